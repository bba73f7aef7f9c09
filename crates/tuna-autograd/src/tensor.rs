//! `Tensor`: shape, element type, device storage, and whether it needs a gradient.

use crate::error::{Error, Result};
use crate::graph::{self, Node};
use crate::ops::Kernels;
use std::any::Any;
use std::cell::{Ref, RefCell, RefMut};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tuna_kernels::ops::elementwise::ElementwiseKernel;
use tuna_kernels::{Alloc, Elem};

/// Element types a differentiable tensor can hold: f32 and f64 (f64 on the CPU is for gradient
/// checks), whose gradients, masters and optimizer moments are their own type, and bf16 (CUDA's
/// mixed precision), whose activations and activation gradients are bf16 while a trainable leaf
/// keeps an f32 master copy and accumulates an f32 gradient (`E::Acc`): the optimizer updates the
/// master and writes the bf16 copy the ops read ([`Tensor::master`]).
pub trait Float: Elem {
    /// A constant, rounded to this type.
    fn c(x: f64) -> Self;
    /// Whether `Self::Acc` is `Self` (f32, f64): a leaf then keeps no master and accumulates its
    /// gradient in its own type.
    const ACC_IS_SELF: bool;
}
impl Float for f32 {
    fn c(x: f64) -> Self {
        x as f32
    }
    const ACC_IS_SELF: bool = true;
}
impl Float for f64 {
    fn c(x: f64) -> Self {
        x
    }
    const ACC_IS_SELF: bool = true;
}
impl Float for half::bf16 {
    fn c(x: f64) -> Self {
        half::bf16::from_f64(x)
    }
    const ACC_IS_SELF: bool = false;
}

/// `x` as a `U` when `T` and `U` are one type (an `E` buffer as its `E::Acc` buffer where
/// `E::ACC_IS_SELF`); `None` otherwise.
pub(crate) fn same_mut<T: 'static, U: 'static>(x: &mut T) -> Option<&mut U> {
    (x as &mut dyn Any).downcast_mut::<U>()
}
/// [`same_mut`] by value.
pub(crate) fn same_owned<T: 'static, U: 'static>(x: T) -> std::result::Result<U, T> {
    let b: Box<dyn Any> = Box::new(x);
    match b.downcast::<U>() {
        Ok(u) => Ok(*u),
        Err(b) => Err(*b.downcast::<T>().expect("boxed just above")),
    }
}

/// `E` values as `E::Acc`: a copy (exact widening for bf16; the same values for f32/f64).
pub(crate) fn widen<E: Float>(v: &[E]) -> Vec<E::Acc> {
    v.iter().map(|&x| <E::Acc as Elem>::from_f32(x.to_f32())).collect()
}

/// `E::Acc` values as `E` (round to nearest even for bf16; the same values for f32/f64).
pub(crate) fn narrow<E: Float>(v: &[E::Acc]) -> Vec<E> {
    match same_slice::<E::Acc, E>(v) {
        Some(same) => same.to_vec(),
        None => v.iter().map(|&x| E::from_f32(x.to_f32())).collect(),
    }
}

/// `x` as a `[U]` when `T` and `U` are one type (no copy); `None` otherwise.
pub(crate) fn same_slice<T: 'static, U: 'static>(x: &[T]) -> Option<&[U]> {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<U>() {
        // SAFETY: T and U are the same type, so the slice's memory holds Us.
        Some(unsafe { std::slice::from_raw_parts(x.as_ptr() as *const U, x.len()) })
    } else {
        None
    }
}

/// A gradient buffer, allocated (zeroed) at first accumulation: in `E` for an activation (and a
/// leaf of f32/f64), in `E::Acc` for a trainable leaf whose `E` is not its own accumulator (a bf16
/// parameter's f32 gradient, held type-erased as `<B as Alloc<E::Acc>>::Owned`).
pub(crate) struct GradCell<B: Alloc<E>, E: Elem> {
    pub(crate) buf: RefCell<Option<B::Owned>>,
    /// The `E::Acc` gradient of a mixed-precision leaf; `acc_mode` says whether this cell uses it.
    pub(crate) acc: RefCell<Option<Box<dyn Any>>>,
    pub(crate) acc_mode: bool,
    pub(crate) len: usize,
}

