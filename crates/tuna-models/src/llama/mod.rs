//! Llama (SmolLM2 and kin) on tuna's autograd: RMSNorm, RoPE (rotate_half) at explicit per-token
//! positions, grouped-query causal attention with a key padding mask and a KV cache, SwiGLU MLP.

use crate::adapt::{layer_prefix, owned_prefix, Adapt, Prepared};
use crate::checkpointing::{self, BlockAdapt, Checkpointing};
use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::generate::{CausalLm, KvCache};
use crate::linear::Linear;
use crate::params::Loader;
use std::sync::Arc;
use tuna_autograd::checkpoint;
use tuna_autograd::ops::act::swiglu;
use tuna_autograd::ops::attention::{attention, AttnOptions, Prefix};
use tuna_autograd::ops::elem::{add, slice_cols};
use tuna_autograd::ops::linear::{linear, WeightLayout};
use tuna_autograd::ops::loss::linear_cross_entropy;
use tuna_autograd::ops::norm::{add_rmsnorm, rmsnorm};
use tuna_autograd::ops::rope::rope;
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Ints, Tensor};

use crate::IGNORE_INDEX;

/// Tensors Llama checkpoints carry that the model does not compute with (see
/// [`Loader::finish`]): older `transformers`' rotary-frequency buffers, and `lm_head.weight` when
/// `tie_word_embeddings` makes the head the embeddings (as in `transformers`).
/// A sequence classifier's head (`score`) is not loaded either: tuna scores with its own.
pub const KNOWN_UNUSED: &[&str] = &["layers.*.self_attn.rotary_emb.inv_freq", "lm_head.weight", "score.weight"];

/// One decoder layer's weights (all `[out, in]`, no biases).
pub struct LlamaLayer<B: Kernels<E>, E: Float> {
    pub input_layernorm: Tensor<B, E>,
    pub q_proj: Linear<B, E>,
    pub k_proj: Linear<B, E>,
    pub v_proj: Linear<B, E>,
    pub o_proj: Linear<B, E>,
    pub post_attention_layernorm: Tensor<B, E>,
    pub gate_proj: Linear<B, E>,
    pub up_proj: Linear<B, E>,
    pub down_proj: Linear<B, E>,
}

/// A forward's sizes and constants, as one layer needs them.
#[derive(Clone, Copy)]
struct LayerDims {
    batch: usize,
    seq: usize,
    heads: usize,
    kvh: usize,
    hd: usize,
    eps: f32,
    theta: f32,
}

impl<B: Kernels<E>, E: Float> LlamaLayer<B, E> {
    /// The layer's linears, in order.
    pub fn linears(&self) -> [&Linear<B, E>; 7] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj, &self.gate_proj, &self.up_proj, &self.down_proj]
    }

    /// Layer `i` over `x` through the adaptation `ad`, at `positions`, with the layer's prefix,
    /// the key mask and an optional KV cache.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        ad: &Adapt<B, E>,
        i: usize,
        x: &Tensor<B, E>,
        positions: &Ints<B, u32>,
        prefix: Option<Prefix<'_, B, E>>,
        mask: Option<&Ints<B, u8>>,
        cache: Option<&mut KvCache<B, E>>,
        dims: LayerDims,
    ) -> Result<Tensor<B, E>> {
        let LayerDims { batch, seq, heads, kvh, hd, eps, theta } = dims;
        let h = rmsnorm(x, &self.input_layernorm, eps)?;
        let proj = |w: &Linear<B, E>, n: usize| -> Result<Tensor<B, E>> {
            Ok(reshape(&ad.linear(w, &h)?, &[batch, seq, n, hd])?)
        };
        let q = rope(&proj(&self.q_proj, heads)?, positions, theta)?;
        let k = rope(&proj(&self.k_proj, kvh)?, positions, theta)?;
        let v = proj(&self.v_proj, kvh)?;
        // With a cache, `k`/`v` are its preallocated buffers and `kv_len` the rows in use.
        let ((k, v), kv_len) = KvCache::through(cache, i, k, v)?;
        let a = attention(&q, &k, &v, prefix, mask, AttnOptions { causal: true, scale: None, kv_len })?;
        let a = reshape(&a, &[batch, seq, heads * hd])?;
        // The residual add and the post-attention norm in one pass.
        let (x, h) =
            add_rmsnorm(x, &ad.sublayer(i, false, ad.linear(&self.o_proj, &a)?)?, &self.post_attention_layernorm, eps)?;
        let gate = ad.linear(&self.gate_proj, &h)?;
        let up = ad.linear(&self.up_proj, &h)?;
        let down = ad.linear(&self.down_proj, &swiglu(&gate, &up)?)?;
        Ok(add(&x, &ad.sublayer(i, true, down)?)?)
    }
}

