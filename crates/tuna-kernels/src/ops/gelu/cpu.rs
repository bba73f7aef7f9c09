//! GELU on the CPU: rayon over fixed-size chunks, generic over f32 and f64 ([`CpuFloat`]).

use super::{check, GeluKernel, GeluKind, FRAC_1_SQRT_2PI, GELU_C, SQRT_2_OVER_PI};
use crate::backend::{Cpu, CpuFloat};
use crate::error::Result;
use rayon::prelude::*;

const CHUNK: usize = 16 * 1024;

#[inline]
fn fwd<F: CpuFloat>(kind: GeluKind, x: F) -> F {
    let half = F::c(0.5);
    match kind {
        GeluKind::Tanh => half * x * (F::one() + (F::c(SQRT_2_OVER_PI) * (x + F::c(GELU_C) * x * x * x)).tanh()),
        GeluKind::Erf => half * x * (F::one() + (x * F::FRAC_1_SQRT_2()).erf()),
    }
}

#[inline]
fn grad<F: CpuFloat>(kind: GeluKind, x: F) -> F {
    let (half, one) = (F::c(0.5), F::one());
    match kind {
        GeluKind::Tanh => {
            let (s2p, c) = (F::c(SQRT_2_OVER_PI), F::c(GELU_C));
            let t = (s2p * (x + c * x * x * x)).tanh();
            half * (one + t) + half * x * (one - t * t) * s2p * (one + F::c(3.0) * c * x * x)
        }
        GeluKind::Erf => {
            half * (one + (x * F::FRAC_1_SQRT_2()).erf()) + x * (-half * x * x).exp() * F::c(FRAC_1_SQRT_2PI)
        }
    }
}

impl<F: CpuFloat> GeluKernel<F> for Cpu {
    fn gelu_fwd(&self, kind: GeluKind, x: &[F], y: &mut [F]) -> Result<()> {
        check(x.len(), &[("y", y.len())])?;
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = fwd(kind, x);
            }
        });
        Ok(())
    }

    fn gelu_bwd(&self, kind: GeluKind, x: &[F], dy: &[F], dx: &mut [F]) -> Result<()> {
        check(x.len(), &[("dy", dy.len()), ("dx", dx.len())])?;
        dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK))).for_each(|(dx, (x, dy))| {
            for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                *dx += dy * grad(kind, x);
            }
        });
        Ok(())
    }
}