impl<B: Alloc<E>, E: Elem> GradCell<B, E> {
    pub(crate) fn new(len: usize) -> Rc<Self> {
        Rc::new(GradCell { buf: RefCell::new(None), acc: RefCell::new(None), acc_mode: false, len })
    }
    /// A leaf's cell: in `E::Acc` when `acc_mode`.
    pub(crate) fn new_leaf(len: usize, acc_mode: bool) -> Rc<Self> {
        Rc::new(GradCell { buf: RefCell::new(None), acc: RefCell::new(None), acc_mode, len })
    }
    /// The gradient buffer behind `g` (this cell's, borrowed), allocated zeroed if absent.
    pub(crate) fn ensure<'g>(&self, dev: &B, g: &'g mut Option<B::Owned>) -> Result<&'g mut B::Owned> {
        if g.is_none() {
            *g = Some(dev.zeros(self.len)?);
        }
        Ok(g.as_mut().expect("just set"))
    }
    /// Take the buffer out (frees a non-leaf gradient once its node has used it; drops a leaf's).
    pub(crate) fn take(&self) -> Option<B::Owned> {
        self.acc.borrow_mut().take();
        self.buf.borrow_mut().take()
    }
    /// Whether a gradient has been accumulated.
    pub(crate) fn is_some(&self) -> bool {
        if self.acc_mode {
            self.acc.borrow().is_some()
        } else {
            self.buf.borrow().is_some()
        }
    }
}

impl<B: Kernels<E>, E: Float> GradCell<B, E> {
    /// Run `f` on the `E::Acc` gradient of a mixed-precision leaf (zeroed first if absent).
    fn with_acc<T>(&self, dev: &B, f: impl FnOnce(&mut AccOwned<B, E>) -> Result<T>) -> Result<T> {
        debug_assert!(self.acc_mode);
        let mut a = self.acc.borrow_mut();
        if a.is_none() {
            *a = Some(Box::new(Alloc::<E::Acc>::zeros(dev, self.len)?));
        }
        let owned = a.as_mut().expect("just set").downcast_mut::<AccOwned<B, E>>().expect("an E::Acc buffer");
        f(owned)
    }

    /// Run `f` on the gradient buffer (zeroed first if absent); kernels accumulate into it. For a
    /// mixed-precision leaf `f` writes a zeroed `E` scratch that is then added to its `E::Acc`
    /// gradient.
    pub(crate) fn accumulate(&self, dev: &B, f: impl FnOnce(&mut B::Buf<E>) -> Result<()>) -> Result<()> {
        if self.acc_mode {
            let mut s = Alloc::<E>::zeros(dev, self.len)?;
            f(<B as Alloc<E>>::buf_mut(&mut s))?;
            return self.add_owned(dev, s);
        }
        let mut g = self.buf.borrow_mut();
        f(<B as Alloc<E>>::buf_mut(self.ensure(dev, &mut g)?))
    }

    /// The gradient as `write` makes it, when this cell has none yet (and is not a mixed-precision
    /// leaf's): `write` fills a fresh buffer in full ([`Alloc::unfilled`]: no zeroing pass on CUDA;
    /// the CPU zeroes it, and only the product's read of it is saved), which becomes the gradient. Otherwise `add` accumulates into the gradient, as
    /// [`GradCell::accumulate`] runs it. Both must compute the same values (`write`'s `x` where `add`
    /// makes `g + x`).
    pub(crate) fn write_or_accumulate(
        &self,
        dev: &B,
        write: impl FnOnce(&mut B::Buf<E>) -> Result<()>,
        add: impl FnOnce(&mut B::Buf<E>) -> Result<()>,
    ) -> Result<()> {
        let empty = !self.acc_mode && self.buf.borrow().is_none();
        if !empty {
            return self.accumulate(dev, add);
        }
        let mut g = Alloc::<E>::unfilled(dev, self.len)?;
        write(<B as Alloc<E>>::buf_mut(&mut g))?;
        *self.buf.borrow_mut() = Some(g);
        Ok(())
    }

