//! T5 (the original and v1.1 / flan-T5) on tuna's autograd: an encoder-decoder with RMS norms
//! (T5's layer norm has no mean and no bias), unscaled attention with a learned relative-position
//! bias (one table per stack, in its first layer, shared by the stack's layers), cross-attention
//! from the decoder to the encoder, a ReLU or gated-GELU feed-forward, and a head tied to the
//! shared embedding (the decoder output scaled by `d_model^-0.5`) or of its own.
//!
//! The position bias reaches the fused attention kernel as an additive score bias
//! `[heads, q_len, keys]`: bucket ids are computed on the host, their rows gathered from the table
//! by the embedding op and put head-major by a product with the identity (a few multiply-adds per
//! score, and gradients flow back to the table through both).
//!
//! Adaptation, following PEFT's seq2seq models: a soft prompt goes before the encoder's input;
//! a prefix reaches the decoder's self-attention (see [`T5::decoder_prefix`]); LoRA names the
//! modules as Hugging Face does (`decoder.block.0.layer.1.EncDecAttention.q`); Houlsby adapters
//! follow every self-attention and feed-forward sublayer, encoder blocks first.

use crate::adapt::{Adapt, LayerKv};
use crate::checkpointing::{self, BlockAdapt, Checkpointing};
use crate::config::T5Config;
use crate::error::{Error, Result};
use crate::generate::{CausalLm, KvCache};
use crate::linear::Linear;
use crate::params::Loader;
use std::sync::Arc;
use tuna_autograd::checkpoint;
use tuna_autograd::ops::act::{gelu, GeluKind};
use tuna_autograd::ops::attention::{attention_biased, AttnOptions, Prefix};
use tuna_autograd::ops::elem::{add, mul, scale, slice_cols};
use tuna_autograd::ops::embed::embedding;
use tuna_autograd::ops::linear::{linear, matmul, MatmulParams, WeightLayout};
use tuna_autograd::ops::loss::linear_cross_entropy;
use tuna_autograd::ops::norm::{add_rmsnorm, rmsnorm};
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Ints, Tensor};

use crate::IGNORE_INDEX;

/// Tensors T5 checkpoints carry that the model does not compute with: the stacks' copies of the
/// shared embedding (older files store them), the unused bias table some files keep in the first
/// cross-attention, and `lm_head.weight` when it equals the shared embedding.
pub const KNOWN_UNUSED: &[&str] = &[
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
];

/// One attention's projections (`[out, in]`, no biases).
pub struct T5Attention<B: Kernels<E>, E: Float> {
    pub q: Linear<B, E>,
    pub k: Linear<B, E>,
    pub v: Linear<B, E>,
    pub o: Linear<B, E>,
}

/// The feed-forward: `wo(relu(wi x))`, or `wo(gelu_tanh(wi_0 x) * wi_1 x)` when gated.
pub struct T5Ff<B: Kernels<E>, E: Float> {
    /// `wi` (ReLU) or `wi_0` (gated).
    pub wi: Linear<B, E>,
    /// `wi_1`, when gated.
    pub wi_1: Option<Linear<B, E>>,
    pub wo: Linear<B, E>,
}

/// An encoder block (`encoder.block.N`): self-attention, feed-forward, each after its norm.
pub struct T5EncoderBlock<B: Kernels<E>, E: Float> {
    pub attn_norm: Tensor<B, E>,
    pub attn: T5Attention<B, E>,
    pub ff_norm: Tensor<B, E>,
    pub ff: T5Ff<B, E>,
}

/// A decoder block (`decoder.block.N`): causal self-attention, cross-attention, feed-forward.
pub struct T5DecoderBlock<B: Kernels<E>, E: Float> {
    pub self_norm: Tensor<B, E>,
    pub self_attn: T5Attention<B, E>,
    pub cross_norm: Tensor<B, E>,
    pub cross: T5Attention<B, E>,
    pub ff_norm: Tensor<B, E>,
    pub ff: T5Ff<B, E>,
}

