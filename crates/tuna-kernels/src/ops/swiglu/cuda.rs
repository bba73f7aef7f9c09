//! SiLU and SwiGLU on CUDA: launch glue for `kernels/swiglu.cu` (one thread per element, grid-stride).

use super::{check, SwigluKernel, SwigluParams};
use crate::cuda::{grid_1d, symbol, Cuda, CudaElem};
use crate::cuda::{CudaBuf, KernelArg, Launch};
use crate::error::Result;

// SAFETY: #[repr(C)] plain-old-data mirrored field by field by `struct SwigluParams` in swiglu.cu.
unsafe impl KernelArg for SwigluParams {}

const BLOCK: u32 = 256;

impl<E: CudaElem> SwigluKernel<E> for Cuda {
    fn silu_fwd(&self, x: &CudaBuf<E>, y: &mut CudaBuf<E>) -> Result<()> {
        let p = check("silu", "x", x.len(), &[("y", y.len())])?;
        let mut b = Launch::new("swiglu", symbol::<E>("silu", "fwd"));
        b.arg(&p).arg(x).arg(y);
        // SAFETY: arguments match silu_fwd_<E>(SwigluParams, const T* x, T* y); lengths checked = p.n.
        unsafe { self.launch(b, grid_1d(x.len(), BLOCK)) }?;
        Ok(())
    }

    fn silu_bwd(&self, x: &CudaBuf<E>, dy: &CudaBuf<E>, dx: &mut CudaBuf<E>) -> Result<()> {
        let p = check("silu", "x", x.len(), &[("dy", dy.len()), ("dx", dx.len())])?;
        let mut b = Launch::new("swiglu", symbol::<E>("silu", "bwd"));
        b.arg(&p).arg(x).arg(dy).arg(dx);
        // SAFETY: arguments match silu_bwd_<E>(SwigluParams, const T* x, const T* dy, T* dx); lengths checked.
        unsafe { self.launch(b, grid_1d(x.len(), BLOCK)) }?;
        Ok(())
    }

    fn swiglu_fwd(&self, gate: &CudaBuf<E>, up: &CudaBuf<E>, y: &mut CudaBuf<E>) -> Result<()> {
        let p = check("swiglu", "gate", gate.len(), &[("up", up.len()), ("y", y.len())])?;
        let mut b = Launch::new("swiglu", symbol::<E>("swiglu", "fwd"));
        b.arg(&p).arg(gate).arg(up).arg(y);
        // SAFETY: arguments match swiglu_fwd_<E>(SwigluParams, const T* gate, const T* up, T* y); lengths checked.
        unsafe { self.launch(b, grid_1d(gate.len(), BLOCK)) }?;
        Ok(())
    }

    fn swiglu_bwd(
        &self,
        gate: &CudaBuf<E>,
        up: &CudaBuf<E>,
        dy: &CudaBuf<E>,
        dgate: &mut CudaBuf<E>,
        dup: &mut CudaBuf<E>,
    ) -> Result<()> {
        let others = [("up", up.len()), ("dy", dy.len()), ("dgate", dgate.len()), ("dup", dup.len())];
        let p = check("swiglu", "gate", gate.len(), &others)?;
        let mut b = Launch::new("swiglu", symbol::<E>("swiglu", "bwd"));
        b.arg(&p).arg(gate).arg(up).arg(dy).arg(dgate).arg(dup);
        // SAFETY: arguments match swiglu_bwd_<E>(SwigluParams, const T* gate, up, dy, T* dgate, T* dup);
        // all five lengths checked equal to p.n.
        unsafe { self.launch(b, grid_1d(gate.len(), BLOCK)) }?;
        Ok(())
    }
}
