//! Softmax cross-entropy over `[rows, vocab]` logits with an ignore index: a loss-only forward
//! (for evaluation) and a forward fused with its backward that overwrites the logits with their
//! gradient in place.
//!
//! `loss[r] = logsumexp(logits[r]) - logits[r, targets[r]]`, computed max-subtracted; rows whose
//! target is `ignore_index` get loss 0 (and a zero gradient row).
//!
//! **In-place exception to the accumulate convention**: [`CrossEntropyKernel::ce_fwd_bwd`]
//! overwrites `logits` with `grad_scale * (softmax(logits) - onehot(target))`, so the fused op
//! never materializes a second `[rows, vocab]` buffer (at a 50k vocab that buffer is the largest
//! activation of a small model). The logits are consumed: the caller must not need them after.
//! For a mean over the valid rows, pass `grad_scale = 1 / num_valid` (see [`count_valid`]).
//!
//! Targets neither `ignore_index` nor in `0..vocab` are an [`Error::Invalid`] on the CPU (checked
//! before anything is written). A CUDA kernel cannot return an error: there such a row gets loss
//! NaN (so a mean loss shows it) and a zero gradient row, and reads nothing out of bounds;
//! callers that build targets on the host can check them first with [`validate_targets`].

mod cpu;
mod cuda;
#[cfg(test)]
mod tests;

use crate::backend::{Backend, Elem};
use crate::error::{check_len, Error, Result};

/// PyTorch's default ignore index.
pub const IGNORE_INDEX: i32 = -100;

/// Kernel parameters, mirrored by `struct CeParams` in `kernels/cross_entropy.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CeParams {
    pub rows: u32,
    pub vocab: u32,
    /// Targets equal to this are ignored (loss 0, zero gradient).
    pub ignore_index: i32,
    /// Factor on the gradient written by `ce_fwd_bwd` (1 / number of valid rows for a mean).
    /// An f32 on every element type: an f64 run (gradient checks) gets it widened, so a scale such
    /// as 1/3 carries f32 rounding (~6e-8 relative); use 1 or a power of two there.
    pub grad_scale: f32,
}

impl CeParams {
    /// `rows` rows of `vocab` logits, ignore index -100, gradient scale 1.
    pub fn new(rows: usize, vocab: usize) -> Self {
        CeParams { rows: rows as u32, vocab: vocab as u32, ignore_index: IGNORE_INDEX, grad_scale: 1.0 }
    }
    pub fn with_ignore_index(self, ignore_index: i32) -> Self {
        CeParams { ignore_index, ..self }
    }
    pub fn with_grad_scale(self, grad_scale: f32) -> Self {
        CeParams { grad_scale, ..self }
    }
    pub fn logits_elems(&self) -> usize {
        self.rows as usize * self.vocab as usize
    }

    /// Validate the parameters themselves.
    pub fn validate(&self) -> Result<()> {
        if self.vocab == 0 {
            return Err(Error::Invalid { op: "cross_entropy", msg: "vocab must be positive".into() });
        }
        if !self.grad_scale.is_finite() {
            return Err(Error::Invalid {
                op: "cross_entropy",
                msg: format!("grad_scale {} is not finite", self.grad_scale),
            });
        }
        Ok(())
    }
}

/// Softmax cross-entropy on a device: the loss alone, and the loss fused with its backward.
pub trait CrossEntropyKernel<E: Elem>: Backend {
    /// Writes the per-row losses `loss` (`[rows]` in `E::Acc`: f32 for f32/bf16, f64 for f64; 0 for
    /// ignored rows); `logits` are untouched.
    fn ce_fwd(
        &self,
        p: &CeParams,
        logits: &Self::Buf<E>,
        targets: &Self::Buf<i32>,
        loss: &mut Self::Buf<E::Acc>,
    ) -> Result<()>;
    /// Writes the per-row losses and OVERWRITES `logits` with
    /// `p.grad_scale * (softmax - onehot(target))` (zero rows for ignored targets).
    fn ce_fwd_bwd(
        &self,
        p: &CeParams,
        logits: &mut Self::Buf<E>,
        targets: &Self::Buf<i32>,
        loss: &mut Self::Buf<E::Acc>,
    ) -> Result<()>;
}

/// Check that every target is `ignore_index` or in `0..vocab`; the error names the first bad row.
pub fn validate_targets(targets: &[i32], vocab: usize, ignore_index: i32) -> Result<()> {
    let bad = |&t: &i32| t != ignore_index && (t < 0 || t as usize >= vocab);
    match targets.iter().position(bad) {
        None => Ok(()),
        Some(r) => Err(Error::Invalid {
            op: "cross_entropy",
            msg: format!("targets[{r}] = {} is neither ignore_index {ignore_index} nor in 0..{vocab}", targets[r]),
        }),
    }
}

/// Number of targets that are not `ignore_index` (the denominator of a mean loss).
pub fn count_valid(targets: &[i32], ignore_index: i32) -> usize {
    targets.iter().filter(|&&t| t != ignore_index).count()
}

/// Shape checks shared by both devices and both entry points.
fn check<B: Backend + ?Sized, E: Elem>(
    p: &CeParams,
    logits: &B::Buf<E>,
    targets: &B::Buf<i32>,
    loss: &B::Buf<E::Acc>,
) -> Result<()> {
    p.validate()?;
    let shape = || format!("{p:?}");
    check_len("cross_entropy", "logits", B::len(logits), p.logits_elems(), shape)?;
    check_len("cross_entropy", "targets", B::len(targets), p.rows as usize, shape)?;
    check_len("cross_entropy", "loss", B::len(loss), p.rows as usize, shape)
}
