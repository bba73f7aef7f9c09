//! Tile-level building blocks of CPU attention: the problem geometry, KV blocks and their
//! masks, strided `gemm` tile products, and the vectorized per-tile softmax arithmetic
//! (for f32: a vectorizable exp, compiled for AVX-512 / AVX2 and picked at run time; for f64:
//! the same loops with `f64::exp`, for gradient checks).

use crate::backend::CpuFloat;
use crate::ops::attention::AttnParams;
use std::any::TypeId;
use std::sync::OnceLock;

/// Query rows per tile.
pub const BQ: usize = 128;
/// Keys per tile.
pub const BK: usize = 128;

/// Sizes, strides and masking of one call. The small accessors are `#[inline]` because the
/// generic kernels that call them are instantiated in the calling crate.
pub struct Geo<'a> {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Query heads per KV head.
    pub group: usize,
    pub t: usize,
    pub s: usize,
    /// Key rows per sequence in `k`/`v` (their batch stride in rows; `s` unless a strided cache).
    pub s_rows: usize,
    pub p: usize,
    pub d: usize,
    pub scale: f32,
    pub causal: bool,
    pub mask: Option<&'a [u8]>,
    /// Per-sequence `(start, len)` in the prefix table (`[batch, 2]`); `None`: all of it.
    pub prefix_rows: Option<&'a [u32]>,
}

/// One block of keys: `n` rows starting at `j0`, of the prefix or of the content.
#[derive(Clone, Copy, Debug)]
pub struct KvBlock {
    pub j0: usize,
    pub n: usize,
    pub prefix: bool,
}

