//! Attention backward on the CPU: race-free and deterministic (no atomics). Each pass owns the
//! gradient rows it writes; tiles recompute `P = exp(S - lse)` and `dS = P * (dP - delta)`.
//!
//! - pass `dq`: rayon over (batch, head, query block), looping over KV blocks: `dq += scale dS K`.
//!   With a score bias it also adds `dbias += dS`; then its tasks are (head, query block), each
//!   looping over the whole batch, so one task owns each `dbias` row (the batch sum stays
//!   race-free and in a fixed order), and it covers the content blocks too (no `Fused` split).
//! - pass `dkv`: rayon over (batch, kv head, content key block), looping over the group's heads
//!   and query blocks: `dv += P^T dO`, `dk += scale dS^T Q`.
//! - pass `dprefix`: rayon over (kv head, prefix block), looping over every batch, group head
//!   and query block, so the batch reduction happens inside the task.
//!
//! When there are enough (batch, kv head) pairs to keep every thread busy, the `Fused` split
//! runs the `dkv` pass per (batch, kv head) and adds `dq` there too (that task owns those `dq`
//! rows), leaving the `dq` pass only the prefix blocks: 5 tile products per content tile
//! instead of 7.

use super::tile::{self, matmul, Geo, KvBlock, SharedMut, View, BK, BQ};
use super::Src;
use crate::backend::{Cpu, CpuFloat};
use crate::ops::attention::AttnGrads;
use rayon::prelude::*;

/// How the backward splits its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BwdMode {
    /// `Fused` when batch * kv_heads >= 2 * threads, else `Split`.
    Auto,
    Split,
    Fused,
}

/// Everything a backward tile reads.
struct Bwd<'a, F> {
    x: Src<'a, F>,
    d_o: &'a [F],
    lse: &'a [F],
    delta: &'a [F],
}

impl<F> Clone for Bwd<'_, F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F> Copy for Bwd<'_, F> {}

struct Scratch<F> {
    s: Vec<F>,
    dp: Vec<F>,
    dk: Vec<F>,
    dv: Vec<F>,
}

impl<F: CpuFloat> Scratch<F> {
    fn new(d: usize) -> Self {
        let z = F::zero();
        Scratch { s: vec![z; BQ * BK], dp: vec![z; BQ * BK], dk: vec![z; BK * d], dv: vec![z; BK * d] }
    }
}

/// Recompute one tile: `P` into `sc.s` and `dS` into `sc.dp` (each `bq x blk.n`). Returns `bq`.
fn tile_grads<F: CpuFloat>(
    g: &Geo,
    a: Bwd<F>,
    b: usize,
    h: usize,
    qb: usize,
    blk: KvBlock,
    sc: &mut Scratch<F>,
) -> usize {
    let (i0, bq) = g.q_rows(qb);
    let (n, d) = (blk.n, g.d);
    let (_, vp) = a.x.kv(g, b, blk, h / g.group);
    let qo = g.q_off(b, i0, h);
    let (s, dp) = (&mut sc.s[..bq * n], &mut sc.dp[..bq * n]);
    // SAFETY: s and dp hold bq x n; query rows i0..i0+bq of q/d_o and key rows j0..j0+n of
    // k/v (or the prefix) lie inside buffers whose lengths check_inputs/check_bwd verified.
    unsafe {
        a.x.scores(g, s, b, h, i0, bq, blk);
        matmul(
            bq,
            n,
            d,
            dp.as_mut_ptr(),
            n,
            false,
            View::rows(a.d_o[qo..].as_ptr(), g.q_rs()),
            View::cols(vp, g.kv_rs()),
            F::one(),
        );
    }
    let lo = g.lse_off(b, h, i0);
    tile::softmax_grad(s, dp, n, &a.lse[lo..][..bq], &a.delta[lo..][..bq]);
    bq
}

/// `dq rows (b, i0.., h) += scale * dS K` for the tile in `sc`.
///
/// # Safety
/// No other concurrent task writes those `dq` rows; `dq` has `q_elems` floats.
#[allow(clippy::too_many_arguments)]
unsafe fn add_dq<F: CpuFloat>(
    g: &Geo,
    a: Bwd<F>,
    b: usize,
    h: usize,
    qb: usize,
    blk: KvBlock,
    sc: &Scratch<F>,
    dq: SharedMut<F>,
) {
    let (i0, bq) = g.q_rows(qb);
    let (kp, _) = a.x.kv(g, b, blk, h / g.group);
    // SAFETY: the caller owns these dq rows; dS is bq x n; key rows lie in their buffer.
    unsafe {
        let dst = dq.0.add(g.q_off(b, i0, h));
        matmul(
            bq,
            g.d,
            blk.n,
            dst,
            g.q_rs(),
            true,
            View::rows(sc.dp.as_ptr(), blk.n),
            View::rows(kp, g.kv_rs()),
            F::c(g.scale.into()),
        );
    }
}

