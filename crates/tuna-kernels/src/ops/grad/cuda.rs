//! Gradient bookkeeping on CUDA: launch glue for `kernels/grad.cu` (grid-stride kernels).
//!
//! `grad_zero` is a stream memset. `grad_sq_norm_acc` runs at most [`NORM_MAX_BLOCKS`] blocks,
//! each summing its grid-stride share in f32, reducing over the block, and adding to `acc` with
//! one `atomicAdd` (so the last bits of the norm vary with the order of the blocks).

use super::{check_acc, check_accumulate, check_cast, check_clip, GradKernel, GradNormKernel, GradParams};
use crate::cuda::{grid_1d, symbol, Cuda, CudaElem};
use crate::cuda::{CudaBuf, KernelArg, Launch};
use crate::error::Result;
use cudarc::driver::LaunchConfig;

// SAFETY: #[repr(C)] plain-old-data (u64, f32, f32) mirrored field by field by `struct GradParams` in grad.cu.
unsafe impl KernelArg for GradParams {}

const BLOCK: u32 = 256;
/// Most blocks of the squared-norm kernel (bounds the atomics per tensor).
pub const NORM_MAX_BLOCKS: usize = 1024;

impl<E: CudaElem> GradKernel<E> for Cuda {
    fn grad_accumulate(&self, dst: &mut CudaBuf<f32>, src: &CudaBuf<E>, scale: f32) -> Result<()> {
        let p = check_accumulate::<Cuda, E>(dst, src, scale as f64)?;
        if p.n == 0 {
            return Ok(());
        }
        let mut b = Launch::new("grad", symbol::<E>("grad", "accumulate"));
        b.arg(&p).arg(dst).arg(src);
        // SAFETY: arguments match grad_accumulate_<E>(GradParams, float*, const T*); both buffers
        // have p.n elements (checked); the kernel guards i < n.
        unsafe { self.launch(b, grid_1d(p.n as usize, BLOCK)) }?;
        Ok(())
    }

    fn cast(&self, src: &CudaBuf<f32>, dst: &mut CudaBuf<E>) -> Result<()> {
        let p = check_cast::<Cuda, E>(src, dst)?;
        if p.n == 0 {
            return Ok(());
        }
        let mut b = Launch::new("grad", symbol::<E>("grad", "cast"));
        b.arg(&p).arg(src).arg(dst);
        // SAFETY: arguments match grad_cast_<E>(GradParams, const float*, T*); both buffers have
        // p.n elements (checked); the kernel guards i < n.
        unsafe { self.launch(b, grid_1d(p.n as usize, BLOCK)) }?;
        Ok(())
    }
}

impl GradNormKernel<f32> for Cuda {
    fn grad_zero(&self, dst: &mut CudaBuf<f32>) -> Result<()> {
        self.memset_zeros(dst)
    }

    fn grad_sq_norm_acc(&self, src: &CudaBuf<f32>, acc: &mut CudaBuf<f32>) -> Result<()> {
        check_acc("grad_sq_norm_acc", acc.len())?;
        let n = src.len();
        if n == 0 {
            return Ok(());
        }
        let p = GradParams { n: n as u64, scale: 1.0, max_norm: 0.0 };
        let blocks = n.div_ceil(BLOCK as usize).min(NORM_MAX_BLOCKS) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut b = Launch::new("grad", "grad_sqnorm_f32");
        b.arg(&p).arg(src).arg(acc);
        // SAFETY: arguments match grad_sqnorm_f32(GradParams, const float*, float*); src has p.n
        // elements and acc one (checked); grid-stride loop guards i < n.
        unsafe { self.launch(b, cfg) }?;
        Ok(())
    }

    fn grad_clip(&self, acc: &CudaBuf<f32>, max_norm: f32, dst: &mut CudaBuf<f32>) -> Result<()> {
        let p = check_clip(acc.len(), max_norm as f64, dst.len())?;
        if p.n == 0 {
            return Ok(());
        }
        let mut b = Launch::new("grad", "grad_clip_f32");
        b.arg(&p).arg(acc).arg(dst);
        // SAFETY: arguments match grad_clip_f32(GradParams, const float*, float*); acc has one
        // element and dst p.n (checked); the kernel guards i < n.
        unsafe { self.launch(b, grid_1d(p.n as usize, BLOCK)) }?;
        Ok(())
    }
}
