//! Attention on the CPU, FlashAttention-2 style: rayon over (batch, head, query block), each
//! task streaming KV blocks (prefix first, then content up to the causal limit) through `gemm`
//! tile products and an online softmax. Memory per task is O(BQ*BK + BQ*head_dim); no T x S
//! score matrix is ever formed. The backward is in `cpu/bwd.rs`. Generic over [`CpuFloat`]:
//! f32 for training (vectorized softmax), f64 for gradient checks; `lse` and the prefix
//! gradients are in the same type.

mod bwd;
mod tile;

use super::{check_bwd, check_inputs, AttentionKernel, AttnGrads, AttnInputs, AttnParams};
use crate::backend::{Cpu, CpuFloat};
use crate::error::Result;
use rayon::prelude::*;
use tile::{matmul, Geo, SharedMut, View, BK, BQ};

pub(super) use bwd::BwdMode;

/// The read-only inputs of one call, as slices.
struct Src<'a, F> {
    q: &'a [F],
    k: &'a [F],
    v: &'a [F],
    pk: &'a [F],
    pv: &'a [F],
    /// `[heads, q_len, prefix_len + kv_len]`, when the call has a score bias.
    bias: Option<&'a [F]>,
}

impl<F> Clone for Src<'_, F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F> Copy for Src<'_, F> {}

impl<'a, F: CpuFloat> Src<'a, F> {
    fn new(x: &AttnInputs<'a, Cpu, F>) -> Self {
        let (pk, pv) = x.prefix.unwrap_or((&[], &[]));
        Src { q: x.q, k: x.k, v: x.v, pk, pv, bias: x.bias }
    }
    /// The scaled score tile of query rows `(b, i0..i0 + bq, h)` against `blk`, biased and masked.
    ///
    /// # Safety
    /// `s` holds `bq * blk.n` floats; the rows and keys lie in buffers check_inputs verified.
    #[allow(clippy::too_many_arguments)]
    unsafe fn scores(&self, g: &Geo, s: &mut [F], b: usize, h: usize, i0: usize, bq: usize, blk: tile::KvBlock) {
        let (kp, _) = self.kv(g, b, blk, h / g.group);
        let q = View::rows(self.q[g.q_off(b, i0, h)..].as_ptr(), g.q_rs());
        // SAFETY: per the contract.
        unsafe {
            matmul(bq, blk.n, g.d, s.as_mut_ptr(), blk.n, false, q, View::cols(kp, g.kv_rs()), F::c(g.scale.into()))
        };
        if let Some(bias) = self.bias {
            g.add_bias(s, bias, h, i0, bq, blk);
        }
        g.apply_mask(s, b, i0, bq, blk);
    }
    /// Key and value views of block `blk` for KV head `kvh` of batch `b`.
    fn kv(&self, g: &Geo, b: usize, blk: tile::KvBlock, kvh: usize) -> (*const F, *const F) {
        let off = g.kv_off(b, blk, kvh);
        let (k, v) = if blk.prefix { (self.pk, self.pv) } else { (self.k, self.v) };
        // In bounds: check_inputs verified the buffer lengths against the geometry.
        (k[off..].as_ptr(), v[off..].as_ptr())
    }
}

/// Scratch of one forward task.
struct FwdScratch<F> {
    s: Vec<F>,
    acc: Vec<F>,
    m: Vec<F>,
    l: Vec<F>,
    alpha: Vec<F>,
}