impl<B: Kernels<E>, E: Float> Clone for LlamaLayer<B, E> {
    /// The same tensors (shared storage): what a checkpointed layer's recompute holds.
    fn clone(&self) -> Self {
        LlamaLayer {
            input_layernorm: self.input_layernorm.clone(),
            q_proj: self.q_proj.clone(),
            k_proj: self.k_proj.clone(),
            v_proj: self.v_proj.clone(),
            o_proj: self.o_proj.clone(),
            post_attention_layernorm: self.post_attention_layernorm.clone(),
            gate_proj: self.gate_proj.clone(),
            up_proj: self.up_proj.clone(),
            down_proj: self.down_proj.clone(),
        }
    }
}

/// A Llama causal language model.
pub struct Llama<B: Kernels<E>, E: Float> {
    pub cfg: LlamaConfig,
    pub dev: Arc<B>,
    pub embed_tokens: Tensor<B, E>,
    pub layers: Vec<LlamaLayer<B, E>>,
    pub norm: Tensor<B, E>,
    /// `lm_head.weight`, or the same tensor as `embed_tokens` when tied.
    pub lm_head: Tensor<B, E>,
    /// The adaptation method in place (empty: the base model).
    pub adapt: Adapt<B, E>,
    /// The layers whose activations a recorded forward recomputes in the backward.
    pub checkpoint: Checkpointing,
}

