//! Reading an adapter folder into an [`Adapt`]: one function per `peft_type`, over a config whose
//! fields [`Fields::check_all`] has accepted. Every tensor of `adapter_model.safetensors` must be
//! taken (an unexpected one is an error naming it), and adapter tensors holding NaN or infinite
//! values are refused at load, naming the file and the tensor.

use super::peft::{EXTRA, WEIGHTS};
use super::peft_fields::{Fields, HOULSBY, LORA, PREFIX_TUNING, PROMPT_TUNING, P_TUNING};
use super::targets::{peft_default, Targets};
use super::{param, Adapt, Adaptable, Arch, Houlsby, LinearModule, Lora, LoraConfig, ModelShape};
use super::{EncoderKind, EncoderSpec, PrefixKind, PrefixParams, PrefixTuning, SoftPrompt, LSTM_LAYERS};
use crate::error::{some_names, Error, Result};
use crate::io::{read_tensors, HostTensor};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tuna_autograd::ops::linear::WeightLayout;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Tensor};

/// PEFT's default `lora_alpha`.
const DEFAULT_LORA_ALPHA: f64 = 8.0;
/// The prefix of PEFT's LoRA tensor names (`base_model.model.<module>.lora_A.weight`).
const LORA_PREFIX: &str = "base_model.model.";
const LORA_A: &str = ".lora_A.weight";
const LORA_B: &str = ".lora_B.weight";

/// The adaptation in `dir` (config `f`, of type `peft_type`) for `model`.
pub(crate) fn adaptation<B: Kernels<E>, E: Float, M: Adaptable<B, E>>(
    model: &M,
    f: &Fields<'_>,
    peft_type: &str,
    dir: &Path,
) -> Result<Adapt<B, E>> {
    let mut w = Tensors::read(&dir.join(WEIGHTS))?;
    let dev = model.input_embeddings().device().clone();
    let s = model.shape();
    let mut ad = Adapt::<B, E>::default();
    match peft_type {
        PROMPT_TUNING => ad.prompt = Some(prompt(f, &s, &mut w, &dev)?),
        P_TUNING => {
            let mut p = prompt(f, &s, &mut w, &dev)?;
            p.ptuning = Some(ptuning_spec(f, s.hidden)?);
            ad.prompt = Some(p);
        }
        PREFIX_TUNING => ad.prefix = Some(prefix(f, &s, &mut w, &dev)?),
        LORA => {
            let (lora, cfg) = lora(f, s.arch, &model.linears(), &mut w, &dev)?;
            ad.lora = lora;
            ad.lora_config = Some(cfg);
        }
        HOULSBY => ad.houlsby = Some(houlsby(f, &s, &mut w, &dev)?),
        other => return Err(Error::Unsupported { path: f.path.to_path_buf(), what: format!("peft_type {other}") }),
    }
    w.finish()?;
    ad.extra = extra(&dir.join(EXTRA), &dev)?;
    Ok(ad)
}

/// The tensors of one safetensors file, checked finite, and which of them the loader took.
struct Tensors {
    path: PathBuf,
    map: BTreeMap<String, HostTensor>,
    taken: BTreeSet<String>,
}

impl Tensors {
    fn read(path: &Path) -> Result<Self> {
        let map = read_tensors(path)?;
        check_finite(path, &map)?;
        Ok(Tensors { path: path.to_path_buf(), map, taken: BTreeSet::new() })
    }

    /// Tensor `name` with exactly shape `want`.
    fn take(&mut self, name: &str, want: &[usize]) -> Result<Vec<f32>> {
        let (s, v) = self.map.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.into(),
            expected: want.to_vec(),
        })?;
        if s != want {
            return Err(Error::TensorShape {
                path: self.path.clone(),
                name: name.into(),
                expected: want.to_vec(),
                found: s.clone(),
            });
        }
        self.taken.insert(name.to_string());
        Ok(v.clone())
    }

    /// A tensor the loader did not take is an error naming it.
    fn finish(&self) -> Result<()> {
        let left: Vec<&String> = self.map.keys().filter(|k| !self.taken.contains(*k)).collect();
        if left.is_empty() {
            return Ok(());
        }
        Err(Error::Format {
            path: self.path.clone(),
            msg: format!("tensors this adapter does not use: {}", some_names(&left)),
        })
    }
}

