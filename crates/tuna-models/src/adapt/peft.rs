//! Adapter checkpoints in Hugging Face PEFT's format (`adapter_config.json` +
//! `adapter_model.safetensors`; facts in `tests/fixtures/peft/SPEC.md`, checked against peft
//! 0.21.2), plus tuna's own Houlsby format (see [`super::Houlsby`]).
//!
//! One method per folder, as in PEFT. Beside PEFT's two files tuna writes `tuna_base.json` (the
//! base model's dimensions, so that loading onto another model is a clear error even where
//! PEFT's config does not say, e.g. the vocabulary) and, when the adaptation has extra tensors
//! (a classification head), `tuna_extra.safetensors`. PEFT ignores both.

use super::peft_fields::{Fields, HOULSBY, LORA, PREFIX_TUNING, PROMPT_TUNING, P_TUNING};
use super::{Adapt, Adaptable, LoraConfig, ModelShape, PrefixParams};
use crate::error::{Error, Result};
use serde_json::{json, Map, Value};
use std::path::Path;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Tensor};

pub use crate::io::HostTensor;
use crate::io::{pretty_sorted, safetensors_bytes, write_atomic};

pub const CONFIG: &str = "adapter_config.json";
pub const WEIGHTS: &str = "adapter_model.safetensors";
pub const BASE: &str = "tuna_base.json";
/// How an adapter refused for another model (architecture or dimensions) begins its message, so
/// that a caller can tell it from other errors (`tuna eval` then leaves out its precision hint).
pub const OTHER_MODEL: &str = "adapter made for a ";
pub const EXTRA: &str = "tuna_extra.safetensors";

/// Write `model`'s adaptation into `dir` (created if needed; each file replaced atomically).
/// `base_name` goes to `base_model_name_or_path`.
pub fn save<B: Kernels<E>, E: Float, M: Adaptable<B, E>>(model: &M, dir: &Path, base_name: &str) -> Result<()> {
    let (config, tensors) = to_peft(model.adapt(), &model.shape(), base_name)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), source: e })?;
    write_atomic(&dir.join(CONFIG), pretty_sorted(&config).as_bytes())?;
    write_atomic(&dir.join(WEIGHTS), &safetensors_bytes(&tensors)?)?;
    write_atomic(&dir.join(BASE), pretty_sorted(&base_json(&model.shape())).as_bytes())?;
    let extra = &model.adapt().extra;
    let extra_path = dir.join(EXTRA);
    if extra.is_empty() {
        let _ = std::fs::remove_file(&extra_path);
    } else {
        let t = extra.iter().map(|(n, t)| Ok((n.clone(), host(t)?))).collect::<Result<Vec<_>>>()?;
        write_atomic(&extra_path, &safetensors_bytes(&t)?)?;
    }
    Ok(())
}

/// Read the adapter in `dir` and install it on `model` (replacing any adaptation it had). Every
/// field of `adapter_config.json` is honored or refused by name (see `peft_fields`: e.g.
/// `rank_pattern`, `use_dora` or an unknown field with a value are errors); errors name the file
/// and what disagrees with the model (hidden size, layers, heads, vocabulary, module names,
/// `target_modules`, tensor shapes), a tensor the adapter does not use, or a tensor holding NaN
/// or infinite values.
pub fn load<B: Kernels<E>, E: Float, M: Adaptable<B, E>>(model: &mut M, dir: &Path) -> Result<()> {
    let cfg_path = dir.join(CONFIG);
    let cfg = read_config(&cfg_path)?;
    let f = Fields::new(&cfg_path, &cfg);
    let peft_type = f.peft_type()?;
    f.check_all(peft_type)?;
    check_base(dir, &model.shape())?;
    let ad = super::peft_load::adaptation(model, &f, peft_type, dir)?;
    *model.adapt_mut() = ad;
    Ok(())
}

/// `adapter_config.json` as a JSON object.
fn read_config(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    let fmt = |msg: String| Error::Format { path: path.to_path_buf(), msg };
    match serde_json::from_str(&text).map_err(|e| fmt(format!("invalid JSON: {e}")))? {
        Value::Object(m) => Ok(m),
        other => Err(fmt(format!("expected a JSON object, found {other}"))),
    }
}

