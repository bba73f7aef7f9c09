//! One interface over the architectures: [`AnyModel`] opens a Hugging Face folder or a Llama GGUF
//! file with its tokenizer, installs or loads an adaptation, and computes what training, evaluation
//! and generation need (the causal-LM loss, class scores through verbalizer rows or a BERT head,
//! positions, the context limit) and writes a Hugging Face folder of itself. Code above this crate
//! names no architecture.

use crate::adapt::{full_finetune_predicate, peft, Adapt, Adaptable, LoraConfig, Method, ModelShape, PromptInit};
use crate::bert::Bert;
use crate::checkpointing::Checkpointing;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generate::{generate, Sampling};
use crate::gguf::GgufFile;
use crate::gpt2::Gpt2;
use crate::hf::HfCheckpoint;
use crate::llama::Llama;
use crate::params::Loader;
use crate::positions::positions_from_mask;
use crate::t5::{EncoderState, T5Decoding, T5};
use crate::weights::WeightSource;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tuna_autograd::ops::elem::{mean_pool, slice_cols};
use tuna_autograd::ops::embed::embedding;
use tuna_autograd::ops::linear::{linear, WeightLayout};
pub use tuna_autograd::ops::lowp::BasePrecision;
use tuna_autograd::ops::lowp::{PackedWeight, Q4Format, Q4_BLOCK};
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Ints, Tensor};

/// What [`AnyModel::set_base_precision`] did: the layers packed and the bytes before and after.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BasePacking {
    pub precision: BasePrecision,
    pub layers: usize,
    pub f32_bytes: usize,
    pub packed_bytes: usize,
}

/// Whether `dev` has the low-precision products: one is tried on a 1 x 1 weight before anything
/// is released (CUDA says it has none).
fn check_lowp_device<B: Kernels<E>, E: Float>(dev: &Arc<B>, p: BasePrecision) -> Result<()> {
    let (probe, inp) = match p {
        BasePrecision::Q4 => {
            let block = vec![0u8; Q4Format::Q4_0.block_bytes()];
            (PackedWeight::from_q4("probe", Q4Format::Q4_0, block, 1, Q4_BLOCK)?, Q4_BLOCK)
        }
        _ => (PackedWeight::pack("probe", &[1.0], 1, 1, false, p)?, 1),
    };
    let probe = Arc::new(probe);
    let x = Tensor::constant(dev, &[1, inp], &vec![E::from_f32(1.0); inp])?;
    tuna_autograd::ops::lowp::linear_packed(&x, &probe, None)?;
    Ok(())
}

/// `--base-precision p` on a model whose block weights all train (full fine-tuning).
fn nothing_to_pack(p: BasePrecision) -> Error {
    Error::InvalidArgument(format!(
        "--base-precision {p}: no frozen block weight to hold in {p} (full fine-tuning trains them all; the \
         low-precision base is for the parameter-efficient methods)"
    ))
}

/// `--base-precision q4` on a model `path` whose block weights are not held in Q4_0 / Q4_1.
fn q4_needs_q4_gguf(path: &Path) -> Error {
    Error::InvalidArgument(format!(
        "--base-precision q4 keeps a GGUF file's Q4_0 / Q4_1 weights as they are stored, and {} holds no \
         transformer-block weight in Q4_0 or Q4_1: q4 needs such a .gguf (bf16 and int8 work on any model)",
        path.display()
    ))
}

/// A batch's ids, mask and positions on the device.
type Inputs<B> = (Ints<B, u32>, Ints<B, u8>, Ints<B, u32>);

/// One of the supported architectures, on backend `B` in element type `E`.
pub enum Net<B: Kernels<E>, E: Float> {
    Gpt2(Gpt2<B, E>),
    Llama(Llama<B, E>),
    Bert(Bert<B, E>),
    T5(T5<B, E>),
}

macro_rules! each {
    ($m:expr, $x:ident => $body:expr) => {
        match $m {
            Net::Gpt2($x) => $body,
            Net::Llama($x) => $body,
            Net::Bert($x) => $body,
            Net::T5($x) => $body,
        }
    };
}

/// A loaded model of any supported architecture, with its tokenizer and the base weights that
/// train (full fine-tuning): the one interface the trainer, the CLI and the training-step bench use.
pub struct AnyModel<B: Kernels<E>, E: Float> {
    pub net: Net<B, E>,
    pub tokenizer: tokenizers::Tokenizer,
    /// Whether `encode` adds the tokenizer's special tokens (BERT's `[CLS]`/`[SEP]`; not for GGUF).
    pub add_special: bool,
    /// Base weights that train, by Hugging Face name (empty unless full fine-tuning).
    pub trainable_base: Vec<(String, Tensor<B, E>)>,
    pub source: PathBuf,
    /// How saved adapters name their base (`base_model_name_or_path`): a Hugging Face id when the
    /// model was opened by one; `None`: `source`.
    pub name: Option<String>,
    pub dev: Arc<B>,
}

impl<B: Kernels<E>, E: Float> AnyModel<B, E> {
    /// Load `path` (a Hugging Face folder or a Llama `.gguf`), training the base weights
    /// `method` says (full fine-tuning); the method itself is installed by [`AnyModel::install`].
    pub fn open_for(dev: &Arc<B>, path: &Path, method: &Method) -> Result<Self> {
        Self::open_for_with(dev, path, method, BasePrecision::F32)
    }