/// NaN or infinite values in a tensor are an error naming the file, the tensor and their count.
fn check_finite(path: &Path, tensors: &BTreeMap<String, HostTensor>) -> Result<()> {
    for (name, (_, v)) in tensors {
        let bad = v.iter().filter(|x| !x.is_finite()).count();
        if bad > 0 {
            return Err(Error::Format {
                path: path.to_path_buf(),
                msg: format!("tensor `{name}` holds {bad} non-finite values (NaN or infinite) of {}", v.len()),
            });
        }
    }
    Ok(())
}

/// `tuna_extra.safetensors` (a classification head), when present.
fn extra<B: Kernels<E>, E: Float>(path: &Path, dev: &Arc<B>) -> Result<Vec<(String, Tensor<B, E>)>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let tensors = read_tensors(path)?;
    check_finite(path, &tensors)?;
    tensors.iter().map(|(name, (s, v))| Ok((name.clone(), param(dev, name, s, v)?))).collect()
}

/// `num_transformer_submodules`, when given, is the model's: 1, or 2 for an encoder-decoder
/// (PEFT's value for T5). Returns the model's.
fn one_submodule(f: &Fields<'_>, s: &ModelShape) -> Result<usize> {
    let want = submodules(s);
    match f.count("num_transformer_submodules")? {
        Some(k) if k != want => Err(f.err(format!(
            "`num_transformer_submodules` is {k}: this {} model takes {want} (2 is an encoder-decoder model)",
            s.arch.name()
        ))),
        _ => Ok(want),
    }
}

/// PEFT's `num_transformer_submodules` of a model: 2 for an encoder-decoder (its prompt tables
/// hold a second set of rows for the decoder, which PEFT's forward does not read), else 1.
pub(crate) fn submodules(s: &ModelShape) -> usize {
    if s.arch == Arch::T5 {
        2
    } else {
        1
    }
}

fn prompt<B: Kernels<E>, E: Float>(
    f: &Fields<'_>,
    s: &ModelShape,
    w: &mut Tensors,
    dev: &Arc<B>,
) -> Result<SoftPrompt<B, E>> {
    let n = f.need_count("num_virtual_tokens")?;
    let k = one_submodule(f, s)?;
    f.expect_dim("token_dim", "hidden size", s.hidden)?;
    // The model's dimensions, which a soft prompt does not use: only their form is checked.
    for key in ["num_layers", "num_attention_heads"] {
        f.count(key)?;
    }
    // An encoder-decoder's table has `k * n` rows; PEFT's forward prepends the first `n` to the
    // encoder's input and reads no other.
    let v = w.take("prompt_embeddings", &[k * n, s.hidden])?;
    Ok(SoftPrompt::direct(param(dev, "prompt_embeddings", &[n, s.hidden], &v[..n * s.hidden])?))
}

/// P-tuning's encoder settings, kept to be saved again: the saved `prompt_embeddings` is the
/// encoder's output (PEFT saves no encoder and runs none on load), so the adapter loads as
/// [`prompt`]'s soft prompt. PEFT's defaults where absent: MLP, hidden size = `token_dim`, 2 layers.
fn ptuning_spec(f: &Fields<'_>, token_dim: usize) -> Result<EncoderSpec> {
    let kind = match f.text("encoder_reparameterization_type")? {
        None => EncoderKind::Mlp,
        Some(t) => EncoderKind::from_peft(t).ok_or_else(|| {
            f.err(format!("`encoder_reparameterization_type` {t:?}: expected \"MLP\" or \"LSTM\" (PEFT's encoders)"))
        })?,
    };
    let hidden = f.count("encoder_hidden_size")?.unwrap_or(token_dim);
    let layers = f.count("encoder_num_layers")?.unwrap_or(LSTM_LAYERS);
    Ok(EncoderSpec { kind, hidden, layers })
}

fn prefix<B: Kernels<E>, E: Float>(
    f: &Fields<'_>,
    s: &ModelShape,
    w: &mut Tensors,
    dev: &Arc<B>,
) -> Result<PrefixTuning<B, E>> {
    let n = f.need_count("num_virtual_tokens")?;
    one_submodule(f, s)?;
    let token_dim = s.kv_heads * s.head_dim;
    f.expect_dim("num_layers", "layer count", s.layers)?;
    f.expect_dim("token_dim", "key/value width = kv_heads x head_dim", token_dim)?;
    f.expect_dim("num_attention_heads", "key/value heads", s.kv_heads)?;
    let width = s.layers * 2 * token_dim;
    let v = w.take("prompt_embeddings", &[n, width])?;
    // A projected prefix loads as its table (PEFT does the same: the MLP is not saved).
    let kind = if f.flag("prefix_projection")? == Some(true) { PrefixKind::Prefix } else { PrefixKind::PTuningV2 };
    f.count("encoder_hidden_size")?; // the projection's width: unused by the saved table, its form checked
    Ok(PrefixTuning {
        n,
        layers: s.layers,
        kv_heads: s.kv_heads,
        head_dim: s.head_dim,
        kind,
        params: PrefixParams::Direct(param(dev, "prompt_embeddings", &[n, width], &v)?),
    })
}