/// PEFT's config and tensors for an adaptation.
fn to_peft<B: Kernels<E>, E: Float>(
    ad: &Adapt<B, E>,
    s: &ModelShape,
    base_name: &str,
) -> Result<(Value, Vec<(String, HostTensor)>)> {
    let used = [ad.prompt.is_some(), ad.prefix.is_some(), ad.houlsby.is_some(), !ad.lora.is_empty()];
    if used.iter().filter(|&&u| u).count() != 1 {
        return Err(Error::InvalidArgument(
            "a PEFT adapter folder holds exactly one method (prompt, p-tuning, prefix, houlsby or lora)".into(),
        ));
    }
    let task = match s.arch {
        super::Arch::Bert => "FEATURE_EXTRACTION",
        super::Arch::T5 => "SEQ_2_SEQ_LM",
        _ => "CAUSAL_LM",
    };
    let submodules = super::peft_load::submodules(s);
    // A hub id with a revision (`org/name@rev`) is written as PEFT writes it: the id, and the
    // revision in its own field (`from_pretrained` takes no `@`).
    let (base, revision) = match crate::hub::parse_id(base_name) {
        Some((org, name, rev)) if base_name.contains('@') && !std::path::Path::new(base_name).exists() => {
            (format!("{org}/{name}"), Value::from(rev))
        }
        _ => (base_name.to_string(), Value::Null),
    };
    let common = json!({
        "auto_mapping": null, "base_model_name_or_path": base, "inference_mode": true,
        "modules_to_save": null, "peft_version": "0.21.2", "revision": revision, "task_type": task,
    });
    let mut cfg = common.as_object().cloned().unwrap_or_default();
    let mut tensors = Vec::new();
    let put = |cfg: &mut Map<String, Value>, v: Value| cfg.extend(v.as_object().cloned().unwrap_or_default());
    if let Some(p) = &ad.prompt {
        let dims = json!({
            "num_virtual_tokens": p.len(), "token_dim": s.hidden, "num_transformer_submodules": submodules,
            "num_attention_heads": s.heads, "num_layers": s.layers,
        });
        put(&mut cfg, dims);
        match &p.ptuning {
            None => put(
                &mut cfg,
                json!({
                    "peft_type": PROMPT_TUNING, "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": null,
                    "tokenizer_kwargs": null, "tokenizer_name_or_path": null,
                }),
            ),
            Some(e) => put(
                &mut cfg,
                json!({
                    "peft_type": P_TUNING, "encoder_reparameterization_type": e.kind.peft_name(),
                    "encoder_hidden_size": e.hidden, "encoder_num_layers": e.layers, "encoder_dropout": 0.0,
                }),
            ),
        }
        // P-tuning's is the encoder's output, as PEFT saves it. An encoder-decoder's table has a
        // second set of rows PEFT's forward never reads: written as zeros.
        let vectors = tuna_autograd::no_grad(|| p.all_vectors())?;
        let (shape, mut v) = host(&vectors)?;
        let rows = p.len() * submodules;
        v.resize(rows * shape[1], 0.0);
        tensors.push(("prompt_embeddings".to_string(), (vec![rows, shape[1]], v)));
    }
    if let Some(p) = &ad.prefix {
        let token_dim = p.kv_heads * p.head_dim;
        let enc = match &p.params {
            PrefixParams::Mlp { w1, .. } => w1.shape()[0],
            PrefixParams::Direct(_) => token_dim,
        };
        put(
            &mut cfg,
            json!({
                "peft_type": PREFIX_TUNING, "num_virtual_tokens": p.n, "token_dim": token_dim,
                "num_transformer_submodules": submodules, "num_attention_heads": p.kv_heads, "num_layers": p.layers,
                "encoder_hidden_size": enc, "init_weights": null,
                "prefix_projection": matches!(p.params, PrefixParams::Mlp { .. }),
            }),
        );
        // Saved after the projection, as PEFT does.
        let table = tuna_autograd::no_grad(|| p.table())?;
        tensors.push(("prompt_embeddings".to_string(), host(&table)?));
    }
    if let Some(h) = &ad.houlsby {
        put(
            &mut cfg,
            json!({
                "peft_type": HOULSBY, "bottleneck_size": h.bottleneck, "num_layers": h.layers.len(),
                "token_dim": s.hidden, "non_linearity": super::houlsby::NON_LINEARITY,
                "placement": super::houlsby::PLACEMENT,
            }),
        );
        for (n, t) in h.params() {
            tensors.push((n, host(&t)?));
        }
    }
    if !ad.lora.is_empty() {
        let c = ad
            .lora_config
            .clone()
            .ok_or_else(|| Error::InvalidArgument("LoRA adapters without their LoraConfig".into()))?;
        put(&mut cfg, lora_config_json(&c, s.arch == super::Arch::Gpt2));
        for (name, l) in &ad.lora {
            tensors.push((format!("base_model.model.{name}.lora_A.weight"), host(&l.a)?));
            tensors.push((format!("base_model.model.{name}.lora_B.weight"), host(&l.b)?));
        }
    }
    Ok((Value::Object(cfg), tensors))
}

