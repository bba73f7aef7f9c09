//! Cross-entropy on the CPU: rayon over rows; max in f32, the sum of exponentials in f64.

use super::{check, validate_targets, CeParams, CrossEntropyKernel};
use crate::backend::Cpu;
use crate::error::Result;
use rayon::prelude::*;

/// `(max, sum of exp(x - max))` of one row.
fn max_sum(x: &[f32]) -> (f32, f64) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (m, x.iter().map(|&v| ((v - m) as f64).exp()).sum())
}

/// The loss of one row whose target `t` is valid, from its `(max, sum)`.
fn row_loss(x: &[f32], t: usize, (m, s): (f32, f64)) -> f32 {
    (s.ln() + m as f64 - x[t] as f64) as f32
}

impl CrossEntropyKernel<f32> for Cpu {
    fn ce_fwd(&self, p: &CeParams, logits: &[f32], targets: &[i32], loss: &mut [f32]) -> Result<()> {
        check::<Cpu, f32>(p, logits, targets, loss)?;
        validate_targets(targets, p.vocab as usize, p.ignore_index)?;
        let v = p.vocab as usize;
        loss.par_iter_mut().zip(logits.par_chunks(v)).zip(targets.par_iter()).for_each(|((l, x), &t)| {
            *l = if t == p.ignore_index { 0.0 } else { row_loss(x, t as usize, max_sum(x)) };
        });
        Ok(())
    }

    fn ce_fwd_bwd(&self, p: &CeParams, logits: &mut [f32], targets: &[i32], loss: &mut [f32]) -> Result<()> {
        check::<Cpu, f32>(p, logits, targets, loss)?;
        validate_targets(targets, p.vocab as usize, p.ignore_index)?;
        let v = p.vocab as usize;
        loss.par_iter_mut().zip(logits.par_chunks_mut(v)).zip(targets.par_iter()).for_each(|((l, x), &t)| {
            if t == p.ignore_index {
                *l = 0.0;
                x.fill(0.0);
                return;
            }
            let (m, s) = max_sum(x);
            *l = row_loss(x, t as usize, (m, s));
            let inv = (1.0 / s) as f32;
            for (j, g) in x.iter_mut().enumerate() {
                let onehot = if j == t as usize { 1.0 } else { 0.0 };
                *g = p.grad_scale * ((*g - m).exp() * inv - onehot);
            }
        });
        Ok(())
    }
}
