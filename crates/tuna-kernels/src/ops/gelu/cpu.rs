//! GELU on the CPU: rayon over fixed-size chunks.

use super::{check, GeluKernel, GeluKind, GELU_C, SQRT_2_OVER_PI};
use crate::backend::Cpu;
use crate::error::Result;
use rayon::prelude::*;

const CHUNK: usize = 16 * 1024;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

#[inline]
fn fwd(kind: GeluKind, x: f32) -> f32 {
    match kind {
        GeluKind::Tanh => 0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + GELU_C * x * x * x)).tanh()),
        GeluKind::Erf => 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2)),
    }
}

#[inline]
fn grad(kind: GeluKind, x: f32) -> f32 {
    match kind {
        GeluKind::Tanh => {
            let t = (SQRT_2_OVER_PI * (x + GELU_C * x * x * x)).tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x)
        }
        GeluKind::Erf => {
            0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2)) + x * (-0.5 * x * x).exp() * FRAC_1_SQRT_2PI
        }
    }
}

impl GeluKernel<f32> for Cpu {
    fn gelu_fwd(&self, kind: GeluKind, x: &[f32], y: &mut [f32]) -> Result<()> {
        check(x.len(), &[("y", y.len())])?;
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = fwd(kind, x);
            }
        });
        Ok(())
    }

    fn gelu_bwd(&self, kind: GeluKind, x: &[f32], dy: &[f32], dx: &mut [f32]) -> Result<()> {
        check(x.len(), &[("dy", dy.len()), ("dx", dx.len())])?;
        dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK))).for_each(|(dx, (x, dy))| {
            for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                *dx += dy * grad(kind, x);
            }
        });
        Ok(())
    }
}
