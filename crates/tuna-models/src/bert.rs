//! BERT encoder on tuna's autograd (e.g. all-MiniLM-L6-v2): word + position + token-type-0
//! embeddings and LayerNorm, post-LN blocks with bidirectional attention under the key padding
//! mask, GELU (erf); the pooler (dense + tanh of the first token) and sentence-transformers' masked
//! mean pooling.

use crate::adapt::{layer_prefix, owned_prefix, Adapt};
use crate::checkpointing::{self, BlockAdapt, Checkpointing};
use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::generate::KvCache;
use crate::gpt2::{batch_seq, Norm};
use crate::linear::Linear;
use crate::params::Loader;
use tuna_autograd::checkpoint;
use tuna_autograd::ops::act::{gelu, GeluKind};
use tuna_autograd::ops::attention::{attention, AttnOptions, Prefix};
use tuna_autograd::ops::elem::{add, mean_pool, slice_cols, tanh};
use tuna_autograd::ops::embed::embedding;
use tuna_autograd::ops::linear::WeightLayout;
use tuna_autograd::ops::norm::add_layernorm;
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Ints, Tensor};

/// A BERT dense layer: weight `[out, in]` and bias.
pub type Dense<B, E> = Linear<B, E>;

/// One encoder layer (`encoder.layer.N`).
pub struct BertLayer<B: Kernels<E>, E: Float> {
    pub query: Dense<B, E>,
    pub key: Dense<B, E>,
    pub value: Dense<B, E>,
    pub attn_out: Dense<B, E>,
    pub attn_norm: Norm<B, E>,
    pub intermediate: Dense<B, E>,
    pub output: Dense<B, E>,
    pub out_norm: Norm<B, E>,
}

/// BERT: embeddings, encoder, and the pooler when the checkpoint has one.
pub struct Bert<B: Kernels<E>, E: Float> {
    pub cfg: BertConfig,
    pub word: Tensor<B, E>,
    pub position: Tensor<B, E>,
    pub token_type: Tensor<B, E>,
    pub emb_norm: Norm<B, E>,
    pub layers: Vec<BertLayer<B, E>>,
    pub pooler: Option<Dense<B, E>>,
    /// The checkpoint the weights came from (named by the missing-pooler error).
    pub path: std::path::PathBuf,
    /// The adaptation method in place (empty: the base model).
    pub adapt: Adapt<B, E>,
    /// The layers whose activations a recorded forward recomputes in the backward.
    pub checkpoint: Checkpointing,
}

/// Tensors BERT checkpoints carry that the encoder does not compute with (see
/// [`Loader::finish`]): the pretraining heads, task heads (a sequence classifier's, a QA model's:
/// tuna trains its own) and the position-id buffer (when stored as floats).
pub const KNOWN_UNUSED: &[&str] = &["cls.*", "classifier.*", "qa_outputs.*", "embeddings.position_ids"];

/// `name`, bare (`BertModel`) or under the `bert.` prefix (task heads' checkpoints).
fn names(name: &str) -> [String; 2] {
    [name.to_string(), format!("bert.{name}")]
}

fn load<B: Kernels<E>, E: Float>(l: &mut Loader<'_, B, E>, name: &str, shape: &[usize]) -> Result<Tensor<B, E>> {
    let [a, b] = names(name);
    l.load_any(&[&a, &b], shape)
}

fn norm<B: Kernels<E>, E: Float>(l: &mut Loader<'_, B, E>, name: &str, c: usize) -> Result<Norm<B, E>> {
    Ok(Norm { weight: load(l, &format!("{name}.weight"), &[c])?, bias: load(l, &format!("{name}.bias"), &[c])? })
}

/// Dense `name` (bare or under `bert.` in the file), named as `BertModel`'s module.
fn dense<B: Kernels<E>, E: Float>(l: &mut Loader<'_, B, E>, name: &str, i: usize, o: usize) -> Result<Dense<B, E>> {
    Ok(Linear::new(
        name.to_string(),
        load(l, &format!("{name}.weight"), &[o, i])?,
        Some(load(l, &format!("{name}.bias"), &[o])?),
        WeightLayout::OutIn,
    ))
}

