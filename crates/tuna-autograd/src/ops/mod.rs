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
use crate::tensor::{same_mut, AccBuf, AccOwned, Float, GradCell};
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

/// Every kernel an autograd op may call, for element type `E` (and its accumulator type `E::Acc`):
/// implemented by `Cpu` (f32, f64) and `Cuda` (f32, bf16).
pub trait Kernels<E: Float>:
    Alloc<E>
    + Alloc<E::Acc>
    + ElementwiseKernel<E::Acc>
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
        + Alloc<E::Acc>
        + ElementwiseKernel<E::Acc>
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

/// A buffer of `n` elements that one kernel writes in full before anything reads it (a forward's
/// output, or a copy made to be handed on as a gradient): [`Alloc::unfilled`], CUDA skips the
/// zeroing pass, the CPU still zeroes. Never for anything a kernel accumulates (`+=`) into.
pub(crate) fn unfilled<B: Alloc<E>, E: Float>(dev: &B, n: usize) -> Result<B::Owned> {
    Ok(dev.unfilled(n)?)
}

/// [`unfilled`] in `E::Acc` (row statistics a forward writes for every row).
pub(crate) fn acc_unfilled<B: Kernels<E>, E: Float>(dev: &B, n: usize) -> Result<AccOwned<B, E>> {
    Ok(Alloc::<E::Acc>::unfilled(dev, n)?)
}

