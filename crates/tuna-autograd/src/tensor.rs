//! `Tensor`: shape, element type, device storage, and whether it needs a gradient.

use crate::error::{Error, Result};
use crate::graph::{self, Node};
use std::cell::{Ref, RefCell, RefMut};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tuna_kernels::{Alloc, CpuFloat, Elem};

/// Element types a differentiable tensor can hold: its gradient has the same type
/// (f32 and f64; f64 on the CPU is for gradient checks).
pub trait Float: CpuFloat {}
impl Float for f32 {}
impl Float for f64 {}

/// A gradient buffer, allocated (zeroed) at first accumulation.
pub(crate) struct GradCell<B: Alloc<E>, E: Elem> {
    pub(crate) buf: RefCell<Option<B::Owned>>,
    pub(crate) len: usize,
}

impl<B: Alloc<E>, E: Elem> GradCell<B, E> {
    pub(crate) fn new(len: usize) -> Rc<Self> {
        Rc::new(GradCell { buf: RefCell::new(None), len })
    }
    /// Run `f` on the gradient buffer (zeroed first if absent); kernels accumulate into it.
    pub(crate) fn accumulate(&self, dev: &B, f: impl FnOnce(&mut B::Buf<E>) -> Result<()>) -> Result<()> {
        let mut g = self.buf.borrow_mut();
        f(B::buf_mut(self.ensure(dev, &mut g)?))
    }
    /// The gradient buffer behind `g` (this cell's, borrowed), allocated zeroed if absent.
    pub(crate) fn ensure<'g>(&self, dev: &B, g: &'g mut Option<B::Owned>) -> Result<&'g mut B::Owned> {
        if g.is_none() {
            *g = Some(dev.zeros(self.len)?);
        }
        Ok(g.as_mut().expect("just set"))
    }
    /// Add a whole gradient `g` (of this cell's length): moved in when the cell is empty (no
    /// zeroing, no copy), added with `add` otherwise.
    pub(crate) fn accumulate_owned(
        &self,
        g: B::Owned,
        add: impl FnOnce(&mut B::Buf<E>, &B::Buf<E>) -> Result<()>,
    ) -> Result<()> {
        let mut cur = self.buf.borrow_mut();
        match cur.as_mut() {
            None => {
                *cur = Some(g);
                Ok(())
            }
            Some(c) => add(B::buf_mut(c), B::buf(&g)),
        }
    }
    /// Take the buffer out (frees a non-leaf gradient once its node has used it).
    pub(crate) fn take(&self) -> Option<B::Owned> {
        self.buf.borrow_mut().take()
    }
}

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
    fn build(dev: Arc<B>, shape: Vec<usize>, data: B::Owned, grad: bool, node: Option<Rc<Node>>) -> Self {
        let g = grad.then(|| GradCell::new(numel(&shape)));
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
            }),
        }
    }

    /// A tensor that needs no gradient (inputs, frozen weights).
    pub fn constant(dev: &Arc<B>, shape: &[usize], values: &[E]) -> Result<Self> {
        check_len(None, shape, values.len())?;
        Ok(Self::build(dev.clone(), shape.to_vec(), dev.from_host(values)?, false, None))
    }

    /// A trainable leaf: its gradient accumulates across backward passes until [`Tensor::zero_grad`].
    pub fn param(dev: &Arc<B>, name: &str, shape: &[usize], values: &[E]) -> Result<Self> {
        check_len(Some(name), shape, values.len())?;
        let mut t = Self::build(dev.clone(), shape.to_vec(), dev.from_host(values)?, true, None);
        Rc::get_mut(&mut t.inner).expect("fresh tensor").name = Some(name.into());
        Ok(t)
    }

    /// A zero tensor, trainable or not.
    pub fn zeros(dev: &Arc<B>, shape: &[usize], requires_grad: bool) -> Result<Self> {
        Ok(Self::build(dev.clone(), shape.to_vec(), dev.zeros(numel(shape))?, requires_grad, None))
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
        Ok(Self::build(dev.clone(), shape.to_vec(), dev.zeros(0)?, false, None))
    }
    /// Whether the data was released ([`Tensor::release_storage`]).
    pub fn is_released(&self) -> bool {
        self.numel() > 0 && B::len(&*self.buf()) == 0
    }
    /// A host copy of the accumulated gradient; `None` where none has flowed here yet.
    pub fn grad(&self) -> Result<Option<Vec<E>>> {
        match &self.inner.grad {
            None => Ok(None),
            Some(c) => match &*c.buf.borrow() {
                None => Ok(None),
                Some(g) => Ok(Some(self.inner.dev.to_host(g)?)),
            },
        }
    }
    /// Drop the accumulated gradient (the optimizer step's zeroing).
    pub fn zero_grad(&self) {
        if let Some(c) = &self.inner.grad {
            c.take();
        }
    }
    /// Whether a gradient has been accumulated (and not yet dropped).
    pub fn has_grad(&self) -> bool {
        self.inner.grad.as_ref().is_some_and(|c| c.buf.borrow().is_some())
    }
    /// Run `f` on the gradient buffer, if one has been accumulated.
    pub fn with_grad<T>(&self, f: impl FnOnce(&B::Buf<E>) -> T) -> Option<T> {
        let c = self.inner.grad.as_ref()?;
        let g = c.buf.borrow();
        g.as_ref().map(|g| f(B::buf(g)))
    }

    pub(crate) fn cell(&self) -> Option<Rc<GradCell<B, E>>> {
        self.inner.grad.clone()
    }
    pub(crate) fn node(&self) -> Option<Rc<Node>> {
        self.inner.node.clone()
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

    /// Seed this scalar's gradient with 1; its tape node, if an op made it.
    fn seed_backward(&self) -> Result<Option<Rc<Node>>> {
        if self.numel() != 1 {
            return Err(Error::Backward(format!("needs a scalar, got shape {:?}", self.shape())));
        }
        let cell = self
            .cell()
            .ok_or_else(|| Error::Backward("the loss does not depend on any tensor that needs a gradient".into()))?;
        {
            // Seed: d loss / d loss = 1 (added to what a leaf loss already holds).
            let dev = &self.inner.dev;
            let mut g = cell.buf.borrow_mut();
            let prev = match g.take() {
                Some(old) => dev.to_host(&old)?[0].to_f32(),
                None => 0.0,
            };
            *g = Some(dev.from_host(&[E::from_f32(prev + 1.0)])?);
        }
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
