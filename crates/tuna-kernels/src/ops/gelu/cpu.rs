//! GELU on the CPU: rayon over fixed-size chunks. f32 takes `fast.rs` (AVX2+FMA when the CPU has
//! them, else its scalar path); f64 (and f32 through [`generic_fwd`]/[`generic_bwd`], the code f32
//! ran before `fast.rs`, kept for the benchmark's before/after) the generic code below.

use super::{check, GeluKernel, GeluKind, FRAC_1_SQRT_2PI, GELU_C, SQRT_2_OVER_PI};
use crate::backend::{Cpu, CpuFloat};
use crate::error::Result;
use rayon::prelude::*;
use std::any::TypeId;

/// Elements per parallel chunk. A fused caller applying the GELU chunk by chunk over the same
/// boundaries ([`fwd_chunk`]) gets the kernel's bits (the f32 vector path's tail is per chunk).
pub(crate) const CHUNK: usize = 16 * 1024;

/// `y = gelu(x)` on one chunk, serially, on the path [`GeluKernel::gelu_fwd`] takes for each of
/// its chunks (f32: `fast.rs`; f64: the generic code).
pub(crate) fn fwd_chunk<F: CpuFloat>(kind: GeluKind, x: &[F], y: &mut [F]) {
    match (as_f32(x), as_f32_mut(y)) {
        (Some(x), Some(y)) => super::fast::fwd(kind, x, y),
        _ => {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = fwd(kind, x);
            }
        }
    }
}

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

/// `x` as `&[f32]` when `F` is f32.
fn as_f32<F: CpuFloat>(x: &[F]) -> Option<&[f32]> {
    // SAFETY: F is f32 (same type id), so the slice is a slice of f32.
    (TypeId::of::<F>() == TypeId::of::<f32>()).then(|| unsafe { &*(x as *const [F] as *const [f32]) })
}

/// `x` as `&mut [f32]` when `F` is f32.
fn as_f32_mut<F: CpuFloat>(x: &mut [F]) -> Option<&mut [f32]> {
    // SAFETY: F is f32 (same type id), so the slice is a slice of f32.
    (TypeId::of::<F>() == TypeId::of::<f32>()).then(|| unsafe { &mut *(x as *mut [F] as *mut [f32]) })
}

/// `y = gelu(x)`, f32: chunks in parallel, each on the fastest path the CPU has.
fn fwd_f32(kind: GeluKind, x: &[f32], y: &mut [f32], path: fn(GeluKind, &[f32], &mut [f32])) {
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| path(kind, x, y))
}

/// `dx += dy * gelu'(x)`, f32, as [`fwd_f32`].
fn bwd_f32(kind: GeluKind, x: &[f32], dy: &[f32], dx: &mut [f32], path: fn(GeluKind, &[f32], &[f32], &mut [f32])) {
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(dx, (x, dy))| path(kind, x, dy, dx))
}

/// The generic forward (f64's; f32's before `fast.rs`).
pub(super) fn generic_fwd<F: CpuFloat>(kind: GeluKind, x: &[F], y: &mut [F]) {
    // One loop per kind (the kind is not matched per element), so each vectorizes.
    match kind {
        GeluKind::Tanh => map(x, y, |x| fwd(GeluKind::Tanh, x)),
        GeluKind::Erf => map(x, y, |x| fwd(GeluKind::Erf, x)),
        GeluKind::Relu => map(x, y, |x| fwd(GeluKind::Relu, x)),
    }
}

/// The generic backward (f64's; f32's before `fast.rs`).
pub(super) fn generic_bwd<F: CpuFloat>(kind: GeluKind, x: &[F], dy: &[F], dx: &mut [F]) {
    match kind {
        GeluKind::Tanh => map_grad(x, dy, dx, |x| grad(GeluKind::Tanh, x)),
        GeluKind::Erf => map_grad(x, dy, dx, |x| grad(GeluKind::Erf, x)),
        GeluKind::Relu => map_grad(x, dy, dx, |x| grad(GeluKind::Relu, x)),
    }
}

/// f32 on a chosen path: `simd` false forces the scalar one (benchmarks and tests).
pub(super) fn fwd_f32_path(kind: GeluKind, x: &[f32], y: &mut [f32], simd: bool) {
    fwd_f32(kind, x, y, if simd { super::fast::fwd } else { super::fast::fwd_scalar })
}

/// As [`fwd_f32_path`], backward.
pub(super) fn bwd_f32_path(kind: GeluKind, x: &[f32], dy: &[f32], dx: &mut [f32], simd: bool) {
    bwd_f32(kind, x, dy, dx, if simd { super::fast::bwd } else { super::fast::bwd_scalar })
}

impl<F: CpuFloat> GeluKernel<F> for Cpu {
    fn gelu_fwd(&self, kind: GeluKind, x: &[F], y: &mut [F]) -> Result<()> {
        check(x.len(), &[("y", y.len())])?;
        match (as_f32(x), as_f32_mut(y)) {
            (Some(x), Some(y)) => fwd_f32(kind, x, y, super::fast::fwd),
            _ => generic_fwd(kind, x, y),
        }
        Ok(())
    }

    fn gelu_bwd(&self, kind: GeluKind, x: &[F], dy: &[F], dx: &mut [F]) -> Result<()> {
        check(x.len(), &[("dy", dy.len()), ("dx", dx.len())])?;
        match (as_f32(x), as_f32(dy), as_f32_mut(dx)) {
            (Some(x), Some(dy), Some(dx)) => bwd_f32(kind, x, dy, dx, super::fast::bwd),
            _ => generic_bwd(kind, x, dy, dx),
        }
        Ok(())
    }
}
