//! `KvCache`: each layer's keys (after RoPE) and values for the tokens already seen, so that a
//! decoder processes only new tokens. Batch-of-one caches can be stacked into one batch (each row
//! left-padded) and a row taken back out ([`KvCache::stack_rows`], [`KvCache::row`]): a server
//! keeps one cache per sequence and decodes any set of them together.

use crate::error::Result;
use tuna_autograd::ops::elem::{slice_cols, write_cols};
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Tensor};

/// One layer's cached keys and values.
pub type KeysValues<B, E> = (Tensor<B, E>, Tensor<B, E>);

/// One layer's preallocated buffers `[batch, capacity, kv_heads, head_dim]` and how many of
/// their columns hold tokens.
struct Slot<B: Kernels<E>, E: Float> {
    k: Tensor<B, E>,
    v: Tensor<B, E>,
    len: usize,
}

impl<B: Kernels<E>, E: Float> Slot<B, E> {
    fn capacity(&self) -> usize {
        self.k.shape()[1]
    }
}

/// Per layer, keys and values in a preallocated buffer `[batch, capacity, kv_heads, head_dim]`
/// of which the first `len` columns are cached; attention reads the buffer in place
/// ([`tuna_autograd::ops::attention::AttnOptions::kv_len`]).
///
/// Cost: an append writes only the new columns into the buffer (on the device, no host round
/// trip), so decoding `n` tokens moves `O(n)` key/value bytes per layer. When the buffer is full
/// it is replaced by one of twice the capacity (or of [`KvCache::reserve`]'s, when larger) and
/// the cached columns copied over once: `O(n)` amortized. Reserving the prompt plus the tokens to
/// generate avoids any regrowth.
///
/// Meant for inference under [`tuna_autograd::no_grad`]: appends are not recorded (no gradient
/// flows into the cache), and attention's backward refuses a buffer wider than its keys.
pub struct KvCache<B: Kernels<E>, E: Float> {
    layers: Vec<Option<Slot<B, E>>>,
    /// The capacity a new or regrown buffer takes at least (0: just what is appended).
    reserved: usize,
}