/// LoRA's full config as PEFT 0.21.2 writes it (every field, defaults where tuna has no choice).
pub(crate) fn lora_config_json(c: &LoraConfig, conv1d: bool) -> Value {
    json!({
        "peft_type": LORA, "alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null,
        "bias": "none", "corda_config": null, "ensure_weight_tying": false, "eva_config": null,
        "exclude_modules": null, "fan_in_fan_out": conv1d, "init_lora_weights": true, "kasa_config": null,
        "layer_replication": null, "layers_pattern": null, "layers_to_transform": null, "loftq_config": {},
        "lora_alpha": c.alpha, "lora_bias": false, "lora_dropout": c.dropout, "lora_ga_config": null,
        "megatron_config": null, "megatron_core": "megatron.core", "monteclora_config": null,
        "qalora_group_size": 16, "r": c.r, "rank_pattern": {}, "target_modules": c.targets,
        "target_parameters": null, "trainable_token_indices": null, "use_bdlora": null, "use_dora": false,
        "use_qalora": false, "use_rslora": false, "velora_config": null,
    })
}

fn base_json(s: &ModelShape) -> Value {
    json!({
        "arch": s.arch.name(), "hidden_size": s.hidden, "num_layers": s.layers, "num_heads": s.heads,
        "num_kv_heads": s.kv_heads, "head_dim": s.head_dim, "vocab_size": s.vocab,
    })
}

/// Compare `tuna_base.json` (when present) with the model.
fn check_base(dir: &Path, s: &ModelShape) -> Result<()> {
    let path = dir.join(BASE);
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Format { path: path.clone(), msg: format!("invalid JSON: {e}") })?;
    if let Some(a) = v.get("arch").and_then(Value::as_str).filter(|&a| a != s.arch.name()) {
        return Err(Error::Format { path, msg: format!("{OTHER_MODEL}{a} model, this model is {}", s.arch.name()) });
    }
    for (k, have) in [
        ("hidden_size", s.hidden),
        ("num_layers", s.layers),
        ("num_heads", s.heads),
        ("num_kv_heads", s.kv_heads),
        ("head_dim", s.head_dim),
        ("vocab_size", s.vocab),
    ] {
        if let Some(want) = v.get(k).and_then(Value::as_u64).filter(|&w| w as usize != have) {
            return Err(Error::Format {
                path,
                msg: format!("{OTHER_MODEL}model with {k} {want}, but this model has {have}"),
            });
        }
    }
    Ok(())
}

/// A tensor's values as saved: a bf16 model's trainable tensors by their f32 masters.
fn host<B: Kernels<E>, E: Float>(t: &Tensor<B, E>) -> Result<HostTensor> {
    Ok((t.shape().to_vec(), t.master_to_vec()?.into_iter().map(tuna_kernels::Elem::to_f32).collect()))
}
