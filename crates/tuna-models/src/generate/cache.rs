//! `KvCache`: each layer's keys (after RoPE) and values for the tokens already seen, so that a
//! decoder processes only new tokens.

use crate::error::Result;
use tuna_autograd::ops::elem::concat_cols;
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Tensor};

/// One layer's cached keys and values.
pub type KeysValues<B, E> = (Tensor<B, E>, Tensor<B, E>);

/// Per layer, keys and values `[batch, cached, kv_heads, head_dim]`, grown as tokens are appended.
///
/// Meant for inference under [`tuna_autograd::no_grad`]. Under a recording graph it stays correct
/// (the concatenation is differentiable) but keeps every step's graph alive.
///
/// Cost: each append copies the layer's whole cache into a new buffer on the device (a
/// concatenation, no host round trip), so decoding `n` tokens moves `O(n^2)` key/value bytes per
/// layer. A preallocated buffer written in place would make it `O(n)`; correctness first.
pub struct KvCache<B: Kernels<E>, E: Float> {
    layers: Vec<Option<KeysValues<B, E>>>,
}

impl<B: Kernels<E>, E: Float> KvCache<B, E> {
    /// An empty cache for a model of `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        KvCache { layers: (0..n_layers).map(|_| None).collect() }
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Tokens cached (per row of the batch), read from the first layer.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |(k, _)| k.shape()[1])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Batch size of the cached tensors (`None` while empty).
    pub fn batch(&self) -> Option<usize> {
        self.layers.first().and_then(|l| l.as_ref()).map(|(k, _)| k.shape()[0])
    }

    /// Layer `i`'s cached keys and values, if any.
    pub fn layer(&self, i: usize) -> Option<&KeysValues<B, E>> {
        self.layers.get(i).and_then(|l| l.as_ref())
    }

    /// Forget everything cached.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
    }

    /// Append `k`, `v` (`[batch, new, kv_heads, head_dim]`) to layer `i` and return the layer's
    /// whole keys and values (`[batch, cached + new, kv_heads, head_dim]`).
    pub fn append(&mut self, i: usize, k: &Tensor<B, E>, v: &Tensor<B, E>) -> Result<KeysValues<B, E>> {
        let n_layers = self.layers.len();
        let slot = self.layers.get_mut(i).ok_or_else(|| tuna_autograd::Error::Shape {
            op: "kv_cache",
            what: "layer index vs the cache's layer count",
            left: vec![i],
            right: vec![n_layers],
        })?;
        let ks = k.shape();
        let fits = |c: &Tensor<B, E>| c.shape()[0] == ks[0] && c.shape()[2..] == ks[2..];
        if ks.len() != 4 || v.shape() != ks || slot.as_ref().is_some_and(|(ck, _)| !fits(ck)) {
            return Err(tuna_autograd::Error::Shape {
                op: "kv_cache",
                what: "new keys/values vs cached [batch, cached, kv_heads, head_dim]",
                left: ks.to_vec(),
                right: slot.as_ref().map_or(vec![], |(ck, _)| ck.shape().to_vec()),
            }
            .into());
        }
        let joined = match slot.take() {
            None => (k.clone(), v.clone()),
            Some((ck, cv)) => (cat_seq(&ck, k)?, cat_seq(&cv, v)?),
        };
        *slot = Some(joined.clone());
        Ok(joined)
    }
}

/// `[b, s, h, d]` and `[b, t, h, d]` joined along the sequence as `[b, s + t, h, d]`: each batch
/// row is contiguous, so this is a column concatenation of `[b, s*h*d]` and `[b, t*h*d]`.
fn cat_seq<B: Kernels<E>, E: Float>(a: &Tensor<B, E>, b: &Tensor<B, E>) -> Result<Tensor<B, E>> {
    // Both are 4-D with equal batch and head dims (checked by `append`).
    let (&[n, s, h, d], t) = (a.shape(), b.shape()[1]) else {
        return Err(tuna_autograd::Error::Shape {
            op: "kv_cache",
            what: "not 4-D",
            left: a.shape().to_vec(),
            right: vec![],
        }
        .into());
    };
    let joined = concat_cols(&[&reshape(a, &[n, s * h * d])?, &reshape(b, &[n, t * h * d])?])?;
    Ok(reshape(&joined, &[n, s + t, h, d])?)
}