    /// [`AnyModel::open_for`] with the frozen block weights held in `base` as they load
    /// ([`AnyModel::open_with`]).
    pub fn open_for_with(dev: &Arc<B>, path: &Path, method: &Method, base: BasePrecision) -> Result<Self> {
        match method {
            Method::Full { patterns } => Self::open_with(dev, path, full_finetune_predicate(patterns), base),
            _ => Self::open_with(dev, path, |_| false, base),
        }
    }

    /// Load `path` (a Hugging Face folder or a Llama `.gguf`) with its tokenizer; the base weights
    /// named as `trainable` says train. No adaptation is installed.
    pub fn open(dev: &Arc<B>, path: &Path, trainable: impl Fn(&str) -> bool + 'static) -> Result<Self> {
        Self::open_with(dev, path, trainable, BasePrecision::F32)
    }

    /// [`AnyModel::open`], each frozen linear weight of the transformer blocks packed in `base`
    /// (bf16 or int8, CPU; see [`AnyModel::set_base_precision`]) as soon as it is loaded, so the
    /// f32 model never exists whole: the peak while loading is the packed model and one f32
    /// tensor's copies (the source's values, the tensor, its host copy for packing).
    ///
    /// `q4` keeps a GGUF's Q4_0 / Q4_1 block weights as their blocks (copied from the file, never
    /// dequantized); block weights the file stores otherwise (F32, F16, Q8_0, ...) load as f32, as
    /// do embeddings, norms and the head. A model with no block weight in Q4 is refused, naming
    /// the file (a Hugging Face folder before anything loads).
    pub fn open_with(
        dev: &Arc<B>,
        path: &Path,
        trainable: impl Fn(&str) -> bool + 'static,
        base: BasePrecision,
    ) -> Result<Self> {
        if path.is_file() {
            if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
                return Err(Error::Format {
                    path: path.to_path_buf(),
                    msg: "a model file must be a .gguf; otherwise give a Hugging Face folder".into(),
                });
            }
            let g = GgufFile::open(path)?;
            let cfg = ModelConfig::Llama(g.llama_config()?);
            Self::from_source_with(dev, &cfg, &g, path, g.build_tokenizer()?, false, trainable, base)
        } else if path.is_dir() {
            let ck = HfCheckpoint::open(path)?;
            let tok = crate::tokenizer::Tokenizer::from_file(path.join("tokenizer.json"))?
                .without_padding_and_truncation()
                .inner()
                .clone();
            Self::from_source_with(dev, &ck.config().clone(), &ck, path, tok, true, trainable, base)
        } else {
            Err(Error::Format {
                path: path.to_path_buf(),
                msg: "no such file or folder (give a Hugging Face folder or a .gguf file; a hub id needs a model \
                      hub, which this machine cannot reach)"
                    .into(),
            })
        }
    }

    /// The model `cfg` describes, its weights from `src` (a checkpoint, or weights made in code),
    /// with `tokenizer` (`add_special`: whether [`AnyModel::encode`] adds its special tokens); the
    /// base weights named as `trainable` says train. `source` is the folder (or `.gguf`) the model
    /// came from: a merged export copies a folder's config and tokenizer files, and writes those a
    /// `.gguf` implies.
    pub fn from_source(
        dev: &Arc<B>,
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        source: &Path,
        tokenizer: tokenizers::Tokenizer,
        add_special: bool,
        trainable: impl Fn(&str) -> bool + 'static,
    ) -> Result<Self> {
        Self::from_source_with(dev, cfg, src, source, tokenizer, add_special, trainable, BasePrecision::F32)
    }

    /// [`AnyModel::from_source`] with the frozen block weights packed in `base` as they load.
    #[allow(clippy::too_many_arguments)]
    pub fn from_source_with(
        dev: &Arc<B>,
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        source: &Path,
        tokenizer: tokenizers::Tokenizer,
        add_special: bool,
        trainable: impl Fn(&str) -> bool + 'static,
        base: BasePrecision,
    ) -> Result<Self> {
        // Only a block weight counts (a file whose embedding alone is Q4 is refused before loading).
        let q4_block = |n: &String| n.contains(".layers.") && src.q4_format(n).is_some();
        if base == BasePrecision::Q4 && !src.names().iter().any(q4_block) {
            return Err(q4_needs_q4_gguf(src.path()));
        }
        if base != BasePrecision::F32 {
            check_lowp_device(dev, base)?;
        }
        let mut l = Loader::with_trainable(src, dev, trainable);
        l.pack = base;
        let net = match cfg {
            ModelConfig::Gpt2(c) => Net::Gpt2(Gpt2::load(c, &mut l)?),
            ModelConfig::Llama(c) => Net::Llama(Llama::load(c, &mut l)?),
            ModelConfig::Bert(c) => Net::Bert(Bert::load(c, &mut l)?),
            ModelConfig::T5(c) => Net::T5(T5::load(c, &mut l)?),
        };
        let trainable_base = l.loaded.into_iter().filter(|(_, t)| t.requires_grad()).collect();
        let model = AnyModel {
            net,
            tokenizer,
            add_special,
            trainable_base,
            source: source.to_path_buf(),
            name: None,
            dev: dev.clone(),
        };
        if base != BasePrecision::F32 && model.base_precision() != base {
            // q4 with full fine-tuning trains every block weight: the general refusal says so.
            let none_trains = model.trainable_base.is_empty();
            return Err(if base == BasePrecision::Q4 && none_trains {
                q4_needs_q4_gguf(src.path())
            } else {
                nothing_to_pack(base)
            });
        }
        Ok(model)
    }

    /// Install `method`'s new parameters (seeded). A TEXT or CLASS_LABELS prompt or prefix init
    /// given with no tokens takes them from `init_text`.
    pub fn install(&mut self, method: &Method, seed: u64, init_text: Option<&str>) -> Result<()> {
        let mut method = self.resolve(method)?;
        if let (Net::T5(t), Method::Prefix { .. } | Method::PTuningV2 { .. }) = (&self.net, &method) {
            t.check_prefix()?;
        }
        if let Some(PromptInit::Text(ids) | PromptInit::ClassLabels(ids)) = method.init_mut() {
            if ids.is_empty() {
                let text = init_text.ok_or_else(|| {
                    Error::InvalidArgument(
                        "the prompt or prefix init needs a text (--prompt-init-text, --prefix-init-text)".into(),
                    )
                })?;
                *ids = self.encode_plain(text)?;
            }
        }
        each!(&mut self.net, n => method.apply(n, seed))?;
        Ok(())
    }

    /// `f` on the model with its adaptation set aside (prompt, prefix, adapters and LoRA; a task
    /// head in `adapt.extra` stays): the untrained model, for a method's baseline. Restored after.
    pub fn without_adaptation<T>(&mut self, f: impl FnOnce(&Self) -> T) -> T {
        let a = self.adapt_mut();
        let saved = (a.prompt.take(), a.prefix.take(), a.houlsby.take(), std::mem::take(&mut a.lora));
        let out = f(self);
        let a = self.adapt_mut();
        (a.prompt, a.prefix, a.houlsby, a.lora) = saved;
        out
    }

    /// Install the adapter saved in `dir` (PEFT's format or tuna's), replacing any adaptation.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        Ok(each!(&mut self.net, n => crate::adapt::peft::load(n, dir))?)
    }

    /// Save the adaptation into `dir` as a PEFT folder (`base_name` names the base model in it).
    pub fn save_adapter(&self, dir: &Path, base_name: &str) -> Result<()> {
        Ok(each!(&self.net, n => crate::adapt::peft::save(n, dir, base_name))?)
    }

    /// `method` with LoRA's default targets filled in (the attention query and value projections,
    /// PEFT's defaults) when none were given.
    fn resolve(&self, method: &Method) -> Result<Method> {
        Ok(match method {
            Method::Lora(c) if c.targets.is_empty() => {
                let t = crate::adapt::default_lora_targets(self.shape().arch);
                Method::Lora(LoraConfig { targets: t.iter().map(|s| s.to_string()).collect(), ..c.clone() })
            }
            m => m.clone(),
        })
    }

    /// Checkpoint the transformer blocks `policy` names in every recorded forward from now on
    /// (see [`Checkpointing`]): the same gradients, less activation memory, a recomputed forward.
    pub fn set_checkpointing(&mut self, policy: Checkpointing) {
        match &mut self.net {
            Net::Gpt2(n) => n.checkpoint = policy,
            Net::Llama(n) => n.checkpoint = policy,
            Net::Bert(n) => n.checkpoint = policy,
            Net::T5(n) => n.checkpoint = policy,
        }
    }

    /// Holds every frozen linear weight of the transformer blocks in `p` from now on (bf16, or
    /// int8 with a scale per 64 inputs of an output channel; `--base-precision`), releasing their f32 storage: the products run
    /// on the packed weights (CPU only). Embeddings, norms, heads and everything that trains stay
    /// f32. LoRA needs only the base weight's shape, so the method may be installed before or after;
    /// [`AnyModel::open_with`] packs as the weights load instead (no f32 model in memory at all).
    /// `F32` changes nothing. Refused on a device without the low-precision products, on a base
    /// already packed, and when no block weight is frozen (full fine-tuning trains them all).
    pub fn set_base_precision(&mut self, p: BasePrecision) -> Result<BasePacking> {
        let mut done = BasePacking { precision: p, ..Default::default() };
        if p == BasePrecision::F32 {
            return Ok(done);
        }
        if p == BasePrecision::Q4 {
            return Err(Error::InvalidArgument(
                "--base-precision q4 keeps a GGUF's Q4_0 / Q4_1 blocks as the model loads (AnyModel::open_with); \
                 f32 weights already loaded are not made q4 (bf16 and int8 pack them)"
                    .into(),
            ));
        }
        check_lowp_device(&self.dev, p)?;
        let linears = each!(&self.net, n => Adaptable::linears(n));
        if let Some(held) = linears.iter().find_map(|l| l.packed()) {
            return Err(Error::InvalidArgument(format!(
                "--base-precision {p}: the base is already held in {} (load the model anew for another precision)",
                held.precision()
            )));
        }
        for l in linears.iter().filter(|l| l.is_packable()) {
            let (before, after) = l.pack(p)?;
            done.layers += 1;
            done.f32_bytes += before;
            done.packed_bytes += after;
        }
        if done.layers == 0 {
            return Err(nothing_to_pack(p));
        }
        Ok(done)
    }

    /// f32 bytes of the frozen, not yet packed linear weights of the blocks: what
    /// `--base-precision` would hold smaller (0 when packed already, or when they train).
    pub fn packable_bytes(&self) -> usize {
        let linears = each!(&self.net, n => Adaptable::linears(n));
        linears.iter().filter(|l| l.is_packable()).map(|l| l.weight.bytes()).sum()
    }

    /// f32 bytes and Q4 bytes of the frozen, not yet packed block linear weights that the model's
    /// `.gguf` stores as Q4_0 / Q4_1: what `--base-precision q4` would hold as the file's blocks
    /// instead. `(0, 0)` for a Hugging Face folder, a packed base, or a file that cannot be read.
    pub fn q4_convertible_bytes(&self) -> (usize, usize) {
        if !self.source.is_file() {
            return (0, 0);
        }
        let Ok(g) = GgufFile::open(&self.source) else { return (0, 0) };
        let linears = each!(&self.net, n => Adaptable::linears(n));
        let mut sum = (0, 0);
        for l in linears.iter().filter(|l| l.is_packable()) {
            if let Some(fmt) = g.q4_format(&format!("{}.weight", l.name)) {
                sum.0 += l.weight.bytes();
                sum.1 += l.weight.numel() / Q4_BLOCK * fmt.block_bytes();
            }
        }
        sum
    }

    /// The packed weight behind base weight `name` (`<module>.weight`), when it is held packed.
    pub fn packed_weight(&self, name: &str) -> Option<Arc<PackedWeight>> {
        let linears = each!(&self.net, n => Adaptable::linears(n));
        linears.iter().find(|l| name.strip_suffix(".weight") == Some(l.name.as_str())).and_then(|l| l.packed())
    }

    /// The precision the blocks' frozen weights are held in (`F32` unless packed).
    pub fn base_precision(&self) -> BasePrecision {
        let linears = each!(&self.net, n => Adaptable::linears(n));
        linears.iter().find_map(|l| l.packed().map(|p| p.precision())).unwrap_or_default()
    }

    /// The checkpointing policy in place.
    pub fn checkpointing(&self) -> Checkpointing {
        each!(&self.net, n => n.checkpoint)
    }

    pub fn shape(&self) -> ModelShape {
        each!(&self.net, n => n.shape())
    }
    pub fn adapt(&self) -> &Adapt<B, E> {
        each!(&self.net, n => n.adapt())
    }
    pub fn adapt_mut(&mut self) -> &mut Adapt<B, E> {
        each!(&mut self.net, n => n.adapt_mut())
    }
    pub fn named_weights(&self) -> Vec<(String, Tensor<B, E>)> {
        each!(&self.net, n => n.named_weights())
    }
    /// Whether the model generates text and scores classes by verbalizer tokens (GPT-2, Llama,
    /// T5), rather than by a head over pooled states (BERT).
    pub fn is_decoder(&self) -> bool {
        !matches!(self.net, Net::Bert(_))
    }

    /// Whether the model is an encoder-decoder (T5): a completion's prompt goes to the encoder and
    /// its target to the decoder.
    pub fn is_encoder_decoder(&self) -> bool {
        matches!(self.net, Net::T5(_))
    }

    /// The positions the model has (GPT-2's `n_positions`, `max_position_embeddings` otherwise:
    /// learned position tables end there, and Llama's RoPE was trained up to there).
    pub fn max_positions(&self) -> usize {
        match &self.net {
            Net::Gpt2(g) => g.cfg.n_positions,
            Net::Llama(l) => l.cfg.max_position_embeddings,
            Net::Bert(b) => b.cfg.max_position_embeddings,
            Net::T5(t) => t.cfg.n_positions,
        }
    }

    /// Positions the installed adaptation takes before the content (PEFT's rule: with `n` virtual
    /// tokens of a soft prompt or prefix, the content starts at position `n`).
    pub fn virtual_tokens(&self) -> usize {
        self.adapt().prompt_len() + self.adapt().prefix_len()
    }

    /// Every tensor the optimizer updates, by checkpoint name: trained base weights, then the
    /// adaptation's tensors (including a classification head in `adapt.extra`).
    pub fn trainable(&self) -> Vec<(String, Tensor<B, E>)> {
        let mut v = self.trainable_base.clone();
        v.extend(self.adapt().params());
        v
    }

    /// Parameters of the base model (each tensor once).
    pub fn base_param_count(&self) -> usize {
        self.named_weights().iter().map(|(_, t)| t.numel()).sum()
    }

    /// Token ids of `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let e = self.tokenizer.encode(text, self.add_special).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(e.get_ids().to_vec())
    }

    /// The ids [`AnyModel::encode`] gives `text`, of which the caller keeps the first `keep` (or with
    /// `from_end` the last `keep`), without tokenizing all of a long text. A window of about 16
    /// bytes per kept token is tokenized, cut at a whitespace, and doubled until it yields `keep`
    /// tokens and a margin. Tokenizers split words at whitespace, so the kept tokens are those of
    /// the whole text. A window never grows past [`MAX_WINDOW`] bytes: a text with no whitespace
    /// in that span, or whose tokens average more than that over `keep`, is cut there (at a
    /// character), which can change the tokens at the cut: only a text of that size is read.
    pub fn encode_window(&self, text: &str, keep: usize, from_end: bool) -> Result<Vec<u32>> {
        const MARGIN: usize = 16;
        let mut budget = (keep + MARGIN) * 16;
        while budget < text.len() {
            let last = budget >= MAX_WINDOW;
            let cut = if from_end { tail(text, budget) } else { head(text, budget) };
            match cut {
                Some(w) => {
                    let ids = self.encode(w)?;
                    if ids.len() >= keep + MARGIN || last {
                        return Ok(ids);
                    }
                }
                None if last => {
                    let w = if from_end { tail_chars(text, budget) } else { head_chars(text, budget) };
                    return self.encode(w);
                }
                None => {}
            }
            budget *= 2;
        }
        self.encode(text)
    }

    /// Token ids of `text` without special tokens (verbalizer words, prompt-init text).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let e = self.tokenizer.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(e.get_ids().to_vec())
    }

    /// The id padding uses (masked out everywhere; the tokenizer's pad token where it has one).
    pub fn pad_id(&self) -> u32 {
        ["[PAD]", "<pad>", "<|endoftext|>", "</s>"].iter().find_map(|t| self.tokenizer.token_to_id(t)).unwrap_or(0)
    }

    /// Hugging Face's causal LM loss of `ids` (`[batch, seq]`, left-padded under `mask`) against
    /// `labels` (unshifted, -100 ignored), positions from the mask.
    ///
    /// For T5 each row is split: its unlabeled real tokens (the prompt) are the encoder's input,
    /// its labeled tokens the decoder's targets (Hugging Face's seq2seq loss over them).
    pub fn lm_loss(&self, ids: &[u32], mask: &[u8], labels: &[i32], batch: usize) -> Result<Tensor<B, E>> {
        if let Net::T5(t5) = &self.net {
            let (enc_ids, enc_mask, targets, batch) = split_seq2seq(ids, mask, labels, batch)?;
            let s = enc_ids.len() / batch;
            let t = Ints::new(&self.dev, &[batch, s], &enc_ids)?;
            let m = Ints::new(&self.dev, &[batch, s], &enc_mask)?;
            return t5.loss(&t, &m, &targets);
        }
        let (t, m, pos) = self.inputs(ids, mask, batch)?;
        Ok(match &self.net {
            Net::Gpt2(g) => g.loss_masked(&t, &pos, Some(&m), labels)?,
            Net::Llama(l) => l.loss_masked(&t, &pos, Some(&m), labels)?,
            Net::Bert(_) | Net::T5(_) => {
                return Err(Error::InvalidArgument(
                    "the lm and completion tasks need a decoder (GPT-2, Llama, T5), not BERT".into(),
                ))
            }
        })
    }

    /// Class scores `[batch, classes]`: for decoders the head's logits of the verbalizer tokens at
    /// the last position (rows are left-padded); for BERT `head` (`classifier.weight` `[C, hidden]`
    /// and `classifier.bias`) over the mask-weighted mean of the last hidden states.
    pub fn class_scores(&self, ids: &[u32], mask: &[u8], batch: usize, verbalizer: &[u32]) -> Result<Tensor<B, E>> {
        let (t, m, pos) = self.inputs(ids, mask, batch)?;
        let last = |h: Tensor<B, E>| -> Result<Tensor<B, E>> {
            let (s, hid) = (h.shape()[1], h.shape()[2]);
            Ok(slice_cols(&reshape(&h, &[batch, s * hid])?, (s - 1) * hid, hid)?)
        };
        match &self.net {
            Net::Gpt2(g) => {
                let (h, _) = g.hidden_states(&t, &pos, Some(&m), None)?;
                self.verbalizer_scores(&last(h)?, verbalizer)
            }
            Net::Llama(l) => {
                let (h, _) = l.hidden_states(&t, &pos, Some(&m), None)?;
                self.verbalizer_scores(&last(h)?, verbalizer)
            }
            Net::T5(t5) => {
                // The decoder's first step (from the start token) over the encoded text.
                let (out, mask) = t5.encode(&t, &m)?;
                let enc = EncoderState { out, mask, cross_kv: None };
                let start = Ints::new(&self.dev, &[batch, 1], &vec![t5.cfg.decoder_start(); batch])?;
                let h = t5.decode(&start, &enc, None)?;
                let h = t5.head_input(&reshape(&h, &[batch, t5.cfg.d_model])?)?;
                self.verbalizer_scores(&h, verbalizer)
            }
            Net::Bert(b) => {
                let (h, m) = b.encode(&t, &m)?;
                let pooled = mean_pool(&h, &m)?;
                let find = |n: &str| b.adapt.extra.iter().find(|(k, _)| k == n).map(|(_, t)| t.clone());
                let (Some(w), Some(bias)) = (find("classifier.weight"), find("classifier.bias")) else {
                    return Err(Error::InvalidArgument(
                        "BERT classification needs its head (classifier.weight/bias, in tuna_extra.safetensors beside the \
                         adapter or the model)"
                            .into(),
                    ));
                };
                Ok(linear(&pooled, &w, WeightLayout::OutIn, Some(&bias))?)
            }
        }
    }

    /// A decoder's logits of the `verbalizer` tokens from last-position hidden states `h`
    /// (`[batch, hidden]` -> `[batch, verbalizer.len()]`): the head's rows of those tokens only.
    pub fn verbalizer_scores(&self, h: &Tensor<B, E>, verbalizer: &[u32]) -> Result<Tensor<B, E>> {
        let table = match &self.net {
            Net::Gpt2(g) => &g.wte,
            Net::Llama(l) => &l.lm_head,
            Net::T5(t) => &t.lm_head,
            Net::Bert(_) => {
                return Err(Error::InvalidArgument("verbalizer scores are a decoder's; BERT scores by its head".into()))
            }
        };
        let ids = Ints::new(&self.dev, &[1, verbalizer.len()], verbalizer)?;
        let rows = reshape(&embedding(table, &ids, None)?, &[verbalizer.len(), table.shape()[1]])?;
        Ok(linear(h, &rows, WeightLayout::OutIn, None)?)
    }

    /// BERT's mask-weighted mean of the last hidden states, `[batch, hidden]` (what its
    /// classification head reads); decoders have none (an error).
    pub fn mean_pooled(&self, ids: &[u32], mask: &[u8], batch: usize) -> Result<Tensor<B, E>> {
        let (t, m, _) = self.inputs(ids, mask, batch)?;
        match &self.net {
            Net::Bert(b) => {
                let (h, m) = b.encode(&t, &m)?;
                Ok(mean_pool(&h, &m)?)
            }
            _ => Err(Error::InvalidArgument("mean-pooled states are BERT's; decoders score by their head".into())),
        }
    }

    /// Add a trainable classification head for BERT (`[classes, hidden]`, small seeded init).
    pub fn add_head(&mut self, classes: usize, seed: u64) -> Result<()> {
        let hidden = self.shape().hidden;
        let mut rng = tuna_kernels::rng::SplitMix64::new(seed ^ 0x4ead);
        let bound = 1.0 / (hidden as f64).sqrt();
        let w: Vec<f32> = (0..classes * hidden).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
        let w = crate::adapt::param(&self.dev, "classifier.weight", &[classes, hidden], &w)?;
        let b = crate::adapt::param(&self.dev, "classifier.bias", &[classes], &vec![0.0; classes])?;
        let extra = &mut self.adapt_mut().extra;
        extra.retain(|(n, _)| !n.starts_with("classifier."));
        extra.push(("classifier.weight".into(), w));
        extra.push(("classifier.bias".into(), b));
        Ok(())
    }

    pub(crate) fn inputs(&self, ids: &[u32], mask: &[u8], batch: usize) -> Result<Inputs<B>> {
        let seq = ids.len() / batch.max(1);
        let t = Ints::new(&self.dev, &[batch, seq], ids)?;
        let m = Ints::new(&self.dev, &[batch, seq], mask)?;
        let pos = match self.net {
            // BERT takes positions 0..seq itself (right padding).
            Net::Bert(_) => crate::positions::positions(batch, seq, 0),
            _ => positions_from_mask(mask, batch, seq),
        };
        Ok((t, m, Ints::new(&self.dev, &[batch, seq], &pos)?))
    }

    /// `model` (a Hugging Face folder or a `.gguf`) with the adapter in `adapter` (a PEFT folder or
    /// tuna's) installed, nothing trainable. Without an adapter, a fully fine-tuned model's task
    /// head (`tuna_extra.safetensors` beside it) is installed.
    pub fn open_adapted(dev: &Arc<B>, model: &Path, adapter: Option<&Path>) -> Result<Self> {
        Self::open_adapted_with(dev, model, adapter, BasePrecision::F32)
    }

    /// [`AnyModel::open_adapted`] with the frozen block weights packed in `base` as they load.
    pub fn open_adapted_with(dev: &Arc<B>, model: &Path, adapter: Option<&Path>, base: BasePrecision) -> Result<Self> {
        let mut m = Self::open_with(dev, model, |_| false, base)?;
        let head = model.join(peft::EXTRA);
        if adapter.is_none() && head.exists() {
            for (name, (s, v)) in crate::io::read_tensors(&head)? {
                let v: Vec<E> = v.into_iter().map(E::from_f32).collect();
                let t = Tensor::constant(&m.dev, &s, &v)?;
                m.adapt_mut().extra.push((name, t));
            }
        }
        if let Some(a) = adapter {
            // A tuna run's folder holds its adapter one level down.
            if !a.join(peft::CONFIG).exists() && a.join("adapter").join(peft::CONFIG).exists() {
                return Err(Error::Format {
                    path: a.to_path_buf(),
                    msg: format!(
                        "no {} here; a tuna run keeps its adapter in {}",
                        peft::CONFIG,
                        a.join("adapter").display()
                    ),
                });
            }
            m.load_adapter(a)?;
        }
        Ok(m)
    }

    /// Write a Hugging Face folder of the model as it is now into `dir` (created if needed): every
    /// base weight under its name in `model.safetensors` with LoRA merged in, a task head beside it
    /// (`tuna_extra.safetensors`), and the source's config and tokenizer (for a GGUF source, the
    /// Hugging Face config and tokenizer it implies). Prompt, prefix and Houlsby adaptations do not
    /// merge into base weights: they are an error.
    pub fn save_merged(&self, dir: &Path) -> Result<()> {
        let ad = self.adapt();
        if ad.prompt.is_some() || ad.prefix.is_some() || ad.houlsby.is_some() {
            return Err(Error::InvalidArgument(
                "only LoRA merges into the base weights; prompt, prefix and adapter methods stay an adapter folder"
                    .into(),
            ));
        }
        // A packed base holds no f32 weights to merge into (and writing it would widen it):
        // merge from a model opened in f32 (`tuna export --merged` does).
        let p = self.base_precision();
        if p != BasePrecision::F32 {
            return Err(Error::InvalidArgument(format!(
                "the base weights are held packed ({p}): open the model with an f32 base to merge LoRA into them"
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), source: e })?;
        // A bf16 model's trainable weights by their f32 masters.
        let host = |t: &Tensor<B, E>| -> Result<crate::io::HostTensor> {
            Ok((t.shape().to_vec(), t.master_to_vec()?.into_iter().map(tuna_kernels::Elem::to_f32).collect()))
        };
        for l in ad.lora.values() {
            l.merge()?;
        }
        // Streamed one tensor at a time: the model is never copied to the host whole.
        let named = self.named_weights();
        let shapes: Vec<(String, Vec<usize>)> = named.iter().map(|(n, t)| (n.clone(), t.shape().to_vec())).collect();
        let written = crate::io::write_atomic_with(&dir.join("model.safetensors"), |w| {
            crate::io::write_safetensors_f32(w, &shapes, |i| Ok(host(&named[i].1)?.1))
        });
        drop(named);
        for l in ad.lora.values() {
            l.unmerge()?;
        }
        written?;
        if !ad.extra.is_empty() {
            let e = ad.extra.iter().map(|(n, t)| Ok((n.clone(), host(t)?))).collect::<Result<Vec<_>>>()?;
            crate::io::write_atomic(&dir.join(peft::EXTRA), &crate::io::safetensors_bytes(&e)?)?;
        }
        if let (false, Net::Llama(l)) = (self.source.is_dir(), &self.net) {
            // A GGUF source: the Hugging Face config and tokenizer it implies.
            let c = &l.cfg;
            let cfg = serde_json::json!({
                "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
                "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
                "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": c.kv_heads(), "head_dim": c.head_dim(), "rms_norm_eps": c.rms_norm_eps,
                "rope_theta": c.rope_theta, "tie_word_embeddings": l.lm_head.id() == l.embed_tokens.id(),
                "max_position_embeddings": c.max_position_embeddings, "torch_dtype": "float32",
            });
            crate::io::write_atomic(&dir.join("config.json"), crate::io::pretty_sorted(&cfg).as_bytes())?;
            let tok = self.tokenizer.to_string(true).map_err(|e| Error::Tokenizer(e.to_string()))?;
            crate::io::write_atomic(&dir.join("tokenizer.json"), tok.as_bytes())?;
        } else {
            for f in HF_FILES {
                let src = self.source.join(f);
                if src.exists() {
                    let bytes = std::fs::read(&src).map_err(|e| Error::Io { path: src.clone(), source: e })?;
                    crate::io::write_atomic(&dir.join(f), &bytes)?;
                }
            }
        }
        Ok(())
    }

    /// The token generation stops after: ChatML's end of turn, `</s>` or GPT-2's end of text.
    pub fn eos_id(&self) -> Option<u32> {
        ["<|im_end|>", "</s>", "<|endoftext|>"].iter().find_map(|t| self.tokenizer.token_to_id(t))
    }

    /// Up to `max_new_tokens` tokens after `prompt` (see [`crate::generate::generate`]), through the
    /// installed adaptation. Refused up front when the prompt, the virtual tokens and the new tokens
    /// do not fit the model's positions (the last new token is never fed back, so it may take the
    /// position after the last), and for BERT, which does not generate.
    pub fn generate(&self, prompt: &[u32], max_new_tokens: usize, sampling: &Sampling) -> Result<Vec<u32>> {
        let (virt, limit) = (self.virtual_tokens(), self.max_positions());
        let not_a_decoder =
            || Error::InvalidArgument("generation needs a decoder (Llama family, GPT-2), not BERT".into());
        if !self.is_decoder() {
            return Err(not_a_decoder());
        }
        if let Net::T5(_) = &self.net {
            // The prompt (after any soft prompt) is the encoder's; the new tokens (after any
            // prefix, from the start token) the decoder's: each side has the limit.
            let (enc_virt, dec_virt) = (self.adapt().prompt_len(), self.adapt().prefix_len());
            let bad = |msg: String| Err(Error::Format { path: self.source.clone(), msg });
            if prompt.is_empty() {
                return Err(Error::InvalidArgument("generate: T5 needs a prompt of at least one token".into()));
            }
            if enc_virt.saturating_add(prompt.len()) > limit {
                return bad(format!(
                    "a {}-token prompt{} exceeds the encoder's {limit} positions: shorten it",
                    prompt.len(),
                    if enc_virt > 0 { format!(" and {enc_virt} virtual tokens") } else { String::new() }
                ));
            }
            if dec_virt.saturating_add(max_new_tokens) > limit {
                return bad(format!(
                    "{max_new_tokens} new tokens{} exceed the decoder's {limit} positions: use --max-new-tokens {} or less",
                    if dec_virt > 0 { format!(" after {dec_virt} prefix positions") } else { String::new() },
                    limit - dec_virt.min(limit)
                ));
            }
        } else if virt.saturating_add(prompt.len()).saturating_add(max_new_tokens) > limit.saturating_add(1) {
            let room = limit.saturating_add(1).saturating_sub(virt.saturating_add(prompt.len()));
            let fix = if room == 0 {
                "the prompt alone fills the context: shorten it".to_string()
            } else {
                format!("use --max-new-tokens {room} or less")
            };
            let virt = if virt > 0 { format!(" and {virt} virtual tokens") } else { String::new() };
            return Err(Error::Format {
                path: self.source.clone(),
                msg: format!(
                    "a {}-token prompt{virt} plus {max_new_tokens} new tokens exceeds the model's {limit} positions: {fix}",
                    prompt.len()
                ),
            });
        }
        let eos = self.eos_id();
        match &self.net {
            Net::Llama(l) => generate(l, prompt, max_new_tokens, sampling, eos),
            Net::Gpt2(g) => generate(g, prompt, max_new_tokens, sampling, eos),
            Net::T5(t) => {
                // The encoder runs once; the decoder starts from its start token with a KV cache.
                let enc = tuna_autograd::no_grad(|| t.encoder_state(prompt))?;
                let dec = T5Decoding { model: t, enc };
                let out = generate(&dec, &[t.cfg.decoder_start()], max_new_tokens, sampling, eos)?;
                Ok(out)
            }
            Net::Bert(_) => Err(not_a_decoder()),
        }
    }
}