impl<'a> Geo<'a> {
    pub fn new(p: &AttnParams, mask: Option<&'a [u8]>, prefix_rows: Option<&'a [u32]>) -> Self {
        Geo {
            batch: p.batch as usize,
            heads: p.heads as usize,
            kv_heads: p.kv_heads as usize,
            group: (p.heads / p.kv_heads) as usize,
            t: p.q_len as usize,
            s: p.kv_len as usize,
            s_rows: p.kv_rows(),
            p: p.prefix_len as usize,
            d: p.head_dim as usize,
            scale: p.scale,
            causal: p.causal == 1,
            mask,
            prefix_rows,
        }
    }
    /// Row stride of `q`, `o`, `dq`, `d_o`.
    #[inline]
    pub fn q_rs(&self) -> usize {
        self.heads * self.d
    }
    /// Row stride of `k`, `v`, prefix, and their gradients.
    #[inline]
    pub fn kv_rs(&self) -> usize {
        self.kv_heads * self.d
    }
    #[inline]
    pub fn q_off(&self, b: usize, i: usize, h: usize) -> usize {
        ((b * self.t + i) * self.heads + h) * self.d
    }
    /// Offset of key row `j` of KV head `kvh` in `k`/`v` (content) or in the prefix buffers.
    #[inline]
    pub fn kv_off(&self, b: usize, blk: KvBlock, kvh: usize) -> usize {
        if blk.prefix {
            (blk.j0 * self.kv_heads + kvh) * self.d
        } else {
            ((b * self.s_rows + blk.j0) * self.kv_heads + kvh) * self.d
        }
    }
    #[inline]
    pub fn lse_off(&self, b: usize, h: usize, i: usize) -> usize {
        (b * self.heads + h) * self.t + i
    }
    /// Row stride of `bias` and `dbias`: every prefix row of the table, then every content key.
    #[inline]
    pub fn bias_rs(&self) -> usize {
        self.p + self.s
    }
    /// Offset in `bias`/`dbias` of query row `i` of head `h` at the first key of `blk`.
    #[inline]
    pub fn bias_off(&self, h: usize, i: usize, blk: KvBlock) -> usize {
        let col = if blk.prefix { blk.j0 } else { self.p + blk.j0 };
        (h * self.t + i) * self.bias_rs() + col
    }
    /// Query blocks per sequence.
    #[inline]
    pub fn q_blocks(&self) -> usize {
        self.t.div_ceil(BQ)
    }
    /// Rows `(i0, bq)` of query block `qb`.
    #[inline]
    pub fn q_rows(&self, qb: usize) -> (usize, usize) {
        let i0 = qb * BQ;
        (i0, BQ.min(self.t - i0))
    }
    /// The first key of sequence `b` its mask keeps (0 without a mask, or if it keeps none).
    #[inline]
    pub fn first_kept(&self, b: usize) -> usize {
        self.mask.map_or(0, |m| m[b * self.s..(b + 1) * self.s].iter().position(|&x| x != 0).unwrap_or(0))
    }
    /// Where the forward's query blocks of sequence `b` start, for causal calls: the query row at
    /// its first kept key, modulo [`BQ`] (0 where nothing is padded on the left, and for
    /// bidirectional calls, whose queries are not the keys' rows). Blocks that start there put a
    /// left-padded sequence's rows into the blocks they fill without the padding, so each row's
    /// tile products have the unpadded row's shapes (the matrix kernels' rounding depends on them).
    #[inline]
    pub fn q_shift(&self, b: usize) -> usize {
        if !self.causal || self.t > self.s {
            return 0;
        }
        self.first_kept(b).saturating_sub(self.s - self.t) % BQ
    }
    /// Rows `(i0, bq)` of the forward's query block `qb` when blocks start at `shift` (block 0 is
    /// then `[0, shift)`); `bq == 0` past the last row. `q_blocks() + 1` blocks cover every row.
    #[inline]
    pub fn q_rows_from(&self, qb: usize, shift: usize) -> (usize, usize) {
        let i0 = match (shift, qb) {
            (0, _) => qb * BQ,
            (_, 0) => return (0, shift.min(self.t)),
            _ => shift + (qb - 1) * BQ,
        };
        if i0 >= self.t {
            (self.t, 0)
        } else {
            (i0, BQ.min(self.t - i0))
        }
    }
    /// The prefix rows `start..end` of the table sequence `b` sees (clamped to the table).
    #[inline]
    pub fn prefix_range(&self, b: usize) -> (usize, usize) {
        match self.prefix_rows {
            Some(r) => {
                let start = (r[2 * b] as usize).min(self.p);
                (start, start + (r[2 * b + 1] as usize).min(self.p - start))
            }
            None => (0, self.p),
        }
    }
    /// Prefix key blocks of sequence `b` (`BK` rows from the start of its range; `j0` absolute
    /// in the table).
    #[inline]
    pub fn prefix_blocks(&self, b: usize) -> impl Iterator<Item = KvBlock> {
        let (start, end) = self.prefix_range(b);
        (start..end).step_by(BK).map(move |j0| KvBlock { j0, n: BK.min(end - j0), prefix: true })
    }
    /// Content key blocks that query rows `[i0, i0 + bq)` of batch `b` can see at all, from the
    /// first key the mask keeps: the keys after a run of left padding fall into the blocks they
    /// fill without it, so a padded row's online softmax rounds as the unpadded row's does (the
    /// skipped keys are padding, which adds exactly nothing). A row's bits then do not depend on
    /// how much padding the batch gave it, which the low-precision bases' activation rounding
    /// would otherwise amplify.
    #[inline]
    pub fn content_blocks(&self, b: usize, i0: usize, bq: usize) -> impl Iterator<Item = KvBlock> + '_ {
        // Causal calls have t <= s (validated); bidirectional ones may have t > s.
        let end = if self.causal { (self.s - self.t + i0 + bq).min(self.s) } else { self.s };
        (self.first_kept(b).min(end)..end)
            .step_by(BK)
            .map(move |j0| KvBlock { j0, n: BK.min(self.s - j0), prefix: false })
            .filter(move |blk| !self.all_padded(b, *blk))
    }
    /// Whether every key of a content block is padding.
    #[inline]
    pub fn all_padded(&self, b: usize, blk: KvBlock) -> bool {
        match self.mask {
            Some(m) if !blk.prefix => m[b * self.s + blk.j0..][..blk.n].iter().all(|&x| x == 0),
            _ => false,
        }
    }
    /// First query row that can see content key `j0` (causal), else 0.
    #[inline]
    pub fn first_q_seeing(&self, j0: usize) -> usize {
        if self.causal {
            j0.saturating_sub(self.s - self.t)
        } else {
            0
        }
    }

    /// `tile (bq x blk.n) += bias` rows `(h, i0..i0 + bq)` at the block's columns (before masking).
    #[inline]
    pub fn add_bias<F: CpuFloat>(&self, tile: &mut [F], bias: &[F], h: usize, i0: usize, bq: usize, blk: KvBlock) {
        let n = blk.n;
        let rows = bias[self.bias_off(h, i0, blk)..].chunks(self.bias_rs());
        for (row, brow) in tile[..bq * n].chunks_exact_mut(n).zip(rows) {
            row.iter_mut().zip(&brow[..n]).for_each(|(x, &b)| *x += b);
        }
    }

    /// `dbias` rows `(h, i0..i0 + bq)` at the block's columns `+= ds` (`bq x blk.n`).
    ///
    /// # Safety
    /// `dbias` holds `heads * t * bias_rs` floats and no other concurrent task writes those rows.
    #[inline]
    pub unsafe fn add_dbias<F: CpuFloat>(
        &self,
        dbias: SharedMut<F>,
        ds: &[F],
        h: usize,
        i0: usize,
        bq: usize,
        blk: KvBlock,
    ) {
        let n = blk.n;
        for (r, row) in ds[..bq * n].chunks_exact(n).enumerate() {
            // SAFETY: per the contract; the row's n columns lie inside it.
            let out = unsafe { std::slice::from_raw_parts_mut(dbias.0.add(self.bias_off(h, i0 + r, blk)), n) };
            out.iter_mut().zip(row).for_each(|(y, &x)| *y += x);
        }
    }

    /// Sets to `-inf` the scores of `tile` (`bq x blk.n`, rows of query `i0 + r`) that the
    /// causal rule or the padding mask hides.
    pub fn apply_mask<F: CpuFloat>(&self, tile: &mut [F], b: usize, i0: usize, bq: usize, blk: KvBlock) {
        if blk.prefix {
            return;
        }
        let n = blk.n;
        if let Some(m) = self.mask {
            let m = &m[b * self.s + blk.j0..][..n];
            if m.contains(&0) {
                for row in tile[..bq * n].chunks_exact_mut(n) {
                    for (x, &keep) in row.iter_mut().zip(m) {
                        if keep == 0 {
                            *x = F::neg_infinity();
                        }
                    }
                }
            }
        }
        if self.causal {
            let off = self.s - self.t;
            for (r, row) in tile[..bq * n].chunks_exact_mut(n).enumerate() {
                // Query i0 + r sees content keys j <= off + i0 + r.
                let first_hidden = (off + i0 + r + 1).saturating_sub(blk.j0);
                if first_hidden < n {
                    row[first_hidden..].fill(F::neg_infinity());
                }
            }
        }
    }
}