    /// Run `f` on the gradient as an `E::Acc` buffer (the parameter gradients the kernels keep in
    /// `E::Acc`: norm weights, biases, embedding tables, prefix keys/values): directly where the
    /// gradient is in `E::Acc` (a mixed-precision leaf, or any f32/f64 tensor), else through a
    /// zeroed `E::Acc` scratch rounded to `E` and added (a bf16 activation).
    pub(crate) fn accumulate_acc(&self, dev: &B, f: impl FnOnce(&mut AccBuf<B, E>) -> Result<()>) -> Result<()> {
        if self.acc_mode {
            return self.with_acc(dev, |a| f(<B as Alloc<E::Acc>>::buf_mut(a)));
        }
        if E::ACC_IS_SELF {
            let mut g = self.buf.borrow_mut();
            let owned = self.ensure(dev, &mut g)?;
            let owned = same_mut::<EOwned<B, E>, AccOwned<B, E>>(owned).expect("E::Acc is E");
            return f(<B as Alloc<E::Acc>>::buf_mut(owned));
        }
        let mut s = Alloc::<E::Acc>::zeros(dev, self.len)?;
        f(<B as Alloc<E::Acc>>::buf_mut(&mut s))?;
        self.add_acc_owned(dev, s)
    }

    /// Add a whole gradient `g` (of this cell's length): moved in when an `E` cell is empty (no
    /// zeroing, no copy), added otherwise (widened into a mixed-precision leaf's `E::Acc`).
    pub(crate) fn add_owned(&self, dev: &B, g: <B as Alloc<E>>::Owned) -> Result<()> {
        if self.acc_mode {
            let one = <E::Acc as Elem>::from_f32(1.0);
            return self.with_acc(dev, |a| {
                Ok(dev.grad_accumulate(<B as Alloc<E::Acc>>::buf_mut(a), <B as Alloc<E>>::buf(&g), one)?)
            });
        }
        let mut cur = self.buf.borrow_mut();
        match cur.as_mut() {
            None => {
                *cur = Some(g);
                Ok(())
            }
            Some(c) => Ok(dev.scale_bwd(1.0, <B as Alloc<E>>::buf(&g), <B as Alloc<E>>::buf_mut(c))?),
        }
    }

    /// [`GradCell::add_owned`] for a gradient in `E::Acc` (rounded to `E` for a bf16 activation).
    pub(crate) fn add_acc_owned(&self, dev: &B, g: AccOwned<B, E>) -> Result<()> {
        if self.acc_mode {
            let mut a = self.acc.borrow_mut();
            return match a.as_mut() {
                None => {
                    *a = Some(Box::new(g));
                    Ok(())
                }
                Some(cur) => {
                    let cur = cur.downcast_mut::<AccOwned<B, E>>().expect("an E::Acc buffer");
                    Ok(ElementwiseKernel::<E::Acc>::scale_bwd(
                        dev,
                        1.0,
                        <B as Alloc<E::Acc>>::buf(&g),
                        <B as Alloc<E::Acc>>::buf_mut(cur),
                    )?)
                }
            };
        }
        match same_owned::<AccOwned<B, E>, EOwned<B, E>>(g) {
            Ok(e) => self.add_owned(dev, e),
            Err(g) => {
                let mut e = Alloc::<E>::zeros(dev, self.len)?;
                dev.cast(<B as Alloc<E::Acc>>::buf(&g), <B as Alloc<E>>::buf_mut(&mut e))?;
                self.add_owned(dev, e)
            }
        }
    }
}

