//! Gradient bookkeeping on the CPU: rayon over fixed-size chunks; the squared norm sums each
//! chunk in f64 and adds the chunk sums in order (the same result on every run).

use super::{check_acc, check_accumulate, check_cast, check_clip, clip_factor, GradKernel, GradNormKernel};
use crate::backend::Cpu;
use crate::error::Result;
use rayon::prelude::*;

const CHUNK: usize = 16 * 1024;

impl GradKernel<f32> for Cpu {
    fn grad_accumulate(&self, dst: &mut [f32], src: &[f32], scale: f32) -> Result<()> {
        check_accumulate::<Cpu, f32>(dst, src, scale)?;
        dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| {
            d.iter_mut().zip(s).for_each(|(d, &s)| *d += scale * s);
        });
        Ok(())
    }

    fn cast(&self, src: &[f32], dst: &mut [f32]) -> Result<()> {
        check_cast::<Cpu, f32>(src, dst)?;
        dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| d.copy_from_slice(s));
        Ok(())
    }
}

impl GradNormKernel for Cpu {
    fn grad_zero(&self, dst: &mut [f32]) -> Result<()> {
        dst.par_chunks_mut(CHUNK).for_each(|d| d.fill(0.0));
        Ok(())
    }

    fn grad_sq_norm_acc(&self, src: &[f32], acc: &mut [f32]) -> Result<()> {
        check_acc("grad_sq_norm_acc", acc.len())?;
        let partial: Vec<f64> = src.par_chunks(CHUNK).map(|c| c.iter().map(|&x| x as f64 * x as f64).sum()).collect();
        acc[0] = (acc[0] as f64 + partial.iter().sum::<f64>()) as f32;
        Ok(())
    }

    fn grad_clip(&self, acc: &[f32], max_norm: f32, dst: &mut [f32]) -> Result<()> {
        check_clip(acc.len(), max_norm, dst.len())?;
        let f = clip_factor(acc[0], max_norm);
        if f < 1.0 {
            dst.par_chunks_mut(CHUNK).for_each(|d| d.iter_mut().for_each(|x| *x *= f));
        }
        Ok(())
    }
}
