//! A linear layer over a frozen low-precision weight ([`PackedWeight`]: bf16, int8 or q4, CPU): the
//! forward `x W^T` and, when `x` needs a gradient, the backward `dx += dy W`. The weight is a
//! constant, so nothing is saved but a handle to it: no activation is kept for this product.

use super::elem::add_bias;
use super::{zeros, Kernels};
use crate::error::{Error, Result};
use crate::graph::{launched, output};
use crate::tensor::{Float, Tensor};
use std::sync::Arc;
pub use tuna_kernels::ops::lowp::{
    BasePrecision, CpuMatrixFeatures, LowpKernel, MatrixPath, PackedWeight, Q4Format, Q4_BLOCK,
};

/// `x W^T (+ bias)` over the last dim of `x` (`[.., in] -> [.., out]`) with a packed frozen weight.
/// Op kind `matmul (bf16 base)`, `matmul (int8 base)` or `matmul (q4 base)` (its own row in
/// `tuna profile`); backward kind `linear.dX` (as a frozen f32 linear's), and `add_bias.*`.
pub fn linear_packed<B: Kernels<E>, E: Float>(
    x: &Tensor<B, E>,
    w: &Arc<PackedWeight>,
    bias: Option<&Tensor<B, E>>,
) -> Result<Tensor<B, E>> {
    let (out, inp) = (w.out_features(), w.in_features());
    if x.shape().last() != Some(&inp) {
        return Err(Error::Shape {
            op: "linear_packed",
            what: "x's last dim vs the weight's input dim",
            left: x.shape().to_vec(),
            right: vec![out, inp],
        });
    }
    let m = x.numel() / inp;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("checked non-empty") = out;
    let dev = x.device();
    let mut y = zeros::<B, E>(dev, m * out)?;
    dev.lowp_linear_fwd(w, m, &x.buf(), B::buf_mut(&mut y))?;
    let kind = match w.precision() {
        BasePrecision::Bf16 => "matmul (bf16 base)",
        BasePrecision::Int8 => "matmul (int8 base)",
        BasePrecision::Q4 => "matmul (q4 base)",
        BasePrecision::F32 => "matmul",
    };
    let flops = 2.0 * (m * out * inp) as f64;
    crate::stats::flops(kind, false, flops);
    let y = output(kind, &[x], dev, shape, y, |g_out, _| {
        let (cx, dev, w) = (x.cell(), dev.clone(), w.clone());
        Box::new(move || {
            let Some(g) = g_out.take() else { return Ok(()) };
            if let Some(cx) = &cx {
                launched("linear.dX");
                crate::stats::flops(kind, true, flops);
                cx.accumulate(&dev, |dx| Ok(dev.lowp_linear_bwd(&w, m, B::buf(&g), dx)?))?;
            }
            Ok(())
        })
    });
    match bias {
        Some(b) => add_bias(&y, b),
        None => Ok(y),
    }
}
