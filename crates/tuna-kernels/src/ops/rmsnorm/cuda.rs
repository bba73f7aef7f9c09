//! RMSNorm on CUDA: launch glue for `kernels/rmsnorm.cu`, with layernorm's launch scheme
//! (warp-per-row for `dim <= 1024`, block-per-row above; dgamma from partials + reduction).

use super::{check, RmsNormKernel, RmsNormParams};
use crate::cuda::{grid_1d, symbol, Cuda, CudaElem};
use crate::cuda::{CudaBuf, KernelArg, Launch};
use crate::error::Result;
use crate::ops::layernorm::Extent::{Dim, Full, Rows};
use crate::ops::layernorm::{param_chunks, partials_launch, row_launch};

// SAFETY: #[repr(C)] plain-old-data mirrored field by field by `struct RmsNormParams` in rmsnorm.cu.
unsafe impl KernelArg for RmsNormParams {}

impl<E: CudaElem> RmsNormKernel<E> for Cuda {
    fn rmsnorm_fwd(
        &self,
        p: &RmsNormParams,
        x: &CudaBuf<E>,
        gamma: &CudaBuf<E>,
        y: &mut CudaBuf<E>,
        rstd: &mut CudaBuf<f32>,
    ) -> Result<()> {
        check(
            p,
            &[("x", Full, x.len()), ("gamma", Dim, gamma.len()), ("y", Full, y.len()), ("rstd", Rows, rstd.len())],
        )?;
        if p.rows == 0 {
            return Ok(());
        }
        let (variant, cfg) = row_launch(p.rows, p.dim);
        let mut b = Launch::new("rmsnorm", symbol::<E>("rmsnorm", &format!("fwd_{variant}")));
        b.arg(p).arg(x).arg(gamma).arg(y).arg(rstd);
        // SAFETY: arguments match rmsnorm_fwd_<variant>_<E>(RmsNormParams, const T* x, gamma, T* y,
        // float* rstd); every length was checked against p above, and the kernel touches rows < p.rows only.
        unsafe { self.launch(b, cfg) }?;
        Ok(())
    }

    fn add_rmsnorm_fwd(
        &self,
        p: &RmsNormParams,
        x: &CudaBuf<E>,
        r: &CudaBuf<E>,
        gamma: &CudaBuf<E>,
        h: &mut CudaBuf<E>,
        y: &mut CudaBuf<E>,
        rstd: &mut CudaBuf<f32>,
    ) -> Result<()> {
        check(p, &[("x", Full, x.len()), ("r", Full, r.len()), ("h", Full, h.len())])?;
        check(p, &[("gamma", Dim, gamma.len()), ("y", Full, y.len()), ("rstd", Rows, rstd.len())])?;
        if p.rows == 0 {
            return Ok(());
        }
        let (variant, cfg) = row_launch(p.rows, p.dim);
        let mut b = Launch::new("rmsnorm", symbol::<E>("add_rmsnorm", &format!("fwd_{variant}")));
        b.arg(p).arg(x).arg(r).arg(gamma).arg(h).arg(y).arg(rstd);
        // SAFETY: arguments match add_rmsnorm_fwd_<variant>_<E>(RmsNormParams, const T* x, r, gamma,
        // T* h, y, float* rstd); every length was checked against p above, and the kernel touches
        // rows < p.rows only.
        unsafe { self.launch(b, cfg) }?;
        Ok(())
    }

    fn rmsnorm_bwd(
        &self,
        p: &RmsNormParams,
        x: &CudaBuf<E>,
        gamma: &CudaBuf<E>,
        rstd: &CudaBuf<f32>,
        dy: &CudaBuf<E>,
        dx: &mut CudaBuf<E>,
        dgamma: Option<&mut CudaBuf<f32>>,
    ) -> Result<()> {
        check(p, &[("x", Full, x.len()), ("gamma", Dim, gamma.len()), ("rstd", Rows, rstd.len())])?;
        check(p, &[("dy", Full, dy.len()), ("dx", Full, dx.len())])?;
        if let Some(g) = dgamma.as_deref() {
            check(p, &[("dgamma", Dim, g.len())])?;
        }
        if p.rows == 0 {
            return Ok(());
        }
        let (variant, cfg) = row_launch(p.rows, p.dim);
        let mut b = Launch::new("rmsnorm", symbol::<E>("rmsnorm", &format!("bwd_{variant}")));
        b.arg(p).arg(x).arg(gamma).arg(rstd).arg(dy).arg(dx);
        // SAFETY: arguments match rmsnorm_bwd_<variant>_<E>(RmsNormParams, const T* x, gamma,
        // const float* rstd, const T* dy, T* dx); lengths checked against p above.
        unsafe { self.launch(b, cfg) }?;
        let Some(dgamma) = dgamma else {
            return Ok(()); // frozen gamma: no partials, no reduction
        };

        let (chunk_rows, chunks) = param_chunks(p.rows);
        let mut part = self.zeros::<f32>(chunks as usize * p.dim as usize)?;
        let mut b = Launch::new("rmsnorm", symbol::<E>("rmsnorm", "bwd_params"));
        b.arg(p).arg(&chunk_rows).arg(x).arg(rstd).arg(dy).arg(&mut part);
        // SAFETY: arguments match rmsnorm_bwd_params_<E>(RmsNormParams, u32 chunk_rows, const T* x,
        // const float* rstd, const T* dy, float* part_g); the grid has `chunks` rows of blocks, each
        // writing row blockIdx.y < chunks of the [chunks, dim] partials.
        unsafe { self.launch(b, partials_launch(p.dim, chunks)) }?;

        let mut b = Launch::new("rmsnorm", symbol::<f32>("rmsnorm", "bwd_reduce"));
        b.arg(p).arg(&chunks).arg(&part).arg(dgamma);
        // SAFETY: arguments match rmsnorm_bwd_reduce_f32(RmsNormParams, u32 chunks, const float* part
        // [chunks, dim], float* grad [dim]); one thread per column j < dim.
        unsafe { self.launch(b, grid_1d(p.dim as usize, 256)) }?;
        Ok(())
    }
}
