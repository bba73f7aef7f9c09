//! A base checkpoint holding tensors the architecture does not use is an error naming a few of
//! them and their count (a config of 1 layer with weights for 2 must not load, ignoring layer 1),
//! while the buffers and heads real checkpoints carry still load: GPT-2's `attn.bias` /
//! `attn.masked_bias` and tied `lm_head.weight`, Llama's `rotary_emb.inv_freq` and tied head,
//! BERT's `cls.*` heads and `position_ids`. Folders built in a temporary folder from the fixtures.

mod golden_common;

use golden_common::fixture;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tuna_kernels::Cpu;
use tuna_models::bert::Bert;
use tuna_models::config::ModelConfig;
use tuna_models::gpt2::Gpt2;
use tuna_models::hf::HfCheckpoint;
use tuna_models::io;
use tuna_models::llama::Llama;
use tuna_models::params::Loader;

type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// A model folder in the temporary directory, removed when dropped.
struct Folder(PathBuf);

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The fixture `arch` with its config changed by `config` and its tensors by `tensors`.
fn folder(arch: &str, config: impl Fn(&mut Value), tensors: impl Fn(&mut Tensors)) -> Folder {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let k = NEXT.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("tuna-unexpected-{}-{k}-{arch}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let src = fixture(arch);
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config(&mut c);
    std::fs::write(d.join("config.json"), serde_json::to_string_pretty(&c).unwrap()).unwrap();
    let mut t = io::read_tensors(&src.join("model.safetensors")).unwrap();
    tensors(&mut t);
    let list: Vec<_> = t.into_iter().collect();
    std::fs::write(d.join("model.safetensors"), io::safetensors_bytes(&list).unwrap()).unwrap();
    Folder(d)
}

/// Load the folder's model (whichever architecture its config names); the error's text if any.
fn load(f: &Folder) -> Result<(), String> {
    let ck = HfCheckpoint::open(&f.0).map_err(|e| e.to_string())?;
    let dev = Arc::new(Cpu);
    let mut l = Loader::<Cpu, f32>::frozen(&ck, &dev);
    let r = match ck.config().clone() {
        ModelConfig::Gpt2(c) => Gpt2::load(&c, &mut l).map(drop),
        ModelConfig::Llama(c) => Llama::load(&c, &mut l).map(drop),
        ModelConfig::Bert(c) => Bert::load(&c, &mut l).map(drop),
        ModelConfig::T5(c) => tuna_models::t5::T5::load(&c, &mut l).map(drop),
    };
    r.map_err(|e| e.to_string())
}

fn add(t: &mut Tensors, name: &str, shape: &[usize]) {
    t.insert(name.into(), (shape.to_vec(), vec![0.5; shape.iter().product()]));
}

fn one_layer(key: &'static str) -> impl Fn(&mut Value) {
    move |c| c[key] = 1.into()
}

#[test]
fn a_config_with_fewer_layers_than_the_weights_is_an_error_naming_them() {
    let e = load(&folder("gpt2", one_layer("n_layer"), |_| {})).unwrap_err();
    assert!(
        e.contains("model.safetensors: tensors the model does not use: `transformer.h.1.attn.c_attn.bias`, `transformer.h.1.attn.c_attn.weight`,"),
        "{e}"
    );
    assert!(e.contains(" and 7 more (12 in all)"), "{e}");
    let e = load(&folder("llama", one_layer("num_hidden_layers"), |_| {})).unwrap_err();
    assert!(e.contains("`model.layers.1.input_layernorm.weight`") && e.contains("(9 in all)"), "{e}");
    let e = load(&folder("bert", one_layer("num_hidden_layers"), |_| {})).unwrap_err();
    assert!(e.contains("`encoder.layer.1.attention.output.LayerNorm.bias`") && e.contains("(16 in all)"), "{e}");
}

#[test]
fn a_tensor_the_architecture_has_no_place_for_is_an_error() {
    let e = load(&folder("llama", |_| {}, |t| add(t, "model.layers.0.self_attn.q_proj.bias", &[32]))).unwrap_err();
    assert!(e.contains("tensors the model does not use: `model.layers.0.self_attn.q_proj.bias` (1 in all)"), "{e}");
    let e = load(&folder("bert", |_| {}, |t| add(t, "encoder.layer.0.output.dense.extra", &[2, 32]))).unwrap_err();
    assert!(e.contains("`encoder.layer.0.output.dense.extra` (1 in all)"), "{e}");
}

#[test]
fn task_heads_of_hugging_face_checkpoints_load_without_them() {
    // A sequence classifier's or QA model's head is not the base model's: tuna trains its own.
    load(&folder(
        "bert",
        |_| {},
        |t| {
            add(t, "classifier.weight", &[2, 32]);
            add(t, "classifier.bias", &[2]);
            add(t, "qa_outputs.weight", &[2, 32]);
        },
    ))
    .unwrap();
    load(&folder("gpt2", |_| {}, |t| add(t, "score.weight", &[3, 32]))).unwrap();
    load(&folder("llama", |_| {}, |t| add(t, "score.weight", &[3, 32]))).unwrap();
}

#[test]
fn buffers_and_heads_real_checkpoints_carry_still_load() {
    // GPT-2: the causal-mask buffers of older transformers (prefixed or not) and the tied head.
    load(&folder(
        "gpt2",
        |_| {},
        |t| {
            add(t, "transformer.h.0.attn.bias", &[1, 1, 64, 64]);
            add(t, "h.1.attn.bias", &[1, 1, 64, 64]);
            add(t, "transformer.h.1.attn.masked_bias", &[1]);
            add(t, "lm_head.weight", &[96, 32]);
        },
    ))
    .unwrap();
    // Llama: rotary frequencies, and a stored head that `tie_word_embeddings` replaces.
    load(&folder(
        "llama",
        |c| c["tie_word_embeddings"] = true.into(),
        |t| {
            add(t, "model.layers.0.self_attn.rotary_emb.inv_freq", &[4]);
            add(t, "model.layers.1.self_attn.rotary_emb.inv_freq", &[4]);
            add(t, "lm_head.weight", &[96, 32]);
        },
    ))
    .unwrap();
    // BERT: the pretraining heads, a float position-id buffer, and the pooler (which is used).
    load(&folder(
        "bert",
        |_| {},
        |t| {
            add(t, "cls.predictions.bias", &[96]);
            add(t, "cls.predictions.transform.dense.weight", &[32, 32]);
            add(t, "bert.embeddings.position_ids", &[1, 64]);
            add(t, "pooler.dense.weight", &[32, 32]);
            add(t, "pooler.dense.bias", &[32]);
        },
    ))
    .unwrap();
}
