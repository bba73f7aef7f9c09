//! LayerNorm on the CPU: rayon over rows (forward) and over fixed chunks of rows (backward, whose
//! per-chunk dgamma/dbeta partials are then summed in chunk order, so results are reproducible).

use super::{check, Extent, LayerNormKernel, LayerNormParams};
use crate::backend::Cpu;
use crate::error::Result;
use rayon::prelude::*;

/// Elements per backward task (the rows of a chunk are a function of `dim` only).
const CHUNK_ELEMS: usize = 16 * 1024;

/// Normalize one row: writes `y` and returns `(mean, rstd)`.
fn fwd_row(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32]) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let rstd = 1.0 / (var + eps).sqrt();
    for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
        *y = (x - mean) * rstd * g + b;
    }
    (mean, rstd)
}

/// One row of the backward: `dx += ...`, `dgamma += dy*xhat`, `dbeta += dy`.
fn bwd_row(x: &[f32], gamma: &[f32], mean: f32, rstd: f32, dy: &[f32], dx: &mut [f32], dg: &mut [f32], db: &mut [f32]) {
    let n = x.len() as f32;
    let (mut sg, mut sgx) = (0.0f32, 0.0f32);
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

impl LayerNormKernel<f32> for Cpu {
    fn layernorm_fwd(
        &self,
        p: &LayerNormParams,
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        y: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
    ) -> Result<()> {
        use Extent::*;
        let bufs = [("x", Full, x.len()), ("gamma", Dim, gamma.len()), ("beta", Dim, beta.len())];
        check(p, &bufs)?;
        check(p, &[("y", Full, y.len()), ("mean", Rows, mean.len()), ("rstd", Rows, rstd.len())])?;
        let d = p.dim as usize;
        y.par_chunks_mut(d).zip(x.par_chunks(d)).zip(mean.par_iter_mut().zip(rstd.par_iter_mut())).for_each(
            |((y, x), (m, r))| {
                (*m, *r) = fwd_row(x, gamma, beta, p.eps, y);
            },
        );
        Ok(())
    }

    fn layernorm_bwd(
        &self,
        p: &LayerNormParams,
        x: &[f32],
        gamma: &[f32],
        mean: &[f32],
        rstd: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) -> Result<()> {
        use Extent::*;
        let ins = [("x", Full, x.len()), ("gamma", Dim, gamma.len()), ("mean", Rows, mean.len())];
        check(p, &ins)?;
        check(p, &[("rstd", Rows, rstd.len()), ("dy", Full, dy.len()), ("dx", Full, dx.len())])?;
        check(p, &[("dgamma", Dim, dgamma.len()), ("dbeta", Dim, dbeta.len())])?;
        let d = p.dim as usize;
        let rows = (CHUNK_ELEMS / d).max(1);
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(rows * d)
            .zip(x.par_chunks(rows * d).zip(dy.par_chunks(rows * d)))
            .zip(mean.par_chunks(rows).zip(rstd.par_chunks(rows)))
            .map(|((dx, (x, dy)), (mean, rstd))| {
                let (mut dg, mut db) = (vec![0.0f32; d], vec![0.0f32; d]);
                for r in 0..mean.len() {
                    let s = r * d..(r + 1) * d;
                    bwd_row(&x[s.clone()], gamma, mean[r], rstd[r], &dy[s.clone()], &mut dx[s], &mut dg, &mut db);
                }
                (dg, db)
            })
            .collect();
        for (dg, db) in &partials {
            dgamma.iter_mut().zip(dg).for_each(|(a, b)| *a += b);
            dbeta.iter_mut().zip(db).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }
}
