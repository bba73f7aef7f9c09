//! SiLU and SwiGLU on CUDA: launch glue for `kernels/swiglu.cu` (one thread per element, grid-stride).

use super::{check, SwigluKernel, SwigluParams};
use crate::cuda::{grid_1d, symbol, Cuda, CudaElem};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};

// SAFETY: #[repr(C)] plain-old-data mirrored field by field by `struct SwigluParams` in swiglu.cu.
unsafe impl DeviceRepr for SwigluParams {}

const BLOCK: u32 = 256;

impl<E: CudaElem> SwigluKernel<E> for Cuda {
    fn silu_fwd(&self, x: &CudaSlice<E>, y: &mut CudaSlice<E>) -> Result<()> {
        let p = check("silu", "x", x.len(), &[("y", y.len())])?;
        let f = self.function("swiglu", &symbol::<E>("silu", "fwd"))?;
        let mut b = self.stream().launch_builder(&f);
        b.arg(&p).arg(x).arg(y);
        // SAFETY: arguments match silu_fwd_<E>(SwigluParams, const T* x, T* y); lengths checked = p.n.
        unsafe { b.launch(grid_1d(x.len(), BLOCK)) }.map_err(|e| Error::cuda("silu_fwd", e))?;
        Ok(())
    }

    fn silu_bwd(&self, x: &CudaSlice<E>, dy: &CudaSlice<E>, dx: &mut CudaSlice<E>) -> Result<()> {
        let p = check("silu", "x", x.len(), &[("dy", dy.len()), ("dx", dx.len())])?;
        let f = self.function("swiglu", &symbol::<E>("silu", "bwd"))?;
        let mut b = self.stream().launch_builder(&f);
        b.arg(&p).arg(x).arg(dy).arg(dx);
        // SAFETY: arguments match silu_bwd_<E>(SwigluParams, const T* x, const T* dy, T* dx); lengths checked.
        unsafe { b.launch(grid_1d(x.len(), BLOCK)) }.map_err(|e| Error::cuda("silu_bwd", e))?;
        Ok(())
    }

    fn swiglu_fwd(&self, gate: &CudaSlice<E>, up: &CudaSlice<E>, y: &mut CudaSlice<E>) -> Result<()> {
        let p = check("swiglu", "gate", gate.len(), &[("up", up.len()), ("y", y.len())])?;
        let f = self.function("swiglu", &symbol::<E>("swiglu", "fwd"))?;
        let mut b = self.stream().launch_builder(&f);
        b.arg(&p).arg(gate).arg(up).arg(y);
        // SAFETY: arguments match swiglu_fwd_<E>(SwigluParams, const T* gate, const T* up, T* y); lengths checked.
        unsafe { b.launch(grid_1d(gate.len(), BLOCK)) }.map_err(|e| Error::cuda("swiglu_fwd", e))?;
        Ok(())
    }

    fn swiglu_bwd(
        &self,
        gate: &CudaSlice<E>,
        up: &CudaSlice<E>,
        dy: &CudaSlice<E>,
        dgate: &mut CudaSlice<E>,
        dup: &mut CudaSlice<E>,
    ) -> Result<()> {
        let others = [("up", up.len()), ("dy", dy.len()), ("dgate", dgate.len()), ("dup", dup.len())];
        let p = check("swiglu", "gate", gate.len(), &others)?;
        let f = self.function("swiglu", &symbol::<E>("swiglu", "bwd"))?;
        let mut b = self.stream().launch_builder(&f);
        b.arg(&p).arg(gate).arg(up).arg(dy).arg(dgate).arg(dup);
        // SAFETY: arguments match swiglu_bwd_<E>(SwigluParams, const T* gate, up, dy, T* dgate, T* dup);
        // all five lengths checked equal to p.n.
        unsafe { b.launch(grid_1d(gate.len(), BLOCK)) }.map_err(|e| Error::cuda("swiglu_bwd", e))?;
        Ok(())
    }
}