/// A backend's owned buffer of `E`.
pub(crate) type EOwned<B, E> = <B as Alloc<E>>::Owned;
/// A backend's owned buffer of `E::Acc`.
pub(crate) type AccOwned<B, E> = <B as Alloc<<E as Elem>::Acc>>::Owned;
/// A backend's buffer of `E::Acc`, as the kernels take it.
pub(crate) type AccBuf<B, E> = <B as tuna_kernels::Backend>::Buf<<E as Elem>::Acc>;

pub(crate) struct Inner<B: Alloc<E>, E: Elem> {
    pub(crate) id: u64,
    pub(crate) name: Option<Rc<str>>,
    pub(crate) shape: Vec<usize>,
    pub(crate) dev: Arc<B>,
    /// Shared so that an op's backward can keep its own output's data without keeping the
    /// output tensor (and so its node) alive.
    pub(crate) data: Rc<RefCell<B::Owned>>,
    pub(crate) grad: Option<Rc<GradCell<B, E>>>,
    pub(crate) node: Option<Rc<Node>>,
    /// Produced by an op (recorded or not), as opposed to created by the caller (weights, inputs).
    pub(crate) activation: bool,
    /// A mixed-precision trainable leaf's master copy (`<B as Alloc<E::Acc>>::Owned`, type-erased):
    /// the optimizer updates it and writes `data` from it.
    pub(crate) master: Option<RefCell<Box<dyn Any>>>,
    /// A loss op's value as computed (in f64 on the host) before it was rounded to `E`: what
    /// [`Tensor::value`] reports, rounded to `E::Acc`.
    pub(crate) exact: std::cell::Cell<Option<f64>>,
}

/// A tensor on backend `B` holding `E`s. Cloning is cheap (shared storage).
pub struct Tensor<B: Alloc<E>, E: Elem> {
    pub(crate) inner: Rc<Inner<B, E>>,
}

impl<B: Alloc<E>, E: Elem> Clone for Tensor<B, E> {
    fn clone(&self) -> Self {
        Tensor { inner: self.inner.clone() }
    }
}

impl<B: Alloc<E> + 'static, E: Elem> std::fmt::Debug for Tensor<B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor<{}>{:?}", E::NAME, self.inner.shape)?;
        if let Some(n) = &self.inner.name {
            write!(f, " `{n}`")?;
        }
        if self.requires_grad() {
            write!(f, " (grad)")?;
        }
        Ok(())
    }
}

