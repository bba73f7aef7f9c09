//! AdamW on CUDA: launch glue for `kernels/adamw.cu` (one thread per element, grid-stride).

use super::{check, AdamWKernel, AdamWKernelParams, AdamWParams};
use crate::cuda::{grid_1d, Cuda};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};

// SAFETY: #[repr(C)] plain-old-data (u64, seven f32, u32 padding) mirrored field by field by
// `struct AdamWKernelParams` in adamw.cu.
unsafe impl DeviceRepr for AdamWKernelParams {}

const BLOCK: u32 = 256;

impl AdamWKernel<f32> for Cuda {
    fn adamw_step(
        &self,
        p: &AdamWParams,
        params: &mut CudaSlice<f32>,
        grads: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let k = check::<Cuda, f32>(p, params, grads, m, v)?;
        if k.n == 0 {
            return Ok(());
        }
        let f = self.function("adamw", "adamw_step_f32")?;
        let mut b = self.stream().launch_builder(&f);
        b.arg(&k).arg(params).arg(grads).arg(m).arg(v);
        // SAFETY: arguments match adamw_step_f32(AdamWKernelParams, float*, const float*, float*,
        // float*); all four buffers have k.n elements (checked); the kernel guards i < n.
        unsafe { b.launch(grid_1d(k.n as usize, BLOCK)) }.map_err(|e| Error::cuda("adamw_step", e))?;
        Ok(())
    }
}