/// A T5 model (`T5ForConditionalGeneration`).
pub struct T5<B: Kernels<E>, E: Float> {
    pub cfg: T5Config,
    pub dev: Arc<B>,
    /// `shared.weight` `[vocab, d_model]`: both stacks' input embedding (and the tied head).
    pub shared: Tensor<B, E>,
    /// The relative-position bias tables `[buckets, heads]` of the encoder and the decoder.
    pub enc_bias: Tensor<B, E>,
    pub dec_bias: Tensor<B, E>,
    pub encoder: Vec<T5EncoderBlock<B, E>>,
    pub enc_norm: Tensor<B, E>,
    pub decoder: Vec<T5DecoderBlock<B, E>>,
    pub dec_norm: Tensor<B, E>,
    /// `lm_head.weight`, or the same tensor as `shared` when tied.
    pub lm_head: Tensor<B, E>,
    pub adapt: Adapt<B, E>,
    /// The blocks (encoder first, then decoder) whose activations a recorded forward recomputes.
    pub checkpoint: Checkpointing,
}

/// A forward's sizes, as one block needs them.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    dkv: usize,
    eps: f32,
}

impl<B: Kernels<E>, E: Float> T5Attention<B, E> {
    fn linears(&self) -> [&Linear<B, E>; 4] {
        [&self.q, &self.k, &self.v, &self.o]
    }

    /// Attention of `x` (`[batch, t, d]`) over `kv_src` (`[batch, s, d]`; `x` itself for
    /// self-attention), scores unscaled plus `bias`; with a cache, the new keys and values are
    /// appended to layer `i` of it first.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        ad: &Adapt<B, E>,
        x: &Tensor<B, E>,
        kv: KvSource<'_, B, E>,
        prefix: Option<Prefix<'_, B, E>>,
        mask: Option<&Ints<B, u8>>,
        bias: Option<&Tensor<B, E>>,
        causal: bool,
        d: Dims,
    ) -> Result<Tensor<B, E>> {
        let t = x.shape()[1];
        let q = reshape(&ad.linear(&self.q, x)?, &[d.batch, t, d.heads, d.dkv])?;
        let heads = |lin: &Linear<B, E>, src: &Tensor<B, E>| -> Result<Tensor<B, E>> {
            let s = src.shape()[1];
            Ok(reshape(&ad.linear(lin, src)?, &[d.batch, s, d.heads, d.dkv])?)
        };
        let ((k, v), kv_len) = match kv {
            KvSource::Own(cache, i) => KvCache::through(cache, i, heads(&self.k, x)?, heads(&self.v, x)?)?,
            KvSource::Other(src) => ((heads(&self.k, src)?, heads(&self.v, src)?), None),
            KvSource::Ready(k, v) => ((k.clone(), v.clone()), None),
        };
        let opt = AttnOptions { causal, scale: Some(1.0), kv_len };
        let a = attention_biased(&q, &k, &v, prefix, mask, bias, opt)?;
        ad.linear(&self.o, &reshape(&a, &[d.batch, t, d.heads * d.dkv])?)
    }
}

// Manual clones: the same tensors (shared storage), what a checkpointed block's recompute holds
// (a derive would ask the backend itself to be Clone).
impl<B: Kernels<E>, E: Float> Clone for T5Attention<B, E> {
    fn clone(&self) -> Self {
        T5Attention { q: self.q.clone(), k: self.k.clone(), v: self.v.clone(), o: self.o.clone() }
    }
}
impl<B: Kernels<E>, E: Float> Clone for T5Ff<B, E> {
    fn clone(&self) -> Self {
        T5Ff { wi: self.wi.clone(), wi_1: self.wi_1.clone(), wo: self.wo.clone() }
    }
}
impl<B: Kernels<E>, E: Float> Clone for T5EncoderBlock<B, E> {
    fn clone(&self) -> Self {
        T5EncoderBlock {
            attn_norm: self.attn_norm.clone(),
            attn: self.attn.clone(),
            ff_norm: self.ff_norm.clone(),
            ff: self.ff.clone(),
        }
    }
}
impl<B: Kernels<E>, E: Float> Clone for T5DecoderBlock<B, E> {
    fn clone(&self) -> Self {
        T5DecoderBlock {
            self_norm: self.self_norm.clone(),
            self_attn: self.self_attn.clone(),
            cross_norm: self.cross_norm.clone(),
            cross: self.cross.clone(),
            ff_norm: self.ff_norm.clone(),
            ff: self.ff.clone(),
        }
    }
}

