//! Differentiable ops: one module per kernel family, each a thin rule over `tuna_kernels`.
//!
//! The pattern every op follows: compute the forward with the kernel; then, through
//! [`graph::output`](crate::graph), record a backward only if an input needs a gradient, saving
//! (with [`Saved`](crate::graph)) only the tensors the backward will read for the inputs that
//! need one, and counting each backward kernel launch by kind.

pub mod act;
pub mod attention;
pub mod elem;
pub mod embed;
pub mod linear;
pub mod loss;
pub mod lowp;
pub mod norm;
pub mod rope;
pub mod shape;

use crate::error::Result;
use crate::tensor::{Float, GradCell};
use tuna_kernels::ops::attention::AttentionKernel;
use tuna_kernels::ops::cross_entropy::CrossEntropyKernel;
use tuna_kernels::ops::elementwise::ElementwiseKernel;
use tuna_kernels::ops::embedding::EmbeddingKernel;
use tuna_kernels::ops::gelu::GeluKernel;
use tuna_kernels::ops::grad::GradKernel;
use tuna_kernels::ops::layernorm::LayerNormKernel;
use tuna_kernels::ops::lowp::LowpKernel;
use tuna_kernels::ops::matmul::MatmulKernel;
use tuna_kernels::ops::rmsnorm::RmsNormKernel;
use tuna_kernels::ops::rope::RopeKernel;
use tuna_kernels::ops::swiglu::SwigluKernel;
use tuna_kernels::Alloc;

/// Every kernel an autograd op may call, for element type `E`: implemented by `Cpu` (f32, f64)
/// and `Cuda` (f32).
pub trait Kernels<E: Float>:
    Alloc<E>
    + Alloc<u32>
    + Alloc<i32>
    + Alloc<u8>
    + AttentionKernel<E>
    + CrossEntropyKernel<E>
    + ElementwiseKernel<E>
    + EmbeddingKernel<E>
    + GeluKernel<E>
    + GradKernel<E>
    + LayerNormKernel<E>
    + LowpKernel<E>
    + MatmulKernel<E>
    + RmsNormKernel<E>
    + RopeKernel<E>
    + SwigluKernel<E>
    + 'static
{
}

impl<B, E: Float> Kernels<E> for B where
    B: Alloc<E>
        + Alloc<u32>
        + Alloc<i32>
        + Alloc<u8>
        + AttentionKernel<E>
        + CrossEntropyKernel<E>
        + ElementwiseKernel<E>
        + EmbeddingKernel<E>
        + GeluKernel<E>
        + GradKernel<E>
        + LayerNormKernel<E>
        + LowpKernel<E>
        + MatmulKernel<E>
        + RmsNormKernel<E>
        + RopeKernel<E>
        + SwigluKernel<E>
        + 'static
{
}

/// `n` zeros of `E` on `dev`.
pub(crate) fn zeros<B: Alloc<E>, E: Float>(dev: &B, n: usize) -> Result<B::Owned> {
    Ok(dev.zeros(n)?)
}

/// A host copy of an `E` buffer.
pub(crate) fn host<B: Alloc<E>, E: Float>(dev: &B, o: &B::Owned) -> Result<Vec<E>> {
    Ok(dev.to_host(o)?)
}

/// An `E` buffer holding `values`.
pub(crate) fn upload<B: Alloc<E>, E: Float>(dev: &B, values: &[E]) -> Result<B::Owned> {
    Ok(dev.from_host(values)?)
}

/// Where a backward kernel writes one input's gradient: that input's gradient buffer (allocated
/// zeroed at first use), or a scratch buffer when the input needs no gradient but the kernel
/// writes one anyway, or a scratch buffer added to the input's gradient by
/// [`GradSlot::finish`] when another slot of the same kernel already holds that gradient (one
/// tensor passed as two inputs: `swiglu(&x, &x)`, attention with `k = v`).
pub(crate) enum GradSlot<'a, B: Alloc<E>, E: Float> {
    Cell(std::cell::RefMut<'a, Option<B::Owned>>),
    Scratch(B::Owned),
    Deferred(std::rc::Rc<GradCell<B, E>>, B::Owned),
}

impl<'a, B: Alloc<E>, E: Float> GradSlot<'a, B, E> {
    /// `n` sizes the scratch of an input without a gradient; a gradient cell knows its own length.
    pub(crate) fn new(dev: &B, cell: &'a Option<std::rc::Rc<GradCell<B, E>>>, n: usize) -> Result<Self> {
        Ok(match cell {
            Some(c) => match c.buf.try_borrow_mut() {
                Ok(mut g) => {
                    c.ensure(dev, &mut g)?;
                    GradSlot::Cell(g)
                }
                // Another slot of this kernel holds the same gradient: the same tensor is two inputs.
                Err(_) => GradSlot::Deferred(c.clone(), dev.zeros(c.len)?),
            },
            None => GradSlot::Scratch(dev.zeros(n)?),
        })
    }
    /// The slot of an input's gradient if it needs one, else `None` (the kernel skips it).
    pub(crate) fn optional(dev: &B, cell: &'a Option<std::rc::Rc<GradCell<B, E>>>, n: usize) -> Result<Option<Self>> {
        cell.as_ref().map(|_| Self::new(dev, cell, n)).transpose()
    }
    pub(crate) fn buf(&mut self) -> &mut B::Buf<E> {
        match self {
            GradSlot::Cell(g) => B::buf_mut(g.as_mut().expect("allocated in new")),
            GradSlot::Scratch(o) | GradSlot::Deferred(_, o) => B::buf_mut(o),
        }
    }
}

impl<B: Kernels<E>, E: Float> GradSlot<'_, B, E> {
    /// After the kernel: release every slot, then add each deferred scratch into its gradient.
    pub(crate) fn finish(dev: &B, slots: impl IntoIterator<Item = Option<Self>>) -> Result<()> {
        let mut deferred = Vec::new();
        for s in slots.into_iter().flatten() {
            if let GradSlot::Deferred(c, o) = s {
                deferred.push((c, o));
            }
        }
        for (c, o) in deferred {
            c.accumulate(dev, |d| Ok(dev.grad_accumulate(d, B::buf(&o), <E as tuna_kernels::CpuFloat>::c(1.0))?))?;
        }
        Ok(())
    }
}
