//! LayerNorm on CUDA: launch glue for `kernels/layernorm.cu` (warp-per-row kernels for
//! `dim <= 1024`, block-per-row above; dgamma/dbeta from per-chunk partials and a reduction kernel).

use super::{check, Extent, LayerNormKernel, LayerNormParams};
use crate::cuda::{grid_1d, grid_rows, symbol, Cuda, CudaElem};
use crate::cuda::{CudaBuf, KernelArg, Launch};
use crate::error::Result;
use cudarc::driver::LaunchConfig;

// SAFETY: #[repr(C)] plain-old-data mirrored field by field by `struct LayerNormParams` in layernorm.cu.
unsafe impl KernelArg for LayerNormParams {}

/// Largest `dim` that runs one warp per row.
pub(crate) const WARP_MAX_DIM: u32 = 1024;
/// Rows per block of the warp-per-row kernels (`NORM_WARP_ROWS` in norm.cuh).
const WARP_ROWS: u32 = 8;
/// Threads per block of the block-per-row kernels.
const ROW_BLOCK: u32 = 256;

/// The row kernel variant (`warp` or `block`) for `dim` and its launch configuration.
pub(crate) fn row_launch(rows: u32, dim: u32) -> (&'static str, LaunchConfig) {
    if dim <= WARP_MAX_DIM {
        ("warp", grid_1d(rows as usize * 32, 32 * WARP_ROWS))
    } else {
        ("block", grid_rows(rows as usize, ROW_BLOCK, 0))
    }
}

/// Rows per chunk of the parameter-gradient partials, and the number of chunks: enough blocks
/// to fill the GPU at any `dim`, at most 1024 chunks so the scratch stays small.
pub(crate) fn param_chunks(rows: u32) -> (u32, u32) {
    let chunk_rows = rows.div_ceil(1024).max(32);
    (chunk_rows, rows.div_ceil(chunk_rows))
}

/// Launch configuration of the partials kernel: (32 x 8) threads per (32 columns, chunk).
pub(crate) fn partials_launch(dim: u32, chunks: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (dim.div_ceil(32), chunks, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 }
}

impl<E: CudaElem> LayerNormKernel<E> for Cuda {
    fn layernorm_fwd(
        &self,
        p: &LayerNormParams,
        x: &CudaBuf<E>,
        gamma: &CudaBuf<E>,
        beta: &CudaBuf<E>,
        y: &mut CudaBuf<E>,
        mean: &mut CudaBuf<f32>,
        rstd: &mut CudaBuf<f32>,
    ) -> Result<()> {
        use Extent::*;
        check(p, &[("x", Full, x.len()), ("gamma", Dim, gamma.len()), ("beta", Dim, beta.len())])?;
        check(p, &[("y", Full, y.len()), ("mean", Rows, mean.len()), ("rstd", Rows, rstd.len())])?;
        if p.rows == 0 {
            return Ok(());
        }
        let (variant, cfg) = row_launch(p.rows, p.dim);
        let mut b = Launch::new("layernorm", symbol::<E>("layernorm", &format!("fwd_{variant}")));
        b.arg(p).arg(x).arg(gamma).arg(beta).arg(y).arg(mean).arg(rstd);
        // SAFETY: arguments match layernorm_fwd_<variant>_<E>(LayerNormParams, const T* x, gamma, beta,
        // T* y, float* mean, float* rstd); every length was checked against p above, and the kernel
        // touches rows < p.rows only.
        unsafe { self.launch(b, cfg) }?;
        Ok(())
    }

