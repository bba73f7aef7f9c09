//! What the adaptation methods need to know about a model: its shape, its linears by Hugging Face
//! module name, its input embeddings, and every base weight by name (for freezing checks, counts
//! and merged exports).

use super::Adapt;
use crate::bert::Bert;
use crate::gpt2::Gpt2;
use crate::llama::Llama;
use tuna_autograd::ops::linear::WeightLayout;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Tensor};

/// Model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Gpt2,
    Llama,
    Bert,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Gpt2 => "gpt2",
            Arch::Llama => "llama",
            Arch::Bert => "bert",
        }
    }
}

/// The dimensions an adapter must agree with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    pub arch: Arch,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
}

/// A linear layer by its Hugging Face module name (`model.layers.0.self_attn.q_proj`).
pub struct LinearModule<B: Kernels<E>, E: Float> {
    pub name: String,
    pub weight: Tensor<B, E>,
    pub layout: WeightLayout,
}

/// A model the adaptation methods apply to.
pub trait Adaptable<B: Kernels<E>, E: Float> {
    fn shape(&self) -> ModelShape;
    fn adapt(&self) -> &Adapt<B, E>;
    fn adapt_mut(&mut self) -> &mut Adapt<B, E>;
    /// The input token embedding table `[vocab, hidden]`.
    fn input_embeddings(&self) -> &Tensor<B, E>;
    /// Every linear layer, in model order.
    fn linears(&self) -> Vec<LinearModule<B, E>>;
    /// Every base weight by its Hugging Face name (tied weights once), in model order.
    fn named_weights(&self) -> Vec<(String, Tensor<B, E>)>;
}

fn lin<B: Kernels<E>, E: Float>(name: String, w: &Tensor<B, E>, layout: WeightLayout) -> LinearModule<B, E> {
    LinearModule { name, weight: w.clone(), layout }
}

impl<B: Kernels<E>, E: Float> Adaptable<B, E> for Llama<B, E> {
    fn shape(&self) -> ModelShape {
        let c = &self.cfg;
        ModelShape {
            arch: Arch::Llama,
            hidden: c.hidden_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            head_dim: c.head_dim(),
            vocab: c.vocab_size,
        }
    }
    fn adapt(&self) -> &Adapt<B, E> {
        &self.adapt
    }
    fn adapt_mut(&mut self) -> &mut Adapt<B, E> {
        &mut self.adapt
    }
    fn input_embeddings(&self) -> &Tensor<B, E> {
        &self.embed_tokens
    }
    fn linears(&self) -> Vec<LinearModule<B, E>> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            for (n, w) in [
                ("self_attn.q_proj", &l.q_proj),
                ("self_attn.k_proj", &l.k_proj),
                ("self_attn.v_proj", &l.v_proj),
                ("self_attn.o_proj", &l.o_proj),
                ("mlp.gate_proj", &l.gate_proj),
                ("mlp.up_proj", &l.up_proj),
                ("mlp.down_proj", &l.down_proj),
            ] {
                out.push(lin(format!("{p}.{n}"), w, WeightLayout::OutIn));
            }
        }
        out
    }
    fn named_weights(&self) -> Vec<(String, Tensor<B, E>)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed_tokens.clone())];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), l.input_layernorm.clone()));
            out.push((format!("{p}.post_attention_layernorm.weight"), l.post_attention_layernorm.clone()));
        }
        out.extend(self.linears().into_iter().map(|m| (format!("{}.weight", m.name), m.weight)));
        out.push(("model.norm.weight".into(), self.norm.clone()));
        if self.lm_head.id() != self.embed_tokens.id() {
            out.push(("lm_head.weight".into(), self.lm_head.clone()));
        }
        out
    }
}

