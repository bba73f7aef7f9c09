//! GPT-2 on tuna's autograd: learned positions, pre-LN blocks with a fused qkv `Conv1D`, causal
//! attention, GELU (tanh), and logits through the tied token embedding.
//!
//! Positions are an explicit input. Hugging Face uses `0..T-1` when no `position_ids` are passed
//! (even with left padding); its `generate` derives them from the attention mask instead
//! (`cumsum(mask) - 1`, pads set to 1). [`Gpt2::positions`] and [`Gpt2::positions_from_mask`]
//! build each. With a key padding mask, a left-pad query sees no key at all: its attention output
//! is zeros (Hugging Face's is arbitrary there); real tokens are unaffected either way.
//!
//! With a [`KvCache`], each layer's keys and values are appended to it and new tokens attend to
//! every cached one; their positions are absolute (learned `wpe` rows), continuing after the cache.

use crate::adapt::{layer_prefix, owned_prefix, Adapt, Prepared};
use crate::checkpointing::{self, BlockAdapt, Checkpointing};
use crate::config::Gpt2Config;
use crate::error::{Error, Result};
use crate::generate::{CausalLm, KvCache};
use crate::linear::Linear;
use crate::params::Loader;
use std::sync::Arc;
use tuna_autograd::checkpoint;
use tuna_autograd::ops::act::GeluKind;
use tuna_autograd::ops::attention::{attention, AttnOptions, Prefix};
use tuna_autograd::ops::elem::{add, slice_cols};
use tuna_autograd::ops::embed::embedding;
use tuna_autograd::ops::linear::{linear, WeightLayout};
use tuna_autograd::ops::loss::linear_cross_entropy;
use tuna_autograd::ops::norm::{add_layernorm, layernorm};
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Ints, Tensor};

use crate::IGNORE_INDEX;

/// A LayerNorm's weight and bias.
pub struct Norm<B: Kernels<E>, E: Float> {
    pub weight: Tensor<B, E>,
    pub bias: Tensor<B, E>,
}

/// GPT-2's Conv1D: a linear layer whose weight is stored `[in, out]`.
pub type Conv1D<B, E> = Linear<B, E>;

/// One pre-LN transformer block (`h.N`).
pub struct Gpt2Block<B: Kernels<E>, E: Float> {
    pub ln_1: Norm<B, E>,
    /// `attn.c_attn`: `[C, 3C]`, columns q | k | v.
    pub c_attn: Conv1D<B, E>,
    pub attn_proj: Conv1D<B, E>,
    pub ln_2: Norm<B, E>,
    pub c_fc: Conv1D<B, E>,
    pub mlp_proj: Conv1D<B, E>,
}

/// GPT-2 with its language-model head (tied to `wte`).
pub struct Gpt2<B: Kernels<E>, E: Float> {
    pub cfg: Gpt2Config,
    pub wte: Tensor<B, E>,
    pub wpe: Tensor<B, E>,
    pub blocks: Vec<Gpt2Block<B, E>>,
    pub ln_f: Norm<B, E>,
    /// The adaptation method in place (empty: the base model).
    pub adapt: Adapt<B, E>,
    /// The blocks whose activations a recorded forward recomputes in the backward.
    pub checkpoint: Checkpointing,
}

/// Tensors GPT-2 checkpoints carry that the model does not compute with (see
/// [`Loader::finish`]): older `transformers`' causal-mask buffers and the head, tied to `wte`.
/// A sequence classifier's head (`score`) is not loaded either: tuna scores with its own.
pub const KNOWN_UNUSED: &[&str] = &["h.*.attn.bias", "h.*.attn.masked_bias", "lm_head.weight", "score.weight"];

/// `name`, under the bare `GPT2Model` name or `GPT2LMHeadModel`'s `transformer.` prefix.
fn load<B: Kernels<E>, E: Float>(l: &mut Loader<'_, B, E>, name: &str, shape: &[usize]) -> Result<Tensor<B, E>> {
    l.load_any(&[name, &format!("transformer.{name}")], shape)
}

fn norm<B: Kernels<E>, E: Float>(l: &mut Loader<'_, B, E>, name: &str, c: usize) -> Result<Norm<B, E>> {
    Ok(Norm { weight: load(l, &format!("{name}.weight"), &[c])?, bias: load(l, &format!("{name}.bias"), &[c])? })
}