/// Where an attention's keys and values come from.
enum KvSource<'a, B: Kernels<E>, E: Float> {
    /// The queries' own input, through layer `i` of an optional KV cache.
    Own(Option<&'a mut KvCache<B, E>>, usize),
    /// Another sequence (the encoder output), projected here.
    Other(&'a Tensor<B, E>),
    /// Keys and values projected once already (`[batch, s, heads, d_kv]`: generation's
    /// cross-attention).
    Ready(&'a Tensor<B, E>, &'a Tensor<B, E>),
}

impl<B: Kernels<E>, E: Float> T5Ff<B, E> {
    fn linears(&self) -> Vec<&Linear<B, E>> {
        let mut v = vec![&self.wi];
        v.extend(self.wi_1.as_ref());
        v.push(&self.wo);
        v
    }

    fn forward(&self, ad: &Adapt<B, E>, x: &Tensor<B, E>) -> Result<Tensor<B, E>> {
        let h = match &self.wi_1 {
            None => gelu(&ad.linear(&self.wi, x)?, GeluKind::Relu)?,
            Some(wi_1) => mul(&gelu(&ad.linear(&self.wi, x)?, GeluKind::Tanh)?, &ad.linear(wi_1, x)?)?,
        };
        ad.linear(&self.wo, &h)
    }
}

impl<B: Kernels<E>, E: Float> T5EncoderBlock<B, E> {
    pub fn linears(&self) -> Vec<&Linear<B, E>> {
        let mut v: Vec<_> = self.attn.linears().into();
        v.extend(self.ff.linears());
        v
    }

    /// Block `i` (its Houlsby index) over `x` under the key `mask`, with the stack's `bias`.
    fn forward(
        &self,
        ad: &Adapt<B, E>,
        i: usize,
        x: &Tensor<B, E>,
        mask: &Ints<B, u8>,
        bias: &Tensor<B, E>,
        d: Dims,
    ) -> Result<Tensor<B, E>> {
        let h = rmsnorm(x, &self.attn_norm, d.eps)?;
        let a = self.attn.forward(ad, &h, KvSource::Own(None, 0), None, Some(mask), Some(bias), false, d)?;
        let (x, h) = add_rmsnorm(x, &ad.sublayer(i, false, a)?, &self.ff_norm, d.eps)?;
        let f = self.ff.forward(ad, &h)?;
        Ok(add(&x, &ad.sublayer(i, true, f)?)?)
    }
}

/// The decoder's view of the encoder: its output and mask, or (generation) each layer's
/// cross-attention keys and values projected once.
pub struct EncoderState<B: Kernels<E>, E: Float> {
    pub out: Tensor<B, E>,
    pub mask: Ints<B, u8>,
    /// Per decoder layer `(k, v)` `[batch, s, heads, d_kv]`, when projected ahead.
    pub cross_kv: Option<Vec<LayerKv<B, E>>>,
}

impl<B: Kernels<E>, E: Float> T5DecoderBlock<B, E> {
    pub fn linears(&self) -> Vec<&Linear<B, E>> {
        let mut v: Vec<_> = self.self_attn.linears().into();
        v.extend(self.cross.linears());
        v.extend(self.ff.linears());
        v
    }

    /// Decoder block `j` (Houlsby index `hi`) over `x`.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        ad: &Adapt<B, E>,
        hi: usize,
        j: usize,
        x: &Tensor<B, E>,
        enc: &EncoderState<B, E>,
        prefix: Option<Prefix<'_, B, E>>,
        bias: &Tensor<B, E>,
        cache: Option<&mut KvCache<B, E>>,
        d: Dims,
    ) -> Result<Tensor<B, E>> {
        let h = rmsnorm(x, &self.self_norm, d.eps)?;
        let a = self.self_attn.forward(ad, &h, KvSource::Own(cache, j), prefix, None, Some(bias), true, d)?;
        let (x, h) = add_rmsnorm(x, &ad.sublayer(hi, false, a)?, &self.cross_norm, d.eps)?;
        let src = match &enc.cross_kv {
            Some(kv) => KvSource::Ready(&kv[j].0, &kv[j].1),
            None => KvSource::Other(&enc.out),
        };
        let c = self.cross.forward(ad, &h, src, None, Some(&enc.mask), None, false, d)?;
        let (x, h) = add_rmsnorm(&x, &c, &self.ff_norm, d.eps)?;
        let f = self.ff.forward(ad, &h)?;
        Ok(add(&x, &ad.sublayer(hi, true, f)?)?)
    }
}

