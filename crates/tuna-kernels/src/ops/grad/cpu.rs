//! Gradient bookkeeping on the CPU: rayon over fixed-size chunks; the squared norm sums each
//! chunk in f64 and adds the chunk sums in order (the same result on every run). Generic over the
//! float ([`CpuFloat`]): f32, or f64 for gradient checks; gradients and masters are in E itself.

use super::{check_acc, check_accumulate, check_cast, check_clip, clip_factor, GradKernel, GradNormKernel};
use crate::backend::{Cpu, CpuFloat};
use crate::error::Result;
use rayon::prelude::*;

const CHUNK: usize = 16 * 1024;

/// `x` widened to f64.
#[inline(always)]
fn wide<F: CpuFloat>(x: F) -> f64 {
    x.into()
}

impl<F: CpuFloat> GradKernel<F> for Cpu {
    fn grad_accumulate(&self, dst: &mut [F], src: &[F], scale: F) -> Result<()> {
        check_accumulate::<Cpu, F>(dst, src, wide(scale))?;
        dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| {
            d.iter_mut().zip(s).for_each(|(d, &s)| *d += scale * s);
        });
        Ok(())
    }

    fn cast(&self, src: &[F], dst: &mut [F]) -> Result<()> {
        check_cast::<Cpu, F>(src, dst)?;
        dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| d.copy_from_slice(s));
        Ok(())
    }
}

impl<F: CpuFloat> GradNormKernel<F> for Cpu {
    fn grad_zero(&self, dst: &mut [F]) -> Result<()> {
        dst.par_chunks_mut(CHUNK).for_each(|d| d.fill(F::zero()));
        Ok(())
    }

    fn grad_sq_norm_acc(&self, src: &[F], acc: &mut [F]) -> Result<()> {
        check_acc("grad_sq_norm_acc", acc.len())?;
        let partial: Vec<f64> = src.par_chunks(CHUNK).map(|c| c.iter().map(|&x| wide(x) * wide(x)).sum()).collect();
        acc[0] = F::c(wide(acc[0]) + partial.iter().sum::<f64>());
        Ok(())
    }

    fn grad_clip(&self, acc: &[F], max_norm: F, dst: &mut [F]) -> Result<()> {
        check_clip(acc.len(), wide(max_norm), dst.len())?;
        let f = clip_factor(acc[0], max_norm);
        if f < F::one() {
            dst.par_chunks_mut(CHUNK).for_each(|d| d.iter_mut().for_each(|x| *x *= f));
        }
        Ok(())
    }
}