/// Conv1D `name` (bare or prefixed in the file), named `transformer.<name>` as GPT2LMHeadModel's
/// modules are.
fn conv<B: Kernels<E>, E: Float>(l: &mut Loader<'_, B, E>, name: &str, i: usize, o: usize) -> Result<Conv1D<B, E>> {
    let lin = Linear::new(
        format!("transformer.{name}"),
        load(l, &format!("{name}.weight"), &[i, o])?,
        Some(load(l, &format!("{name}.bias"), &[o])?),
        WeightLayout::InOut,
    );
    l.linear(lin)
}

/// A forward's sizes, as one block needs them.
#[derive(Clone, Copy)]
struct BlockDims {
    b: usize,
    t: usize,
    c: usize,
    h: usize,
    d: usize,
    eps: f32,
}

impl<B: Kernels<E>, E: Float> Gpt2Block<B, E> {
    /// The block's Conv1D layers, in order.
    pub fn linears(&self) -> [&Conv1D<B, E>; 4] {
        [&self.c_attn, &self.attn_proj, &self.c_fc, &self.mlp_proj]
    }

    /// Block `l` over `x` through the adaptation `ad`, with the layer's prefix, the key mask and
    /// an optional KV cache.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        ad: &Adapt<B, E>,
        l: usize,
        x: &Tensor<B, E>,
        prefix: Option<Prefix<'_, B, E>>,
        mask: Option<&Ints<B, u8>>,
        cache: Option<&mut KvCache<B, E>>,
        dims: BlockDims,
    ) -> Result<Tensor<B, E>> {
        let BlockDims { b, t, c, h, d, eps } = dims;
        let qkv = ad.linear(&self.c_attn, &self.ln_1.apply(x, eps)?)?;
        let split = |i: usize| -> Result<Tensor<B, E>> { Ok(reshape(&slice_cols(&qkv, i * c, c)?, &[b, t, h, d])?) };
        // With a cache, `k`/`v` are its preallocated buffers and `kv_len` the rows in use.
        let ((k, v), kv_len) = KvCache::through(cache, l, split(1)?, split(2)?)?;
        let a = attention(&split(0)?, &k, &v, prefix, mask, AttnOptions { causal: true, scale: None, kv_len })?;
        let a = ad.linear(&self.attn_proj, &reshape(&a, &[b, t, c])?)?;
        // The residual add and ln_2 in one pass (h = x + a, and ln_2(h)).
        let (x, n2) = self.ln_2.add_apply(x, &ad.sublayer(l, false, a)?, eps)?;
        // One fused op (product, bias, GELU) unless an adapter acts on c_fc (see `linear_gelu`).
        let f = ad.linear_gelu(&self.c_fc, &n2, GeluKind::Tanh)?;
        Ok(add(&x, &ad.sublayer(l, true, ad.linear(&self.mlp_proj, &f)?)?)?)
    }
}

impl<B: Kernels<E>, E: Float> Clone for Gpt2Block<B, E> {
    /// The same tensors (shared storage): what a checkpointed block's recompute holds.
    fn clone(&self) -> Self {
        Gpt2Block {
            ln_1: self.ln_1.clone(),
            c_attn: self.c_attn.clone(),
            attn_proj: self.attn_proj.clone(),
            ln_2: self.ln_2.clone(),
            c_fc: self.c_fc.clone(),
            mlp_proj: self.mlp_proj.clone(),
        }
    }
}

impl<B: Kernels<E>, E: Float> Clone for Norm<B, E> {
    fn clone(&self) -> Self {
        Norm { weight: self.weight.clone(), bias: self.bias.clone() }
    }
}

impl<B: Kernels<E>, E: Float> Norm<B, E> {
    fn apply(&self, x: &Tensor<B, E>, eps: f32) -> Result<Tensor<B, E>> {
        Ok(layernorm(x, &self.weight, &self.bias, eps)?)
    }

    /// `(x + r, norm(x + r))` from one kernel pass.
    fn add_apply(&self, x: &Tensor<B, E>, r: &Tensor<B, E>, eps: f32) -> Result<(Tensor<B, E>, Tensor<B, E>)> {
        Ok(add_layernorm(x, r, &self.weight, &self.bias, eps)?)
    }
}

