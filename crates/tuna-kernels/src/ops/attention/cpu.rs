//! Attention on the CPU, FlashAttention-2 style: rayon over (batch, head, query block), each
//! task streaming KV blocks (prefix first, then content up to the causal limit) through `gemm`
//! tile products and an online softmax. Memory per task is O(BQ*BK + BQ*head_dim); no T x S
//! score matrix is ever formed. The backward is in `cpu/bwd.rs`.

mod bwd;
mod tile;

use super::{check_bwd, check_inputs, AttentionKernel, AttnGrads, AttnInputs, AttnParams};
use crate::backend::Cpu;
use crate::error::Result;
use rayon::prelude::*;
use tile::{matmul, Geo, SharedMut, View, BK, BQ};

pub(super) use bwd::BwdMode;

/// The read-only inputs of one call, as slices.
#[derive(Clone, Copy)]
struct Src<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    pk: &'a [f32],
    pv: &'a [f32],
}

impl<'a> Src<'a> {
    fn new(x: &AttnInputs<'a, Cpu, f32>) -> Self {
        let (pk, pv) = x.prefix.unwrap_or((&[], &[]));
        Src { q: x.q, k: x.k, v: x.v, pk, pv }
    }
    /// Key and value views of block `blk` for KV head `kvh` of batch `b`.
    fn kv(&self, g: &Geo, b: usize, blk: tile::KvBlock, kvh: usize) -> (*const f32, *const f32) {
        let off = g.kv_off(b, blk, kvh);
        let (k, v) = if blk.prefix { (self.pk, self.pv) } else { (self.k, self.v) };
        // In bounds: check_inputs verified the buffer lengths against the geometry.
        (k[off..].as_ptr(), v[off..].as_ptr())
    }
}

/// Scratch of one forward task.
struct FwdScratch {
    s: Vec<f32>,
    acc: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    alpha: Vec<f32>,
}

/// Forward of query block `qb` of head `h`, batch `b`: writes its rows of `o` and `lse`.
///
/// # Safety
/// `o` and `lse` point to buffers of `q_elems` and `lse_elems` floats whose rows
/// `(b, i0..i0+bq, h)` no other concurrent task writes.
unsafe fn fwd_task(g: &Geo, x: Src, b: usize, h: usize, qb: usize, sc: &mut FwdScratch, o: SharedMut, lse: SharedMut) {
    let (i0, bq) = g.q_rows(qb);
    let (d, kvh) = (g.d, h / g.group);
    let q = View::rows(x.q[g.q_off(b, i0, h)..].as_ptr(), g.q_rs());
    let acc = &mut sc.acc[..bq * d];
    acc.fill(0.0);
    sc.m[..bq].fill(f32::NEG_INFINITY);
    sc.l[..bq].fill(0.0);
    for blk in g.prefix_blocks().chain(g.content_blocks(b, i0, bq)) {
        let n = blk.n;
        let (kp, vp) = x.kv(g, b, blk, kvh);
        let s = &mut sc.s[..bq * n];
        // SAFETY: `s` holds bq x n; q rows i0..i0+bq and key rows j0..j0+n lie in their buffers.
        unsafe { matmul(bq, n, d, s.as_mut_ptr(), n, false, q, View::cols(kp, g.kv_rs()), g.scale) };
        g.apply_mask(s, b, i0, bq, blk);
        tile::online_softmax(s, n, &mut sc.m[..bq], &mut sc.l[..bq], &mut sc.alpha[..bq]);
        for (row, &a) in acc.chunks_exact_mut(d).zip(&sc.alpha[..bq]) {
            if a != 1.0 {
                row.iter_mut().for_each(|x| *x *= a);
            }
        }
        // SAFETY: `acc` holds bq x d; `s` bq x n; value rows j0..j0+n lie in their buffer.
        unsafe {
            matmul(bq, d, n, acc.as_mut_ptr(), d, true, View::rows(s.as_ptr(), n), View::rows(vp, g.kv_rs()), 1.0)
        };
    }
    for r in 0..bq {
        let (m, l) = (sc.m[r], sc.l[r]);
        let seen = l > 0.0;
        let inv = if seen { 1.0 / l } else { 0.0 };
        // SAFETY: row (b, i0 + r, h) of `o` and entry (b, h, i0 + r) of `lse` are this task's
        // alone (see the contract) and in bounds.
        unsafe {
            let orow = std::slice::from_raw_parts_mut(o.0.add(g.q_off(b, i0 + r, h)), d);
            for (y, &a) in orow.iter_mut().zip(&acc[r * d..][..d]) {
                *y = a * inv;
            }
            *lse.0.add(g.lse_off(b, h, i0 + r)) = if seen { m + l.ln() } else { f32::NEG_INFINITY };
        }
    }
}

impl AttentionKernel<f32> for Cpu {
    fn attn_fwd(&self, p: &AttnParams, x: AttnInputs<'_, Self, f32>, o: &mut [f32], lse: &mut [f32]) -> Result<()> {
        check_inputs(p, &x)?;
        let shape = || format!("{p:?}");
        crate::error::check_len("attention", "o", o.len(), p.q_elems(), shape)?;
        crate::error::check_len("attention", "lse", lse.len(), p.lse_elems(), shape)?;
        let g = Geo::new(p, x.key_mask);
        let src = Src::new(&x);
        let (o, lse) = (SharedMut(o.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
        let nqb = g.q_blocks();
        (0..g.batch * g.heads * nqb).into_par_iter().for_each_init(
            || FwdScratch {
                s: vec![0.0; BQ * BK],
                acc: vec![0.0; BQ * g.d],
                m: vec![0.0; BQ],
                l: vec![0.0; BQ],
                alpha: vec![0.0; BQ],
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
        x: AttnInputs<'_, Self, f32>,
        o: &[f32],
        d_o: &[f32],
        lse: &[f32],
        g: AttnGrads<'_, Self, f32>,
    ) -> Result<()> {
        attn_bwd_mode(p, x, o, d_o, lse, g, BwdMode::Auto)
    }
}

/// The backward with a chosen task split (tests exercise each).
pub(super) fn attn_bwd_mode(
    p: &AttnParams,
    x: AttnInputs<'_, Cpu, f32>,
    o: &[f32],
    d_o: &[f32],
    lse: &[f32],
    grads: AttnGrads<'_, Cpu, f32>,
    mode: BwdMode,
) -> Result<()> {
    check_inputs(p, &x)?;
    check_bwd::<Cpu, f32>(p, o, d_o, lse, &grads)?;
    let g = Geo::new(p, x.key_mask);
    bwd::backward(&g, Src::new(&x), o, d_o, lse, grads, mode);
    Ok(())
}
