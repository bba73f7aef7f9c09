//! LayerNorm on the CPU: rayon over rows (forward) and over fixed chunks of rows (backward, whose
//! per-chunk dgamma/dbeta partials are then summed in chunk order, so results are reproducible).
//! Generic over f32 and f64 ([`CpuFloat`]); statistics and parameter gradients are in the same type.

use super::{check, Extent, LayerNormKernel, LayerNormParams};
use crate::backend::{Cpu, CpuFloat};
use crate::error::Result;
use rayon::prelude::*;

/// Elements per backward task (the rows of a chunk are a function of `dim` only).
const CHUNK_ELEMS: usize = 16 * 1024;

/// Normalize one row: writes `y` and returns `(mean, rstd)`.
fn fwd_row<F: CpuFloat>(x: &[F], gamma: &[F], beta: &[F], eps: F, y: &mut [F]) -> (F, F) {
    let n = F::c(x.len() as f64);
    let mean = x.iter().copied().sum::<F>() / n;
    let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<F>() / n;
    let rstd = F::one() / (var + eps).sqrt();
    for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
        *y = (x - mean) * rstd * g + b;
    }
    (mean, rstd)
}

/// One row of the backward: `dx += ...`, `dgamma += dy*xhat`, `dbeta += dy`.
fn bwd_row<F: CpuFloat>(x: &[F], gamma: &[F], mean: F, rstd: F, dy: &[F], dx: &mut [F], dg: &mut [F], db: &mut [F]) {
    let n = F::c(x.len() as f64);
    let (mut sg, mut sgx) = (F::zero(), F::zero());
    for ((&x, &g), &dy) in x.iter().zip(gamma).zip(dy) {
        let gy = dy * g;
        sg += gy;
        sgx += gy * ((x - mean) * rstd);
    }
    let (mg, mgx) = (sg / n, sgx / n);
    for i in 0..x.len() {
        let xh = (x[i] - mean) * rstd;
        dx[i] += rstd * (dy[i] * gamma[i] - mg - xh * mgx);
        dg[i] += dy[i] * xh;
        db[i] += dy[i];
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

    fn layernorm_bwd(
        &self,
        p: &LayerNormParams,
        x: &[F],
        gamma: &[F],
        mean: &[F],
        rstd: &[F],
        dy: &[F],
        dx: &mut [F],
        dgamma: &mut [F],
        dbeta: &mut [F],
    ) -> Result<()> {
        use Extent::*;
        let ins = [("x", Full, x.len()), ("gamma", Dim, gamma.len()), ("mean", Rows, mean.len())];
        check(p, &ins)?;
        check(p, &[("rstd", Rows, rstd.len()), ("dy", Full, dy.len()), ("dx", Full, dx.len())])?;
        check(p, &[("dgamma", Dim, dgamma.len()), ("dbeta", Dim, dbeta.len())])?;
        let d = p.dim as usize;
        let rows = (CHUNK_ELEMS / d).max(1);
        let partials: Vec<(Vec<F>, Vec<F>)> = dx
            .par_chunks_mut(rows * d)
            .zip(x.par_chunks(rows * d).zip(dy.par_chunks(rows * d)))
            .zip(mean.par_chunks(rows).zip(rstd.par_chunks(rows)))
            .map(|((dx, (x, dy)), (mean, rstd))| {
                let (mut dg, mut db) = (vec![F::zero(); d], vec![F::zero(); d]);
                for r in 0..mean.len() {
                    let s = r * d..(r + 1) * d;
                    bwd_row(&x[s.clone()], gamma, mean[r], rstd[r], &dy[s.clone()], &mut dx[s], &mut dg, &mut db);
                }
                (dg, db)
            })
            .collect();
        for (dg, db) in &partials {
            dgamma.iter_mut().zip(dg).for_each(|(a, &b)| *a += b);
            dbeta.iter_mut().zip(db).for_each(|(a, &b)| *a += b);
        }
        Ok(())
    }
}