/// T5's relative-position bucket of `rel = key - query` (Mesh TensorFlow's, as transformers
/// computes it, in f32): half the buckets exact distances, half logarithmic up to
/// `max_distance`; `bidirectional` splits them between keys before and after the query, otherwise
/// keys after the query all fall in bucket 0.
pub fn relative_bucket(rel: i64, bidirectional: bool, num_buckets: usize, max_distance: usize) -> u32 {
    let mut nb = num_buckets as i64;
    let mut bucket = 0i64;
    let dist = if bidirectional {
        nb /= 2;
        if rel > 0 {
            bucket += nb;
        }
        rel.abs()
    } else {
        (-rel).max(0)
    };
    let max_exact = nb / 2;
    if dist < max_exact {
        return (bucket + dist) as u32;
    }
    // f32 throughout, the order transformers uses: log(d / max_exact) / log(max_dist / max_exact) * (nb - max_exact)
    // (a float-to-int cast saturates: the config check keeps this finite and positive).
    let ratio = ((dist as f32) / max_exact.max(1) as f32).ln();
    let denom = ((max_distance as f64) / max_exact.max(1) as f64).ln() as f32;
    let large = max_exact.saturating_add((ratio / denom * (nb - max_exact) as f32) as i64);
    (bucket + large.clamp(0, (nb - 1).max(0))) as u32
}

