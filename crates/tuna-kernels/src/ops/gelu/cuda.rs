//! GELU on CUDA: launch glue for `kernels/gelu.cu` (one thread per element, grid-stride).

use super::{check, GeluKernel, GeluKind, GeluParams};
use crate::cuda::{grid_1d, symbol, Cuda, CudaElem};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};

// SAFETY: #[repr(C)] plain-old-data mirrored field by field by `struct GeluParams` in gelu.cu.
unsafe impl DeviceRepr for GeluParams {}

const BLOCK: u32 = 256;

impl<E: CudaElem> GeluKernel<E> for Cuda {
    fn gelu_fwd(&self, kind: GeluKind, x: &CudaSlice<E>, y: &mut CudaSlice<E>) -> Result<()> {
        let p = GeluParams { kind: kind as u32, ..check(x.len(), &[("y", y.len())])? };
        let f = self.function("gelu", &symbol::<E>("gelu", "fwd"))?;
        let mut b = self.stream().launch_builder(&f);
        b.arg(&p).arg(x).arg(y);
        // SAFETY: argument list matches gelu_fwd_<E>(GeluParams, const T*, T*); lengths checked above.
        unsafe { b.launch(grid_1d(x.len(), BLOCK)) }.map_err(|e| Error::cuda("gelu_fwd", e))?;
        Ok(())
    }

    fn gelu_bwd(&self, kind: GeluKind, x: &CudaSlice<E>, dy: &CudaSlice<E>, dx: &mut CudaSlice<E>) -> Result<()> {
        let p = GeluParams { kind: kind as u32, ..check(x.len(), &[("dy", dy.len()), ("dx", dx.len())])? };
        let f = self.function("gelu", &symbol::<E>("gelu", "bwd"))?;
        let mut b = self.stream().launch_builder(&f);
        b.arg(&p).arg(x).arg(dy).arg(dx);
        // SAFETY: argument list matches gelu_bwd_<E>(GeluParams, const T*, const T*, T*); lengths checked.
        unsafe { b.launch(grid_1d(x.len(), BLOCK)) }.map_err(|e| Error::cuda("gelu_bwd", e))?;
        Ok(())
    }
}