fn houlsby<B: Kernels<E>, E: Float>(
    f: &Fields<'_>,
    s: &ModelShape,
    w: &mut Tensors,
    dev: &Arc<B>,
) -> Result<Houlsby<B, E>> {
    let bn = f.need_count("bottleneck_size")?;
    f.expect_dim("num_layers", "adapted block count", s.blocks)?;
    f.expect_dim("token_dim", "hidden size", s.hidden)?;
    for (key, tuna) in [("non_linearity", super::houlsby::NON_LINEARITY), ("placement", super::houlsby::PLACEMENT)] {
        if let Some(v) = f.text(key)?.filter(|&v| v != tuna) {
            return Err(f.err(format!("`{key}` {v:?} is not supported by tuna (its Houlsby adapters: {tuna:?})")));
        }
    }
    let h = Houlsby::<B, E>::new(dev, s.blocks, s.hidden, bn, 0)?;
    for (name, t) in h.params() {
        let v = w.take(&name, t.shape())?;
        // The master too, for a bf16 model (the f32 values exactly; the data their rounding).
        t.load_master(&v.iter().map(|&x| <E::Acc as tuna_kernels::Elem>::from_f32(x)).collect::<Vec<_>>())?;
    }
    Ok(h)
}

/// LoRA's hyperparameters as the config gives them.
struct LoraFields {
    r: usize,
    alpha: f64,
    rslora: bool,
    dropout: f32,
    targets: Targets,
    /// `target_modules` as errors show it (PEFT's default when absent).
    targets_text: String,
    exclude: Option<Targets>,
}

impl LoraFields {
    fn read(f: &Fields<'_>, arch: Arch) -> Result<Self> {
        let r = f.need_count("r")?;
        let alpha = f.number("lora_alpha")?.unwrap_or(DEFAULT_LORA_ALPHA);
        if !(alpha > 0.0 && alpha <= 1e6) {
            return Err(f.err(format!("`lora_alpha` is {alpha}: expected 0 < alpha <= 1e6")));
        }
        let rslora = f.flag("use_rslora")?.unwrap_or(false);
        let dropout = f.number("lora_dropout")?.unwrap_or(0.0);
        if !(0.0..1.0).contains(&dropout) {
            return Err(f.err(format!("`lora_dropout` is {dropout}: expected a probability in [0, 1)")));
        }
        check_init(f)?;
        let (targets, targets_text) = match Targets::read(f, "target_modules")? {
            Some(t) => (t, json_of(f, "target_modules")),
            None => {
                let t = peft_default(arch);
                let text = format!("(absent: PEFT's default for {}, {})", arch.name(), t.json());
                (t, text)
            }
        };
        let exclude = Targets::read(f, "exclude_modules")?;
        Ok(LoraFields { r, alpha, rslora, dropout: dropout as f32, targets, targets_text, exclude })
    }

    /// Whether the config asks for LoRA on module `name`.
    fn targets(&self, name: &str) -> bool {
        self.targets.matches(name) && !self.exclude.as_ref().is_some_and(|x| x.matches(name))
    }

