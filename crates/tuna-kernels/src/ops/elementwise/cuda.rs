//! Elementwise ops on CUDA: launch glue for `kernels/elementwise.cu`. Flat ops run one
//! grid-stride thread per element; row-shaped ops run columns on grid x and rows (or batch rows)
//! on grid y, grid-striding past 65535; `dbias` comes from per-chunk partials and an in-order
//! reduction kernel (no atomics).

use super::{check_bias, check_cols, check_flat, check_pool};
use super::{BiasParams, ColsParams, ElementwiseKernel, FlatParams, PoolParams};
use crate::cuda::{grid_1d, symbol, Cuda, CudaElem};
use crate::cuda::{CudaBuf, KernelArg, Launch};
use crate::error::Result;
use cudarc::driver::LaunchConfig;

// SAFETY (all four): #[repr(C)] plain-old-data structs mirrored field by field by the structs of
// the same names in elementwise.cu (u64 fields, then f32/u32: no padding differences).
unsafe impl KernelArg for FlatParams {}
unsafe impl KernelArg for BiasParams {}
unsafe impl KernelArg for ColsParams {}
unsafe impl KernelArg for PoolParams {}

/// Threads per block of the flat and row-shaped kernels.
const BLOCK: u32 = 256;
/// Largest grid x dimension.
const MAX_GRID_X: u64 = i32::MAX as u64;
/// Largest grid y dimension; kernels grid-stride over the rest.
pub(crate) const MAX_GRID_Y: u64 = 65535;
/// Largest grid x of the pooling backward (per batch row); it grid-strides over the rest.
pub(crate) const POOL_BWD_MAX_BLOCKS_X: u64 = 1024;
/// Rows and columns of one dbias partials block (`BIAS_PART_ROWS/COLS` in elementwise.cu).
const BIAS_PART_ROWS: u32 = 8;
const BIAS_PART_COLS: u32 = 32;