/// A strided read-only matrix view: element `(r, c)` at `ptr + r*rs + c*cs`.
pub struct View<F> {
    pub ptr: *const F,
    pub rs: usize,
    pub cs: usize,
}

impl<F> Clone for View<F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F> Copy for View<F> {}

impl<F> View<F> {
    pub fn rows(ptr: *const F, rs: usize) -> Self {
        View { ptr, rs, cs: 1 }
    }
    /// The transpose of a row-major matrix with row stride `rs`.
    pub fn cols(ptr: *const F, rs: usize) -> Self {
        View { ptr, rs: 1, cs: rs }
    }
}

/// `dst (m x n, row stride dst_rs) = [dst +] beta * lhs (m x k) * rhs (k x n)`, one thread.
///
/// # Safety
/// `dst` must be valid for writes (and reads if `accumulate`) of every element `r*dst_rs + c`
/// with `r < m`, `c < n`, not aliased by `lhs`/`rhs`, and `lhs`/`rhs` valid for reads of every
/// element their strides address for `m x k` and `k x n`.
pub unsafe fn matmul<F: CpuFloat>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut F,
    dst_rs: usize,
    accumulate: bool,
    lhs: View<F>,
    rhs: View<F>,
    beta: F,
) {
    let st = |x: usize| x as isize;
    // SAFETY: forwarded from this function's contract; gemm computes dst := 1*dst + beta*lhs*rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            st(dst_rs),
            accumulate,
            lhs.ptr,
            st(lhs.cs),
            st(lhs.rs),
            rhs.ptr,
            st(rhs.cs),
            st(rhs.rs),
            F::one(),
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// A raw pointer that rayon tasks share to write disjoint rows of one output buffer.
pub struct SharedMut<F>(pub *mut F);
impl<F> Clone for SharedMut<F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F> Copy for SharedMut<F> {}
// SAFETY: every use writes rows that no other concurrent task touches (documented at each use),
// and the element types are plain floats (Send + Sync).
unsafe impl<F: Send + Sync> Send for SharedMut<F> {}
// SAFETY: as above.
unsafe impl<F: Send + Sync> Sync for SharedMut<F> {}

#[derive(Clone, Copy, PartialEq)]
enum Level {
    Avx512,
    Avx2,
    Base,
}

fn level() -> Level {
    static L: OnceLock<Level> = OnceLock::new();
    *L.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                return Level::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Level::Avx2;
            }
        }
        Level::Base
    })
}

