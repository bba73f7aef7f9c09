//! GELU on CUDA: launch glue for `kernels/gelu.cu` (one thread per element, grid-stride).

use super::{check, GeluKernel, GeluKind, GeluParams};
use crate::cuda::{grid_1d, symbol, Cuda, CudaElem};
use crate::cuda::{CudaBuf, KernelArg, Launch};
use crate::error::Result;

// SAFETY: #[repr(C)] plain-old-data mirrored field by field by `struct GeluParams` in gelu.cu.
unsafe impl KernelArg for GeluParams {}

const BLOCK: u32 = 256;

impl<E: CudaElem> GeluKernel<E> for Cuda {
    fn gelu_fwd(&self, kind: GeluKind, x: &CudaBuf<E>, y: &mut CudaBuf<E>) -> Result<()> {
        let p = GeluParams { kind: kind as u32, ..check(x.len(), &[("y", y.len())])? };
        let mut b = Launch::new("gelu", symbol::<E>("gelu", "fwd"));
        b.arg(&p).arg(x).arg(y);
        // SAFETY: argument list matches gelu_fwd_<E>(GeluParams, const T*, T*); lengths checked above.
        unsafe { self.launch(b, grid_1d(x.len(), BLOCK)) }?;
        Ok(())
    }

    fn gelu_bwd(&self, kind: GeluKind, x: &CudaBuf<E>, dy: &CudaBuf<E>, dx: &mut CudaBuf<E>) -> Result<()> {
        let p = GeluParams { kind: kind as u32, ..check(x.len(), &[("dy", dy.len()), ("dx", dx.len())])? };
        let mut b = Launch::new("gelu", symbol::<E>("gelu", "bwd"));
        b.arg(&p).arg(x).arg(dy).arg(dx);
        // SAFETY: argument list matches gelu_bwd_<E>(GeluParams, const T*, const T*, T*); lengths checked.
        unsafe { self.launch(b, grid_1d(x.len(), BLOCK)) }?;
        Ok(())
    }
}