/// A recorded op's output: its gradient cell and tape node.
pub(crate) type Recorded<B, E> = (Rc<GradCell<B, E>>, Rc<Node>);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl<B: Alloc<E> + 'static, E: Elem> Tensor<B, E> {
    /// A leaf; `grad` is `Some(acc_mode)` for a trainable one.
    fn build(dev: Arc<B>, shape: Vec<usize>, data: B::Owned, grad: Option<bool>, node: Option<Rc<Node>>) -> Self {
        let g = grad.map(|acc| GradCell::new_leaf(numel(&shape), acc));
        Tensor {
            inner: Rc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                name: None,
                shape,
                dev,
                data: Rc::new(RefCell::new(data)),
                grad: g,
                node,
                activation: false,
                master: None,
                exact: Default::default(),
            }),
        }
    }

    /// A tensor that needs no gradient (inputs, frozen weights).
    pub fn constant(dev: &Arc<B>, shape: &[usize], values: &[E]) -> Result<Self> {
        check_len(None, shape, values.len())?;
        Ok(Self::build(dev.clone(), shape.to_vec(), dev.from_host(values)?, None, None))
    }

    /// A copy of the data as a leaf that needs no gradient (cuts the graph). The copy goes through
    /// the host.
    pub fn detach(&self) -> Result<Self> {
        Self::constant(&self.inner.dev, &self.inner.shape, &self.to_vec()?)
    }

    /// An op's output, with its gradient cell and tape node when the op was recorded.
    pub(crate) fn from_op(
        dev: &Arc<B>,
        shape: Vec<usize>,
        data: Rc<RefCell<B::Owned>>,
        rec: Option<Recorded<B, E>>,
    ) -> Self {
        let (grad, node) = match rec {
            Some((c, n)) => (Some(c), Some(n)),
            None => (None, None),
        };
        Tensor {
            inner: Rc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                name: None,
                shape,
                dev: dev.clone(),
                data,
                grad,
                node,
                activation: true,
                master: None,
                exact: Default::default(),
            }),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.inner.shape
    }
    pub fn numel(&self) -> usize {
        numel(&self.inner.shape)
    }
    pub fn name(&self) -> Option<&str> {
        self.inner.name.as_deref()
    }
    pub fn device(&self) -> &Arc<B> {
        &self.inner.dev
    }
    /// Unique id of this tensor (not of its clones' storage copies).
    pub fn id(&self) -> u64 {
        self.inner.id
    }
    /// Whether a gradient flows to this tensor (a trainable leaf, or an op output recorded on the tape).
    pub fn requires_grad(&self) -> bool {
        self.inner.grad.is_some()
    }
    /// Whether this is a leaf (not produced by a recorded op).
    pub fn is_leaf(&self) -> bool {
        self.inner.node.is_none()
    }
    /// Whether an op produced this tensor (an activation), rather than the caller.
    pub fn is_activation(&self) -> bool {
        self.inner.activation
    }
    /// Bytes of this tensor's data.
    pub fn bytes(&self) -> usize {
        self.numel() * std::mem::size_of::<E>()
    }

    /// The data as a buffer the kernels take.
    pub fn data(&self) -> Ref<'_, B::Owned> {
        self.inner.data.borrow()
    }
    /// The data as the kernels' buffer type (`[E]` on the CPU, `CudaBuf<E>` on CUDA).
    pub fn buf(&self) -> Ref<'_, B::Buf<E>> {
        Ref::map(self.inner.data.borrow(), |d| B::buf(d))
    }
    /// Mutable data: for optimizer updates of leaves. Changing an input of a recorded op before its
    /// backward runs gives wrong gradients, as in any tape.
    pub fn data_mut(&self) -> RefMut<'_, B::Owned> {
        self.inner.data.borrow_mut()
    }
    /// Records the value a loss op computed before rounding it to `E` (see [`Tensor::value`]).
    pub(crate) fn set_exact(&self, v: f64) {
        self.inner.exact.set(Some(v));
    }

    /// A host copy of the data. A released tensor ([`Tensor::release_storage`]) is an error.
    pub fn to_vec(&self) -> Result<Vec<E>> {
        if self.is_released() {
            return Err(Error::Released(self.name().unwrap_or("unnamed").to_string()));
        }
        Ok(self.inner.dev.to_host(&self.data())?)
    }
    /// Frees the data, keeping the shape: for a frozen weight now held elsewhere (packed in low
    /// precision). Reading it afterwards ([`Tensor::to_vec`]) is an error, and a kernel given it
    /// sees an empty buffer and refuses it by length. Refused for a tensor that trains.
    pub fn release_storage(&self) -> Result<()> {
        if self.requires_grad() {
            return Err(Error::Invalid(format!(
                "tensor `{}` trains: its storage cannot be released",
                self.name().unwrap_or("unnamed")
            )));
        }
        *self.data_mut() = self.inner.dev.zeros(0)?;
        Ok(())
    }
    /// A frozen tensor of `shape` whose data is held elsewhere from the start (a weight kept
    /// packed as it loads, never materialised): as a tensor after [`Tensor::release_storage`].
    pub fn released(dev: &Arc<B>, shape: &[usize]) -> Result<Self> {
        Ok(Self::build(dev.clone(), shape.to_vec(), dev.zeros(0)?, None, None))
    }
    /// Whether the data was released ([`Tensor::release_storage`]).
    pub fn is_released(&self) -> bool {
        self.numel() > 0 && B::len(&*self.buf()) == 0
    }
    /// Drop the accumulated gradient (the optimizer step's zeroing).
    pub fn zero_grad(&self) {
        if let Some(c) = &self.inner.grad {
            c.take();
        }
    }
    /// Whether a gradient has been accumulated (and not yet dropped).
    pub fn has_grad(&self) -> bool {
        self.inner.grad.as_ref().is_some_and(|c| c.is_some())
    }
    /// Whether this is a mixed-precision trainable leaf: an `E::Acc` master and gradient beside
    /// its `E` data.
    pub fn has_master(&self) -> bool {
        self.inner.master.is_some()
    }

    pub(crate) fn cell(&self) -> Option<Rc<GradCell<B, E>>> {
        self.inner.grad.clone()
    }
    pub(crate) fn node(&self) -> Option<Rc<Node>> {
        self.inner.node.clone()
    }
}

