//! Cross-entropy on CUDA: launch glue for `kernels/cross_entropy.cu`, one block per row.
//!
//! Two launch configurations, picked by [`block_for`]: 256 threads per row for vocabularies up to
//! [`SMALL_VOCAB`], 1024 above (GPT-2's 50257, SmolLM2's 49152). An invalid target gives a NaN
//! loss and a zero gradient row (a kernel cannot return an error; see the module docs).

use super::{check, CeParams, CrossEntropyKernel};
use crate::cuda::{grid_rows, symbol, Cuda, CudaElem};
use crate::cuda::{CudaBuf, KernelArg, Launch};
use crate::error::{Error, Result};

// SAFETY: #[repr(C)] plain-old-data (u32, u32, i32, f32) mirrored field by field by `struct CeParams`
// in cross_entropy.cu.
unsafe impl KernelArg for CeParams {}

/// Largest vocabulary served by 256-thread blocks.
pub const SMALL_VOCAB: u32 = 4096;

/// Threads per row block for a vocabulary of `vocab`.
pub fn block_for(vocab: u32) -> u32 {
    if vocab <= SMALL_VOCAB {
        256
    } else {
        1024
    }
}

fn launch_rows(p: &CeParams) -> Result<Option<u32>> {
    if p.rows == 0 {
        return Ok(None);
    }
    if p.rows > i32::MAX as u32 {
        return Err(Error::Unsupported {
            op: "cross_entropy",
            device: "cuda".into(),
            msg: format!("{} rows exceed 2^31-1 blocks", p.rows),
        });
    }
    Ok(Some(p.rows))
}

impl<E: CudaElem> CrossEntropyKernel<E> for Cuda {
    fn ce_fwd(&self, p: &CeParams, logits: &CudaBuf<E>, targets: &CudaBuf<i32>, loss: &mut CudaBuf<f32>) -> Result<()> {
        check::<Cuda, E>(p, logits, targets, loss)?;
        let Some(rows) = launch_rows(p)? else { return Ok(()) };
        let mut b = Launch::new("cross_entropy", symbol::<E>("cross_entropy", "fwd"));
        b.arg(p).arg(logits).arg(targets).arg(loss);
        // SAFETY: arguments match cross_entropy_fwd_<E>(CeParams, const T*, const int*, float*);
        // lengths checked against `p`; one block per row; out-of-range targets are never indexed.
        unsafe { self.launch(b, grid_rows(rows as usize, block_for(p.vocab), 0)) }?;
        Ok(())
    }

    fn ce_fwd_bwd(
        &self,
        p: &CeParams,
        logits: &mut CudaBuf<E>,
        targets: &CudaBuf<i32>,
        loss: &mut CudaBuf<f32>,
    ) -> Result<()> {
        check::<Cuda, E>(p, logits, targets, loss)?;
        let Some(rows) = launch_rows(p)? else { return Ok(()) };
        let mut b = Launch::new("cross_entropy", symbol::<E>("cross_entropy", "bwd"));
        b.arg(p).arg(logits).arg(targets).arg(loss);
        // SAFETY: arguments match cross_entropy_bwd_<E>(CeParams, T*, const int*, float*); lengths
        // checked; each block reads and overwrites only its own row of logits.
        unsafe { self.launch(b, grid_rows(rows as usize, block_for(p.vocab), 0)) }?;
        Ok(())
    }
}
