//! SiLU and SwiGLU on the CPU: rayon over fixed-size chunks.

use super::{check, SwigluKernel};
use crate::backend::Cpu;
use crate::error::Result;
use rayon::prelude::*;

const CHUNK: usize = 16 * 1024;

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `silu'(x) = s * (1 + x * (1 - s))` with `s = sigmoid(x)`.
#[inline]
fn silu_grad(x: f32) -> f32 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

impl SwigluKernel<f32> for Cpu {
    fn silu_fwd(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        check("silu", "x", x.len(), &[("y", y.len())])?;
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = x * sigmoid(x);
            }
        });
        Ok(())
    }

    fn silu_bwd(&self, x: &[f32], dy: &[f32], dx: &mut [f32]) -> Result<()> {
        check("silu", "x", x.len(), &[("dy", dy.len()), ("dx", dx.len())])?;
        dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK))).for_each(|(dx, (x, dy))| {
            for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                *dx += dy * silu_grad(x);
            }
        });
        Ok(())
    }

    fn swiglu_fwd(&self, gate: &[f32], up: &[f32], y: &mut [f32]) -> Result<()> {
        check("swiglu", "gate", gate.len(), &[("up", up.len()), ("y", y.len())])?;
        y.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))).for_each(|(y, (g, u))| {
            for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                *y = g * sigmoid(g) * u;
            }
        });
        Ok(())
    }

    fn swiglu_bwd(&self, gate: &[f32], up: &[f32], dy: &[f32], dgate: &mut [f32], dup: &mut [f32]) -> Result<()> {
        let others = [("up", up.len()), ("dy", dy.len()), ("dgate", dgate.len()), ("dup", dup.len())];
        check("swiglu", "gate", gate.len(), &others)?;
        let ins = gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK));
        let outs = dgate.par_chunks_mut(CHUNK).zip(dup.par_chunks_mut(CHUNK));
        outs.zip(ins).for_each(|((dg, du), ((g, u), dy))| {
            for i in 0..g.len() {
                let s = sigmoid(g[i]);
                dg[i] += dy[i] * u[i] * (s * (1.0 + g[i] * (1.0 - s)));
                du[i] += dy[i] * (g[i] * s);
            }
        });
        Ok(())
    }
}