impl<B: Kernels<E>, E: Float> Tensor<B, E> {
    /// The value of a one-element tensor (a loss) as f64. A loss op's output reports the mean it
    /// computed rounded once to `E::Acc` (the same bits as its element for f32 and f64; for bf16
    /// the f32 mean, where the element itself is the bf16 rounding, 2^-6 apart near 3); any other
    /// tensor reports its element. An error for a tensor that is not one element.
    pub fn value(&self) -> Result<f64> {
        if self.numel() != 1 {
            return Err(Error::Invalid(format!(
                "value() of `{}`: a one-element tensor, not shape {:?}",
                self.name().unwrap_or("unnamed"),
                self.shape()
            )));
        }
        match self.computed_value() {
            Some(v) => Ok(v),
            None => Ok(self.to_vec()?[0].to_f64()),
        }
    }

    /// The value a loss op computed on the host, rounded once to `E::Acc`, when this tensor is a
    /// loss op's output ([`Tensor::value`] without a read of the device); `None` otherwise.
    pub fn computed_value(&self) -> Option<f64> {
        self.inner.exact.get().map(|v| <E::Acc as Elem>::from_f64(v).to_f64())
    }

    /// A trainable leaf: its gradient accumulates across backward passes until [`Tensor::zero_grad`].
    /// A bf16 leaf keeps an f32 master of `values` (widened exactly) and accumulates an f32 gradient.
    pub fn param(dev: &Arc<B>, name: &str, shape: &[usize], values: &[E]) -> Result<Self> {
        check_len(Some(name), shape, values.len())?;
        let mut t = Self::trainable(dev, shape, Alloc::<E>::from_host(&**dev, values)?)?;
        Rc::get_mut(&mut t.inner).expect("fresh tensor").name = Some(name.into());
        Ok(t)
    }

    /// A trainable leaf from its master values (`E::Acc`): for bf16, the f32 master keeps them
    /// exactly and the data is their rounding (a checkpoint's or an initializer's f32 values).
    pub fn param_from_master(dev: &Arc<B>, name: &str, shape: &[usize], values: &[E::Acc]) -> Result<Self> {
        check_len(Some(name), shape, values.len())?;
        let t = Self::param(dev, name, shape, &narrow::<E>(values))?;
        if t.has_master() {
            t.load_master(values)?;
        }
        Ok(t)
    }

    /// A zero tensor, trainable or not.
    pub fn zeros(dev: &Arc<B>, shape: &[usize], requires_grad: bool) -> Result<Self> {
        let data = Alloc::<E>::zeros(&**dev, numel(shape))?;
        if requires_grad {
            Self::trainable(dev, shape, data)
        } else {
            Ok(Self::build(dev.clone(), shape.to_vec(), data, None, None))
        }
    }

    /// A trainable leaf holding `data`, with a master copy where `E` is not its own accumulator.
    fn trainable(dev: &Arc<B>, shape: &[usize], data: <B as Alloc<E>>::Owned) -> Result<Self> {
        let mut t = Self::build(dev.clone(), shape.to_vec(), data, Some(!E::ACC_IS_SELF), None);
        if !E::ACC_IS_SELF {
            let host = widen::<E>(&Alloc::<E>::to_host(&**dev, &t.data())?);
            let m: AccOwned<B, E> = Alloc::<E::Acc>::from_host(&**dev, &host)?;
            Rc::get_mut(&mut t.inner).expect("fresh tensor").master = Some(RefCell::new(Box::new(m)));
        }
        Ok(t)
    }