impl<B: Kernels<E>, E: Float> KvCache<B, E> {
    /// An empty cache for a model of `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        KvCache { layers: (0..n_layers).map(|_| None).collect(), reserved: 0 }
    }

    /// Make the next buffer allocated hold at least `tokens` columns (the prompt plus the tokens
    /// to generate, or the model's context): a generation that stays within it appends without
    /// ever regrowing. Buffers already allocated are kept until they fill.
    pub fn reserve(&mut self, tokens: usize) {
        self.reserved = self.reserved.max(tokens);
    }

    /// The capacity [`KvCache::reserve`] asked for (0: none).
    pub fn reserved(&self) -> usize {
        self.reserved
    }

    /// An empty cache of as many layers, keeping only the reservation: what a sequence holds while
    /// its keys and values live elsewhere (a server's batch cache), so they are not held twice.
    pub fn emptied(&self) -> Self {
        KvCache { layers: (0..self.layers.len()).map(|_| None).collect(), reserved: self.reserved }
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Tokens cached (per row of the batch), read from the first layer.
    pub fn len(&self) -> usize {
        self.layer_len(0)
    }

    /// Tokens cached in layer `i` (0 if none, or no such layer).
    pub fn layer_len(&self, i: usize) -> usize {
        self.layers.get(i).and_then(|l| l.as_ref()).map_or(0, |s| s.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Columns layer `i`'s buffers hold before they must grow (0 before the first append).
    pub fn capacity(&self, i: usize) -> usize {
        self.layers.get(i).and_then(|l| l.as_ref()).map_or(0, |s| s.capacity())
    }

    /// Batch size of the cached tensors (`None` while empty).
    pub fn batch(&self) -> Option<usize> {
        self.layers.first().and_then(|l| l.as_ref()).map(|s| s.k.shape()[0])
    }

    /// Layer `i`'s whole preallocated buffers `[batch, capacity, kv_heads, head_dim]` (columns
    /// from [`KvCache::layer_len`] on are not tokens), if any.
    pub fn buffers(&self, i: usize) -> Option<KeysValues<B, E>> {
        self.layers.get(i).and_then(|l| l.as_ref()).map(|s| (s.k.clone(), s.v.clone()))
    }

    /// Layer `i`'s cached keys and values `[batch, len, kv_heads, head_dim]`, if any: the
    /// buffers themselves when full, else a copy of their first `len` columns.
    pub fn layer(&self, i: usize) -> Result<Option<KeysValues<B, E>>> {
        let Some(s) = self.layers.get(i).and_then(|l| l.as_ref()) else { return Ok(None) };
        Ok(Some((first_cols(&s.k, s.len)?, first_cols(&s.v, s.len)?)))
    }

    /// A layer's keys and values as attention takes them: with a cache, `k`/`v` appended to layer
    /// `i` and its buffers returned with the columns in use (attention's `kv_len`); without one,
    /// `k`/`v` themselves.
    pub fn through(
        cache: Option<&mut Self>,
        i: usize,
        k: Tensor<B, E>,
        v: Tensor<B, E>,
    ) -> Result<(KeysValues<B, E>, Option<usize>)> {
        match cache {
            Some(c) => c.append(i, &k, &v).map(|(kv, n)| (kv, Some(n))),
            None => Ok(((k, v), None)),
        }
    }

    /// Forget everything cached (and the buffers).
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
    }

    /// Forget every column from `len` on, in every layer (the buffers stay): undoes the appends
    /// of a forward that failed part way through its layers. Columns are only ever written past
    /// the cached ones, so those before `len` are as they were.
    pub fn truncate(&mut self, len: usize) {
        if len == 0 {
            self.clear();
        }
        self.layers.iter_mut().flatten().for_each(|sl| sl.len = sl.len.min(len));
    }

    /// Append `k`, `v` (`[batch, new, kv_heads, head_dim]`) to layer `i`: written in place after
    /// the cached columns, the buffers grown first when full. Returns the layer's buffers
    /// `[batch, capacity, kv_heads, head_dim]` and the columns now cached (attention's
    /// [`tuna_autograd::ops::attention::AttnOptions::kv_len`]).
    pub fn append(&mut self, i: usize, k: &Tensor<B, E>, v: &Tensor<B, E>) -> Result<(KeysValues<B, E>, usize)> {
        let n_layers = self.layers.len();
        let reserved = self.reserved;
        let slot = self.layers.get_mut(i).ok_or_else(|| tuna_autograd::Error::Shape {
            op: "kv_cache",
            what: "layer index vs the cache's layer count",
            left: vec![i],
            right: vec![n_layers],
        })?;
        let ks = k.shape();
        let fits = |c: &Tensor<B, E>| c.shape()[0] == ks[0] && c.shape()[2..] == ks[2..];
        if ks.len() != 4 || v.shape() != ks || slot.as_ref().is_some_and(|s| !fits(&s.k)) {
            return Err(tuna_autograd::Error::Shape {
                op: "kv_cache",
                what: "new keys/values vs cached [batch, cached, kv_heads, head_dim]",
                left: ks.to_vec(),
                right: slot.as_ref().map_or(vec![], |s| s.k.shape().to_vec()),
            }
            .into());
        }
        let (len, new) = (slot.as_ref().map_or(0, |s| s.len), ks[1]);
        if slot.as_ref().is_none_or(|s| len + new > s.capacity()) {
            let cap = (len + new).max(reserved).max(2 * slot.as_ref().map_or(0, |s| s.capacity()));
            let grown = grow(slot.as_ref(), k, cap)?;
            *slot = Some(grown);
        }
        let s = slot.as_mut().expect("allocated above");
        let hd = ks[2] * ks[3];
        write_cols(&s.k, k, len * hd)?;
        write_cols(&s.v, v, len * hd)?;
        s.len = len + new;
        Ok(((s.k.clone(), s.v.clone()), s.len))
    }
}

/// New zero buffers of `cap` columns for keys like `k` (`[batch, _, kv_heads, head_dim]`),
/// holding `old`'s cached columns (its whole buffers copied once: `cap` exceeds their capacity).
fn grow<B: Kernels<E>, E: Float>(old: Option<&Slot<B, E>>, k: &Tensor<B, E>, cap: usize) -> Result<Slot<B, E>> {
    let ks = k.shape();
    let shape = [ks[0], cap, ks[2], ks[3]];
    let (nk, nv) = (Tensor::zeros(k.device(), &shape, false)?, Tensor::zeros(k.device(), &shape, false)?);
    let len = old.map_or(0, |s| s.len);
    if let Some(s) = old.filter(|s| s.len > 0) {
        write_cols(&nk, &s.k, 0)?;
        write_cols(&nv, &s.v, 0)?;
    }
    Ok(Slot { k: nk, v: nv, len })
}

/// The first `len` columns of a buffer `[batch, capacity, kv_heads, head_dim]` as `[batch, len,
/// kv_heads, head_dim]`: the buffer itself when full, else a copy.
fn first_cols<B: Kernels<E>, E: Float>(t: &Tensor<B, E>, len: usize) -> Result<Tensor<B, E>> {
    let &[n, cap, h, d] = t.shape() else {
        return Err(tuna_autograd::Error::Shape {
            op: "kv_cache",
            what: "not 4-D",
            left: t.shape().to_vec(),
            right: vec![],
        }
        .into());
    };
    if len == cap {
        return Ok(t.clone());
    }
    let part = slice_cols(&reshape(t, &[n, cap * h * d])?, 0, len * h * d)?;
    Ok(reshape(&part, &[n, len, h, d])?)
}

impl<B: Kernels<E>, E: Float> KvCache<B, E> {
    /// Batch-of-one caches stacked into one batch: row `r` is `rows[r]` after `pads[r]` zero
    /// columns (to be masked), every padded row of one length, in buffers with `spare` columns of
    /// room after it (so the next appends write in place). Copies every row (`O(batch x length)`
    /// per layer).
    pub fn stack_rows(rows: &[&KvCache<B, E>], pads: &[usize], spare: usize) -> Result<Self> {
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
        let (n, cap) = (rows.len(), width + spare);
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let mut slot: Option<Slot<B, E>> = None;
            for (r, (c, &pad)) in rows.iter().zip(pads).enumerate() {
                let (k, v) = c.layer(i)?.ok_or_else(|| bad("a layer not cached", vec![i], vec![]))?;
                let &[_, len, h, d] = k.shape() else { return Err(bad("not 4-D", k.shape().to_vec(), vec![])) };
                let s = match &mut slot {
                    Some(s) if s.k.shape()[2..] != [h, d] => {
                        return Err(bad("heads of the rows", k.shape().to_vec(), s.k.shape().to_vec()))
                    }
                    Some(s) => s,
                    None => {
                        let z = || Tensor::zeros(k.device(), &[n, cap, h, d], false);
                        slot.insert(Slot { k: z()?, v: z()?, len: width })
                    }
                };
                // Row r's columns pad..width, in the buffers seen as one row of n * cap columns.
                let off = (r * cap + pad) * h * d;
                write_cols(&reshape(&s.k, &[1, n * cap * h * d])?, &reshape(&k, &[1, len * h * d])?, off)?;
                write_cols(&reshape(&s.v, &[1, n * cap * h * d])?, &reshape(&v, &[1, len * h * d])?, off)?;
            }
            layers.push(slot);
        }
        Ok(KvCache { layers, reserved: 0 })
    }

    /// Row `r` of the batch as a batch-of-one cache, without its first `skip` columns (the
    /// padding [`KvCache::stack_rows`] added), in buffers of just its length. Copies the row.
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
        let take = |t: &Tensor<B, E>, len: usize| -> Result<Tensor<B, E>> {
            let &[_, cap, h, d] = t.shape() else { unreachable!("cache buffers are 4-D") };
            let flat = reshape(t, &[1, n * cap * h * d])?;
            let row = slice_cols(&flat, (r * cap + skip) * h * d, (len - skip) * h * d)?;
            Ok(reshape(&row, &[1, len - skip, h, d])?)
        };
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            layers.push(match l {
                Some(sl) if sl.len > skip => {
                    Some(Slot { k: take(&sl.k, sl.len)?, v: take(&sl.v, sl.len)?, len: sl.len - skip })
                }
                _ => None,
            });
        }
        Ok(KvCache { layers, reserved: self.reserved })
    }
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

    /// A forward that failed after some layers appended is undone by `truncate`: every layer back
    /// to the length before, the columns before it as they were, the next append in their place.
    #[test]
    fn truncate_undoes_a_partial_append() {
        let dev = Arc::new(Cpu);
        let mut c = one(3, 100.0);
        c.reserve(8);
        let before = c.layer(0).unwrap().unwrap().0.to_vec().unwrap();
        let t = Tensor::constant(&dev, &[1, 1, 2, 3], &[7.0; 6]).unwrap();
        c.append(0, &t, &t).unwrap(); // layer 0 appended, layer 1 not: a forward failed between
        assert_eq!((c.layer_len(0), c.layer_len(1)), (4, 3));
        c.truncate(3);
        assert_eq!((c.layer_len(0), c.layer_len(1)), (3, 3));
        assert_eq!(c.layer(0).unwrap().unwrap().0.to_vec().unwrap(), before);
        let u = Tensor::constant(&dev, &[1, 1, 2, 3], &[9.0; 6]).unwrap();
        for i in 0..2 {
            c.append(i, &u, &u).unwrap();
        }
        let k = c.layer(0).unwrap().unwrap().0.to_vec().unwrap();
        assert_eq!((&k[..18], &k[18..]), (&before[..], &[9.0; 6][..]));
        c.truncate(0);
        assert!(c.is_empty() && c.batch().is_none(), "truncated to nothing is a fresh cache");
        let e = c.emptied();
        assert!(e.is_empty() && e.reserved() == 8 && e.n_layers() == 2);
    }

    #[test]
    fn stacked_rows_are_left_padded_and_come_back_out() {
        let (a, b) = (one(3, 100.0), one(1, 200.0));
        let s = KvCache::stack_rows(&[&a, &b], &[1, 3], 2).unwrap();
        assert_eq!(s.capacity(0), 6);
        assert_eq!((s.batch(), s.len()), (Some(2), 4));
        let k = s.layer(1).unwrap().unwrap().0.to_vec().unwrap();
        assert_eq!(&k[..6], &[0.0; 6]);
        assert_eq!(k[6], 100.0);
        assert_eq!(&k[24..42], &[0.0; 18]);
        assert_eq!(&k[42..], &(0..6).map(|j| 200.0 + j as f64).collect::<Vec<_>>()[..]);
        assert_eq!(s.layer(0).unwrap().unwrap().1.to_vec().unwrap()[47], -205.0);
        for (r, (c, pad)) in [(&a, 1), (&b, 3)].into_iter().enumerate() {
            let back = s.row(r, pad).unwrap();
            for i in 0..2 {
                let (l, m) = (back.layer(i).unwrap().unwrap(), c.layer(i).unwrap().unwrap());
                assert_eq!(l.0.shape(), m.0.shape());
                assert_eq!(
                    (l.0.to_vec().unwrap(), l.1.to_vec().unwrap()),
                    (m.0.to_vec().unwrap(), m.1.to_vec().unwrap())
                );
            }
        }
        // Lengths that do not line up, a row out of range, everything skipped: errors.
        let e = KvCache::stack_rows(&[&a, &b], &[0, 0], 0).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("padded row lengths"), "{e}");
        assert!(KvCache::stack_rows(&[&s], &[0], 0).is_err());
        assert!(KvCache::<Cpu, f64>::stack_rows(&[], &[], 0).is_err());
        assert!(s.row(2, 0).is_err());
        assert!(s.row(0, 4).is_err());
    }

    #[test]
    fn appends_write_in_place_and_grow_geometrically() {
        let dev = Arc::new(Cpu);
        // Batch 2, 1 head of 2: token j of row r holds (100 r + j, -(100 r + j)).
        let tok = |r: usize, j: usize| 100.0 * r as f64 + j as f64;
        let cols = |from: usize, n: usize| -> (Tensor<Cpu, f64>, Tensor<Cpu, f64>) {
            let k: Vec<f64> =
                (0..2).flat_map(|r| (from..from + n).flat_map(move |j| [tok(r, j), -tok(r, j)])).collect();
            let v: Vec<f64> = k.iter().map(|x| x + 0.5).collect();
            (Tensor::constant(&dev, &[2, n, 1, 2], &k).unwrap(), Tensor::constant(&dev, &[2, n, 1, 2], &v).unwrap())
        };
        let mut c = KvCache::<Cpu, f64>::new(1);
        c.reserve(4);
        let (k, v) = cols(0, 3);
        let ((bk, _), n) = c.append(0, &k, &v).unwrap();
        assert_eq!((n, c.capacity(0), bk.shape()), (3, 4, &[2, 4, 1, 2][..]));
        let id = bk.id();
        let (k, v) = cols(3, 1);
        let ((bk, bv), n) = c.append(0, &k, &v).unwrap();
        // Within capacity: the same buffers, the new column written in place (no concatenation).
        assert_eq!((n, bk.id()), (4, id));
        assert_eq!(c.buffers(0).unwrap().0.id(), id);
        // Full, so the next append regrows: twice the capacity, the cached columns carried over.
        let (k, v) = cols(4, 2);
        let ((gk, gv), n) = c.append(0, &k, &v).unwrap();
        assert_eq!((n, c.capacity(0)), (6, 8));
        assert_ne!(gk.id(), id);
        let want: Vec<f64> = (0..2)
            .flat_map(|r| (0..8).flat_map(move |j| if j < 6 { [tok(r, j), -tok(r, j)] } else { [0.0; 2] }))
            .collect();
        assert_eq!(gk.to_vec().unwrap(), want);
        assert_eq!(gv.to_vec().unwrap()[2 * 5], tok(0, 5) + 0.5);
        // The old buffers held what they had (the append wrote nothing outside its columns).
        assert_eq!(bv.to_vec().unwrap()[8..10], [tok(1, 0) + 0.5, -tok(1, 0) + 0.5]);
        let (lk, _) = c.layer(0).unwrap().unwrap();
        assert_eq!((lk.shape(), &lk.to_vec().unwrap()[..12]), (&[2, 6, 1, 2][..], &want[..12]));
        // A mismatched batch is refused and leaves the layer as it was.
        let odd = Tensor::constant(&dev, &[1, 1, 1, 2], &[0.0, 0.0]).unwrap();
        assert!(c.append(0, &odd, &odd).is_err());
        assert!(c.append(1, &k, &v).is_err());
        assert_eq!(c.layer_len(0), 6);
    }
}