/// An encoder-decoder batch: the encoder's ids and mask, the decoder's targets, the row count.
type Seq2SeqRows = (Vec<u32>, Vec<u8>, Vec<i32>, usize);

/// Rows of a decoder batch (`[batch, seq]`, left-padded, labels unshifted with -100 at the prompt)
/// split for an encoder-decoder: each row's unlabeled real tokens as the encoder input
/// (left-padded to the longest), its labeled tokens as the decoder targets (right-padded with
/// -100). Returns `(enc_ids, enc_mask, targets, batch)`; a row without a prompt or without a
/// target is an error.
fn split_seq2seq(ids: &[u32], mask: &[u8], labels: &[i32], batch: usize) -> Result<Seq2SeqRows> {
    let seq = ids.len() / batch.max(1);
    if batch == 0 || ids.len() != batch * seq || mask.len() != ids.len() || labels.len() != ids.len() {
        return Err(Error::InvalidArgument(format!(
            "seq2seq batch: {} ids, {} mask entries and {} labels for {batch} rows",
            ids.len(),
            mask.len(),
            labels.len()
        )));
    }
    let mut rows = Vec::with_capacity(batch);
    for r in 0..batch {
        let span = r * seq..(r + 1) * seq;
        let (ids, mask, labels) = (&ids[span.clone()], &mask[span.clone()], &labels[span]);
        let real = || (0..seq).filter(|&c| mask[c] != 0);
        let enc: Vec<u32> = real().filter(|&c| labels[c] == crate::IGNORE_INDEX).map(|c| ids[c]).collect();
        let tgt: Vec<i32> = real().filter(|&c| labels[c] != crate::IGNORE_INDEX).map(|c| labels[c]).collect();
        if enc.is_empty() || tgt.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "T5 row {r}: {} (an encoder-decoder trains on completions: a prompt for the encoder and a target for \
                 the decoder; the lm task has no prompt)",
                if enc.is_empty() { "no prompt tokens" } else { "no target tokens" }
            )));
        }
        rows.push((enc, tgt));
    }
    let s = rows.iter().map(|(e, _)| e.len()).max().unwrap_or(1);
    let t = rows.iter().map(|(_, t)| t.len()).max().unwrap_or(1);
    let (mut e_ids, mut e_mask, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    for (enc, tgt) in rows {
        e_ids.extend(std::iter::repeat_n(0, s - enc.len()));
        e_mask.extend(std::iter::repeat_n(0u8, s - enc.len()));
        e_mask.extend(std::iter::repeat_n(1u8, enc.len()));
        e_ids.extend(enc);
        targets.extend_from_slice(&tgt);
        targets.extend(std::iter::repeat_n(crate::IGNORE_INDEX, t - tgt.len()));
    }
    Ok((e_ids, e_mask, targets, batch))
}