impl<B: Kernels<E>, E: Float> T5<B, E> {
    /// Load every weight under its Hugging Face name through `loader`. The head is
    /// `lm_head.weight` when the checkpoint has it, else the shared embedding. Tensors it does not
    /// use (beyond [`KNOWN_UNUSED`]) are an error naming them.
    pub fn load(cfg: &T5Config, loader: &mut Loader<'_, B, E>) -> Result<Self> {
        let (d, inner, ff, heads) = (cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.num_heads);
        let nb = cfg.relative_attention_num_buckets;
        let shared = loader.load_any(&["shared.weight", "encoder.embed_tokens.weight"], &[cfg.vocab_size, d])?;
        let lin = |l: &mut Loader<'_, B, E>, name: String, out: usize, inp: usize| -> Result<Linear<B, E>> {
            let weight = l.load(&format!("{name}.weight"), &[out, inp])?;
            l.linear(Linear::new(name, weight, None, WeightLayout::OutIn))
        };
        let attn = |l: &mut Loader<'_, B, E>, p: &str| -> Result<T5Attention<B, E>> {
            Ok(T5Attention {
                q: lin(l, format!("{p}.q"), inner, d)?,
                k: lin(l, format!("{p}.k"), inner, d)?,
                v: lin(l, format!("{p}.v"), inner, d)?,
                o: lin(l, format!("{p}.o"), d, inner)?,
            })
        };
        let feed = |l: &mut Loader<'_, B, E>, p: &str| -> Result<T5Ff<B, E>> {
            let p = format!("{p}.DenseReluDense");
            Ok(if cfg.gated() {
                T5Ff {
                    wi: lin(l, format!("{p}.wi_0"), ff, d)?,
                    wi_1: Some(lin(l, format!("{p}.wi_1"), ff, d)?),
                    wo: lin(l, format!("{p}.wo"), d, ff)?,
                }
            } else {
                T5Ff { wi: lin(l, format!("{p}.wi"), ff, d)?, wi_1: None, wo: lin(l, format!("{p}.wo"), d, ff)? }
            })
        };
        let norm = |l: &mut Loader<'_, B, E>, name: String| l.load(&name, &[d]);
        let mut encoder = Vec::with_capacity(cfg.num_layers);
        let mut enc_bias = None;
        for i in 0..cfg.num_layers {
            let p = format!("encoder.block.{i}.layer");
            let a = format!("{p}.0.SelfAttention");
            if i == 0 {
                enc_bias = Some(loader.load(&format!("{a}.relative_attention_bias.weight"), &[nb, heads])?);
            }
            encoder.push(T5EncoderBlock {
                attn: attn(loader, &a)?,
                attn_norm: norm(loader, format!("{p}.0.layer_norm.weight"))?,
                ff: feed(loader, &format!("{p}.1"))?,
                ff_norm: norm(loader, format!("{p}.1.layer_norm.weight"))?,
            });
        }
        let enc_norm = norm(loader, "encoder.final_layer_norm.weight".into())?;
        let mut decoder = Vec::with_capacity(cfg.decoder_layers());
        let mut dec_bias = None;
        for i in 0..cfg.decoder_layers() {
            let p = format!("decoder.block.{i}.layer");
            let a = format!("{p}.0.SelfAttention");
            if i == 0 {
                dec_bias = Some(loader.load(&format!("{a}.relative_attention_bias.weight"), &[nb, heads])?);
            }
            decoder.push(T5DecoderBlock {
                self_attn: attn(loader, &a)?,
                self_norm: norm(loader, format!("{p}.0.layer_norm.weight"))?,
                cross: attn(loader, &format!("{p}.1.EncDecAttention"))?,
                cross_norm: norm(loader, format!("{p}.1.layer_norm.weight"))?,
                ff: feed(loader, &format!("{p}.2"))?,
                ff_norm: norm(loader, format!("{p}.2.layer_norm.weight"))?,
            });
        }
        let dec_norm = norm(loader, "decoder.final_layer_norm.weight".into())?;
        // As transformers: the head is the shared embedding unless the file holds an
        // `lm_head.weight` that differs from it.
        let shared_name = ["shared.weight", "encoder.embed_tokens.weight"]
            .into_iter()
            .find(|n| loader.src.shape(n).is_some())
            .unwrap_or("shared.weight");
        let own_head = loader.src.shape("lm_head.weight").is_some()
            && loader.src.require("lm_head.weight", &[cfg.vocab_size, d])?
                != loader.src.require(shared_name, &[cfg.vocab_size, d])?;
        let lm_head = if own_head { loader.load("lm_head.weight", &[cfg.vocab_size, d])? } else { shared.clone() };
        let mut unused = KNOWN_UNUSED.to_vec();
        if !own_head {
            unused.push("lm_head.weight");
        }
        loader.finish(&unused)?;
        let missing = |what: &str| Error::Format {
            path: loader.src.path().to_path_buf(),
            msg: format!("t5 config: {what} has no layers"),
        };
        Ok(T5 {
            cfg: cfg.clone(),
            dev: loader.dev.clone(),
            shared,
            enc_bias: enc_bias.ok_or_else(|| missing("the encoder"))?,
            dec_bias: dec_bias.ok_or_else(|| missing("the decoder"))?,
            encoder,
            enc_norm,
            decoder,
            dec_norm,
            lm_head,
            adapt: Adapt::default(),
            checkpoint: Checkpointing::Off,
        })
    }

    fn dims(&self, batch: usize) -> Dims {
        Dims { batch, heads: self.cfg.num_heads, dkv: self.cfg.d_kv, eps: self.cfg.layer_norm_epsilon as f32 }
    }

    /// The position bias `[heads, q_len, keys]` from `table` for queries at positions
    /// `offset..offset + q_len` over keys at `0..keys`.
    pub fn position_bias(
        &self,
        table: &Tensor<B, E>,
        q_len: usize,
        keys: usize,
        offset: usize,
        bidirectional: bool,
    ) -> Result<Tensor<B, E>> {
        let (nb, maxd, heads) =
            (self.cfg.relative_attention_num_buckets, self.cfg.relative_attention_max_distance, self.cfg.num_heads);
        let ids: Vec<u32> = (0..q_len)
            .flat_map(|i| {
                (0..keys).map(move |j| relative_bucket(j as i64 - (i + offset) as i64, bidirectional, nb, maxd))
            })
            .collect();
        let ids = Ints::new(&self.dev, &[1, q_len * keys], &ids)?;
        let rows = embedding(table, &ids, None)?; // [1, q*k, heads]
        let mut eye = vec![E::from_f32(0.0); heads * heads];
        for h in 0..heads {
            eye[h * heads + h] = E::from_f32(1.0);
        }
        let eye = Tensor::constant(&self.dev, &[heads, heads], &eye)?;
        // [heads, heads] x [q*k, heads]^T = the rows head-major.
        let t = matmul(&eye, &rows, MatmulParams { trans_b: true, ..MatmulParams::new(heads, q_len * keys, heads) })?;
        Ok(reshape(&t, &[heads, q_len, keys])?)
    }

    /// The encoder's final hidden states `[batch, s', d]` of `ids` (`[batch, s]`) under `mask`
    /// (1 = token; padding anywhere), and the mask they go with: with a soft prompt, its vectors
    /// come first in each row (before the row's first token) and `s' = s + n`.
    pub fn encode(&self, ids: &Ints<B, u32>, mask: &Ints<B, u8>) -> Result<(Tensor<B, E>, Ints<B, u8>)> {
        let &[batch, seq] = ids.shape() else {
            return Err(shape_err("ids must be [batch, seq]", ids.shape(), &[]));
        };
        if mask.shape() != [batch, seq] {
            return Err(shape_err("encoder mask vs ids [batch, seq]", mask.shape(), &[batch, seq]));
        }
        // Positions are not used (relative attention); the prompt's placement comes from the mask.
        let pos = Ints::new(&self.dev, &[batch, seq], &vec![0u32; batch * seq])?;
        let prep = self.adapt.prepare(&self.dev, &pos, Some(mask), 0)?;
        let mut x = self.adapt.embed(&self.shared, ids, &prep)?;
        let mask = prep.mask.unwrap_or_else(|| mask.clone());
        let s = x.shape()[1];
        let bias = self.position_bias(&self.enc_bias, s, s, 0, true)?;
        let d = self.dims(batch);
        let ad = &self.adapt;
        let ckpt = checkpointing::active(self.checkpoint, ad, false);
        for (i, b) in self.encoder.iter().enumerate() {
            x = if ckpt && self.checkpoint.applies(i) {
                let (b, m) = (b.clone(), mask.clone());
                let view = BlockAdapt::new(ad, b.linears().into_iter().map(|l| l.name.as_str()));
                checkpoint(&[x, bias.clone()], move |xs: &[Tensor<B, E>]| {
                    view.run(|ad| b.forward(ad, i, &xs[0], &m, &xs[1], d))
                })?
            } else {
                b.forward(ad, i, &x, &mask, &bias, d)?
            };
        }
        Ok((rmsnorm(&x, &self.enc_norm, d.eps)?, mask))
    }

    /// Which rows of the prefix table decoder layer `j` reads, as PEFT's seq2seq prefix tuning
    /// delivers them: PEFT views the table as `num_layers * 2` key/value rows, doubles it for the
    /// decoder's self- and cross-attention caches, and hands decoder layer `j` the key row
    /// `4j mod 2L` and value row `(4j + 1) mod 2L`; the cross-attention entries are then
    /// discarded (transformers recomputes cross-attention from the encoder). In layer terms: layer
    /// `j` sees the keys of prefix layer `2j mod L` and the values of the same layer.
    pub fn decoder_prefix_layer(&self, j: usize) -> usize {
        (2 * j) % self.cfg.num_layers
    }

    /// Refused (naming the reason) where PEFT's prefix tuning cannot express this model (see
    /// [`T5Config::prefix_refusal`]).
    pub fn check_prefix(&self) -> Result<()> {
        match self.cfg.prefix_refusal() {
            Some(why) => Err(Error::InvalidArgument(why)),
            None => Ok(()),
        }
    }

    /// The decoder's last hidden states `[batch, t, d]` of `dec_ids` (`[batch, t]`, right-padded:
    /// causal attention keeps the padding out of the real positions) over the encoder state, the
    /// queries after `cache`'s tokens when one is given.
    pub fn decode(
        &self,
        dec_ids: &Ints<B, u32>,
        enc: &EncoderState<B, E>,
        mut cache: Option<&mut KvCache<B, E>>,
    ) -> Result<Tensor<B, E>> {
        let &[batch, t] = dec_ids.shape() else {
            return Err(shape_err("decoder ids must be [batch, t]", dec_ids.shape(), &[]));
        };
        if enc.out.shape()[0] != batch {
            return Err(shape_err("encoder batch vs decoder batch", &enc.out.shape()[..1], &[batch]));
        }
        let cached = cache.as_ref().map_or(0, |c| c.len());
        let kv = self.adapt.prefix_layers()?;
        let n = self.adapt.prefix_len();
        if n > 0 {
            self.check_prefix()?;
        }
        // Queries at n + cached + i over the n prefix keys and the cached + t content keys.
        let bias = self.position_bias(&self.dec_bias, t, n + cached + t, n + cached, false)?;
        let mut x = embedding(&self.shared, dec_ids, None)?;
        let d = self.dims(batch);
        let ad = &self.adapt;
        let le = self.encoder.len();
        let ckpt = checkpointing::active(self.checkpoint, ad, cache.is_some());
        for (j, b) in self.decoder.iter().enumerate() {
            let pl = self.decoder_prefix_layer(j);
            x = if ckpt && self.checkpoint.applies(le + j) && enc.cross_kv.is_none() {
                let (b, m) = (b.clone(), enc.mask.clone());
                let kvj = crate::adapt::owned_prefix(&kv, pl);
                let view = BlockAdapt::new(ad, b.linears().into_iter().map(|l| l.name.as_str()));
                checkpoint(&[x, enc.out.clone(), bias.clone()], move |xs: &[Tensor<B, E>]| {
                    let p = kvj.as_ref().map(|(k, v, rows)| Prefix { k, v, rows: rows.as_ref() });
                    let st = EncoderState { out: xs[1].clone(), mask: m.clone(), cross_kv: None };
                    view.run(|ad| b.forward(ad, le + j, j, &xs[0], &st, p, &xs[2], None, d))
                })?
            } else {
                let p = crate::adapt::layer_prefix(&kv, pl);
                b.forward(ad, le + j, j, &x, enc, p, &bias, cache.as_deref_mut(), d)?
            };
        }
        Ok(rmsnorm(&x, &self.dec_norm, d.eps)?)
    }

    /// Decoder states `[.., d]` as the head reads them: scaled by `d_model^-0.5` when the config
    /// says so (the original T5's tied head).
    pub fn head_input(&self, h: &Tensor<B, E>) -> Result<Tensor<B, E>> {
        Ok(if self.cfg.scales_output() { scale(h, (self.cfg.d_model as f64).powf(-0.5))? } else { h.clone() })
    }

    /// Logits `[.., vocab]` of decoder states `[.., d]`.
    pub fn head(&self, h: &Tensor<B, E>) -> Result<Tensor<B, E>> {
        Ok(linear(&self.head_input(h)?, &self.lm_head, WeightLayout::OutIn, None)?)
    }

    /// The decoder input for `labels` (`[batch, t]`, -100 ignored): labels shifted right after the
    /// decoder start token, -100 as the pad id (Hugging Face's `_shift_right`).
    pub fn shift_right(&self, labels: &[i32], batch: usize) -> Vec<u32> {
        let t = labels.len() / batch.max(1);
        let pad = self.cfg.pad_token_id.unwrap_or(0);
        let mut out = Vec::with_capacity(labels.len());
        for row in labels.chunks(t.max(1)).take(batch) {
            out.push(self.cfg.decoder_start());
            out.extend(row[..t.saturating_sub(1)].iter().map(|&l| if l < 0 { pad } else { l as u32 }));
        }
        out
    }

    /// Hugging Face's seq2seq loss: mean cross-entropy of the decoder's logits against `labels`
    /// (`[batch, t]`, unshifted, -100 ignored) given the encoder input `ids`/`mask` (`[batch, s]`).
    pub fn loss(&self, ids: &Ints<B, u32>, mask: &Ints<B, u8>, labels: &[i32]) -> Result<Tensor<B, E>> {
        let batch = ids.shape()[0];
        if labels.is_empty() || !labels.len().is_multiple_of(batch.max(1)) {
            return Err(Error::InvalidArgument(format!("t5 loss: {} labels for a batch of {batch}", labels.len())));
        }
        let t = labels.len() / batch;
        let (out, mask) = self.encode(ids, mask)?;
        let enc = EncoderState { out, mask, cross_kv: None };
        let dec = Ints::new(&self.dev, &[batch, t], &self.shift_right(labels, batch))?;
        let h = self.decode(&dec, &enc, None)?;
        // The head and the loss fused: only the positions with a target, never the logits whole.
        Ok(linear_cross_entropy(&self.head_input(&h)?, &self.lm_head, labels, IGNORE_INDEX, None)?)
    }

    /// The logits `[batch, t, vocab]` of the decoder input `dec_ids` over the encoder input.
    pub fn forward(&self, ids: &Ints<B, u32>, mask: &Ints<B, u8>, dec_ids: &Ints<B, u32>) -> Result<Tensor<B, E>> {
        let (out, mask) = self.encode(ids, mask)?;
        let h = self.decode(dec_ids, &EncoderState { out, mask, cross_kv: None }, None)?;
        self.head(&h)
    }

    /// The encoder state of one sequence for generation: its output and every decoder layer's
    /// cross-attention keys and values, projected once.
    pub fn encoder_state(&self, ids: &[u32]) -> Result<EncoderState<B, E>> {
        let n = ids.len();
        let t = Ints::new(&self.dev, &[1, n], ids)?;
        let m = Ints::new(&self.dev, &[1, n], &vec![1u8; n])?;
        let (out, mask) = self.encode(&t, &m)?;
        let s = out.shape()[1];
        let (heads, dkv) = (self.cfg.num_heads, self.cfg.d_kv);
        let kv = self
            .decoder
            .iter()
            .map(|b| {
                let k = reshape(&self.adapt.linear(&b.cross.k, &out)?, &[1, s, heads, dkv])?;
                let v = reshape(&self.adapt.linear(&b.cross.v, &out)?, &[1, s, heads, dkv])?;
                Ok((k, v))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(EncoderState { out, mask, cross_kv: Some(kv) })
    }
}

/// One sequence's decoding over its encoded input, for [`crate::generate::generate`]: the decoder
/// start token is the "prompt" and each step feeds one token through the self-attention cache.
pub struct T5Decoding<'a, B: Kernels<E>, E: Float> {
    pub model: &'a T5<B, E>,
    pub enc: EncoderState<B, E>,
}

