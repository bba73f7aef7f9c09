//! RMSNorm on the CPU: rayon over rows (forward) and over fixed chunks of rows (backward, whose
//! per-chunk dgamma partials are then summed in chunk order, so results are reproducible).

use super::{check, RmsNormKernel, RmsNormParams};
use crate::backend::Cpu;
use crate::error::Result;
use crate::ops::layernorm::Extent::{Dim, Full, Rows};
use rayon::prelude::*;

/// Elements per backward task (the rows of a chunk are a function of `dim` only).
const CHUNK_ELEMS: usize = 16 * 1024;

/// Normalize one row: writes `y` and returns `rstd`.
fn fwd_row(x: &[f32], gamma: &[f32], eps: f32, y: &mut [f32]) -> f32 {
    let ms = x.iter().map(|&v| v * v).sum::<f32>() / x.len() as f32;
    let rstd = 1.0 / (ms + eps).sqrt();
    for ((y, &x), &g) in y.iter_mut().zip(x).zip(gamma) {
        *y = x * rstd * g;
    }
    rstd
}

/// One row of the backward: `dx += ...`, `dgamma += dy*xhat`.
fn bwd_row(x: &[f32], gamma: &[f32], rstd: f32, dy: &[f32], dx: &mut [f32], dg: &mut [f32]) {
    let sgx: f32 = x.iter().zip(gamma).zip(dy).map(|((&x, &g), &dy)| dy * g * (x * rstd)).sum();
    let mgx = sgx / x.len() as f32;
    for i in 0..x.len() {
        let xh = x[i] * rstd;
        dx[i] += rstd * (dy[i] * gamma[i] - xh * mgx);
        dg[i] += dy[i] * xh;
    }
}

impl RmsNormKernel<f32> for Cpu {
    fn rmsnorm_fwd(&self, p: &RmsNormParams, x: &[f32], gamma: &[f32], y: &mut [f32], rstd: &mut [f32]) -> Result<()> {
        check(
            p,
            &[("x", Full, x.len()), ("gamma", Dim, gamma.len()), ("y", Full, y.len()), ("rstd", Rows, rstd.len())],
        )?;
        let d = p.dim as usize;
        y.par_chunks_mut(d).zip(x.par_chunks(d)).zip(rstd.par_iter_mut()).for_each(|((y, x), r)| {
            *r = fwd_row(x, gamma, p.eps, y);
        });
        Ok(())
    }

    fn rmsnorm_bwd(
        &self,
        p: &RmsNormParams,
        x: &[f32],
        gamma: &[f32],
        rstd: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        dgamma: &mut [f32],
    ) -> Result<()> {
        check(p, &[("x", Full, x.len()), ("gamma", Dim, gamma.len()), ("rstd", Rows, rstd.len())])?;
        check(p, &[("dy", Full, dy.len()), ("dx", Full, dx.len()), ("dgamma", Dim, dgamma.len())])?;
        let d = p.dim as usize;
        let rows = (CHUNK_ELEMS / d).max(1);
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(rows * d)
            .zip(x.par_chunks(rows * d).zip(dy.par_chunks(rows * d)))
            .zip(rstd.par_chunks(rows))
            .map(|((dx, (x, dy)), rstd)| {
                let mut dg = vec![0.0f32; d];
                for (r, &rs) in rstd.iter().enumerate() {
                    let s = r * d..(r + 1) * d;
                    bwd_row(&x[s.clone()], gamma, rs, &dy[s.clone()], &mut dx[s], &mut dg);
                }
                dg
            })
            .collect();
        for dg in &partials {
            dgamma.iter_mut().zip(dg).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }
}