/// `dv_t += P^T dO`, `dk_t += scale dS^T Q` into the task-local `sc.dk`, `sc.dv` (`n x d`, from
/// scratch row `row0`).
#[allow(clippy::too_many_arguments)]
fn add_dkv_tile<F: CpuFloat>(
    g: &Geo,
    a: Bwd<F>,
    b: usize,
    h: usize,
    qb: usize,
    (row0, n): (usize, usize),
    bq: usize,
    sc: &mut Scratch<F>,
) {
    let qo = g.q_off(b, g.q_rows(qb).0, h);
    let d = g.d;
    // SAFETY: dk/dv scratch hold BK x d and row0 + n <= BK; P and dS are bq x n; query rows lie
    // in q and d_o.
    unsafe {
        let (do_v, q_v) = (View::rows(a.d_o[qo..].as_ptr(), g.q_rs()), View::rows(a.x.q[qo..].as_ptr(), g.q_rs()));
        let (dv, dk) = (sc.dv.as_mut_ptr().add(row0 * d), sc.dk.as_mut_ptr().add(row0 * d));
        matmul(n, d, bq, dv, d, true, View::cols(sc.s.as_ptr(), n), do_v, F::one());
        matmul(n, d, bq, dk, d, true, View::cols(sc.dp.as_ptr(), n), q_v, F::c(g.scale.into()));
    }
}

/// `dst rows (stride kv_rs) += src (n x d)`.
///
/// # Safety
/// No other concurrent task writes those rows, which lie inside `dst`'s buffer.
unsafe fn add_rows<F: CpuFloat>(g: &Geo, dst: *mut F, src: &[F], n: usize) {
    for (r, row) in src[..n * g.d].chunks_exact(g.d).enumerate() {
        // SAFETY: per the contract.
        let out = unsafe { std::slice::from_raw_parts_mut(dst.add(r * g.kv_rs()), g.d) };
        out.iter_mut().zip(row).for_each(|(y, &x)| *y += x);
    }
}

/// Gradients of content key block `kb` of (b, kvh); with `dq`, also its `dq` contributions.
///
/// # Safety
/// No concurrent task writes dk/dv rows (b, block, kvh), nor (if given) dq rows of (b, group heads).
unsafe fn content_block<F: CpuFloat>(
    g: &Geo,
    a: Bwd<F>,
    b: usize,
    kvh: usize,
    kb: usize,
    sc: &mut Scratch<F>,
    out: [SharedMut<F>; 2],
    dq: Option<SharedMut<F>>,
) {
    let j0 = kb * BK;
    let blk = KvBlock { j0, n: BK.min(g.s - j0), prefix: false };
    if g.all_padded(b, blk) {
        return;
    }
    sc.dk[..blk.n * g.d].fill(F::zero());
    sc.dv[..blk.n * g.d].fill(F::zero());
    for h in kvh * g.group..(kvh + 1) * g.group {
        for qb in g.first_q_seeing(j0) / BQ..g.q_blocks() {
            let bq = tile_grads(g, a, b, h, qb, blk, sc);
            add_dkv_tile(g, a, b, h, qb, (0, blk.n), bq, sc);
            if let Some(dq) = dq {
                // SAFETY: forwarded from this function's contract.
                unsafe { add_dq(g, a, b, h, qb, blk, sc, dq) };
            }
        }
    }
    let off = g.kv_off(b, blk, kvh);
    // SAFETY: forwarded from this function's contract.
    unsafe {
        add_rows(g, out[0].0.add(off), &sc.dk, blk.n);
        add_rows(g, out[1].0.add(off), &sc.dv, blk.n);
    }
}

/// Gradients of prefix block `pb` of KV head `kvh`, summed over the batch (each sequence adds
/// to the part of the block inside its prefix range).
///
/// # Safety
/// No concurrent task writes dpk/dpv rows (block, kvh).
unsafe fn prefix_block<F: CpuFloat>(
    g: &Geo,
    a: Bwd<F>,
    kvh: usize,
    pb: usize,
    sc: &mut Scratch<F>,
    out: [SharedMut<F>; 2],
) {
    let j0 = pb * BK;
    let blk = KvBlock { j0, n: BK.min(g.p - j0), prefix: true };
    sc.dk[..blk.n * g.d].fill(F::zero());
    sc.dv[..blk.n * g.d].fill(F::zero());
    for b in 0..g.batch {
        let (start, end) = g.prefix_range(b);
        let (lo, hi) = (j0.max(start), (j0 + blk.n).min(end));
        if lo >= hi {
            continue;
        }
        let sub = KvBlock { j0: lo, n: hi - lo, prefix: true };
        for h in kvh * g.group..(kvh + 1) * g.group {
            for qb in 0..g.q_blocks() {
                let bq = tile_grads(g, a, b, h, qb, sub, sc);
                add_dkv_tile(g, a, b, h, qb, (lo - j0, sub.n), bq, sc);
            }
        }
    }
    let off = g.kv_off(0, blk, kvh);
    // SAFETY: forwarded from this function's contract.
    unsafe {
        add_rows(g, out[0].0.add(off), &sc.dk, blk.n);
        add_rows(g, out[1].0.add(off), &sc.dv, blk.n);
    }
}