/// A block's Dense: as [`dense`], its frozen weight packed when the loader asks (the pooler is not).
fn block<B: Kernels<E>, E: Float>(l: &mut Loader<'_, B, E>, name: &str, i: usize, o: usize) -> Result<Dense<B, E>> {
    let d = dense(l, name, i, o)?;
    l.linear(d)
}

/// A forward's sizes, as one layer needs them.
#[derive(Clone, Copy)]
struct LayerDims {
    b: usize,
    t: usize,
    hid: usize,
    heads: usize,
    d: usize,
    eps: f32,
}

impl<B: Kernels<E>, E: Float> BertLayer<B, E> {
    /// The layer's dense layers, in order.
    pub fn linears(&self) -> [&Dense<B, E>; 6] {
        [&self.query, &self.key, &self.value, &self.attn_out, &self.intermediate, &self.output]
    }

    /// Layer `i` over `x` through the adaptation `ad`, with the layer's prefix, the key mask and an
    /// optional KV cache.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        ad: &Adapt<B, E>,
        i: usize,
        x: &Tensor<B, E>,
        prefix: Option<Prefix<'_, B, E>>,
        key_mask: &Ints<B, u8>,
        cache: Option<&mut KvCache<B, E>>,
        dims: LayerDims,
    ) -> Result<Tensor<B, E>> {
        let LayerDims { b, t, hid, heads, d, eps } = dims;
        let dense = |x: &Tensor<B, E>, dn: &Dense<B, E>| ad.linear(dn, x);
        let heads4 = |y: Tensor<B, E>| -> Result<Tensor<B, E>> { Ok(reshape(&y, &[b, t, heads, d])?) };
        let q = heads4(dense(x, &self.query)?)?;
        let k = heads4(dense(x, &self.key)?)?;
        let v = heads4(dense(x, &self.value)?)?;
        // With a cache, `k`/`v` are its preallocated buffers and `kv_len` the rows in use.
        let ((k, v), kv_len) = KvCache::through(cache, i, k, v)?;
        let a = attention(&q, &k, &v, prefix, Some(key_mask), AttnOptions { causal: false, scale: None, kv_len })?;
        let a = ad.sublayer(i, false, dense(&reshape(&a, &[b, t, hid])?, &self.attn_out)?)?;
        // Post-norm: each residual add and the norm of its sum in one pass (the sum is only the
        // norm's input).
        let x = add_layernorm(&a, x, &self.attn_norm.weight, &self.attn_norm.bias, eps)?.1;
        let f = gelu(&dense(&x, &self.intermediate)?, GeluKind::Erf)?;
        let f = ad.sublayer(i, true, dense(&f, &self.output)?)?;
        Ok(add_layernorm(&f, &x, &self.out_norm.weight, &self.out_norm.bias, eps)?.1)
    }
}

impl<B: Kernels<E>, E: Float> Clone for BertLayer<B, E> {
    /// The same tensors (shared storage): what a checkpointed layer's recompute holds.
    fn clone(&self) -> Self {
        BertLayer {
            query: self.query.clone(),
            key: self.key.clone(),
            value: self.value.clone(),
            attn_out: self.attn_out.clone(),
            attn_norm: self.attn_norm.clone(),
            intermediate: self.intermediate.clone(),
            output: self.output.clone(),
            out_norm: self.out_norm.clone(),
        }
    }
}

