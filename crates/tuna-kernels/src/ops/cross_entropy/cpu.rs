//! Cross-entropy on the CPU: rayon over rows; max in the element type, the sum of exponentials in
//! f64. Generic over the float ([`CpuFloat`]): f32, or f64 for gradient checks.

use super::{check, validate_targets, CeParams, CrossEntropyKernel};
use crate::backend::{Cpu, CpuFloat};
use crate::error::Result;
use rayon::prelude::*;

/// `x` widened to f64.
#[inline(always)]
fn wide<F: CpuFloat>(x: F) -> f64 {
    x.into()
}

/// `(max, sum of exp(x - max))` of one row.
fn max_sum<F: CpuFloat>(x: &[F]) -> (F, f64) {
    let m = x.iter().copied().fold(F::neg_infinity(), F::max);
    (m, x.iter().map(|&v| wide(v - m).exp()).sum())
}

/// The loss of one row whose target `t` is valid, from its `(max, sum)`.
fn row_loss<F: CpuFloat>(x: &[F], t: usize, (m, s): (F, f64)) -> F {
    F::c(s.ln() + wide(m) - wide(x[t]))
}

impl<F: CpuFloat> CrossEntropyKernel<F> for Cpu {
    fn ce_fwd(&self, p: &CeParams, logits: &[F], targets: &[i32], loss: &mut [F]) -> Result<()> {
        check::<Cpu, F>(p, logits, targets, loss)?;
        validate_targets(targets, p.vocab as usize, p.ignore_index)?;
        let v = p.vocab as usize;
        loss.par_iter_mut().zip(logits.par_chunks(v)).zip(targets.par_iter()).for_each(|((l, x), &t)| {
            *l = if t == p.ignore_index { F::zero() } else { row_loss(x, t as usize, max_sum(x)) };
        });
        Ok(())
    }

    fn ce_fwd_bwd(&self, p: &CeParams, logits: &mut [F], targets: &[i32], loss: &mut [F]) -> Result<()> {
        check::<Cpu, F>(p, logits, targets, loss)?;
        validate_targets(targets, p.vocab as usize, p.ignore_index)?;
        let (v, scale) = (p.vocab as usize, F::c(p.grad_scale as f64));
        loss.par_iter_mut().zip(logits.par_chunks_mut(v)).zip(targets.par_iter()).for_each(|((l, x), &t)| {
            if t == p.ignore_index {
                *l = F::zero();
                x.fill(F::zero());
                return;
            }
            let (m, s) = max_sum(x);
            *l = row_loss(x, t as usize, (m, s));
            let inv = F::c(1.0 / s);
            for (j, g) in x.iter_mut().enumerate() {
                let onehot = if j == t as usize { F::one() } else { F::zero() };
                *g = scale * ((*g - m).exp() * inv - onehot);
            }
        });
        Ok(())
    }
}