impl<B: Kernels<E>, E: Float> CausalLm<B, E> for T5Decoding<'_, B, E> {
    fn new_cache(&self) -> KvCache<B, E> {
        KvCache::new(self.model.decoder.len())
    }

    fn logits_step(&self, ids: &[u32], _positions: &[u32], cache: &mut KvCache<B, E>) -> Result<Vec<E>> {
        let t = ids.len();
        if t == 0 {
            return Err(Error::InvalidArgument("t5 decoding step: no ids".into()));
        }
        let ids = Ints::new(&self.model.dev, &[1, t], ids)?;
        let h = self.model.decode(&ids, &self.enc, Some(cache))?;
        let d = self.model.cfg.d_model;
        let last = slice_cols(&reshape(&h, &[1, t * d])?, (t - 1) * d, d)?;
        Ok(self.model.head(&last)?.to_vec()?)
    }
}

fn shape_err(what: &'static str, left: &[usize], right: &[usize]) -> Error {
    tuna_autograd::Error::Shape { op: "t5", what, left: left.to_vec(), right: right.to_vec() }.into()
}

#[cfg(test)]
mod tests {
    use super::relative_bucket;

    #[test]
    fn buckets_of_small_distances_are_exact() {
        // Bidirectional, 32 buckets: 16 per side, distances 0..7 exact.
        assert_eq!(relative_bucket(0, true, 32, 128), 0);
        assert_eq!(relative_bucket(-3, true, 32, 128), 3);
        assert_eq!(relative_bucket(3, true, 32, 128), 19);
        // Causal: keys after the query share bucket 0; 16 exact distances before.
        assert_eq!(relative_bucket(5, false, 32, 128), 0);
        assert_eq!(relative_bucket(-15, false, 32, 128), 15);
        assert_eq!(relative_bucket(-1000, false, 32, 128), 31);
    }