/// The Hugging Face files a model folder carries beside its weights, copied by
/// [`AnyModel::save_merged`].
pub const HF_FILES: [&str; 4] = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"];

/// The most bytes of one example [`AnyModel::encode_window`] tokenizes.
pub const MAX_WINDOW: usize = 1 << 20;

/// The first `bytes` bytes of `text` (fewer, to end at a character).
fn head_chars(text: &str, bytes: usize) -> &str {
    let mut end = bytes.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The last `bytes` bytes of `text` (fewer, to start at a character).
fn tail_chars(text: &str, bytes: usize) -> &str {
    let mut start = text.len().saturating_sub(bytes);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// The start of `text` up to its last whitespace within the first `bytes` bytes (exclusive);
/// `None` when there is none.
fn head(text: &str, bytes: usize) -> Option<&str> {
    let w = head_chars(text, bytes);
    w.char_indices().rev().find(|(_, c)| c.is_whitespace()).map(|(i, _)| &text[..i]).filter(|h| !h.is_empty())
}

/// The end of `text` from its first whitespace within the last `bytes` bytes (inclusive); `None`
/// when there is none.
fn tail(text: &str, bytes: usize) -> Option<&str> {
    let w = tail_chars(text, bytes);
    w.char_indices().find(|(_, c)| c.is_whitespace()).map(|(i, _)| &w[i..])
}

#[cfg(test)]
mod tests {
    use super::{head, head_chars, tail, tail_chars};

    #[test]
    fn windows_cut_at_whitespace_and_character_boundaries() {
        assert_eq!(head("one two three", 9), Some("one two"));
        assert_eq!(tail("one two three", 9), Some(" three"));
        assert_eq!(head("abcdef", 3), None);
        assert_eq!(tail("abcdef", 3), None);
        assert_eq!(head_chars("abcdef", 3), "abc");
        assert_eq!(tail_chars("abcdef", 3), "def");
        // Never inside a multi-byte character.
        assert_eq!(head_chars("ééé", 3), "é");
        assert_eq!(tail_chars("ééé", 3), "é");
    }
}