impl<B: Kernels<E>, E: Float> Adaptable<B, E> for Gpt2<B, E> {
    fn shape(&self) -> ModelShape {
        let c = &self.cfg;
        ModelShape {
            arch: Arch::Gpt2,
            hidden: c.n_embd,
            layers: c.n_layer,
            heads: c.n_head,
            kv_heads: c.n_head,
            head_dim: c.head_dim(),
            vocab: c.vocab_size,
        }
    }
    fn adapt(&self) -> &Adapt<B, E> {
        &self.adapt
    }
    fn adapt_mut(&mut self) -> &mut Adapt<B, E> {
        &mut self.adapt
    }
    fn input_embeddings(&self) -> &Tensor<B, E> {
        &self.wte
    }
    fn linears(&self) -> Vec<LinearModule<B, E>> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("transformer.h.{i}");
            for (n, c) in [
                ("attn.c_attn", &b.c_attn),
                ("attn.c_proj", &b.attn_proj),
                ("mlp.c_fc", &b.c_fc),
                ("mlp.c_proj", &b.mlp_proj),
            ] {
                out.push(lin(format!("{p}.{n}"), &c.weight, WeightLayout::InOut));
            }
        }
        out
    }
    fn named_weights(&self) -> Vec<(String, Tensor<B, E>)> {
        let t = |n: &str| format!("transformer.{n}");
        let mut out = vec![(t("wte.weight"), self.wte.clone()), (t("wpe.weight"), self.wpe.clone())];
        for (i, b) in self.blocks.iter().enumerate() {
            let p = t(&format!("h.{i}"));
            for (n, norm) in [("ln_1", &b.ln_1), ("ln_2", &b.ln_2)] {
                out.push((format!("{p}.{n}.weight"), norm.weight.clone()));
                out.push((format!("{p}.{n}.bias"), norm.bias.clone()));
            }
            for (n, c) in [
                ("attn.c_attn", &b.c_attn),
                ("attn.c_proj", &b.attn_proj),
                ("mlp.c_fc", &b.c_fc),
                ("mlp.c_proj", &b.mlp_proj),
            ] {
                out.push((format!("{p}.{n}.weight"), c.weight.clone()));
                out.push((format!("{p}.{n}.bias"), c.bias.clone()));
            }
        }
        out.push((t("ln_f.weight"), self.ln_f.weight.clone()));
        out.push((t("ln_f.bias"), self.ln_f.bias.clone()));
        out
    }
}

impl<B: Kernels<E>, E: Float> Adaptable<B, E> for Bert<B, E> {
    fn shape(&self) -> ModelShape {
        let c = &self.cfg;
        ModelShape {
            arch: Arch::Bert,
            hidden: c.hidden_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            kv_heads: c.num_attention_heads,
            head_dim: c.head_dim(),
            vocab: c.vocab_size,
        }
    }
    fn adapt(&self) -> &Adapt<B, E> {
        &self.adapt
    }
    fn adapt_mut(&mut self) -> &mut Adapt<B, E> {
        &mut self.adapt
    }
    fn input_embeddings(&self) -> &Tensor<B, E> {
        &self.word
    }
    fn linears(&self) -> Vec<LinearModule<B, E>> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("encoder.layer.{i}");
            for (n, d) in l.dense_named() {
                out.push(lin(format!("{p}.{n}"), &d.weight, WeightLayout::OutIn));
            }
        }
        out
    }
    fn named_weights(&self) -> Vec<(String, Tensor<B, E>)> {
        let mut out = vec![
            ("embeddings.word_embeddings.weight".to_string(), self.word.clone()),
            ("embeddings.position_embeddings.weight".into(), self.position.clone()),
            ("embeddings.token_type_embeddings.weight".into(), self.token_type.clone()),
            ("embeddings.LayerNorm.weight".into(), self.emb_norm.weight.clone()),
            ("embeddings.LayerNorm.bias".into(), self.emb_norm.bias.clone()),
        ];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("encoder.layer.{i}");
            for (n, d) in l.dense_named() {
                out.push((format!("{p}.{n}.weight"), d.weight.clone()));
                out.push((format!("{p}.{n}.bias"), d.bias.clone()));
            }
            for (n, norm) in [("attention.output.LayerNorm", &l.attn_norm), ("output.LayerNorm", &l.out_norm)] {
                out.push((format!("{p}.{n}.weight"), norm.weight.clone()));
                out.push((format!("{p}.{n}.bias"), norm.bias.clone()));
            }
        }
        if let Some(p) = &self.pooler {
            out.push(("pooler.dense.weight".into(), p.weight.clone()));
            out.push(("pooler.dense.bias".into(), p.bias.clone()));
        }
        out
    }
}
