//! Gradient bookkeeping around the optimizer step: zeroing, the fused scale-and-accumulate of
//! micro-batch gradients into the accumulator type, casting masters to the compute type, the
//! global gradient norm, and clipping by it without a host round trip.
//!
//! A training step with clipping runs, on the device's stream and with no host sync:
//! `grad_zero(acc)`; `grad_sq_norm_acc(g, acc)` for every parameter gradient `g`; then
//! `grad_clip(acc, max_norm, g)` for every `g`, each reading the norm from `acc` on the device.
//! The clip factor is `min(1, max_norm / (sqrt(acc) + 1e-6))` (PyTorch's `clip_grad_norm_`); a
//! NaN norm gives factor 1 (the gradients are left as they are, NaN included).
//!
//! These are not forward/backward ops: their kernel symbols are `grad_<accumulate|cast>_<f32|bf16>`
//! and `grad_<sqnorm|clip>_f32`. [`GradKernel`] is generic over the source/destination element
//! type E, with masters and gradients in `E::Acc` (CPU: E = f32 or f64, `E::Acc = E`; CUDA: f32
//! and bf16, `E::Acc = f32`). [`GradNormKernel`] is generic over the gradients' float type (CPU:
//! f32 and f64; CUDA: f32 only).

mod cpu;
mod cuda;
#[cfg(test)]
mod tests;

use crate::backend::{Backend, CpuFloat, Elem};
use crate::error::{check_len, Error, Result};

/// The `1e-6` added to the norm before dividing, as PyTorch's `clip_grad_norm_`.
pub const CLIP_EPS: f32 = 1e-6;

/// Kernel parameters, mirrored by `struct GradParams` in `kernels/grad.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradParams {
    pub n: u64,
    /// Factor of `grad_accumulate`.
    pub scale: f32,
    /// Norm limit of `grad_clip`.
    pub max_norm: f32,
}

/// Accumulation and casting between gradients/masters (`E::Acc`) and element type `E`.
pub trait GradKernel<E: Elem>: Backend {
    /// `dst += scale * src` (`dst` and `scale` in `E::Acc`, `src` E), for micro-batch gradients.
    fn grad_accumulate(&self, dst: &mut Self::Buf<E::Acc>, src: &Self::Buf<E>, scale: E::Acc) -> Result<()>;
    /// `dst = src` converted to E (round to nearest even for bf16), e.g. bf16 copies of f32 masters.
    fn cast(&self, src: &Self::Buf<E::Acc>, dst: &mut Self::Buf<E>) -> Result<()>;
}

/// Zeroing, global norm and clipping of gradients of float type `F`.
pub trait GradNormKernel<F: Elem>: Backend {
    /// `dst = 0`.
    fn grad_zero(&self, dst: &mut Self::Buf<F>) -> Result<()>;
    /// `acc[0] += sum(src^2)`; call once per parameter tensor.
    fn grad_sq_norm_acc(&self, src: &Self::Buf<F>, acc: &mut Self::Buf<F>) -> Result<()>;
    /// `dst *= min(1, max_norm / (sqrt(acc[0]) + 1e-6))`, with `acc` read where it lives.
    fn grad_clip(&self, acc: &Self::Buf<F>, max_norm: F, dst: &mut Self::Buf<F>) -> Result<()>;
}

/// The clip factor for a squared norm `sq` (for f32, the same arithmetic as `grad.cu`).
pub fn clip_factor<F: CpuFloat>(sq: F, max_norm: F) -> F {
    // F::c(1e-6) is CLIP_EPS for f32, and exactly PyTorch's 1e-6 for f64.
    (max_norm / (sq.sqrt() + F::c(1e-6))).min(F::one())
}

/// Checks `grad_accumulate`'s lengths and scale (given in f64 whatever the device's type).
fn check_accumulate<B: Backend + ?Sized, E: Elem>(
    dst: &B::Buf<E::Acc>,
    src: &B::Buf<E>,
    scale: f64,
) -> Result<GradParams> {
    let n = B::len(dst);
    check_len("grad_accumulate", "src", B::len(src), n, || format!("same length as dst ({n})"))?;
    if !scale.is_finite() {
        return Err(Error::Invalid { op: "grad_accumulate", msg: format!("scale {scale} is not finite") });
    }
    Ok(GradParams { n: n as u64, scale: scale as f32, max_norm: 0.0 })
}

fn check_cast<B: Backend + ?Sized, E: Elem>(src: &B::Buf<E::Acc>, dst: &B::Buf<E>) -> Result<GradParams> {
    let n = B::len(src);
    check_len("cast", "dst", B::len(dst), n, || format!("same length as src ({n})"))?;
    Ok(GradParams { n: n as u64, scale: 1.0, max_norm: 0.0 })
}

fn check_acc(op: &'static str, acc_len: usize) -> Result<()> {
    check_len(op, "acc", acc_len, 1, || "one element: the running sum of squares".into())
}

/// Checks `grad_clip`'s `acc` and `max_norm` (given in f64 whatever the device's type).
fn check_clip(acc_len: usize, max_norm: f64, n: usize) -> Result<GradParams> {
    check_acc("grad_clip", acc_len)?;
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::Invalid {
            op: "grad_clip",
            msg: format!("max_norm {max_norm} must be positive and finite"),
        });
    }
    Ok(GradParams { n: n as u64, scale: 1.0, max_norm: max_norm as f32 })
}
