//! LayerNorm on the CPU: rayon over rows (forward) and over fixed chunks of rows (backward, whose
//! per-chunk dgamma/dbeta partials are then summed in chunk order, so results are reproducible).
//! Generic over f32 and f64 ([`CpuFloat`]); statistics and parameter gradients are in the same type.

use super::{check, Extent, LayerNormKernel, LayerNormParams};
use crate::backend::{Cpu, CpuFloat};
use crate::error::Result;
use rayon::prelude::*;

/// Elements per backward task (the rows of a chunk are a function of `dim` only).
const CHUNK_ELEMS: usize = 16 * 1024;

/// Partial sums of [`lane_sum`].
const LANES: usize = 16;

/// `sum_i f(a[i], b[i], c[i])` over a row (`b` and `c` at least as long as `a`), as `LANES`
/// interleaved partial sums (element `i` into lane `i % LANES`) folded pairwise at the end. The
/// order is fixed, so the bits are the same on every CPU; the lanes are independent, so the
/// compiler makes vector adds of them, where one running sum is a chain of dependent adds (one
/// element per add latency, which bounded the norms' forward: see the README's add + norm table).
/// Shared with rmsnorm.
#[inline(always)]
pub(crate) fn lane_sum<F: CpuFloat>(a: &[F], b: &[F], c: &[F], f: impl Fn(F, F, F) -> F) -> F {
    let n = a.len();
    let (b, c) = (&b[..n], &c[..n]);
    let full = n - n % LANES;
    let mut acc = [F::zero(); LANES];
    let lanes = a[..full].chunks_exact(LANES).zip(b[..full].chunks_exact(LANES)).zip(c[..full].chunks_exact(LANES));
    for ((a, b), c) in lanes {
        for j in 0..LANES {
            acc[j] += f(a[j], b[j], c[j]);
        }
    }
    for i in full..n {
        acc[i - full] += f(a[i], b[i], c[i]);
    }
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            acc[j] += acc[j + w];
        }
    }
    acc[0]
}

/// Normalize one row: writes `y` and returns `(mean, rstd)`.
fn fwd_row<F: CpuFloat>(x: &[F], gamma: &[F], beta: &[F], eps: F, y: &mut [F]) -> (F, F) {
    let n = F::c(x.len() as f64);
    let mean = lane_sum(x, x, x, |v, _, _| v) / n;
    let var = lane_sum(x, x, x, |v, _, _| (v - mean) * (v - mean)) / n;
    let rstd = F::one() / (var + eps).sqrt();
    for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
        *y = (x - mean) * rstd * g + b;
    }
    (mean, rstd)
}

/// One row of the input gradient: `dx += rstd * (g - mean(g) - xhat*mean(g*xhat))`.
fn dx_row<F: CpuFloat>(x: &[F], gamma: &[F], mean: F, rstd: F, dy: &[F], dx: &mut [F]) {
    let n = F::c(x.len() as f64);
    let sg = lane_sum(dy, gamma, x, |dy, g, _| dy * g);
    let sgx = lane_sum(dy, gamma, x, |dy, g, x| dy * g * ((x - mean) * rstd));
    let (mg, mgx) = (sg / n, sgx / n);
    for i in 0..x.len() {
        let xh = (x[i] - mean) * rstd;
        dx[i] += rstd * (dy[i] * gamma[i] - mg - xh * mgx);
    }
}

/// One row of the parameter gradients: `dg += dy*xhat`, `db += dy`; an empty `dg` or `db` (a
/// gradient not asked for) is skipped.
fn param_row<F: CpuFloat>(x: &[F], mean: F, rstd: F, dy: &[F], dg: &mut [F], db: &mut [F]) {
    for ((g, &x), &dy) in dg.iter_mut().zip(x).zip(dy) {
        *g += dy * ((x - mean) * rstd);
    }
    for (b, &dy) in db.iter_mut().zip(dy) {
        *b += dy;
    }
}

// `Acc = F` restates CpuFloat's own supertrait bound, which rustc does not use to normalize
// `F::Acc` in the trait's signature.
impl<F: CpuFloat<Acc = F>> LayerNormKernel<F> for Cpu {
    fn layernorm_fwd(
        &self,
        p: &LayerNormParams,
        x: &[F],
        gamma: &[F],
        beta: &[F],
        y: &mut [F],
        mean: &mut [F],
        rstd: &mut [F],
    ) -> Result<()> {
        use Extent::*;
        let bufs = [("x", Full, x.len()), ("gamma", Dim, gamma.len()), ("beta", Dim, beta.len())];
        check(p, &bufs)?;
        check(p, &[("y", Full, y.len()), ("mean", Rows, mean.len()), ("rstd", Rows, rstd.len())])?;
        let d = p.dim as usize;
        y.par_chunks_mut(d).zip(x.par_chunks(d)).zip(mean.par_iter_mut().zip(rstd.par_iter_mut())).for_each(
            |((y, x), (m, r))| {
                (*m, *r) = fwd_row(x, gamma, beta, F::c(p.eps as f64), y);
            },
        );
        Ok(())
    }

