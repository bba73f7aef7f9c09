//! RMSNorm on the CPU: rayon over rows (forward) and over fixed chunks of rows (backward, whose
//! per-chunk dgamma partials are then summed in chunk order, so results are reproducible).
//! Generic over f32 and f64 ([`CpuFloat`]); statistics and parameter gradients are in the same type.

use super::{check, RmsNormKernel, RmsNormParams};
use crate::backend::{Cpu, CpuFloat};
use crate::error::Result;
use crate::ops::layernorm::lane_sum;
use crate::ops::layernorm::Extent::{Dim, Full, Rows};
use rayon::prelude::*;

/// Elements per backward task (the rows of a chunk are a function of `dim` only).
const CHUNK_ELEMS: usize = 16 * 1024;

/// Normalize one row: writes `y` and returns `rstd`.
fn fwd_row<F: CpuFloat>(x: &[F], gamma: &[F], eps: F, y: &mut [F]) -> F {
    let ms = lane_sum(x, x, x, |v, _, _| v * v) / F::c(x.len() as f64);
    let rstd = F::one() / (ms + eps).sqrt();
    for ((y, &x), &g) in y.iter_mut().zip(x).zip(gamma) {
        *y = x * rstd * g;
    }
    rstd
}

/// One row of the input gradient: `dx += rstd * (g - xhat*mean(g*xhat))`.
fn dx_row<F: CpuFloat>(x: &[F], gamma: &[F], rstd: F, dy: &[F], dx: &mut [F]) {
    let sgx = lane_sum(dy, gamma, x, |dy, g, x| dy * g * (x * rstd));
    let mgx = sgx / F::c(x.len() as f64);
    for i in 0..x.len() {
        let xh = x[i] * rstd;
        dx[i] += rstd * (dy[i] * gamma[i] - xh * mgx);
    }
}

/// One row of the parameter gradient: `dg += dy*xhat`.
fn dgamma_row<F: CpuFloat>(x: &[F], rstd: F, dy: &[F], dg: &mut [F]) {
    for ((g, &x), &dy) in dg.iter_mut().zip(x).zip(dy) {
        *g += dy * (x * rstd);
    }
}

// `Acc = F` restates CpuFloat's own supertrait bound, which rustc does not use to normalize
// `F::Acc` in the trait's signature.
impl<F: CpuFloat<Acc = F>> RmsNormKernel<F> for Cpu {
    fn rmsnorm_fwd(&self, p: &RmsNormParams, x: &[F], gamma: &[F], y: &mut [F], rstd: &mut [F]) -> Result<()> {
        check(
            p,
            &[("x", Full, x.len()), ("gamma", Dim, gamma.len()), ("y", Full, y.len()), ("rstd", Rows, rstd.len())],
        )?;
        let d = p.dim as usize;
        y.par_chunks_mut(d).zip(x.par_chunks(d)).zip(rstd.par_iter_mut()).for_each(|((y, x), r)| {
            *r = fwd_row(x, gamma, F::c(p.eps as f64), y);
        });
        Ok(())
    }

    fn add_rmsnorm_fwd(
        &self,
        p: &RmsNormParams,
        x: &[F],
        r: &[F],
        gamma: &[F],
        h: &mut [F],
        y: &mut [F],
        rstd: &mut [F],
    ) -> Result<()> {
        check(p, &[("x", Full, x.len()), ("r", Full, r.len()), ("h", Full, h.len())])?;
        check(p, &[("gamma", Dim, gamma.len()), ("y", Full, y.len()), ("rstd", Rows, rstd.len())])?;
        let d = p.dim as usize;
        let (outs, ins) = (h.par_chunks_mut(d).zip(y.par_chunks_mut(d)), x.par_chunks(d).zip(r.par_chunks(d)));
        outs.zip(ins).zip(rstd.par_iter_mut()).for_each(|(((h, y), (x, r)), s)| {
            // the row of h is written and then normalized while it is in L1
            h.iter_mut().zip(x).zip(r).for_each(|((h, &x), &r)| *h = x + r);
            *s = fwd_row(h, gamma, F::c(p.eps as f64), y);
        });
        Ok(())
    }

    fn rmsnorm_bwd(
        &self,
        p: &RmsNormParams,
        x: &[F],
        gamma: &[F],
        rstd: &[F],
        dy: &[F],
        dx: &mut [F],
        dgamma: Option<&mut [F]>,
    ) -> Result<()> {
        check(p, &[("x", Full, x.len()), ("gamma", Dim, gamma.len()), ("rstd", Rows, rstd.len())])?;
        check(p, &[("dy", Full, dy.len()), ("dx", Full, dx.len())])?;
        let d = p.dim as usize;
        let Some(dgamma) = dgamma else {
            // frozen gamma: dx only, no partial sums
            dx.par_chunks_mut(d)
                .zip(x.par_chunks(d).zip(dy.par_chunks(d)))
                .zip(rstd.par_iter())
                .for_each(|((dx, (x, dy)), &r)| dx_row(x, gamma, r, dy, dx));
            return Ok(());
        };
        check(p, &[("dgamma", Dim, dgamma.len())])?;
        let rows = (CHUNK_ELEMS / d).max(1);
        let partials: Vec<Vec<F>> = dx
            .par_chunks_mut(rows * d)
            .zip(x.par_chunks(rows * d).zip(dy.par_chunks(rows * d)))
            .zip(rstd.par_chunks(rows))
            .map(|((dx, (x, dy)), rstd)| {
                let mut dg = vec![F::zero(); d];
                for (r, &rs) in rstd.iter().enumerate() {
                    let s = r * d..(r + 1) * d;
                    dx_row(&x[s.clone()], gamma, rs, &dy[s.clone()], &mut dx[s.clone()]);
                    dgamma_row(&x[s.clone()], rs, &dy[s], &mut dg);
                }
                dg
            })
            .collect();
        for dg in &partials {
            dgamma.iter_mut().zip(dg).for_each(|(a, &b)| *a += b);
        }
        Ok(())
    }
}
