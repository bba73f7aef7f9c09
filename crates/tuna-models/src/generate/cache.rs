//! `KvCache`: each layer's keys (after RoPE) and values for the tokens already seen, so that a
//! decoder processes only new tokens. Batch-of-one caches can be stacked into one batch (each row
//! left-padded) and a row taken back out ([`KvCache::stack_rows`], [`KvCache::row`]): a server
//! keeps one cache per sequence and decodes any set of them together.

use crate::error::Result;
use tuna_autograd::ops::elem::{concat_cols, slice_cols};
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

impl<B: Kernels<E>, E: Float> KvCache<B, E> {
    /// Batch-of-one caches stacked into one batch: row `r` is `rows[r]` after `pads[r]` zero
    /// columns (to be masked), every padded row of one length. Copies every row (`O(batch x
    /// length)` per layer).
    pub fn stack_rows(rows: &[&KvCache<B, E>], pads: &[usize]) -> Result<Self> {
        let bad = |what: &'static str, left: Vec<usize>, right: Vec<usize>| -> crate::error::Error {
            tuna_autograd::Error::Shape { op: "kv_cache_stack", what, left, right }.into()
        };
        let Some(first) = rows.first() else { return Err(bad("no rows", vec![], vec![])) };
        let n_layers = first.n_layers();
        if pads.len() != rows.len() || rows.iter().any(|c| c.n_layers() != n_layers || c.batch() != Some(1)) {
            return Err(bad(
                "rows: non-empty batch-of-one caches of one layer count, one pad each",
                vec![rows.len(), pads.len()],
                vec![n_layers],
            ));
        }
        let width = first.len() + pads[0];
        if let Some(r) = (0..rows.len()).find(|&r| rows[r].len() + pads[r] != width) {
            return Err(bad("padded row lengths", vec![rows[r].len(), pads[r]], vec![width]));
        }
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let stack = |pick: fn(&KeysValues<B, E>) -> &Tensor<B, E>| -> Result<Tensor<B, E>> {
                let mut parts = Vec::with_capacity(2 * rows.len());
                let mut head = vec![];
                for (c, &pad) in rows.iter().zip(pads) {
                    let t = pick(c.layer(i).ok_or_else(|| bad("a layer not cached", vec![i], vec![]))?);
                    let (s, hd) = (t.shape()[1], t.shape()[2] * t.shape()[3]);
                    if head.is_empty() {
                        head = t.shape()[2..].to_vec();
                    } else if head != t.shape()[2..] {
                        return Err(bad("heads of the rows", t.shape().to_vec(), head));
                    }
                    if pad > 0 {
                        parts.push(Tensor::zeros(t.device(), &[1, pad * hd], false)?);
                    }
                    parts.push(reshape(t, &[1, s * hd])?);
                }
                let joined = concat_cols(&parts.iter().collect::<Vec<_>>())?;
                Ok(reshape(&joined, &[rows.len(), width, head[0], head[1]])?)
            };
            layers.push(Some((stack(|kv| &kv.0)?, stack(|kv| &kv.1)?)));
        }
        Ok(KvCache { layers })
    }

    /// Row `r` of the batch as a batch-of-one cache, without its first `skip` columns (the
    /// padding [`KvCache::stack_rows`] added). Copies the row.
    pub fn row(&self, r: usize, skip: usize) -> Result<Self> {
        let (n, s) = (self.batch().unwrap_or(0), self.len());
        if r >= n || skip >= s {
            return Err(tuna_autograd::Error::Shape {
                op: "kv_cache_row",
                what: "row and skipped columns vs the cache's [batch, cached]",
                left: vec![r, skip],
                right: vec![n, s],
            }
            .into());
        }
        let take = |t: &Tensor<B, E>| -> Result<Tensor<B, E>> {
            let hd = t.shape()[2] * t.shape()[3];
            let flat = reshape(t, &[1, n * s * hd])?;
            let row = slice_cols(&flat, (r * s + skip) * hd, (s - skip) * hd)?;
            Ok(reshape(&row, &[1, s - skip, t.shape()[2], t.shape()[3]])?)
        };
        let layers = self.layers.iter().map(|l| l.as_ref().map(|(k, v)| Ok((take(k)?, take(v)?))).transpose());
        Ok(KvCache { layers: layers.collect::<Result<_>>()? })
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tuna_kernels::Cpu;

    /// A 2-layer batch-of-one cache of `len` tokens, 2 heads of 3, values `tag + position`.
    fn one(len: usize, tag: f64) -> KvCache<Cpu, f64> {
        let dev = Arc::new(Cpu);
        let mut c = KvCache::new(2);
        let v: Vec<f64> = (0..len * 6).map(|j| tag + j as f64).collect();
        let t = Tensor::constant(&dev, &[1, len, 2, 3], &v).unwrap();
        for i in 0..2 {
            let neg = Tensor::constant(&dev, &[1, len, 2, 3], &v.iter().map(|x| -x).collect::<Vec<_>>()).unwrap();
            c.append(i, &t, &neg).unwrap();
        }
        c
    }

    #[test]
    fn stacked_rows_are_left_padded_and_come_back_out() {
        let (a, b) = (one(3, 100.0), one(1, 200.0));
        let s = KvCache::stack_rows(&[&a, &b], &[1, 3]).unwrap();
        assert_eq!((s.batch(), s.len()), (Some(2), 4));
        let k = s.layer(1).unwrap().0.to_vec().unwrap();
        assert_eq!(&k[..6], &[0.0; 6]);
        assert_eq!(k[6], 100.0);
        assert_eq!(&k[24..42], &[0.0; 18]);
        assert_eq!(&k[42..], &(0..6).map(|j| 200.0 + j as f64).collect::<Vec<_>>()[..]);
        assert_eq!(s.layer(0).unwrap().1.to_vec().unwrap()[47], -205.0);
        for (r, (c, pad)) in [(&a, 1), (&b, 3)].into_iter().enumerate() {
            let back = s.row(r, pad).unwrap();
            for i in 0..2 {
                let (l, m) = (back.layer(i).unwrap(), c.layer(i).unwrap());
                assert_eq!(l.0.shape(), m.0.shape());
                assert_eq!(
                    (l.0.to_vec().unwrap(), l.1.to_vec().unwrap()),
                    (m.0.to_vec().unwrap(), m.1.to_vec().unwrap())
                );
            }
        }
        // Lengths that do not line up, a row out of range, everything skipped: errors.
        let e = KvCache::stack_rows(&[&a, &b], &[0, 0]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("padded row lengths"), "{e}");
        assert!(KvCache::stack_rows(&[&s], &[0]).is_err());
        assert!(KvCache::<Cpu, f64>::stack_rows(&[], &[]).is_err());
        assert!(s.row(2, 0).is_err());
        assert!(s.row(0, 4).is_err());
    }
}
