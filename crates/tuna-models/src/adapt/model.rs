//! What the adaptation methods need to know about a model: its shape, its linears by Hugging Face
//! module name, its input embeddings, and every base weight by name (for freezing checks, counts
//! and merged exports), and its own keys and values of given tokens (activation-based prefix inits).

use super::{Adapt, LayerKv};
use crate::bert::Bert;
use crate::error::{Error, Result};
use crate::generate::KvCache;
use crate::gpt2::Gpt2;
use crate::llama::Llama;
use crate::t5::T5;
use std::sync::Arc;
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{no_grad, Float, Ints, Tensor};

/// Model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Gpt2,
    Llama,
    Bert,
    T5,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Gpt2 => "gpt2",
            Arch::Llama => "llama",
            Arch::Bert => "bert",
            Arch::T5 => "t5",
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
    /// Blocks that carry Houlsby adapters: `layers`, except T5's encoder plus decoder blocks
    /// (`layers` is its encoder's, as PEFT counts them).
    pub blocks: usize,
}

/// A linear layer by its Hugging Face module name (`model.layers.0.self_attn.q_proj`): the layer
/// as the architecture loaded it.
pub type LinearModule<B, E> = crate::linear::Linear<B, E>;

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
    /// Each layer's keys (after RoPE where the model applies it) and values, `[n, kv_heads,
    /// head_dim]`, of `ids` run as one sequence at positions `0..n` through the model as it is
    /// (the caller sets any adaptation aside), recording no gradients: what a KV cache holds after
    /// those tokens.
    fn token_kv(&self, ids: &[u32]) -> Result<Vec<LayerKv<B, E>>>;
}

/// Each layer's cached `[1, n, kv_heads, head_dim]` keys and values as `[n, kv_heads, head_dim]`.
fn cache_layers<B: Kernels<E>, E: Float>(cache: &KvCache<B, E>) -> Result<Vec<LayerKv<B, E>>> {
    (0..cache.n_layers())
        .map(|i| {
            let (k, v) = cache
                .layer(i)?
                .ok_or_else(|| Error::InvalidArgument(format!("prefix init: layer {i} recorded no keys/values")))?;
            let s = k.shape()[1..].to_vec();
            Ok((reshape(&k, &s)?, reshape(&v, &s)?))
        })
        .collect()
}

/// `ids` as a `[1, n]` batch with positions `0..n`.
fn one_row<B: Kernels<E>, E: Float>(dev: &Arc<B>, ids: &[u32]) -> Result<(Ints<B, u32>, Ints<B, u32>)> {
    let n = ids.len();
    Ok((Ints::new(dev, &[1, n], ids)?, Ints::new(dev, &[1, n], &crate::positions::positions(1, n, 0))?))
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
            blocks: c.num_hidden_layers,
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
        self.layers.iter().flat_map(|l| l.linears().map(Clone::clone)).collect()
    }
    fn named_weights(&self) -> Vec<(String, Tensor<B, E>)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed_tokens.clone())];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), l.input_layernorm.clone()));
            out.push((format!("{p}.post_attention_layernorm.weight"), l.post_attention_layernorm.clone()));
        }
        out.extend(self.linears().iter().flat_map(|m| m.named_weights()));
        out.push(("model.norm.weight".into(), self.norm.clone()));
        if self.lm_head.id() != self.embed_tokens.id() {
            out.push(("lm_head.weight".into(), self.lm_head.clone()));
        }
        out
    }
    fn token_kv(&self, ids: &[u32]) -> Result<Vec<LayerKv<B, E>>> {
        let (t, pos) = one_row(&self.dev, ids)?;
        let mut cache = KvCache::new(self.layers.len());
        no_grad(|| self.hidden_states(&t, &pos, None, Some(&mut cache)))?;
        cache_layers(&cache)
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
            blocks: c.n_layer,
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
        self.blocks.iter().flat_map(|b| b.linears().map(Clone::clone)).collect()
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
            out.extend(b.linears().iter().flat_map(|m| m.named_weights()));
        }
        out.push((t("ln_f.weight"), self.ln_f.weight.clone()));
        out.push((t("ln_f.bias"), self.ln_f.bias.clone()));
        out
    }
    fn token_kv(&self, ids: &[u32]) -> Result<Vec<LayerKv<B, E>>> {
        let (t, pos) = one_row(self.wte.device(), ids)?;
        let mut cache = KvCache::new(self.blocks.len());
        no_grad(|| self.hidden_cached(&t, &pos, None, Some(&mut cache)))?;
        cache_layers(&cache)
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
            blocks: c.num_hidden_layers,
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
        self.layers.iter().flat_map(|l| l.linears().map(Clone::clone)).collect()
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
            out.extend(l.linears().iter().flat_map(|m| m.named_weights()));
            for (n, norm) in [("attention.output.LayerNorm", &l.attn_norm), ("output.LayerNorm", &l.out_norm)] {
                out.push((format!("{p}.{n}.weight"), norm.weight.clone()));
                out.push((format!("{p}.{n}.bias"), norm.bias.clone()));
            }
        }
        if let Some(p) = &self.pooler {
            out.extend(p.named_weights());
        }
        out
    }
    fn token_kv(&self, ids: &[u32]) -> Result<Vec<LayerKv<B, E>>> {
        let (t, _) = one_row(self.word.device(), ids)?;
        let mask = Ints::new(self.word.device(), &[1, ids.len()], &vec![1u8; ids.len()])?;
        let mut cache = KvCache::new(self.layers.len());
        no_grad(|| self.encode_cached(&t, &mask, Some(&mut cache)))?;
        cache_layers(&cache)
    }
}