    fn add_layernorm_fwd(
        &self,
        p: &LayerNormParams,
        x: &[F],
        r: &[F],
        gamma: &[F],
        beta: &[F],
        h: &mut [F],
        y: &mut [F],
        mean: &mut [F],
        rstd: &mut [F],
    ) -> Result<()> {
        use Extent::*;
        check(p, &[("x", Full, x.len()), ("r", Full, r.len()), ("h", Full, h.len())])?;
        check(p, &[("gamma", Dim, gamma.len()), ("beta", Dim, beta.len()), ("y", Full, y.len())])?;
        check(p, &[("mean", Rows, mean.len()), ("rstd", Rows, rstd.len())])?;
        let d = p.dim as usize;
        let (outs, ins) = (h.par_chunks_mut(d).zip(y.par_chunks_mut(d)), x.par_chunks(d).zip(r.par_chunks(d)));
        outs.zip(ins).zip(mean.par_iter_mut().zip(rstd.par_iter_mut())).for_each(|(((h, y), (x, r)), (m, s))| {
            // the row of h is written and then normalized while it is in L1
            h.iter_mut().zip(x).zip(r).for_each(|((h, &x), &r)| *h = x + r);
            (*m, *s) = fwd_row(h, gamma, beta, F::c(p.eps as f64), y);
        });
        Ok(())
    }

    fn layernorm_bwd(
        &self,
        p: &LayerNormParams,
        x: &[F],
        gamma: &[F],
        mean: &[F],
        rstd: &[F],
        dy: &[F],
        dx: &mut [F],
        dgamma: Option<&mut [F]>,
        dbeta: Option<&mut [F]>,
    ) -> Result<()> {
        use Extent::*;
        let ins = [("x", Full, x.len()), ("gamma", Dim, gamma.len()), ("mean", Rows, mean.len())];
        check(p, &ins)?;
        check(p, &[("rstd", Rows, rstd.len()), ("dy", Full, dy.len()), ("dx", Full, dx.len())])?;
        let (lg, lb) = (dgamma.as_deref().map_or(0, <[F]>::len), dbeta.as_deref().map_or(0, <[F]>::len));
        if dgamma.is_some() {
            check(p, &[("dgamma", Dim, lg)])?;
        }
        if dbeta.is_some() {
            check(p, &[("dbeta", Dim, lb)])?;
        }
        let d = p.dim as usize;
        if dgamma.is_none() && dbeta.is_none() {
            // frozen gamma and beta: dx only, no partial sums
            dx.par_chunks_mut(d)
                .zip(x.par_chunks(d).zip(dy.par_chunks(d)))
                .zip(mean.par_iter().zip(rstd))
                .for_each(|((dx, (x, dy)), (&m, &r))| dx_row(x, gamma, m, r, dy, dx));
            return Ok(());
        }
        let rows = (CHUNK_ELEMS / d).max(1);
        // per-chunk partials, empty for a gradient not asked for
        let partials: Vec<(Vec<F>, Vec<F>)> = dx
            .par_chunks_mut(rows * d)
            .zip(x.par_chunks(rows * d).zip(dy.par_chunks(rows * d)))
            .zip(mean.par_chunks(rows).zip(rstd.par_chunks(rows)))
            .map(|((dx, (x, dy)), (mean, rstd))| {
                let (mut dg, mut db) = (vec![F::zero(); lg], vec![F::zero(); lb]);
                for r in 0..mean.len() {
                    let s = r * d..(r + 1) * d;
                    dx_row(&x[s.clone()], gamma, mean[r], rstd[r], &dy[s.clone()], &mut dx[s.clone()]);
                    param_row(&x[s.clone()], mean[r], rstd[r], &dy[s], &mut dg, &mut db);
                }
                (dg, db)
            })
            .collect();
        if let Some(dgamma) = dgamma {
            partials.iter().for_each(|(dg, _)| dgamma.iter_mut().zip(dg).for_each(|(a, &b)| *a += b));
        }
        if let Some(dbeta) = dbeta {
            partials.iter().for_each(|(_, db)| dbeta.iter_mut().zip(db).for_each(|(a, &b)| *a += b));
        }
        Ok(())
    }
}