    /// The values the optimizer updates, as `E::Acc`: the master of a mixed-precision leaf, the
    /// data itself otherwise (f32, f64), or the widened data of a frozen bf16 tensor.
    pub fn master_to_vec(&self) -> Result<Vec<E::Acc>> {
        if let Some(m) = &self.inner.master {
            let m = m.borrow();
            let m = m.downcast_ref::<AccOwned<B, E>>().expect("an E::Acc master");
            return Ok(Alloc::<E::Acc>::to_host(&**self.device(), m)?);
        }
        let v = self.to_vec()?;
        Ok(match same_owned::<Vec<E>, Vec<E::Acc>>(v) {
            Ok(same) => same,
            Err(v) => widen::<E>(&v),
        })
    }

    /// Replace the values from `E::Acc` ones (a checkpoint's): the master and its rounding into the
    /// data for a mixed-precision leaf, the data otherwise (rounded to `E` for a frozen bf16 one);
    /// in place where the device can. The length must match.
    pub fn load_master(&self, host: &[E::Acc]) -> Result<()> {
        if host.len() != self.numel() {
            return Err(Error::Data {
                name: self.name().unwrap_or("unnamed").into(),
                len: host.len(),
                shape: self.shape().to_vec(),
                expected: self.numel(),
            });
        }
        let dev = self.device().clone();
        if let Some(m) = &self.inner.master {
            let mut m = m.borrow_mut();
            let m = m.downcast_mut::<AccOwned<B, E>>().expect("an E::Acc master");
            Alloc::<E::Acc>::copy_from_host(&*dev, m, host)?;
            dev.cast(<B as Alloc<E::Acc>>::buf(m), <B as Alloc<E>>::buf_mut(&mut self.data_mut()))?;
            return Ok(());
        }
        // f32/f64: the values themselves, in place (no host copy: a resume holds one tensor once).
        match same_slice::<E::Acc, E>(host) {
            Some(same) => Ok(Alloc::<E>::copy_from_host(&*dev, &mut self.data_mut(), same)?),
            None => Ok(Alloc::<E>::copy_from_host(&*dev, &mut self.data_mut(), &narrow::<E>(host))?),
        }
    }

    /// Run `f` on the values the optimizer updates as an `E::Acc` buffer (the master, or the data
    /// where `E` is its own accumulator), then write the data from the master where there is one.
    pub fn update_master<T>(&self, f: impl FnOnce(&mut AccBuf<B, E>) -> Result<T>) -> Result<T> {
        let dev = self.device().clone();
        if let Some(m) = &self.inner.master {
            let mut m = m.borrow_mut();
            let m = m.downcast_mut::<AccOwned<B, E>>().expect("an E::Acc master");
            let out = f(<B as Alloc<E::Acc>>::buf_mut(m))?;
            dev.cast(<B as Alloc<E::Acc>>::buf(m), <B as Alloc<E>>::buf_mut(&mut self.data_mut()))?;
            return Ok(out);
        }
        let mut d = self.data_mut();
        match same_mut::<EOwned<B, E>, AccOwned<B, E>>(&mut *d) {
            Some(a) => f(<B as Alloc<E::Acc>>::buf_mut(a)),
            None => Err(Error::Invalid(format!(
                "tensor `{}` holds {} without a master: not a trainable leaf",
                self.name().unwrap_or("unnamed"),
                E::NAME
            ))),
        }
    }