impl<B: Kernels<E>, E: Float> Gpt2<B, E> {
    /// Every tensor of `cfg`'s model from `loader`'s source (Hugging Face names, with or without
    /// the `transformer.` prefix); a missing or mis-shaped tensor is an error naming it, and so
    /// are tensors it does not use (beyond [`KNOWN_UNUSED`]).
    pub fn load(cfg: &Gpt2Config, loader: &mut Loader<'_, B, E>) -> Result<Self> {
        let (c, ff) = (cfg.n_embd, cfg.inner());
        let wte = load(loader, "wte.weight", &[cfg.vocab_size, c])?;
        let wpe = load(loader, "wpe.weight", &[cfg.n_positions, c])?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = format!("h.{i}");
            blocks.push(Gpt2Block {
                ln_1: norm(loader, &format!("{p}.ln_1"), c)?,
                c_attn: conv(loader, &format!("{p}.attn.c_attn"), c, 3 * c)?,
                attn_proj: conv(loader, &format!("{p}.attn.c_proj"), c, c)?,
                ln_2: norm(loader, &format!("{p}.ln_2"), c)?,
                c_fc: conv(loader, &format!("{p}.mlp.c_fc"), c, ff)?,
                mlp_proj: conv(loader, &format!("{p}.mlp.c_proj"), ff, c)?,
            });
        }
        let ln_f = norm(loader, "ln_f", c)?;
        loader.finish(KNOWN_UNUSED)?;
        Ok(Gpt2 { cfg: cfg.clone(), wte, wpe, blocks, ln_f, adapt: Adapt::default(), checkpoint: Checkpointing::Off })
    }

    fn dev(&self) -> &Arc<B> {
        self.wte.device()
    }

    /// Hugging Face's default positions: `0..seq` in every row.
    pub fn positions(&self, batch: usize, seq: usize) -> Result<Ints<B, u32>> {
        Ok(Ints::new(self.dev(), &[batch, seq], &crate::positions::positions(batch, seq, 0))?)
    }

    /// Positions from an attention mask as Hugging Face's `generate` makes them: `cumsum(mask) - 1`
    /// for real tokens (so a left-padded row starts at 0), 1 for padding.
    pub fn positions_from_mask(&self, mask: &Ints<B, u8>) -> Result<Ints<B, u32>> {
        let seq = mask.shape().last().copied().unwrap_or(0);
        let rows = mask.host().len() / seq.max(1);
        let v = crate::positions::positions_from_mask(mask.host(), rows, seq);
        Ok(Ints::new(self.dev(), mask.shape(), &v)?)
    }

    /// Final hidden states `[batch, seq, n_embd]` (after `ln_f`) of `ids` (`[batch, seq]`) at
    /// `positions` (`[batch, seq]`), attending only to keys where `mask` (`[batch, seq]`) is 1.
    pub fn hidden(
        &self,
        ids: &Ints<B, u32>,
        positions: &Ints<B, u32>,
        mask: Option<&Ints<B, u8>>,
    ) -> Result<Tensor<B, E>> {
        self.hidden_cached(ids, positions, mask, None)
    }

    /// [`Gpt2::hidden`] with an optional `cache`: the new keys and values are appended to it and
    /// the queries see every cached key (causally, the new tokens following the cached ones).
    /// `positions` are absolute (after `cache.len()` cached tokens they usually start there), and
    /// `mask` (`[batch, cached + seq]`, 1 = attend) then covers the cached tokens too.
    pub fn hidden_cached(
        &self,
        ids: &Ints<B, u32>,
        positions: &Ints<B, u32>,
        mask: Option<&Ints<B, u8>>,
        cache: Option<&mut KvCache<B, E>>,
    ) -> Result<Tensor<B, E>> {
        Ok(self.hidden_states(ids, positions, mask, cache)?.0)
    }

    /// [`Gpt2::hidden_cached`] through the adaptation: with a soft prompt the output has its `n`
    /// virtual positions too (inserted before each row's first real token), and with a prompt or
    /// prefix the content positions are shifted past the virtual tokens, as PEFT does. Returns
    /// the prepared inputs too (for widening labels).
    pub fn hidden_states(
        &self,
        ids: &Ints<B, u32>,
        positions: &Ints<B, u32>,
        mask: Option<&Ints<B, u8>>,
        mut cache: Option<&mut KvCache<B, E>>,
    ) -> Result<(Tensor<B, E>, Prepared<B, E>)> {
        let (c, h, d, eps) =
            (self.cfg.n_embd, self.cfg.n_head, self.cfg.head_dim(), self.cfg.layer_norm_epsilon as f32);
        let (b, t_ids) = batch_seq(ids)?;
        if let Some(cc) = &cache {
            if cc.n_layers() != self.blocks.len() || cc.batch().is_some_and(|cb| cb != b) {
                return Err(shape_error(
                    "cache [layers, batch] vs the model and input",
                    &[cc.n_layers(), cc.batch().unwrap_or(b)],
                    &[self.blocks.len(), b],
                ));
            }
        }
        let cached = cache.as_ref().map_or(0, |cc| cc.len());
        let content_cached = cached.saturating_sub(if cached > 0 { self.adapt.prompt_width() } else { 0 });
        // Checked before any layer appends to the cache, so that an error leaves it as it was.
        for (what, have, want) in [
            ("mask vs [batch, cached + seq]", mask.map(|m| m.shape()), [b, content_cached + t_ids]),
            ("positions vs [batch, seq]", Some(positions.shape()), [b, t_ids]),
        ] {
            if let Some(have) = have.filter(|&s| s != want) {
                return Err(shape_error(what, have, &want));
            }
        }
        let prep = self.adapt.prepare(self.dev(), positions, mask, cached)?;
        let (positions, mask) = (&prep.positions, prep.mask.as_ref());
        let t = positions.shape()[1];
        if let Some(&p) = positions.host().iter().find(|&&p| p as usize >= self.cfg.n_positions) {
            return Err(Error::InvalidArgument(format!(
                "gpt2: position {p} is beyond the model's {} learned positions (n_positions)",
                self.cfg.n_positions
            )));
        }
        let tok = self.adapt.embed(&self.wte, ids, &prep)?;
        let mut x = add(&tok, &embedding(&self.wpe, positions, None)?)?;
        let dims = BlockDims { b, t, c, h, d, eps };
        let prefix = self.adapt.prefix_layers()?;
        let ad = &self.adapt;
        let ckpt = checkpointing::active(self.checkpoint, ad, cache.is_some());
        for (l, blk) in self.blocks.iter().enumerate() {
            x = if ckpt && self.checkpoint.applies(l) {
                let (blk, mask, kv) = (blk.clone(), mask.cloned(), owned_prefix(&prefix, l));
                let view = BlockAdapt::new(ad, blk.linears().map(|lin| lin.name.as_str()));
                checkpoint(&[x], move |xs: &[Tensor<B, E>]| {
                    let p = kv.as_ref().map(|(k, v, rows)| Prefix { k, v, rows: rows.as_ref() });
                    view.run(|ad| blk.forward(ad, l, &xs[0], p, mask.as_ref(), None, dims))
                })?
            } else {
                blk.forward(ad, l, &x, layer_prefix(&prefix, l), mask, cache.as_deref_mut(), dims)?
            };
        }
        Ok((self.ln_f.apply(&x, eps)?, prep))
    }

    /// Logits `[batch, seq, vocab]` (`x wte^T`) of `ids` at `positions`, no padding mask.
    pub fn forward(&self, ids: &Ints<B, u32>, positions: &Ints<B, u32>) -> Result<Tensor<B, E>> {
        self.forward_masked(ids, positions, None)
    }

    /// Logits `[batch, seq, vocab]` with a key padding mask (1 = token).
    pub fn forward_masked(
        &self,
        ids: &Ints<B, u32>,
        positions: &Ints<B, u32>,
        mask: Option<&Ints<B, u8>>,
    ) -> Result<Tensor<B, E>> {
        self.head(&self.hidden(ids, positions, mask)?)
    }

    /// Logits `[batch, seq, vocab]` through an optional KV cache: see [`Gpt2::hidden_cached`].
    pub fn forward_cached(
        &self,
        ids: &Ints<B, u32>,
        positions: &Ints<B, u32>,
        mask: Option<&Ints<B, u8>>,
        cache: Option<&mut KvCache<B, E>>,
    ) -> Result<Tensor<B, E>> {
        self.head(&self.hidden_cached(ids, positions, mask, cache)?)
    }

    /// Logits `[.., vocab]` of hidden states `[.., n_embd]` through the tied head (`x wte^T`).
    pub fn head(&self, x: &Tensor<B, E>) -> Result<Tensor<B, E>> {
        Ok(linear(x, &self.wte, WeightLayout::OutIn, None)?)
    }

    /// Hugging Face's causal LM loss with default positions and no mask: mean cross-entropy of
    /// `logits[:, :-1]` against `labels[:, 1:]` (`[batch, seq]`), labels of -100 ignored.
    pub fn loss(&self, ids: &Ints<B, u32>, labels: &[i32]) -> Result<Tensor<B, E>> {
        let (b, t) = batch_seq(ids)?;
        self.loss_masked(ids, &self.positions(b, t)?, None, labels)
    }

    /// The causal LM loss at explicit positions, with an optional key padding mask: the mean
    /// cross-entropy of the logits at `i` against `labels[i + 1]` (`labels` `[batch, seq]`,
    /// row-major), over the labels not [`IGNORE_INDEX`].
    pub fn loss_masked(
        &self,
        ids: &Ints<B, u32>,
        positions: &Ints<B, u32>,
        mask: Option<&Ints<B, u8>>,
        labels: &[i32],
    ) -> Result<Tensor<B, E>> {
        let (b, t) = batch_seq(ids)?;
        if labels.len() != b * t {
            return Err(shape_error("labels vs ids [batch, seq]", &[labels.len()], &[b, t]));
        }
        let (hid, prep) = self.hidden_states(ids, positions, mask, None)?;
        // With a soft prompt the sequence is longer by its virtual tokens (labels ignored there).
        let labels = self.adapt.widen_labels(labels, b, &prep);
        let t = labels.len() / b.max(1usize);
        // The head and the loss fused: only the positions with a target, chunked, never the
        // [tokens, vocab] logits.
        let targets = crate::positions::next_token_targets(&labels, b, t);
        Ok(linear_cross_entropy(&hid, &self.wte, &targets, IGNORE_INDEX, None)?)
    }
}