/// Forward of query block `qb` of head `h`, batch `b` (blocks from `Geo::q_shift`): writes its rows of `o` and `lse`.
///
/// # Safety
/// `o` and `lse` point to buffers of `q_elems` and `lse_elems` floats whose rows
/// `(b, i0..i0+bq, h)` no other concurrent task writes.
#[allow(clippy::too_many_arguments)]
unsafe fn fwd_task<F: CpuFloat>(
    g: &Geo,
    x: Src<F>,
    b: usize,
    h: usize,
    qb: usize,
    sc: &mut FwdScratch<F>,
    o: SharedMut<F>,
    lse: SharedMut<F>,
) {
    let (i0, bq) = g.q_rows_from(qb, g.q_shift(b));
    if bq == 0 {
        return;
    }
    let (d, kvh) = (g.d, h / g.group);
    let acc = &mut sc.acc[..bq * d];
    acc.fill(F::zero());
    sc.m[..bq].fill(F::neg_infinity());
    sc.l[..bq].fill(F::zero());
    for blk in g.prefix_blocks(b).chain(g.content_blocks(b, i0, bq)) {
        let n = blk.n;
        let (_, vp) = x.kv(g, b, blk, kvh);
        let s = &mut sc.s[..bq * n];
        // SAFETY: `s` holds bq x n; q rows i0..i0+bq and key rows j0..j0+n lie in their buffers.
        unsafe { x.scores(g, s, b, h, i0, bq, blk) };
        tile::online_softmax(s, n, &mut sc.m[..bq], &mut sc.l[..bq], &mut sc.alpha[..bq]);
        for (row, &a) in acc.chunks_exact_mut(d).zip(&sc.alpha[..bq]) {
            if a != F::one() {
                row.iter_mut().for_each(|x| *x *= a);
            }
        }
        // SAFETY: `acc` holds bq x d; `s` bq x n; value rows j0..j0+n lie in their buffer.
        unsafe {
            matmul(bq, d, n, acc.as_mut_ptr(), d, true, View::rows(s.as_ptr(), n), View::rows(vp, g.kv_rs()), F::one())
        };
    }
    for r in 0..bq {
        let (m, l) = (sc.m[r], sc.l[r]);
        // A NaN sum (a NaN score) gives a NaN row and lse; a row that saw no key gives zeros.
        let seen = l > F::zero() || l.is_nan();
        let inv = if seen { F::one() / l } else { F::zero() };
        // SAFETY: row (b, i0 + r, h) of `o` and entry (b, h, i0 + r) of `lse` are this task's
        // alone (see the contract) and in bounds.
        unsafe {
            let orow = std::slice::from_raw_parts_mut(o.0.add(g.q_off(b, i0 + r, h)), d);
            for (y, &a) in orow.iter_mut().zip(&acc[r * d..][..d]) {
                *y = a * inv;
            }
            *lse.0.add(g.lse_off(b, h, i0 + r)) = if seen { m + l.ln() } else { F::neg_infinity() };
        }
    }
}

impl<F: CpuFloat> AttentionKernel<F> for Cpu {
    fn attn_fwd(&self, p: &AttnParams, x: AttnInputs<'_, Self, F>, o: &mut [F], lse: &mut [F]) -> Result<()> {
        check_inputs(p, &x)?;
        let shape = || format!("{p:?}");
        crate::error::check_len("attention", "o", o.len(), p.q_elems(), shape)?;
        crate::error::check_len("attention", "lse", lse.len(), p.lse_elems(), shape)?;
        let g = geo(p, &x)?;
        let src = Src::new(&x);
        let (o, lse) = (SharedMut(o.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
        // One block more than the rows need: blocks start where each sequence's real rows do.
        let nqb = g.q_blocks() + 1;
        (0..g.batch * g.heads * nqb).into_par_iter().for_each_init(
            || FwdScratch {
                s: vec![F::zero(); BQ * BK],
                acc: vec![F::zero(); BQ * g.d],
                m: vec![F::zero(); BQ],
                l: vec![F::zero(); BQ],
                alpha: vec![F::zero(); BQ],
            },
            |sc, task| {
                let (bh, qb) = (task / nqb, task % nqb);
                // SAFETY: tasks differ in (b, h, qb), so they write disjoint rows of o and lse,
                // whose lengths check_len verified.
                unsafe { fwd_task(&g, src, bh / g.heads, bh % g.heads, qb, sc, o, lse) }
            },
        );
        Ok(())
    }

    fn attn_bwd(
        &self,
        p: &AttnParams,
        x: AttnInputs<'_, Self, F>,
        o: &[F],
        d_o: &[F],
        lse: &[F],
        g: AttnGrads<'_, Self, F>,
    ) -> Result<()> {
        attn_bwd_mode(p, x, o, d_o, lse, g, BwdMode::Auto)
    }
}

/// The geometry of a checked call; per-sequence prefix ranges must lie inside the table.
fn geo<'a, F: CpuFloat>(p: &AttnParams, x: &AttnInputs<'a, Cpu, F>) -> Result<Geo<'a>> {
    if let Some(r) = x.prefix_rows {
        if let Some(b) = (0..p.batch as usize).find(|&b| r[2 * b] as u64 + r[2 * b + 1] as u64 > p.prefix_len as u64) {
            let msg = format!(
                "prefix_rows: sequence {b} takes rows {}..+{} of a prefix table of {}",
                r[2 * b],
                r[2 * b + 1],
                p.prefix_len
            );
            return Err(crate::error::Error::Invalid { op: "attention", msg });
        }
    }
    Ok(Geo::new(p, x.key_mask, x.prefix_rows))
}

/// The backward with a chosen task split (tests exercise each).
pub(super) fn attn_bwd_mode<F: CpuFloat>(
    p: &AttnParams,
    x: AttnInputs<'_, Cpu, F>,
    o: &[F],
    d_o: &[F],
    lse: &[F],
    grads: AttnGrads<'_, Cpu, F>,
    mode: BwdMode,
) -> Result<()> {
    check_inputs(p, &x)?;
    check_bwd::<Cpu, F>(p, o, d_o, lse, &grads)?;
    let g = geo(p, &x)?;
    bwd::backward(&g, Src::new(&x), o, d_o, lse, grads, mode);
    Ok(())
}