    #[test]
    fn configs_whose_buckets_cannot_grow_are_refused_by_name() {
        let p = std::path::Path::new("config.json");
        let cfg = |extra: &str| {
            let text = format!(
                r#"{{"model_type":"t5","vocab_size":96,"d_model":32,"d_kv":8,"d_ff":48,"num_layers":2,"num_heads":4{extra}}}"#
            );
            crate::config::ModelConfig::from_json(&text, p).map(drop).map_err(|e| e.to_string())
        };
        assert!(cfg("").is_ok());
        for (extra, needle) in [
            (r#","relative_attention_max_distance":2"#, "`relative_attention_max_distance` 2 must exceed"),
            (r#","relative_attention_max_distance":16"#, "`relative_attention_max_distance` 16 must exceed"),
            (r#","relative_attention_num_buckets":2"#, "`relative_attention_num_buckets` 2"),
            (r#","decoder_start_token_id":500"#, "`decoder_start_token_id` 500 is outside"),
        ] {
            let e = cfg(extra).unwrap_err();
            assert!(e.contains(needle), "{extra}: {e}");
        }
        // Every distance of the smallest accepted setting has a bucket inside the table.
        for rel in -300..=300 {
            assert!(relative_bucket(rel, true, 4, 3) < 4 && relative_bucket(rel, false, 4, 3) < 4);
        }
    }
}