impl<B: Kernels<E>, E: Float> Llama<B, E> {
    /// Load every weight under its Hugging Face name through `loader` (which decides what trains).
    /// The head is `lm_head.weight` unless `tie_word_embeddings` is set or the checkpoint has no
    /// `lm_head.weight`, in which case it is `embed_tokens` itself (one tensor, one gradient).
    /// Tensors it does not use (beyond [`KNOWN_UNUSED`]) are an error naming them.
    pub fn load(cfg: &LlamaConfig, loader: &mut Loader<'_, B, E>) -> Result<Self> {
        let (hidden, vocab, inter) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let (heads, kvh, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        if heads == 0 || kvh == 0 || hd == 0 || heads % kvh != 0 {
            return Err(Error::Format {
                path: loader.src.path().to_path_buf(),
                msg: format!("llama config: {heads} attention heads cannot share {kvh} key/value heads of dim {hd}"),
            });
        }
        let embed_tokens = loader.load("model.embed_tokens.weight", &[vocab, hidden])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            // In the checkpoint's order: the trainable list follows it, and so does the order the
            // global gradient norm sums in.
            let norm = |l: &mut Loader<'_, B, E>, name: &str| l.load(&format!("{p}.{name}.weight"), &[hidden]);
            let lin = |l: &mut Loader<'_, B, E>, name: &str, out: usize, inp: usize| -> Result<Linear<B, E>> {
                let name = format!("{p}.{name}");
                if let Some((weight, pw)) = l.load_q4(&format!("{name}.weight"), &[out, inp])? {
                    return Ok(Linear::with_packed(name, weight, None, WeightLayout::OutIn, pw));
                }
                let weight = l.load(&format!("{name}.weight"), &[out, inp])?;
                l.linear(Linear::new(name, weight, None, WeightLayout::OutIn))
            };
            layers.push(LlamaLayer {
                input_layernorm: norm(loader, "input_layernorm")?,
                q_proj: lin(loader, "self_attn.q_proj", heads * hd, hidden)?,
                k_proj: lin(loader, "self_attn.k_proj", kvh * hd, hidden)?,
                v_proj: lin(loader, "self_attn.v_proj", kvh * hd, hidden)?,
                o_proj: lin(loader, "self_attn.o_proj", hidden, heads * hd)?,
                post_attention_layernorm: norm(loader, "post_attention_layernorm")?,
                gate_proj: lin(loader, "mlp.gate_proj", inter, hidden)?,
                up_proj: lin(loader, "mlp.up_proj", inter, hidden)?,
                down_proj: lin(loader, "mlp.down_proj", hidden, inter)?,
            });
        }
        let norm = loader.load("model.norm.weight", &[hidden])?;
        let untied = !cfg.tie_word_embeddings && loader.src.shape("lm_head.weight").is_some();
        let lm_head = if untied { loader.load("lm_head.weight", &[vocab, hidden])? } else { embed_tokens.clone() };
        loader.finish(KNOWN_UNUSED)?;
        Ok(Llama {
            cfg: cfg.clone(),
            dev: loader.dev.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            adapt: Adapt::default(),
            checkpoint: Checkpointing::Off,
        })
    }

    /// Logits `[batch, seq, vocab]` of `ids` (`[batch, seq]`) at `positions` (`[batch, seq]`, the
    /// RoPE position of each token: after left padding or a cache they need not start at 0).
    ///
    /// `mask` (`[batch, cached + seq]`, 1 = attend) marks padding keys; with a `cache` it covers
    /// the cached tokens too. With a cache, the new keys and values are appended to it and the
    /// queries see every cached key (causally, the new tokens following the cached ones).
    ///
    /// With a soft prompt in [`Llama::adapt`], the output has `n` more positions (the virtual
    /// tokens, inserted before each row's first real token); with a prompt or a prefix the content
    /// positions are shifted past the virtual tokens, as PEFT does.
    pub fn forward(
        &self,
        ids: &Ints<B, u32>,
        positions: &Ints<B, u32>,
        mask: Option<&Ints<B, u8>>,
        cache: Option<&mut KvCache<B, E>>,
    ) -> Result<Tensor<B, E>> {
        let (h, _) = self.hidden_states(ids, positions, mask, cache)?;
        self.head(&h)
    }

    /// The last hidden states of `ids` through the adaptation, with the prepared inputs (for the
    /// widened labels).
    pub fn hidden_states(
        &self,
        ids: &Ints<B, u32>,
        positions: &Ints<B, u32>,
        mask: Option<&Ints<B, u8>>,
        cache: Option<&mut KvCache<B, E>>,
    ) -> Result<(Tensor<B, E>, Prepared<B, E>)> {
        if positions.shape() != ids.shape() {
            return Err(shape_err("positions vs ids [batch, seq]", positions.shape(), ids.shape()));
        }
        let cached = cache.as_ref().map_or(0, |c| c.len());
        let prep = self.adapt.prepare(&self.dev, positions, mask, cached)?;
        let x = self.adapt.embed(&self.embed_tokens, ids, &prep)?;
        let h = self.hidden(x, &prep.positions, prep.mask.as_ref(), cache)?;
        Ok((h, prep))
    }

    /// The last layer's normalized hidden states `[batch, seq, hidden]` from input embeddings `x`
    /// (`[batch, seq, hidden]`: token embeddings, or with soft prompt vectors inserted). The
    /// adaptation's prefix, LoRA and adapters apply here; positions and mask are taken as given
    /// (see [`Adapt::prepare`] for the virtual tokens' shift).
    pub fn hidden(
        &self,
        mut x: Tensor<B, E>,
        positions: &Ints<B, u32>,
        mask: Option<&Ints<B, u8>>,
        mut cache: Option<&mut KvCache<B, E>>,
    ) -> Result<Tensor<B, E>> {
        let &[batch, seq, _] = x.shape() else {
            return Err(shape_err("input embeddings must be [batch, seq, hidden]", x.shape(), &[]));
        };
        if let Some(c) = &cache {
            if c.n_layers() != self.layers.len() || c.batch().is_some_and(|b| b != batch) {
                let have = [c.n_layers(), c.batch().unwrap_or(batch)];
                return Err(shape_err(
                    "cache [layers, batch] vs the model and input",
                    &have,
                    &[self.layers.len(), batch],
                ));
            }
        }
        // Checked before any layer appends to the cache, so that an error leaves it as it was.
        let kv_len = cache.as_ref().map_or(0, |c| c.len()) + seq;
        if let Some(m) = mask {
            if m.shape() != [batch, kv_len] {
                return Err(shape_err("mask vs [batch, cached + seq]", m.shape(), &[batch, kv_len]));
            }
        }
        if positions.shape() != [batch, seq] {
            return Err(shape_err("positions vs [batch, seq]", positions.shape(), &[batch, seq]));
        }
        let (heads, kvh, hd) = (self.cfg.num_attention_heads, self.cfg.kv_heads(), self.cfg.head_dim());
        let (eps, theta) = (self.cfg.rms_norm_eps as f32, self.cfg.rope_theta as f32);
        let dims = LayerDims { batch, seq, heads, kvh, hd, eps, theta };
        let prefix = self.adapt.prefix_layers()?;
        let ad = &self.adapt;
        let ckpt = checkpointing::active(self.checkpoint, ad, cache.is_some());
        for (i, l) in self.layers.iter().enumerate() {
            x = if ckpt && self.checkpoint.applies(i) {
                let (l, pos, mask, kv) = (l.clone(), positions.clone(), mask.cloned(), owned_prefix(&prefix, i));
                let view = BlockAdapt::new(ad, l.linears().map(|lin| lin.name.as_str()));
                checkpoint(&[x], move |xs: &[Tensor<B, E>]| {
                    let p = kv.as_ref().map(|(k, v, rows)| Prefix { k, v, rows: rows.as_ref() });
                    view.run(|ad| l.forward(ad, i, &xs[0], &pos, p, mask.as_ref(), None, dims))
                })?
            } else {
                l.forward(ad, i, &x, positions, layer_prefix(&prefix, i), mask, cache.as_deref_mut(), dims)?
            };
        }
        Ok(rmsnorm(&x, &self.norm, eps)?)
    }

    /// Logits `[.., vocab]` of hidden states `[.., hidden]`.
    pub fn head(&self, h: &Tensor<B, E>) -> Result<Tensor<B, E>> {
        Ok(linear(h, &self.lm_head, WeightLayout::OutIn, None)?)
    }

    /// Hugging Face's causal LM loss with positions `0..seq` and no padding: see [`Llama::loss_masked`].
    pub fn loss(&self, ids: &Ints<B, u32>, labels: &[i32]) -> Result<Tensor<B, E>> {
        let &[batch, seq] = ids.shape() else {
            return Err(shape_err("ids must be [batch, seq]", ids.shape(), &[]));
        };
        let positions = Ints::new(&self.dev, &[batch, seq], &positions(batch, seq, 0))?;
        self.loss_masked(ids, &positions, None, labels)
    }

    /// Hugging Face's causal LM loss: the mean cross-entropy of the logits at `i` against
    /// `labels[i + 1]` (`labels` `[batch, seq]`, row-major), over the labels not
    /// [`IGNORE_INDEX`].
    pub fn loss_masked(
        &self,
        ids: &Ints<B, u32>,
        positions: &Ints<B, u32>,
        mask: Option<&Ints<B, u8>>,
        labels: &[i32],
    ) -> Result<Tensor<B, E>> {
        let &[batch, seq] = ids.shape() else {
            return Err(shape_err("ids must be [batch, seq]", ids.shape(), &[]));
        };
        if labels.len() != batch * seq {
            return Err(Error::InvalidArgument(format!(
                "llama loss: {} labels for ids of shape [{batch}, {seq}]",
                labels.len()
            )));
        }
        let (h, prep) = self.hidden_states(ids, positions, mask, None)?;
        // With a soft prompt the sequence is longer by its virtual tokens (labels ignored there).
        let labels = self.adapt.widen_labels(labels, batch, &prep);
        let seq = labels.len() / batch.max(1usize);
        // The head and the loss fused: only the positions with a target, chunked, never the
        // [tokens, vocab] logits.
        let targets = crate::positions::next_token_targets(&labels, batch, seq);
        Ok(linear_cross_entropy(&h, &self.lm_head, &targets, IGNORE_INDEX, None)?)
    }
}