impl<B: Kernels<E>, E: Float> CausalLm<B, E> for Gpt2<B, E> {
    fn new_cache(&self) -> KvCache<B, E> {
        KvCache::new(self.blocks.len())
    }

    fn logits_step(&self, ids: &[u32], positions: &[u32], cache: &mut KvCache<B, E>) -> Result<Vec<E>> {
        let t = ids.len();
        if t == 0 || positions.len() != t {
            return Err(Error::InvalidArgument(format!("logits_step: {t} ids with {} positions", positions.len())));
        }
        let ids = Ints::new(self.dev(), &[1, t], ids)?;
        let pos = Ints::new(self.dev(), &[1, t], positions)?;
        let h = self.hidden_cached(&ids, &pos, None, Some(cache))?;
        // Only the last position goes through the head (a soft prompt may have lengthened the row).
        let (c, t) = (self.cfg.n_embd, h.shape()[1]);
        let last = slice_cols(&reshape(&h, &[1, t * c])?, (t - 1) * c, c)?;
        Ok(self.head(&last)?.to_vec()?)
    }
}

fn shape_error(what: &'static str, left: &[usize], right: &[usize]) -> Error {
    tuna_autograd::Error::Shape { op: "gpt2", what, left: left.to_vec(), right: right.to_vec() }.into()
}

/// `(batch, seq)` of `ids`, or a shape error.
pub(crate) fn batch_seq<B: tuna_kernels::Alloc<u32>>(ids: &Ints<B, u32>) -> Result<(usize, usize)> {
    match *ids.shape() {
        [b, t] => Ok((b, t)),
        _ => Err(tuna_autograd::Error::Shape {
            op: "model input",
            what: "ids must be [batch, seq]",
            left: ids.shape().to_vec(),
            right: vec![],
        }
        .into()),
    }
}