    /// `alpha / r`, or `alpha / sqrt(r)` with rank-stabilized LoRA.
    fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// `init_lora_weights` values whose initialization changes the base weights (by prefix, as PEFT
/// tests them): the adapter then fits only that changed base, and tuna adds it to the original.
const BASE_CHANGING_INITS: [&str; 5] = ["pissa", "olora", "corda", "loftq", "lora_ga"];
/// `init_lora_weights` strings that leave the base weights as they are.
const PLAIN_INITS: [&str; 3] = ["gaussian", "eva", "orthogonal"];

fn check_init(f: &Fields<'_>) -> Result<()> {
    let Some(v) = f.get("init_lora_weights") else { return Ok(()) };
    let why = match v.as_str() {
        _ if v.is_boolean() => return Ok(()),
        Some(s) if PLAIN_INITS.contains(&s) => return Ok(()),
        Some(s) if BASE_CHANGING_INITS.iter().any(|p| s.to_lowercase().starts_with(p)) => {
            "it changes the base weights, so the adapter fits only the changed base; PEFT's save_pretrained(..., \
             path_initial_model_for_weight_conversion=...) converts it to a plain LoRA"
        }
        _ => "an initialization tuna does not know, which may have changed the base weights",
    };
    Err(f.err(format!("`init_lora_weights` {v} is not supported by tuna ({why})")))
}

/// `fan_in_fan_out`, when given, agrees with how module `m` stores its weight (PEFT sets it for
/// GPT-2's Conv1D, `[in, out]`, and clears it for `nn.Linear`, `[out, in]`).
fn check_fan_in_fan_out<B: Kernels<E>, E: Float>(f: &Fields<'_>, m: &LinearModule<B, E>) -> Result<()> {
    let conv1d = m.layout == WeightLayout::InOut;
    match f.flag("fan_in_fan_out")? {
        Some(v) if v != conv1d => {
            let kind = if conv1d { "a Conv1D ([in, out])" } else { "an nn.Linear ([out, in])" };
            Err(f.err(format!(
                "`fan_in_fan_out` {v} contradicts module `{}`, {kind} weight, for which PEFT writes {conv1d}",
                m.name
            )))
        }
        _ => Ok(()),
    }
}

/// The modules whose LoRA tensors the file holds: `(name of lora_A, module)`.
fn lora_modules(w: &Tensors) -> Vec<(String, String)> {
    let modules = w.map.keys().filter_map(|k| Some((k, k.strip_suffix(LORA_A)?)));
    modules.map(|(k, m)| (k.clone(), m.strip_prefix(LORA_PREFIX).unwrap_or(m).to_string())).collect()
}

type LoraMap<B, E> = BTreeMap<String, Lora<B, E>>;

fn lora<B: Kernels<E>, E: Float>(
    f: &Fields<'_>,
    arch: Arch,
    linears: &[LinearModule<B, E>],
    w: &mut Tensors,
    dev: &Arc<B>,
) -> Result<(LoraMap<B, E>, LoraConfig)> {
    let c = LoraFields::read(f, arch)?;
    let r = c.r;
    let mut out = BTreeMap::new();
    for (key, module) in lora_modules(w) {
        let m = linears.iter().find(|m| m.name == module).ok_or_else(|| Error::Format {
            path: w.path.clone(),
            msg: format!("`{key}`: this model has no linear `{module}`"),
        })?;
        if !c.targets(&module) {
            return Err(not_targeted(f, &c, &module, &key));
        }
        check_fan_in_fan_out(f, m)?;
        let (o, i) = super::lora::out_in(&m.weight, m.layout)?;
        let a = w.take(&key, &[r, i])?;
        let b = w.take(&key.replace(LORA_A, LORA_B), &[o, r])?;
        let a = param(dev, &format!("{module}.lora_A"), &[r, i], &a)?;
        let b = param(dev, &format!("{module}.lora_B"), &[o, r], &b)?;
        out.insert(module, Lora::from_parts(a, b, c.scale(), c.dropout, m.weight.clone(), m.layout));
    }
    if out.is_empty() {
        return Err(Error::Format { path: w.path.clone(), msg: format!("no `*{LORA_A}` tensors") });
    }
    if let Some(m) = linears.iter().find(|m| c.targets(&m.name) && !out.contains_key(&m.name)) {
        return Err(f.err(format!(
            "`target_modules` {} names module `{}`, but {WEIGHTS} has no `{LORA_PREFIX}{}{LORA_A}`",
            c.targets_text, m.name, m.name
        )));
    }
    // Rank-stabilized LoRA is kept as the plain alpha of the same scale (alpha' / r = alpha /
    // sqrt(r)), so that the config saved again means the same update.
    let alpha = if c.rslora { c.scale() * r as f64 } else { c.alpha };
    let config = LoraConfig { r, alpha, dropout: c.dropout, targets: c.targets.into_list(out.keys().cloned()) };
    Ok((out, config))
}

/// LoRA tensors for a module the config does not target: the error naming the field that leaves
/// it out.
fn not_targeted(f: &Fields<'_>, c: &LoraFields, module: &str, key: &str) -> Error {
    let (field, text, verb) = if c.targets.matches(module) {
        ("exclude_modules", json_of(f, "exclude_modules"), "excludes")
    } else {
        ("target_modules", c.targets_text.clone(), "does not name")
    };
    f.err(format!("`{field}` {text} {verb} module `{module}`, but {WEIGHTS} holds its `{key}`"))
}

/// Field `key`'s JSON, for errors.
fn json_of(f: &Fields<'_>, key: &str) -> String {
    f.get(key).map(|v| v.to_string()).unwrap_or_else(|| "null".into())
}