const LANES: usize = 16;

/// `e^x` for `x <= 88` (relative error ~2e-7); `0` for `x < -88` and for `-inf`. Written as
/// straight-line float/int arithmetic so loops over it vectorize.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer in the low bits
    const LN2_HI: f32 = 0.693_359_4; // ln 2 split (Cody-Waite) so n * LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-88.03, 88.03); // keeps n in [-127, 127]
    let shifted = x * std::f32::consts::LOG2_E + MAGIC;
    let n = shifted - MAGIC;
    let f = x - n * LN2_HI - n * LN2_LO; // |f| <= ln2 / 2
    let p = 1.0 + f * (1.0 + f * (0.5 + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0))))));
    let ni = shifted.to_bits() as i32 - 0x4B40_0000;
    // n = -127 gives the bit pattern 0 (the value 0.0): underflow to exactly zero.
    p * f32::from_bits(((ni + 127) << 23) as u32)
}

#[inline(always)]
fn row_max<F: CpuFloat>(row: &[F]) -> F {
    let mut acc = [F::neg_infinity(); LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for k in 0..LANES {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    let tail = chunks.remainder().iter().copied().fold(F::neg_infinity(), F::max);
    acc.iter().copied().fold(tail, F::max)
}

/// `row[c] = exp(row[c] - sub)` in place; returns the sum.
#[inline(always)]
fn exp_sub_sum<F: CpuFloat>(row: &mut [F], sub: F, exp: impl Fn(F) -> F) -> F {
    let mut acc = [F::zero(); LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for k in 0..LANES {
            c[k] = exp(c[k] - sub);
            acc[k] += c[k];
        }
    }
    let mut tail = F::zero();
    for x in chunks.into_remainder() {
        *x = exp(*x - sub);
        tail += *x;
    }
    acc.iter().copied().sum::<F>() + tail
}

/// Online softmax over one score tile (`rows x n`): turns scores into `exp(s - m_new)`,
/// updates the running max `m` and sum `l`, and writes each row's rescale factor to `alpha`.
#[inline(always)]
fn online_softmax_impl<F: CpuFloat>(
    tile: &mut [F],
    n: usize,
    m: &mut [F],
    l: &mut [F],
    alpha: &mut [F],
    exp: impl Fn(F) -> F + Copy,
) {
    for (r, row) in tile.chunks_exact_mut(n).enumerate() {
        let m_new = m[r].max(row_max(row));
        if m_new == F::neg_infinity() {
            // Nothing visible to this row yet, or only NaN scores (the max skips NaN): a NaN
            // poisons the row's sum, so the output says NaN rather than "saw nothing".
            if row.iter().any(|x| x.is_nan()) {
                l[r] = F::nan();
            }
            row.fill(F::zero());
            alpha[r] = F::one();
            continue;
        }
        let a = exp(m[r] - m_new);
        l[r] = l[r] * a + exp_sub_sum(row, m_new, exp);
        m[r] = m_new;
        alpha[r] = a;
    }
}

/// Backward tile: `p = exp(s - lse)` in `tile`, `ds = p * (dp - delta)` in `dp`, row by row.
/// A row with `lse = -inf` (it saw nothing) gets zeros.
#[inline(always)]
fn softmax_grad_impl<F: CpuFloat>(
    tile: &mut [F],
    dp: &mut [F],
    n: usize,
    lse: &[F],
    delta: &[F],
    exp: impl Fn(F) -> F,
) {
    for (r, (row, dprow)) in tile.chunks_exact_mut(n).zip(dp.chunks_exact_mut(n)).enumerate() {
        let sub = if lse[r] == F::neg_infinity() { F::infinity() } else { lse[r] };
        let dl = delta[r];
        for (x, g) in row.iter_mut().zip(dprow.iter_mut()) {
            *x = exp(*x - sub);
            *g = *x * (*g - dl);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn online_softmax_avx512(tile: &mut [f32], n: usize, m: &mut [f32], l: &mut [f32], alpha: &mut [f32]) {
    online_softmax_impl(tile, n, m, l, alpha, fast_exp)
}
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn online_softmax_avx2(tile: &mut [f32], n: usize, m: &mut [f32], l: &mut [f32], alpha: &mut [f32]) {
    online_softmax_impl(tile, n, m, l, alpha, fast_exp)
}
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn softmax_grad_avx512(tile: &mut [f32], dp: &mut [f32], n: usize, lse: &[f32], delta: &[f32]) {
    softmax_grad_impl(tile, dp, n, lse, delta, fast_exp)
}
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_grad_avx2(tile: &mut [f32], dp: &mut [f32], n: usize, lse: &[f32], delta: &[f32]) {
    softmax_grad_impl(tile, dp, n, lse, delta, fast_exp)
}

/// [`online_softmax_impl`] in f32 with [`fast_exp`], dispatched on the CPU's vector width.
fn online_softmax_f32(tile: &mut [f32], n: usize, m: &mut [f32], l: &mut [f32], alpha: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: `level` detected these target features on this CPU.
        Level::Avx512 => return unsafe { online_softmax_avx512(tile, n, m, l, alpha) },
        // SAFETY: as above.
        Level::Avx2 => return unsafe { online_softmax_avx2(tile, n, m, l, alpha) },
        Level::Base => {}
    }
    online_softmax_impl(tile, n, m, l, alpha, fast_exp)
}

/// [`softmax_grad_impl`] in f32 with [`fast_exp`], dispatched on the CPU's vector width.
fn softmax_grad_f32(tile: &mut [f32], dp: &mut [f32], n: usize, lse: &[f32], delta: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: `level` detected these target features on this CPU.
        Level::Avx512 => return unsafe { softmax_grad_avx512(tile, dp, n, lse, delta) },
        // SAFETY: as above.
        Level::Avx2 => return unsafe { softmax_grad_avx2(tile, dp, n, lse, delta) },
        Level::Base => {}
    }
    softmax_grad_impl(tile, dp, n, lse, delta, fast_exp)
}

/// `x` as an f32 slice when `F` is f32 (the check folds away at compile time).
#[inline(always)]
fn as_f32<F: CpuFloat>(x: &[F]) -> Option<&[f32]> {
    // SAFETY: F is f32 (same TypeId), so the memory is a valid [f32] of the same length,
    // borrowed for the same lifetime.
    (TypeId::of::<F>() == TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), x.len()) })
}