/// Columns on x (`BLOCK` per block, `cols` at most `x_limit` blocks), rows on y (capped).
pub(crate) fn grid_cols_rows(cols: u64, rows: u64, x_limit: u64) -> LaunchConfig {
    let gx = cols.div_ceil(BLOCK as u64).clamp(1, x_limit) as u32;
    let gy = rows.clamp(1, MAX_GRID_Y) as u32;
    LaunchConfig { grid_dim: (gx, gy, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// Rows per chunk of the dbias partials and the number of chunks: at least 32 rows a chunk, at
/// most 1024 chunks, so the scratch stays small and there are enough blocks to fill the GPU.
pub(crate) fn bias_chunks(rows: u64) -> (u64, u32) {
    let chunk_rows = rows.div_ceil(1024).max(32);
    (chunk_rows, rows.div_ceil(chunk_rows) as u32)
}

impl Cuda {
    /// Launches the flat kernel `<op>_<dir>_<E>(FlatParams, bufs...)` over `p.n` elements.
    fn launch_flat<E: CudaElem>(
        &self,
        op: &str,
        dir: &str,
        p: FlatParams,
        ins: &[&CudaBuf<E>],
        outs: &mut [&mut CudaBuf<E>],
    ) -> Result<()> {
        if p.n == 0 {
            return Ok(());
        }
        let mut b = Launch::new("elementwise", symbol::<E>(op, dir));
        b.arg(&p);
        for x in ins {
            b.arg(*x);
        }
        for y in outs.iter_mut() {
            b.arg(&mut **y);
        }
        // SAFETY: every flat kernel takes (FlatParams, const T* inputs..., T* outputs...) in the
        // order the callers below pass them; each buffer was checked to hold p.n elements and
        // the kernel touches indices < p.n only.
        unsafe { self.launch(b, grid_1d(p.n as usize, BLOCK)) }?;
        Ok(())
    }

    /// Launches `<op>_<dir>_<E>(P, const T* src, T* dst)` with `cfg`.
    fn launch_two<E: CudaElem, P: KernelArg>(
        &self,
        op: &str,
        dir: &str,
        p: &P,
        src: &CudaBuf<E>,
        dst: &mut CudaBuf<E>,
        cfg: LaunchConfig,
    ) -> Result<()> {
        let mut b = Launch::new("elementwise", symbol::<E>(op, dir));
        b.arg(p).arg(src).arg(dst);
        // SAFETY: the callers pass the kernel's own params struct and the (src, dst) buffers its
        // signature names; their lengths were checked against p by the callers, and the kernels
        // index within the shapes p describes.
        unsafe { self.launch(b, cfg) }?;
        Ok(())
    }

    /// `dbias += sum_rows dy`: partials per chunk of rows, then the chunks in order.
    fn bias_grad_launch<E: CudaElem>(&self, p: &BiasParams, dy: &CudaBuf<E>, dbias: &mut CudaBuf<f32>) -> Result<()> {
        let (chunk_rows, chunks) = bias_chunks(p.rows);
        let mut part = self.zeros::<f32>(chunks as usize * p.cols as usize)?;
        let mut b = Launch::new("elementwise", symbol::<E>("add_bias", "bwd_partials"));
        b.arg(p).arg(&chunk_rows).arg(dy).arg(&mut part);
        let gx = p.cols.div_ceil(BIAS_PART_COLS as u64) as u32;
        let cfg = LaunchConfig {
            grid_dim: (gx, chunks, 1),
            block_dim: (BIAS_PART_COLS, BIAS_PART_ROWS, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches add_bias_bwd_partials_<E>(BiasParams, u64 chunk_rows, const T* dy [rows, cols],
        // float* part [chunks, cols]); block y < chunks covers rows < chunks*chunk_rows, clipped to p.rows.
        unsafe { self.launch(b, cfg) }?;

        let mut b = Launch::new("elementwise", "add_bias_bwd_reduce_f32");
        b.arg(p).arg(&chunks).arg(&part).arg(dbias);
        // SAFETY: matches add_bias_bwd_reduce_f32(BiasParams, u32 chunks, const float* part [chunks, cols],
        // float* dbias [cols]); one thread per column c < p.cols.
        unsafe { self.launch(b, grid_1d(p.cols as usize, BLOCK)) }?;
        Ok(())
    }

    /// The column copy kernel `<op>_<dir>_<E>(ColsParams, src, dst)` over `[rows, width]`.
    fn cols<E: CudaElem>(
        &self,
        p: &ColsParams,
        op: &str,
        dir: &str,
        src: &CudaBuf<E>,
        dst: &mut CudaBuf<E>,
    ) -> Result<()> {
        if p.rows == 0 || p.width == 0 {
            return Ok(());
        }
        self.launch_two(op, dir, p, src, dst, grid_cols_rows(p.width, p.rows, MAX_GRID_X))
    }

    /// Launches `sum_rows_masked_mean_<dir>_<E>` with its buffers in the kernel's order:
    /// `(x, mask, y)` forward, `(mask, dy, dx)` backward.
    fn launch_pool<E: CudaElem>(
        &self,
        dir: &str,
        p: &PoolParams,
        cfg: LaunchConfig,
        args: PoolArgs<'_, E>,
    ) -> Result<()> {
        let mut b = Launch::new("elementwise", symbol::<E>("sum_rows_masked_mean", dir));
        b.arg(p);
        match args {
            PoolArgs::Fwd { x, mask, y } => b.arg(x).arg(mask).arg(y),
            PoolArgs::Bwd { mask, dy, dx } => b.arg(mask).arg(dy).arg(dx),
        };
        // SAFETY: forward matches sum_rows_masked_mean_fwd_<E>(PoolParams, const T* x, const u8* mask, T* y),
        // backward sum_rows_masked_mean_bwd_<E>(PoolParams, const u8* mask, const T* dy, T* dx); lengths
        // were checked against p by the callers; kernels index b < batch, t < seq, h < hidden only.
        unsafe { self.launch(b, cfg) }?;
        Ok(())
    }
}

/// The buffers of one pooling launch.
enum PoolArgs<'a, E> {
    Fwd { x: &'a CudaBuf<E>, mask: &'a CudaBuf<u8>, y: &'a mut CudaBuf<E> },
    Bwd { mask: &'a CudaBuf<u8>, dy: &'a CudaBuf<E>, dx: &'a mut CudaBuf<E> },
}

fn flat(n: usize, s: f32) -> FlatParams {
    FlatParams { n: n as u64, s, _pad: 0 }
}

impl<E: CudaElem> ElementwiseKernel<E> for Cuda {
    fn add_fwd(&self, a: &CudaBuf<E>, b: &CudaBuf<E>, y: &mut CudaBuf<E>) -> Result<()> {
        let n = check_flat("add", ("a", a.len()), &[("b", b.len()), ("y", y.len())])?;
        self.launch_flat("add", "fwd", flat(n, 1.0), &[a, b], &mut [y])
    }

    fn add_bwd(&self, dy: &CudaBuf<E>, da: &mut CudaBuf<E>, db: &mut CudaBuf<E>) -> Result<()> {
        let n = check_flat("add", ("dy", dy.len()), &[("da", da.len()), ("db", db.len())])?;
        self.launch_flat("add", "bwd", flat(n, 1.0), &[dy], &mut [da, db])
    }

    fn mul_fwd(&self, a: &CudaBuf<E>, b: &CudaBuf<E>, y: &mut CudaBuf<E>) -> Result<()> {
        let n = check_flat("mul", ("a", a.len()), &[("b", b.len()), ("y", y.len())])?;
        self.launch_flat("mul", "fwd", flat(n, 1.0), &[a, b], &mut [y])
    }

    fn mul_bwd(
        &self,
        a: &CudaBuf<E>,
        b: &CudaBuf<E>,
        dy: &CudaBuf<E>,
        da: &mut CudaBuf<E>,
        db: &mut CudaBuf<E>,
    ) -> Result<()> {
        let others = [("b", b.len()), ("dy", dy.len()), ("da", da.len()), ("db", db.len())];
        let n = check_flat("mul", ("a", a.len()), &others)?;
        self.launch_flat("mul", "bwd", flat(n, 1.0), &[a, b, dy], &mut [da, db])
    }

    fn scale_fwd(&self, s: f64, a: &CudaBuf<E>, y: &mut CudaBuf<E>) -> Result<()> {
        let n = check_flat("scale", ("a", a.len()), &[("y", y.len())])?;
        self.launch_flat("scale", "fwd", flat(n, s as f32), &[a], &mut [y])
    }

    fn scale_bwd(&self, s: f64, dy: &CudaBuf<E>, da: &mut CudaBuf<E>) -> Result<()> {
        let n = check_flat("scale", ("dy", dy.len()), &[("da", da.len())])?;
        self.launch_flat("scale", "bwd", flat(n, s as f32), &[dy], &mut [da])
    }

    fn tanh_fwd(&self, x: &CudaBuf<E>, y: &mut CudaBuf<E>) -> Result<()> {
        let n = check_flat("tanh", ("x", x.len()), &[("y", y.len())])?;
        self.launch_flat("tanh", "fwd", flat(n, 1.0), &[x], &mut [y])
    }

    fn tanh_bwd(&self, y: &CudaBuf<E>, dy: &CudaBuf<E>, dx: &mut CudaBuf<E>) -> Result<()> {
        let n = check_flat("tanh", ("y", y.len()), &[("dy", dy.len()), ("dx", dx.len())])?;
        self.launch_flat("tanh", "bwd", flat(n, 1.0), &[y, dy], &mut [dx])
    }

    fn add_bias_fwd(&self, p: &BiasParams, x: &CudaBuf<E>, bias: &CudaBuf<E>, y: &mut CudaBuf<E>) -> Result<()> {
        check_bias(p, &[("x", x.len(), false), ("bias", bias.len(), true), ("y", y.len(), false)])?;
        if y.is_empty() {
            return Ok(());
        }
        let mut b = Launch::new("elementwise", symbol::<E>("add_bias", "fwd"));
        b.arg(p).arg(x).arg(bias).arg(y);
        // SAFETY: matches add_bias_fwd_<E>(BiasParams, const T* x, const T* bias, T* y); lengths checked
        // above; threads touch columns c < cols of rows r < rows only.
        unsafe { self.launch(b, grid_cols_rows(p.cols, p.rows, MAX_GRID_X)) }?;
        Ok(())
    }

    fn add_bias_bwd(
        &self,
        p: &BiasParams,
        dy: &CudaBuf<E>,
        dx: &mut CudaBuf<E>,
        dbias: &mut CudaBuf<f32>,
    ) -> Result<()> {
        check_bias(p, &[("dy", dy.len(), false), ("dx", dx.len(), false), ("dbias", dbias.len(), true)])?;
        if dy.is_empty() {
            return Ok(());
        }
        // dx += dy is scale's backward with s = 1 (exact).
        self.launch_flat("scale", "bwd", flat(dy.len(), 1.0), &[dy], &mut [dx])?;
        self.bias_grad_launch(p, dy, dbias)
    }

    fn bias_grad(&self, p: &BiasParams, dy: &CudaBuf<E>, dbias: &mut CudaBuf<f32>) -> Result<()> {
        check_bias(p, &[("dy", dy.len(), false), ("dbias", dbias.len(), true)])?;
        if dy.is_empty() {
            return Ok(());
        }
        self.bias_grad_launch(p, dy, dbias)
    }

    fn add_bias_inplace(&self, p: &BiasParams, bias: &CudaBuf<E>, y: &mut CudaBuf<E>) -> Result<()> {
        check_bias(p, &[("bias", bias.len(), true), ("y", y.len(), false)])?;
        if y.is_empty() {
            return Ok(());
        }
        let mut b = Launch::new("elementwise", symbol::<E>("add_bias", "inplace"));
        b.arg(p).arg(bias).arg(y);
        // SAFETY: matches add_bias_inplace_<E>(BiasParams, const T* bias, T* y); lengths checked
        // above; each thread reads and then writes its own elements of y only.
        unsafe { self.launch(b, grid_cols_rows(p.cols, p.rows, MAX_GRID_X)) }?;
        Ok(())
    }

    fn slice_cols_fwd(&self, p: &ColsParams, x: &CudaBuf<E>, y: &mut CudaBuf<E>) -> Result<()> {
        check_cols("slice_cols", p, ("x", x.len()), ("y", y.len()))?;
        self.cols(p, "slice_cols", "fwd", x, y)
    }

    fn slice_cols_bwd(&self, p: &ColsParams, dy: &CudaBuf<E>, dx: &mut CudaBuf<E>) -> Result<()> {
        check_cols("slice_cols", p, ("dx", dx.len()), ("dy", dy.len()))?;
        self.cols(p, "slice_cols", "bwd", dy, dx)
    }

    fn concat_cols_fwd(&self, p: &ColsParams, x: &CudaBuf<E>, y: &mut CudaBuf<E>) -> Result<()> {
        check_cols("concat_cols", p, ("y", y.len()), ("x", x.len()))?;
        self.cols(p, "concat_cols", "fwd", x, y)
    }

    fn concat_cols_bwd(&self, p: &ColsParams, dy: &CudaBuf<E>, dx: &mut CudaBuf<E>) -> Result<()> {
        check_cols("concat_cols", p, ("dy", dy.len()), ("dx", dx.len()))?;
        self.cols(p, "concat_cols", "bwd", dy, dx)
    }

    fn sum_rows_masked_mean_fwd(
        &self,
        p: &PoolParams,
        x: &CudaBuf<E>,
        mask: &CudaBuf<u8>,
        y: &mut CudaBuf<E>,
    ) -> Result<()> {
        check_pool(p, ("x", x.len()), ("y", y.len()), mask.len())?;
        if y.is_empty() {
            return Ok(());
        }
        let cfg = grid_cols_rows(p.hidden, p.batch, MAX_GRID_X);
        self.launch_pool("fwd", p, cfg, PoolArgs::Fwd { x, mask, y })
    }

    fn sum_rows_masked_mean_bwd(
        &self,
        p: &PoolParams,
        mask: &CudaBuf<u8>,
        dy: &CudaBuf<E>,
        dx: &mut CudaBuf<E>,
    ) -> Result<()> {
        check_pool(p, ("dx", dx.len()), ("dy", dy.len()), mask.len())?;
        if dx.is_empty() {
            return Ok(());
        }
        let cfg = grid_cols_rows(p.seq * p.hidden, p.batch, POOL_BWD_MAX_BLOCKS_X);
        self.launch_pool("bwd", p, cfg, PoolArgs::Bwd { mask, dy, dx })
    }
}
