//! No low-precision frozen base on CUDA: there the frozen weights go bf16 through the
//! mixed-precision design (cuBLASLt, bf16 in, fp32 accumulate). Both products say so.

use super::{check, LowpKernel, PackedWeight};
use crate::cuda::{Cuda, CudaBuf, CudaElem};
use crate::error::{Error, Result};

fn unsupported(dev: &Cuda, w: &PackedWeight) -> Error {
    Error::Unsupported {
        op: "lowp_linear",
        device: crate::Backend::device_name(dev),
        msg: format!("a {} frozen base (--base-precision) is CPU-only; keep f32 on CUDA", w.precision()),
    }
}

impl<E: CudaElem> LowpKernel<E> for Cuda {
    fn lowp_linear_fwd(&self, w: &PackedWeight, m: usize, x: &CudaBuf<E>, y: &mut CudaBuf<E>) -> Result<()> {
        check(w, m, ("x", x.len()), ("y", y.len()), true)?;
        Err(unsupported(self, w))
    }
    fn lowp_linear_bwd(&self, w: &PackedWeight, m: usize, dy: &CudaBuf<E>, dx: &mut CudaBuf<E>) -> Result<()> {
        check(w, m, ("dy", dy.len()), ("dx", dx.len()), false)?;
        Err(unsupported(self, w))
    }
}
