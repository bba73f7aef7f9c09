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
        GeluKind::Tanh => half * x * (F::one() + (F::c(SQRT_2_OVER_PI) * (x + F::c(GELU_C) * x * x * x)).tanh_fast()),
        GeluKind::Erf => half * x * (F::one() + (x * F::FRAC_1_SQRT_2()).erf()),
        // NaN passes through (as PyTorch's), so a diverged run still shows it.
        GeluKind::Relu => {
            if x > F::zero() || x.is_nan() {
                x
            } else {
                F::zero()
            }
        }
    }
}

#[inline]
fn grad<F: CpuFloat>(kind: GeluKind, x: F) -> F {
    let (half, one) = (F::c(0.5), F::one());
    match kind {
        GeluKind::Tanh => {
            let (s2p, c) = (F::c(SQRT_2_OVER_PI), F::c(GELU_C));
            let t = (s2p * (x + c * x * x * x)).tanh_fast();
            half * (one + t) + half * x * (one - t * t) * s2p * (one + F::c(3.0) * c * x * x)
        }
        GeluKind::Erf => {
            half * (one + (x * F::FRAC_1_SQRT_2()).erf()) + x * (-half * x * x).exp_fast() * F::c(FRAC_1_SQRT_2PI)
        }
        GeluKind::Relu => {
            if x > F::zero() {
                one
            } else if x.is_nan() {
                x
            } else {
                F::zero()
            }
        }
    }
}

/// `y = f(x)`, in parallel chunks; generic over `f` so it inlines and the loop vectorizes.
fn map<F: CpuFloat>(x: &[F], y: &mut [F], f: impl Fn(F) -> F + Sync + Send + Copy) {
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = f(x);
        }
    })
}

/// `dx += dy * g(x)`, as [`map`].
fn map_grad<F: CpuFloat>(x: &[F], dy: &[F], dx: &mut [F], g: impl Fn(F) -> F + Sync + Send + Copy) {
    dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK))).for_each(|(dx, (x, dy))| {
        for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
            *dx += dy * g(x);
        }
    })
}

impl<F: CpuFloat> GeluKernel<F> for Cpu {
    fn gelu_fwd(&self, kind: GeluKind, x: &[F], y: &mut [F]) -> Result<()> {
        check(x.len(), &[("y", y.len())])?;
        // One loop per kind (the kind is not matched per element), so each vectorizes.
        match kind {
            GeluKind::Tanh => map(x, y, |x| fwd(GeluKind::Tanh, x)),
            GeluKind::Erf => map(x, y, |x| fwd(GeluKind::Erf, x)),
            GeluKind::Relu => map(x, y, |x| fwd(GeluKind::Relu, x)),
        }
        Ok(())
    }

    fn gelu_bwd(&self, kind: GeluKind, x: &[F], dy: &[F], dx: &mut [F]) -> Result<()> {
        check(x.len(), &[("dy", dy.len()), ("dx", dx.len())])?;
        match kind {
            GeluKind::Tanh => map_grad(x, dy, dx, |x| grad(GeluKind::Tanh, x)),
            GeluKind::Erf => map_grad(x, dy, dx, |x| grad(GeluKind::Erf, x)),
            GeluKind::Relu => map_grad(x, dy, dx, |x| grad(GeluKind::Relu, x)),
        }
        Ok(())
    }
}