/// `delta[b, h, i] = sum_d dO * O` in the `lse` layout.
fn deltas<F: CpuFloat>(g: &Geo, o: &[F], d_o: &[F]) -> Vec<F> {
    let mut delta = vec![F::zero(); g.batch * g.heads * g.t];
    delta.par_chunks_mut(g.t.max(1)).enumerate().for_each(|(bh, row)| {
        let (b, h) = (bh / g.heads, bh % g.heads);
        for (i, y) in row.iter_mut().enumerate() {
            let off = g.q_off(b, i, h);
            *y = o[off..][..g.d].iter().zip(&d_o[off..][..g.d]).map(|(&a, &b)| a * b).sum();
        }
    });
    delta
}

/// Runs the passes; buffers were checked by the caller.
pub(super) fn backward<F: CpuFloat>(
    g: &Geo,
    x: Src<F>,
    o: &[F],
    d_o: &[F],
    lse: &[F],
    grads: AttnGrads<'_, Cpu, F>,
    mode: BwdMode,
) {
    let delta = deltas(g, o, d_o);
    let a = Bwd { x, d_o, lse, delta: &delta };
    let mode = match mode {
        BwdMode::Auto if g.batch * g.kv_heads >= 2 * rayon::current_num_threads() => BwdMode::Fused,
        BwdMode::Auto => BwdMode::Split,
        m => m,
    };
    // With a bias the dq pass owns the dbias rows, so it must see every tile: no fused split.
    let dbias = grads.dbias.map(|db| SharedMut(db.as_mut_ptr()));
    let fused = mode == BwdMode::Fused && dbias.is_none();
    let dq = SharedMut(grads.dq.as_mut_ptr());
    let dkv = [SharedMut(grads.dk.as_mut_ptr()), SharedMut(grads.dv.as_mut_ptr())];
    let d = g.d;
    let (nqb, nkb) = (g.q_blocks(), g.s.div_ceil(BK));
    // Pass dq: prefix blocks always; content blocks unless the fused dkv pass adds them.
    if g.p > 0 || !fused {
        // Sequences per task: all of them with a bias (the task owns its dbias rows), else one.
        let per = if dbias.is_some() { g.batch.max(1) } else { 1 };
        (0..g.batch.div_ceil(per) * g.heads * nqb).into_par_iter().for_each_init(
            || Scratch::new(d),
            |sc, task| {
                let (bh, qb) = (task / nqb, task % nqb);
                let (b0, h) = (bh / g.heads * per, bh % g.heads);
                let (i0, bq) = g.q_rows(qb);
                for b in b0..b0 + per {
                    let content = g.content_blocks(b, i0, bq).filter(|_| !fused);
                    for blk in g.prefix_blocks(b).chain(content) {
                        tile_grads(g, a, b, h, qb, blk, sc);
                        // SAFETY: tasks differ in (b, h, qb) (or, with a bias, in (h, qb) and
                        // own every sequence): disjoint dq rows and dbias rows (h, i0..i0 + bq).
                        unsafe {
                            add_dq(g, a, b, h, qb, blk, sc, dq);
                            if let Some(db) = dbias {
                                g.add_dbias(db, &sc.dp, h, i0, bq, blk);
                            }
                        }
                    }
                }
            },
        );
    }
    if fused {
        (0..g.batch * g.kv_heads).into_par_iter().for_each_init(
            || Scratch::new(d),
            |sc, bk| {
                for kb in 0..nkb {
                    // SAFETY: tasks differ in (b, kvh): disjoint dk/dv rows and dq rows (each
                    // query head belongs to one kv head); the dq pass above has finished.
                    unsafe { content_block(g, a, bk / g.kv_heads, bk % g.kv_heads, kb, sc, dkv, Some(dq)) };
                }
            },
        );
    } else {
        (0..g.batch * g.kv_heads * nkb).into_par_iter().for_each_init(
            || Scratch::new(d),
            |sc, task| {
                let (bk, kb) = (task / nkb, task % nkb);
                // SAFETY: tasks differ in (b, kvh, kb): disjoint dk/dv rows; no dq writes.
                unsafe { content_block(g, a, bk / g.kv_heads, bk % g.kv_heads, kb, sc, dkv, None) };
            },
        );
    }
    if let Some((dpk, dpv)) = grads.dprefix {
        let out = [SharedMut(dpk.as_mut_ptr()), SharedMut(dpv.as_mut_ptr())];
        let npb = g.p.div_ceil(BK);
        (0..g.kv_heads * npb).into_par_iter().for_each_init(
            || Scratch::new(d),
            |sc, task| {
                // SAFETY: tasks differ in (kvh, pb): disjoint dpk/dpv rows.
                unsafe { prefix_block(g, a, task / npb, task % npb, sc, out) };
            },
        );
    }
}