impl<B: Kernels<E>, E: Float> CausalLm<B, E> for Llama<B, E> {
    fn new_cache(&self) -> KvCache<B, E> {
        KvCache::new(self.layers.len())
    }

    fn logits_step(&self, ids: &[u32], positions: &[u32], cache: &mut KvCache<B, E>) -> Result<Vec<E>> {
        let t = ids.len();
        if t == 0 || positions.len() != t {
            return Err(Error::InvalidArgument(format!("logits_step: {t} ids with {} positions", positions.len())));
        }
        let ids = Ints::new(&self.dev, &[1, t], ids)?;
        let pos = Ints::new(&self.dev, &[1, t], positions)?;
        let (h, _) = self.hidden_states(&ids, &pos, None, Some(cache))?;
        // Only the last position goes through the head (a soft prompt may have lengthened the row).
        let (hidden, t) = (self.cfg.hidden_size, h.shape()[1]);
        let last = slice_cols(&reshape(&h, &[1, t * hidden])?, (t - 1) * hidden, hidden)?;
        Ok(self.head(&last)?.to_vec()?)
    }
}

use crate::positions::positions;

fn shape_err(what: &'static str, left: &[usize], right: &[usize]) -> Error {
    tuna_autograd::Error::Shape { op: "llama", what, left: left.to_vec(), right: right.to_vec() }.into()
}

#[cfg(test)]
mod tests;
