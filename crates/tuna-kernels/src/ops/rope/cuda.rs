//! RoPE on CUDA: launch glue for `kernels/rope.cu` (one block per token, the token's cos/sin in
//! dynamic shared memory).

use super::{check, RopeKernel, RopeParams};
use crate::cuda::{grid_rows, symbol, Cuda, CudaElem};
use crate::cuda::{CudaBuf, KernelArg, Launch};
use crate::error::{Error, Result};
use cudarc::driver::LaunchConfig;

// SAFETY: #[repr(C)] plain-old-data mirrored field by field by `struct RopeParams` in rope.cu.
unsafe impl KernelArg for RopeParams {}

const BLOCK: u32 = 128;
/// Largest head_dim whose cos/sin fit the default 48 KiB of dynamic shared memory.
const MAX_HEAD_DIM: u32 = 12 * 1024;

/// Launch `rope_<dir>_<E>`: `out = R in` (fwd) or `out += R^T in` (bwd); lengths already checked.
fn launch<E: CudaElem>(
    dev: &Cuda,
    dir: &str,
    p: &RopeParams,
    pos: &CudaBuf<u32>,
    inp: &CudaBuf<E>,
    out: &mut CudaBuf<E>,
) -> Result<()> {
    if p.head_dim > MAX_HEAD_DIM {
        let msg = format!("head_dim {} > {MAX_HEAD_DIM}", p.head_dim);
        return Err(Error::Unsupported { op: "rope", device: crate::Backend::device_name(dev), msg });
    }
    if p.tokens() == 0 {
        return Ok(());
    }
    // One block per token: grid_rows casts to u32, and grid.x is at most 2^31 - 1.
    if p.tokens() > i32::MAX as usize {
        let msg = format!("{} tokens > {} (one block per token)", p.tokens(), i32::MAX);
        return Err(Error::Unsupported { op: "rope", device: crate::Backend::device_name(dev), msg });
    }
    let cfg: LaunchConfig = grid_rows(p.tokens(), BLOCK, p.head_dim * 4);
    let mut b = Launch::new("rope", symbol::<E>("rope", dir));
    b.arg(p).arg(pos).arg(inp).arg(out);
    // SAFETY: arguments match rope_<dir>_<E>(RopeParams, const u32* pos, const T* in, T* out);
    // pos has batch*seq entries and in/out batch*seq*heads*head_dim (checked by the caller),
    // one block per token, and head_dim floats of dynamic shared memory as the kernel uses.
    unsafe { dev.launch(b, cfg) }?;
    Ok(())
}

impl<E: CudaElem> RopeKernel<E> for Cuda {
    fn rope_fwd(&self, p: &RopeParams, pos: &CudaBuf<u32>, x: &CudaBuf<E>, y: &mut CudaBuf<E>) -> Result<()> {
        check(p, pos.len(), &[("x", x.len()), ("y", y.len())])?;
        launch(self, "fwd", p, pos, x, y)
    }

    fn rope_bwd(&self, p: &RopeParams, pos: &CudaBuf<u32>, dy: &CudaBuf<E>, dx: &mut CudaBuf<E>) -> Result<()> {
        check(p, pos.len(), &[("dy", dy.len()), ("dx", dx.len())])?;
        launch(self, "bwd", p, pos, dy, dx)
    }
}
