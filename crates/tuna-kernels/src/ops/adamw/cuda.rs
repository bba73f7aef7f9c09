//! AdamW on CUDA: launch glue for `kernels/adamw.cu` (one thread per element, grid-stride).

use super::{check, AdamWBf16Kernel, AdamWKernel, AdamWKernelParams, AdamWParams};
use crate::cuda::{grid_1d, Cuda};
use crate::cuda::{CudaBuf, KernelArg, Launch};
use crate::error::Result;

// SAFETY: #[repr(C)] plain-old-data (u64, seven f32, u32 padding) mirrored field by field by
// `struct AdamWKernelParams` in adamw.cu.
unsafe impl KernelArg for AdamWKernelParams {}

const BLOCK: u32 = 256;

impl AdamWKernel<f32> for Cuda {
    fn adamw_step(
        &self,
        p: &AdamWParams,
        params: &mut CudaBuf<f32>,
        grads: &CudaBuf<f32>,
        m: &mut CudaBuf<f32>,
        v: &mut CudaBuf<f32>,
    ) -> Result<()> {
        let k = check::<Cuda, f32>(p, params, grads, m, v)?;
        if k.n == 0 {
            return Ok(());
        }
        let mut b = Launch::new("adamw", "adamw_step_f32");
        b.arg(&k).arg(params).arg(grads).arg(m).arg(v);
        // SAFETY: arguments match adamw_step_f32(AdamWKernelParams, float*, const float*, float*,
        // float*); all four buffers have k.n elements (checked); the kernel guards i < n.
        unsafe { self.launch(b, grid_1d(k.n as usize, BLOCK)) }?;
        Ok(())
    }
}

impl AdamWBf16Kernel<f32> for Cuda {
    fn adamw_step_bf16_moments(
        &self,
        p: &AdamWParams,
        seed: u32,
        params: &mut CudaBuf<f32>,
        grads: &CudaBuf<f32>,
        m: &mut CudaBuf<half::bf16>,
        v: &mut CudaBuf<half::bf16>,
    ) -> Result<()> {
        let n = params.len();
        let detail = || format!("same length as params ({n})");
        crate::error::check_len("adamw", "grads", grads.len(), n, detail)?;
        crate::error::check_len("adamw", "m", m.len(), n, detail)?;
        crate::error::check_len("adamw", "v", v.len(), n, detail)?;
        let k = p.kernel_params(n)?;
        if k.n == 0 {
            return Ok(());
        }
        let mut b = Launch::new("adamw", "adamw_step_f32_bf16_moments");
        b.arg(&k).arg(&seed).arg(params).arg(grads).arg(m).arg(v);
        // SAFETY: arguments match adamw_step_f32_bf16_moments(AdamWKernelParams, u32, float*, const
        // float*, bf16*, bf16*); all four buffers have k.n elements (checked); the kernel guards i < n.
        unsafe { self.launch(b, grid_1d(k.n as usize, BLOCK)) }?;
        Ok(())
    }
}