impl<B: Kernels<E>, E: Float> Adaptable<B, E> for T5<B, E> {
    fn shape(&self) -> ModelShape {
        let c = &self.cfg;
        ModelShape {
            arch: Arch::T5,
            hidden: c.d_model,
            layers: c.num_layers,
            heads: c.num_heads,
            kv_heads: c.num_heads,
            head_dim: c.d_kv,
            vocab: c.vocab_size,
            blocks: c.num_layers + c.decoder_layers(),
        }
    }
    fn adapt(&self) -> &Adapt<B, E> {
        &self.adapt
    }
    fn adapt_mut(&mut self) -> &mut Adapt<B, E> {
        &mut self.adapt
    }
    fn input_embeddings(&self) -> &Tensor<B, E> {
        &self.shared
    }
    fn linears(&self) -> Vec<LinearModule<B, E>> {
        let enc = self.encoder.iter().flat_map(|b| b.linears().into_iter().cloned());
        enc.chain(self.decoder.iter().flat_map(|b| b.linears().into_iter().cloned())).collect()
    }
    fn named_weights(&self) -> Vec<(String, Tensor<B, E>)> {
        let mut out = vec![("shared.weight".to_string(), self.shared.clone())];
        for (i, b) in self.encoder.iter().enumerate() {
            let p = format!("encoder.block.{i}.layer");
            if i == 0 {
                out.push((format!("{p}.0.SelfAttention.relative_attention_bias.weight"), self.enc_bias.clone()));
            }
            out.push((format!("{p}.0.layer_norm.weight"), b.attn_norm.clone()));
            out.push((format!("{p}.1.layer_norm.weight"), b.ff_norm.clone()));
            out.extend(b.linears().iter().flat_map(|m| m.named_weights()));
        }
        out.push(("encoder.final_layer_norm.weight".into(), self.enc_norm.clone()));
        for (i, b) in self.decoder.iter().enumerate() {
            let p = format!("decoder.block.{i}.layer");
            if i == 0 {
                out.push((format!("{p}.0.SelfAttention.relative_attention_bias.weight"), self.dec_bias.clone()));
            }
            out.push((format!("{p}.0.layer_norm.weight"), b.self_norm.clone()));
            out.push((format!("{p}.1.layer_norm.weight"), b.cross_norm.clone()));
            out.push((format!("{p}.2.layer_norm.weight"), b.ff_norm.clone()));
            out.extend(b.linears().iter().flat_map(|m| m.named_weights()));
        }
        out.push(("decoder.final_layer_norm.weight".into(), self.dec_norm.clone()));
        if self.lm_head.id() != self.shared.id() {
            out.push(("lm_head.weight".into(), self.lm_head.clone()));
        }
        out
    }
    /// T5's prefix lives in the decoder's self-attention: `ids` run as the encoder's input and,
    /// teacher-forced, as the decoder's, and each prefix layer takes the keys and values of the
    /// first decoder layer that reads it under PEFT's mapping ([`T5::decoder_prefix_layer`]; a
    /// prefix layer no decoder layer reads takes its own index's).
    fn token_kv(&self, ids: &[u32]) -> Result<Vec<LayerKv<B, E>>> {
        let (t, _) = one_row(&self.dev, ids)?;
        let mask = Ints::new(&self.dev, &[1, ids.len()], &vec![1u8; ids.len()])?;
        let mut cache = KvCache::new(self.decoder.len());
        no_grad(|| -> Result<()> {
            let (out, mask) = self.encode(&t, &mask)?;
            let enc = crate::t5::EncoderState { out, mask, cross_kv: None };
            self.decode(&t, &enc, Some(&mut cache))?;
            Ok(())
        })?;
        let kv = cache_layers(&cache)?;
        let (layers, dec) = (self.cfg.num_layers, self.decoder.len());
        Ok((0..layers)
            .map(|l| {
                let j = (0..dec).find(|&j| self.decoder_prefix_layer(j) == l).unwrap_or(l.min(dec - 1));
                kv[j].clone()
            })
            .collect())
    }
}
