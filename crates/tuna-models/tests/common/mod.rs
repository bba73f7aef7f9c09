//! Tiny random checkpoints (as `MemWeights`, under Hugging Face names) for the model tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use tuna_kernels::testing::Rng;
use tuna_kernels::Cpu;
use tuna_models::config::{BertConfig, Gpt2Config};
use tuna_models::params::MemWeights;

pub fn cpu() -> Arc<Cpu> {
    Arc::new(Cpu)
}

/// A checkpoint being built: tensors added under `prefix + name`.
pub struct Ckpt {
    rng: Rng,
    prefix: String,
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Ckpt {
    pub fn new(seed: u64, prefix: &str) -> Self {
        Ckpt { rng: Rng::new(seed), prefix: prefix.into(), tensors: BTreeMap::new() }
    }
    /// Normal values times `scale`, plus `offset` (LayerNorm weights sit near 1).
    pub fn add(&mut self, name: &str, shape: &[usize], scale: f32, offset: f32) {
        let n = shape.iter().product();
        let v = (0..n).map(|_| offset + scale * self.rng.normal()).collect();
        self.tensors.insert(format!("{}{name}", self.prefix), (shape.to_vec(), v));
    }
    pub fn norm(&mut self, name: &str, c: usize) {
        self.add(&format!("{name}.weight"), &[c], 0.1, 1.0);
        self.add(&format!("{name}.bias"), &[c], 0.1, 0.0);
    }
    /// A linear layer's weight (`shape`) and bias (`[bias]`).
    pub fn lin(&mut self, name: &str, shape: [usize; 2], bias: usize) {
        let fan_in = shape[0].min(shape[1]) as f32;
        self.add(&format!("{name}.weight"), &shape, 1.0 / fan_in.sqrt(), 0.0);
        self.add(&format!("{name}.bias"), &[bias], 0.1, 0.0);
    }
    pub fn done(self) -> MemWeights {
        MemWeights { path: PathBuf::from("tiny/model.safetensors"), tensors: self.tensors }
    }
}

pub fn gpt2_cfg() -> Gpt2Config {
    Gpt2Config {
        vocab_size: 13,
        n_positions: 10,
        n_embd: 8,
        n_layer: 2,
        n_head: 2,
        n_inner: Some(12),
        layer_norm_epsilon: 1e-5,
    }
}

/// A random GPT-2 checkpoint for `cfg`, names under `prefix` ("" or "transformer.").
pub fn gpt2_weights(cfg: &Gpt2Config, seed: u64, prefix: &str) -> MemWeights {
    let (c, ff) = (cfg.n_embd, cfg.inner());
    let mut k = Ckpt::new(seed, prefix);
    k.add("wte.weight", &[cfg.vocab_size, c], 0.5, 0.0);
    k.add("wpe.weight", &[cfg.n_positions, c], 0.3, 0.0);
    for i in 0..cfg.n_layer {
        k.norm(&format!("h.{i}.ln_1"), c);
        k.lin(&format!("h.{i}.attn.c_attn"), [c, 3 * c], 3 * c);
        k.lin(&format!("h.{i}.attn.c_proj"), [c, c], c);
        k.norm(&format!("h.{i}.ln_2"), c);
        k.lin(&format!("h.{i}.mlp.c_fc"), [c, ff], ff);
        k.lin(&format!("h.{i}.mlp.c_proj"), [ff, c], c);
    }
    k.norm("ln_f", c);
    k.done()
}

pub fn bert_cfg() -> BertConfig {
    BertConfig {
        vocab_size: 17,
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 12,
        max_position_embeddings: 10,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
    }
}

/// A random BERT checkpoint for `cfg`, names under `prefix` ("" or "bert."), with or without pooler.
pub fn bert_weights(cfg: &BertConfig, seed: u64, prefix: &str, pooler: bool) -> MemWeights {
    let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
    let mut k = Ckpt::new(seed, prefix);
    k.add("embeddings.word_embeddings.weight", &[cfg.vocab_size, h], 0.5, 0.0);
    k.add("embeddings.position_embeddings.weight", &[cfg.max_position_embeddings, h], 0.3, 0.0);
    k.add("embeddings.token_type_embeddings.weight", &[cfg.type_vocab_size, h], 0.3, 0.0);
    k.norm("embeddings.LayerNorm", h);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        for n in ["query", "key", "value"] {
            k.lin(&format!("{p}.attention.self.{n}"), [h, h], h);
        }
        k.lin(&format!("{p}.attention.output.dense"), [h, h], h);
        k.norm(&format!("{p}.attention.output.LayerNorm"), h);
        k.lin(&format!("{p}.intermediate.dense"), [ff, h], ff);
        k.lin(&format!("{p}.output.dense"), [h, ff], h);
        k.norm(&format!("{p}.output.LayerNorm"), h);
    }
    if pooler {
        k.lin("pooler.dense", [h, h], h);
    }
    k.done()
}

/// Largest `|a - b|`.
pub fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}