    /// A host copy of the accumulated gradient, in `E::Acc` (a mixed-precision leaf's f32
    /// gradient as it is; an activation's widened); `None` where none has flowed here yet.
    pub fn grad(&self) -> Result<Option<Vec<E::Acc>>> {
        let Some(c) = &self.inner.grad else { return Ok(None) };
        let dev = &**self.device();
        if c.acc_mode {
            let a = c.acc.borrow();
            return match a.as_ref() {
                None => Ok(None),
                Some(b) => {
                    let o = b.downcast_ref::<AccOwned<B, E>>().expect("an E::Acc buffer");
                    Ok(Some(Alloc::<E::Acc>::to_host(dev, o)?))
                }
            };
        }
        let g = c.buf.borrow();
        let Some(g) = g.as_ref() else { return Ok(None) };
        let v = Alloc::<E>::to_host(dev, g)?;
        Ok(Some(match same_owned::<Vec<E>, Vec<E::Acc>>(v) {
            Ok(same) => same,
            Err(v) => widen::<E>(&v),
        }))
    }

    /// Run `f` on the accumulated gradient as an `E::Acc` buffer, if there is one: a trainable
    /// leaf's (or any f32/f64 tensor's). A bf16 activation's gradient is refused.
    pub fn with_grad<T>(&self, f: impl FnOnce(&mut AccBuf<B, E>) -> T) -> Result<Option<T>> {
        let Some(c) = &self.inner.grad else { return Ok(None) };
        if c.acc_mode {
            let mut a = c.acc.borrow_mut();
            return Ok(a.as_mut().map(|b| {
                f(<B as Alloc<E::Acc>>::buf_mut(b.downcast_mut::<AccOwned<B, E>>().expect("an E::Acc buffer")))
            }));
        }
        let mut g = c.buf.borrow_mut();
        let Some(g) = g.as_mut() else { return Ok(None) };
        match same_mut::<EOwned<B, E>, AccOwned<B, E>>(g) {
            Some(a) => Ok(Some(f(<B as Alloc<E::Acc>>::buf_mut(a)))),
            None => Err(Error::Invalid(format!(
                "the gradient of {} tensor `{}` is held in {}: not a trainable leaf",
                E::NAME,
                self.name().unwrap_or("unnamed"),
                E::NAME
            ))),
        }
    }

    /// Bytes of an accumulated gradient of this tensor (in `E::Acc` for a mixed-precision leaf).
    pub fn grad_bytes(&self) -> usize {
        self.numel() * if self.has_master() { std::mem::size_of::<E::Acc>() } else { std::mem::size_of::<E>() }
    }

    /// Differentiate this scalar: every trainable leaf it depends on accumulates its gradient.
    pub fn backward(&self) -> Result<()> {
        match self.seed_backward()? {
            None => Ok(()),
            Some(n) => graph::run_backward(n),
        }
    }

    /// [`Tensor::backward`], calling `complete` with each trainable leaf's id as soon as its
    /// gradient is complete (see [`graph::run_backward_updating`]); a leaf loss's own gradient
    /// is complete at once.
    pub(crate) fn backward_updating(&self, complete: &mut dyn FnMut(u64) -> Result<()>) -> Result<()> {
        match self.seed_backward()? {
            None => complete(self.id()),
            Some(n) => graph::run_backward_updating(n, complete),
        }
    }

    /// Seed this scalar's gradient with 1 (added to what a leaf loss already holds); its tape
    /// node, if an op made it.
    fn seed_backward(&self) -> Result<Option<Rc<Node>>> {
        if self.numel() != 1 {
            return Err(Error::Backward(format!("needs a scalar, got shape {:?}", self.shape())));
        }
        let cell = self
            .cell()
            .ok_or_else(|| Error::Backward("the loss does not depend on any tensor that needs a gradient".into()))?;
        let one: EOwned<B, E> = Alloc::<E>::from_host(&**self.device(), &[E::from_f32(1.0)])?;
        cell.add_owned(self.device(), one)?;
        Ok(self.node())
    }
}

fn check_len(name: Option<&str>, shape: &[usize], len: usize) -> Result<()> {
    let expected = numel(shape);
    if expected == len {
        Ok(())
    } else {
        Err(Error::Data { name: name.unwrap_or("constant").into(), len, shape: shape.to_vec(), expected })
    }
}
