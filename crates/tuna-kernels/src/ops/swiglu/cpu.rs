//! SiLU and SwiGLU on the CPU: rayon over fixed-size chunks, generic over f32 and f64 ([`CpuFloat`]).

use super::{check, SwigluKernel};
use crate::backend::{Cpu, CpuFloat};
use crate::error::Result;
use rayon::prelude::*;

const CHUNK: usize = 16 * 1024;

#[inline]
fn sigmoid<F: CpuFloat>(x: F) -> F {
    // exp_fast: vectorizable in f32 (relative error ~2e-7), libm in f64.
    F::one() / (F::one() + (-x).exp_fast())
}

/// `silu'(x) = s * (1 + x * (1 - s))` with `s = sigmoid(x)`.
#[inline]
fn silu_grad<F: CpuFloat>(x: F) -> F {
    let s = sigmoid(x);
    s * (F::one() + x * (F::one() - s))
}

impl<F: CpuFloat> SwigluKernel<F> for Cpu {
    fn silu_fwd(&self, x: &[F], y: &mut [F]) -> Result<()> {
        check("silu", "x", x.len(), &[("y", y.len())])?;
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = x * sigmoid(x);
            }
        });
        Ok(())
    }

    fn silu_bwd(&self, x: &[F], dy: &[F], dx: &mut [F]) -> Result<()> {
        check("silu", "x", x.len(), &[("dy", dy.len()), ("dx", dx.len())])?;
        dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK))).for_each(|(dx, (x, dy))| {
            for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                *dx += dy * silu_grad(x);
            }
        });
        Ok(())
    }

    fn swiglu_fwd(&self, gate: &[F], up: &[F], y: &mut [F]) -> Result<()> {
        check("swiglu", "gate", gate.len(), &[("up", up.len()), ("y", y.len())])?;
        y.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))).for_each(|(y, (g, u))| {
            for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                *y = g * sigmoid(g) * u;
            }
        });
        Ok(())
    }

    fn swiglu_bwd(&self, gate: &[F], up: &[F], dy: &[F], dgate: &mut [F], dup: &mut [F]) -> Result<()> {
        let others = [("up", up.len()), ("dy", dy.len()), ("dgate", dgate.len()), ("dup", dup.len())];
        check("swiglu", "gate", gate.len(), &others)?;
        let ins = gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK));
        let outs = dgate.par_chunks_mut(CHUNK).zip(dup.par_chunks_mut(CHUNK));
        outs.zip(ins).for_each(|((dg, du), ((g, u), dy))| {
            for i in 0..g.len() {
                let s = sigmoid(g[i]);
                dg[i] += dy[i] * u[i] * (s * (F::one() + g[i] * (F::one() - s)));
                du[i] += dy[i] * (g[i] * s);
            }
        });
        Ok(())
    }
}