    fn add_layernorm_fwd(
        &self,
        p: &LayerNormParams,
        x: &CudaBuf<E>,
        r: &CudaBuf<E>,
        gamma: &CudaBuf<E>,
        beta: &CudaBuf<E>,
        h: &mut CudaBuf<E>,
        y: &mut CudaBuf<E>,
        mean: &mut CudaBuf<f32>,
        rstd: &mut CudaBuf<f32>,
    ) -> Result<()> {
        use Extent::*;
        check(p, &[("x", Full, x.len()), ("r", Full, r.len()), ("h", Full, h.len())])?;
        check(p, &[("gamma", Dim, gamma.len()), ("beta", Dim, beta.len()), ("y", Full, y.len())])?;
        check(p, &[("mean", Rows, mean.len()), ("rstd", Rows, rstd.len())])?;
        if p.rows == 0 {
            return Ok(());
        }
        let (variant, cfg) = row_launch(p.rows, p.dim);
        let mut b = Launch::new("layernorm", symbol::<E>("add_layernorm", &format!("fwd_{variant}")));
        b.arg(p).arg(x).arg(r).arg(gamma).arg(beta).arg(h).arg(y).arg(mean).arg(rstd);
        // SAFETY: arguments match add_layernorm_fwd_<variant>_<E>(LayerNormParams, const T* x, r, gamma,
        // beta, T* h, y, float* mean, rstd); every length was checked against p above, and the kernel
        // touches rows < p.rows only.
        unsafe { self.launch(b, cfg) }?;
        Ok(())
    }

    fn layernorm_bwd(
        &self,
        p: &LayerNormParams,
        x: &CudaBuf<E>,
        gamma: &CudaBuf<E>,
        mean: &CudaBuf<f32>,
        rstd: &CudaBuf<f32>,
        dy: &CudaBuf<E>,
        dx: &mut CudaBuf<E>,
        dgamma: Option<&mut CudaBuf<f32>>,
        dbeta: Option<&mut CudaBuf<f32>>,
    ) -> Result<()> {
        use Extent::*;
        check(p, &[("x", Full, x.len()), ("gamma", Dim, gamma.len()), ("mean", Rows, mean.len())])?;
        check(p, &[("rstd", Rows, rstd.len()), ("dy", Full, dy.len()), ("dx", Full, dx.len())])?;
        if let Some(g) = dgamma.as_deref() {
            check(p, &[("dgamma", Dim, g.len())])?;
        }
        if let Some(b) = dbeta.as_deref() {
            check(p, &[("dbeta", Dim, b.len())])?;
        }
        if p.rows == 0 {
            return Ok(());
        }
        let (variant, cfg) = row_launch(p.rows, p.dim);
        let mut b = Launch::new("layernorm", symbol::<E>("layernorm", &format!("bwd_{variant}")));
        b.arg(p).arg(x).arg(gamma).arg(mean).arg(rstd).arg(dy).arg(dx);
        // SAFETY: arguments match layernorm_bwd_<variant>_<E>(LayerNormParams, const T* x, gamma,
        // const float* mean, rstd, const T* dy, T* dx); lengths checked against p above.
        unsafe { self.launch(b, cfg) }?;
        if dgamma.is_none() && dbeta.is_none() {
            return Ok(()); // frozen gamma and beta: no partials, no reduction
        }

        // The partials kernel writes both; a gradient not asked for only fills scratch.
        let (chunk_rows, chunks) = param_chunks(p.rows);
        let mut part_g = self.zeros::<f32>(chunks as usize * p.dim as usize)?;
        let mut part_b = self.zeros::<f32>(chunks as usize * p.dim as usize)?;
        let mut b = Launch::new("layernorm", symbol::<E>("layernorm", "bwd_params"));
        b.arg(p).arg(&chunk_rows).arg(x).arg(mean).arg(rstd).arg(dy).arg(&mut part_g).arg(&mut part_b);
        // SAFETY: arguments match layernorm_bwd_params_<E>(LayerNormParams, u32 chunk_rows, const T* x,
        // const float* mean, rstd, const T* dy, float* part_g, part_b); the grid has `chunks` rows of
        // blocks, each writing row blockIdx.y < chunks of the [chunks, dim] partials.
        unsafe { self.launch(b, partials_launch(p.dim, chunks)) }?;

        for (part, grad) in [(&part_g, dgamma), (&part_b, dbeta)] {
            let Some(grad) = grad else { continue };
            let mut b = Launch::new("layernorm", symbol::<f32>("layernorm", "bwd_reduce"));
            b.arg(p).arg(&chunks).arg(part).arg(grad);
            // SAFETY: arguments match layernorm_bwd_reduce_f32(LayerNormParams, u32 chunks, const float*
            // part [chunks, dim], float* grad [dim]); one thread per column j < dim.
            unsafe { self.launch(b, grid_1d(p.dim as usize, 256)) }?;
        }
        Ok(())
    }
}
