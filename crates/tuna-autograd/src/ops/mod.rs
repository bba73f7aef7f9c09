//! Differentiable ops: one module per kernel family, each a thin rule over `tuna_kernels`.
//!
//! The pattern every op follows: compute the forward with the kernel; then, through
//! [`graph::output`](crate::graph), record a backward only if an input needs a gradient, saving
//! (with [`Saved`](crate::graph)) only the tensors the backward will read for the inputs that
//! need one, and counting each backward kernel launch by kind.

pub mod act;

use crate::error::Result;
use crate::tensor::Float;
use tuna_kernels::ops::gelu::GeluKernel;
use tuna_kernels::ops::swiglu::SwigluKernel;
use tuna_kernels::Alloc;

/// Every kernel an autograd op may call, for element type `E`: implemented by `Cpu` (f32, f64)
/// and `Cuda` (f32).
pub trait Kernels<E: Float>: Alloc<E> + GeluKernel<E> + SwigluKernel<E> + 'static {}

impl<B, E: Float> Kernels<E> for B where B: Alloc<E> + GeluKernel<E> + SwigluKernel<E> + 'static {}

/// `n` zeros of `E` on `dev`.
pub(crate) fn zeros<B: Alloc<E>, E: Float>(dev: &B, n: usize) -> Result<B::Owned> {
    Ok(dev.zeros(n)?)
}