/// `n` zeros of `E::Acc` on `dev` (statistics, parameter gradients).
pub(crate) fn acc_zeros<B: Kernels<E>, E: Float>(dev: &B, n: usize) -> Result<AccOwned<B, E>> {
    Ok(Alloc::<E::Acc>::zeros(dev, n)?)
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
/// [`GradSlot::finish`] when the gradient cannot be written directly: another slot of the same
/// kernel already holds it (one tensor passed as two inputs: `swiglu(&x, &x)`, attention with
/// `k = v`), or it is a mixed-precision leaf's `E::Acc` gradient (the `E` scratch is widened into
/// it).
pub(crate) enum GradSlot<'a, B: Alloc<E>, E: Float> {
    Cell(std::cell::RefMut<'a, Option<B::Owned>>),
    Scratch(B::Owned),
    Deferred(std::rc::Rc<GradCell<B, E>>, B::Owned),
}

impl<'a, B: Kernels<E>, E: Float> GradSlot<'a, B, E> {
    /// `n` sizes the scratch of an input without a gradient; a gradient cell knows its own length.
    pub(crate) fn new(dev: &B, cell: &'a Option<std::rc::Rc<GradCell<B, E>>>, n: usize) -> Result<Self> {
        Ok(match cell {
            Some(c) if c.acc_mode => GradSlot::Deferred(c.clone(), zeros::<B, E>(dev, c.len)?),
            Some(c) => match c.buf.try_borrow_mut() {
                Ok(mut g) => {
                    c.ensure(dev, &mut g)?;
                    GradSlot::Cell(g)
                }
                // Another slot of this kernel holds the same gradient: the same tensor is two inputs.
                Err(_) => GradSlot::Deferred(c.clone(), zeros::<B, E>(dev, c.len)?),
            },
            None => GradSlot::Scratch(zeros::<B, E>(dev, n)?),
        })
    }
    pub(crate) fn buf(&mut self) -> &mut B::Buf<E> {
        match self {
            GradSlot::Cell(g) => <B as Alloc<E>>::buf_mut(g.as_mut().expect("allocated in new")),
            GradSlot::Scratch(o) | GradSlot::Deferred(_, o) => <B as Alloc<E>>::buf_mut(o),
        }
    }

    /// After the kernel: release every slot, then add each deferred scratch into its gradient.
    pub(crate) fn finish(dev: &B, slots: impl IntoIterator<Item = Option<Self>>) -> Result<()> {
        finish_slots(dev, slots, std::iter::empty())
    }
}

/// [`GradSlot`] for a gradient the kernel writes in `E::Acc` (a norm's weight, a bias, an
/// embedding table, prefix keys and values): the gradient buffer itself where it is in `E::Acc`
/// (a mixed-precision leaf, any f32/f64 tensor), else an `E::Acc` scratch added (rounded to `E`)
/// after the kernel (a bf16 activation, or the same tensor in two slots).
pub(crate) enum AccSlot<'a, B: Kernels<E>, E: Float> {
    Cell(std::cell::RefMut<'a, AccOwned<B, E>>),
    Scratch(AccOwned<B, E>),
    Deferred(std::rc::Rc<GradCell<B, E>>, AccOwned<B, E>),
}

impl<'a, B: Kernels<E>, E: Float> AccSlot<'a, B, E> {
    /// `n` sizes the scratch of an input without a gradient.
    pub(crate) fn new(dev: &B, cell: &'a Option<std::rc::Rc<GradCell<B, E>>>, n: usize) -> Result<Self> {
        let scratch = |len| -> Result<AccOwned<B, E>> { Ok(Alloc::<E::Acc>::zeros(dev, len)?) };
        let Some(c) = cell else { return Ok(AccSlot::Scratch(scratch(n)?)) };
        if c.acc_mode {
            if let Ok(mut a) = c.acc.try_borrow_mut() {
                if a.is_none() {
                    *a = Some(Box::new(scratch(c.len)?));
                }
                return Ok(AccSlot::Cell(std::cell::RefMut::map(a, |a| {
                    a.as_mut().expect("just set").downcast_mut::<AccOwned<B, E>>().expect("an E::Acc buffer")
                })));
            }
        } else if E::ACC_IS_SELF {
            if let Ok(mut g) = c.buf.try_borrow_mut() {
                c.ensure(dev, &mut g)?;
                return Ok(AccSlot::Cell(std::cell::RefMut::map(g, |g| {
                    same_mut::<<B as Alloc<E>>::Owned, AccOwned<B, E>>(g.as_mut().expect("just set"))
                        .expect("E::Acc is E")
                })));
            }
        }
        Ok(AccSlot::Deferred(c.clone(), scratch(c.len)?))
    }
    /// The slot of an input's gradient if it needs one, else `None` (the kernel skips it).
    pub(crate) fn optional(dev: &B, cell: &'a Option<std::rc::Rc<GradCell<B, E>>>, n: usize) -> Result<Option<Self>> {
        cell.as_ref().map(|_| Self::new(dev, cell, n)).transpose()
    }
    pub(crate) fn buf(&mut self) -> &mut AccBuf<B, E> {
        match self {
            AccSlot::Cell(g) => <B as Alloc<E::Acc>>::buf_mut(g),
            AccSlot::Scratch(o) | AccSlot::Deferred(_, o) => <B as Alloc<E::Acc>>::buf_mut(o),
        }
    }
}

/// After a kernel: release every slot of both kinds, then add each deferred scratch into its
/// gradient (a slot may defer because another holds the same cell).
pub(crate) fn finish_slots<'a, B: Kernels<E>, E: Float>(
    dev: &B,
    slots: impl IntoIterator<Item = Option<GradSlot<'a, B, E>>>,
    acc_slots: impl IntoIterator<Item = Option<AccSlot<'a, B, E>>>,
) -> Result<()> {
    let mut deferred = Vec::new();
    for s in slots.into_iter().flatten() {
        if let GradSlot::Deferred(c, o) = s {
            deferred.push((c, o));
        }
    }
    let mut deferred_acc = Vec::new();
    for s in acc_slots.into_iter().flatten() {
        if let AccSlot::Deferred(c, o) = s {
            deferred_acc.push((c, o));
        }
    }
    for (c, o) in deferred {
        c.add_owned(dev, o)?;
    }
    for (c, o) in deferred_acc {
        c.add_acc_owned(dev, o)?;
    }
    Ok(())
}