/// Mutable [`as_f32`].
#[inline(always)]
fn as_f32_mut<F: CpuFloat>(x: &mut [F]) -> Option<&mut [f32]> {
    // SAFETY: as in `as_f32`; the exclusive borrow of `x` moves into the result.
    (TypeId::of::<F>() == TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), x.len()) })
}

/// See [`online_softmax_impl`]: f32 takes the vectorized [`fast_exp`] path, f64 the plain one
/// with `f64::exp` (full precision, for gradient checks).
pub fn online_softmax<F: CpuFloat>(tile: &mut [F], n: usize, m: &mut [F], l: &mut [F], alpha: &mut [F]) {
    if let (Some(t), Some(m), Some(l), Some(a)) = (as_f32_mut(tile), as_f32_mut(m), as_f32_mut(l), as_f32_mut(alpha)) {
        return online_softmax_f32(t, n, m, l, a);
    }
    online_softmax_impl(tile, n, m, l, alpha, F::exp)
}

/// See [`softmax_grad_impl`]: f32 takes the vectorized [`fast_exp`] path, f64 the plain one.
pub fn softmax_grad<F: CpuFloat>(tile: &mut [F], dp: &mut [F], n: usize, lse: &[F], delta: &[F]) {
    if let (Some(t), Some(g), Some(s), Some(d)) = (as_f32_mut(tile), as_f32_mut(dp), as_f32(lse), as_f32(delta)) {
        return softmax_grad_f32(t, g, n, s, d);
    }
    softmax_grad_impl(tile, dp, n, lse, delta, F::exp)
}

#[cfg(test)]
mod tests {
    use super::fast_exp;

    #[test]
    fn fast_exp_is_accurate_and_underflows_to_zero() {
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let (got, want) = (fast_exp(x) as f64, (x as f64).exp());
            assert!((got - want).abs() <= 3e-7 * want + 1e-37, "exp({x}) = {got}, want {want}");
        }
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp(-100.0), 0.0);
    }
}