impl<B: Kernels<E>, E: Float> Bert<B, E> {
    /// Every tensor of `cfg`'s encoder from `loader`'s source (Hugging Face names, with or without
    /// `bert.`); the pooler only if `pooler.dense.weight` is present. A missing or mis-shaped
    /// tensor is an error naming it, and so are tensors it does not use (beyond [`KNOWN_UNUSED`]).
    pub fn load(cfg: &BertConfig, loader: &mut Loader<'_, B, E>) -> Result<Self> {
        let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
        let word = load(loader, "embeddings.word_embeddings.weight", &[cfg.vocab_size, h])?;
        let position = load(loader, "embeddings.position_embeddings.weight", &[cfg.max_position_embeddings, h])?;
        let token_type = load(loader, "embeddings.token_type_embeddings.weight", &[cfg.type_vocab_size, h])?;
        let emb_norm = norm(loader, "embeddings.LayerNorm", h)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            layers.push(BertLayer {
                query: block(loader, &format!("{p}.attention.self.query"), h, h)?,
                key: block(loader, &format!("{p}.attention.self.key"), h, h)?,
                value: block(loader, &format!("{p}.attention.self.value"), h, h)?,
                attn_out: block(loader, &format!("{p}.attention.output.dense"), h, h)?,
                attn_norm: norm(loader, &format!("{p}.attention.output.LayerNorm"), h)?,
                intermediate: block(loader, &format!("{p}.intermediate.dense"), h, ff)?,
                output: block(loader, &format!("{p}.output.dense"), ff, h)?,
                out_norm: norm(loader, &format!("{p}.output.LayerNorm"), h)?,
            });
        }
        let has_pooler = names("pooler.dense.weight").iter().any(|n| loader.src.shape(n).is_some());
        let pooler = if has_pooler { Some(dense(loader, "pooler.dense", h, h)?) } else { None };
        loader.finish(KNOWN_UNUSED)?;
        let path = loader.src.path().to_path_buf();
        Ok(Bert {
            cfg: cfg.clone(),
            word,
            position,
            token_type,
            emb_norm,
            layers,
            pooler,
            path,
            adapt: Adapt::default(),
            checkpoint: Checkpointing::Off,
        })
    }

    /// `last_hidden_state` `[batch, seq, hidden]` of `ids` (`[batch, seq]`, token type 0,
    /// positions `0..seq`), attending to the keys where `attention_mask` (`[batch, seq]`) is 1.
    /// With a soft prompt the output is longer: see [`Bert::encode`], which also returns the mask.
    pub fn forward(&self, ids: &Ints<B, u32>, attention_mask: &Ints<B, u8>) -> Result<Tensor<B, E>> {
        Ok(self.encode(ids, attention_mask)?.0)
    }

    /// [`Bert::forward`] through the adaptation, with the mask of its output positions: a soft
    /// prompt's `n` vectors are inserted before each row's first real token (the output and mask
    /// gain `n` columns) and, with a prompt or prefix, content positions start at `n`.
    pub fn encode(&self, ids: &Ints<B, u32>, attention_mask: &Ints<B, u8>) -> Result<(Tensor<B, E>, Ints<B, u8>)> {
        self.encode_cached(ids, attention_mask, None)
    }

    /// [`Bert::encode`] after the tokens held in `cache` (each layer's keys and values of earlier
    /// tokens, all real): the new tokens take positions after them and attend to them as to each
    /// other (bidirectionally among the new ones; the cached tokens do not see the new ones), and
    /// their keys and values are appended. This is what a prefix of those tokens computes, so it
    /// also records a sequence's own keys and values (an empty cache). A soft prompt is refused
    /// with a non-empty cache (it would go between the cached tokens and the content).
    pub fn encode_cached(
        &self,
        ids: &Ints<B, u32>,
        attention_mask: &Ints<B, u8>,
        mut cache: Option<&mut KvCache<B, E>>,
    ) -> Result<(Tensor<B, E>, Ints<B, u8>)> {
        let (b, t) = batch_seq(ids)?;
        let cached = cache.as_ref().map_or(0, |c| c.len());
        if let Some(c) = &cache {
            if c.n_layers() != self.layers.len() || c.batch().is_some_and(|cb| cb != b) {
                return Err(tuna_autograd::Error::Shape {
                    op: "bert",
                    what: "cache [layers, batch] vs the model and input",
                    left: vec![c.n_layers(), c.batch().unwrap_or(b)],
                    right: vec![self.layers.len(), b],
                }
                .into());
            }
            if cached > 0 && self.adapt.prompt_width() > 0 {
                return Err(Error::InvalidArgument("bert: a soft prompt after cached tokens is not supported".into()));
            }
        }
        if attention_mask.shape() != [b, t] {
            return Err(tuna_autograd::Error::Shape {
                op: "bert",
                what: "attention_mask vs ids [batch, seq]",
                left: attention_mask.shape().to_vec(),
                right: vec![b, t],
            }
            .into());
        }
        let (hid, heads, d) = (self.cfg.hidden_size, self.cfg.num_attention_heads, self.cfg.head_dim());
        let eps = self.cfg.layer_norm_eps as f32;
        let dev = self.word.device();
        let pos = crate::positions::positions(b, t, cached as u32);
        let pos = Ints::new(dev, &[b, t], &pos)?;
        let prep = self.adapt.prepare(dev, &pos, Some(attention_mask), 0)?;
        let (pos, mask) = (&prep.positions, prep.mask.clone().expect("a mask was given"));
        let t = pos.shape()[1];
        if let Some(&p) = pos.host().iter().find(|&&p| p as usize >= self.cfg.max_position_embeddings) {
            return Err(Error::InvalidArgument(format!(
                "bert: position {p} is beyond the model's {} learned positions (max_position_embeddings)",
                self.cfg.max_position_embeddings
            )));
        }
        let types = Ints::new(dev, &[b, t], &vec![0u32; b * t])?;
        let x = add(&self.adapt.embed(&self.word, ids, &prep)?, &embedding(&self.position, pos, None)?)?;
        let ty = embedding(&self.token_type, &types, None)?;
        let mut x = add_layernorm(&x, &ty, &self.emb_norm.weight, &self.emb_norm.bias, eps)?.1;
        let prefix = self.adapt.prefix_layers()?;
        // The keys include the cached tokens (all real): the mask widens by them.
        let key_mask = if cached == 0 {
            mask.clone()
        } else {
            let rows =
                mask.host().chunks(t.max(1)).flat_map(|r| std::iter::repeat_n(1u8, cached).chain(r.iter().copied()));
            Ints::new(dev, &[b, cached + t], &rows.collect::<Vec<u8>>())?
        };
        let ad = &self.adapt;
        let dims = LayerDims { b, t, hid, heads, d, eps };
        let ckpt = checkpointing::active(self.checkpoint, ad, cache.is_some());
        for (i, l) in self.layers.iter().enumerate() {
            x = if ckpt && self.checkpoint.applies(i) {
                let (l, key_mask, kv) = (l.clone(), key_mask.clone(), owned_prefix(&prefix, i));
                let view = BlockAdapt::new(ad, l.linears().map(|lin| lin.name.as_str()));
                checkpoint(&[x], move |xs: &[Tensor<B, E>]| {
                    let p = kv.as_ref().map(|(k, v, rows)| Prefix { k, v, rows: rows.as_ref() });
                    view.run(|ad| l.forward(ad, i, &xs[0], p, &key_mask, None, dims))
                })?
            } else {
                l.forward(ad, i, &x, layer_prefix(&prefix, i), &key_mask, cache.as_deref_mut(), dims)?
            };
        }
        Ok((x, mask))
    }

    /// `pooler_output` `[batch, hidden]`: `tanh(dense(h[:, 0]))`. An error naming
    /// `pooler.dense.weight` if the checkpoint had no pooler.
    pub fn pooler(&self, h: &Tensor<B, E>) -> Result<Tensor<B, E>> {
        let Some(p) = &self.pooler else {
            return Err(Error::MissingTensor {
                path: self.path.clone(),
                name: "pooler.dense.weight".into(),
                expected: vec![self.cfg.hidden_size, self.cfg.hidden_size],
            });
        };
        let [b, t, hid] = *h.shape() else {
            return Err(tuna_autograd::Error::Shape {
                op: "bert pooler",
                what: "h must be [batch, seq, hidden]",
                left: h.shape().to_vec(),
                right: vec![],
            }
            .into());
        };
        let first = slice_cols(&reshape(h, &[b, t * hid])?, 0, hid)?;
        Ok(tanh(&p.apply(&first)?)?)
    }

    /// sentence-transformers' embedding: the mean of `h` (`[batch, seq, hidden]`) over the tokens
    /// where `mask` is 1, `[batch, hidden]`.
    pub fn mean_pooled(&self, h: &Tensor<B, E>, mask: &Ints<B, u8>) -> Result<Tensor<B, E>> {
        Ok(mean_pool(h, mask)?)
    }
}

/// Cosine similarity of two host vectors (0 when either is all zeros), accumulated in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        (ab / (aa.sqrt() * bb.sqrt())) as f32
    }
}
