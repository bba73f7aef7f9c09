//! The tape: a node per recorded op, linked to the nodes of its inputs, run in reverse
//! topological order by `backward`. An op records itself only when gradients are enabled and
//! one of its inputs needs a gradient; its backward closure holds only what it will use, and
//! is dropped (freeing what it saved) as soon as it has run.

use crate::error::{Error, Result};
use crate::stats::{self, SavedBytes};
use crate::tensor::{GradCell, Tensor};
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::rc::Rc;
use std::sync::Arc;
use tuna_kernels::{Alloc, Elem};

pub(crate) type BackwardFn = Box<dyn FnOnce() -> Result<()>>;

/// One recorded op (opaque outside the crate).
pub struct Node {
    pub(crate) kind: &'static str,
    /// Creation order on this thread: a checkpoint's recompute differentiates only the nodes made
    /// after it started (see [`run_backward_from`]).
    pub(crate) seq: u64,
    parents: Vec<Rc<Node>>,
    /// The ids of the trainable leaves (parameters) among its inputs, each once: the backward adds
    /// to their gradients, so a parameter's gradient is complete once the last node listing it has
    /// run (see [`run_backward_updating`]).
    leaves: Vec<u64>,
    backward: RefCell<Option<BackwardFn>>,
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
    static NEXT_SEQ: Cell<u64> = const { Cell::new(0) };
    /// While a checkpointed function runs its forward (unrecorded): what it reads that needs a
    /// gradient (see [`Collected`]).
    static COLLECT: RefCell<Option<Collected>> = const { RefCell::new(None) };
}

/// What a checkpointed function's unrecorded forward read that needs a gradient: whether
/// anything did (else there is nothing to recompute), and the tape nodes of those inputs that
/// are activations recorded before it (its node's parents, so that the outer backward runs them
/// after the recompute has added to their gradients).
#[derive(Default)]
pub(crate) struct Collected {
    pub(crate) needs_grad: bool,
    pub(crate) parents: Vec<Rc<Node>>,
    /// The trainable leaves it read (the checkpoint's node lists them: its recompute adds to them).
    pub(crate) leaves: Vec<u64>,
    seen: HashSet<*const Node>,
}

impl Collected {
    fn note(&mut self, inputs: &[&dyn Input]) {
        for t in inputs.iter().filter(|t| t.needs_grad()) {
            self.needs_grad = true;
            if let Some(n) = t.tape_node() {
                if self.seen.insert(Rc::as_ptr(&n)) {
                    self.parents.push(n);
                }
            } else if let Some(id) = t.leaf_id() {
                push_unique(&mut self.leaves, id);
            }
        }
    }
}

/// Run `f` unrecorded while collecting what it reads that needs a gradient (a checkpoint's
/// forward). Nested calls collect into their own; the outer collection is restored after.
pub(crate) fn no_grad_collecting<T>(f: impl FnOnce() -> T) -> (T, Collected) {
    struct Restore(Option<Collected>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let outer = self.0.take();
            COLLECT.with(|c| *c.borrow_mut() = outer);
        }
    }
    let restore = Restore(COLLECT.with(|c| c.borrow_mut().replace(Collected::default())));
    let out = no_grad(f);
    let got = COLLECT.with(|c| c.borrow_mut().take()).unwrap_or_default();
    drop(restore);
    (out, got)
}

/// The creation number the next node will get.
pub(crate) fn next_seq() -> u64 {
    NEXT_SEQ.with(|s| s.get())
}

fn take_seq() -> u64 {
    NEXT_SEQ.with(|s| s.replace(s.get() + 1))
}

/// Whether ops are being recorded on this thread.
pub fn grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Run `f` with recording switched off (evaluation, generation); restored afterwards, even on panic.
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GRAD_ENABLED.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GRAD_ENABLED.with(|g| g.replace(false)));
    f()
}

/// Run `f` with recording switched on (a checkpoint's recompute, whatever the caller's mode);
/// restored afterwards, even on panic.
pub(crate) fn with_grad<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GRAD_ENABLED.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GRAD_ENABLED.with(|g| g.replace(true)));
    f()
}

/// Anything that can be an input of a recorded op (tensors of any element type).
pub trait Input {
    fn needs_grad(&self) -> bool;
    #[doc(hidden)]
    fn tape_node(&self) -> Option<Rc<Node>>;
    /// The id of a trainable leaf (a parameter), `None` for anything else.
    #[doc(hidden)]
    fn leaf_id(&self) -> Option<u64>;
}

impl<B: Alloc<E> + 'static, E: Elem> Input for Tensor<B, E> {
    fn needs_grad(&self) -> bool {
        self.requires_grad()
    }
    fn tape_node(&self) -> Option<Rc<Node>> {
        self.node()
    }
    fn leaf_id(&self) -> Option<u64> {
        (self.requires_grad() && self.is_leaf()).then(|| self.id())
    }
}

/// The trainable leaves among `inputs`, each once.
fn leaves_of(inputs: &[&dyn Input]) -> Vec<u64> {
    let mut v: Vec<u64> = Vec::new();
    for id in inputs.iter().filter_map(|t| t.leaf_id()) {
        push_unique(&mut v, id);
    }
    v
}

/// Add leaf `id` to `leaves` unless it is there (a node's few leaves: a scan beats a set).
pub(crate) fn push_unique(leaves: &mut Vec<u64>, id: u64) {
    if !leaves.contains(&id) {
        leaves.push(id);
    }
}

/// Whether an op over `inputs` must record itself. Inside a checkpoint's unrecorded forward, the
/// inputs that need a gradient are noted (see [`Collected`]).
pub(crate) fn recording(inputs: &[&dyn Input]) -> bool {
    if grad_enabled() {
        return inputs.iter().any(|t| t.needs_grad());
    }
    COLLECT.with(|c| {
        if let Some(c) = c.borrow_mut().as_mut() {
            c.note(inputs)
        }
    });
    false
}

/// Build an op's output tensor. When gradients are enabled and an input needs one, the op is
/// recorded: `make` receives the output's gradient cell and the output's data (for the few
/// backwards that read their own output; holding it keeps only the data alive, counted with
/// [`SavedBytes`]) and returns the backward closure, which reads the output's gradient and
/// accumulates into the inputs' cells. `make` is not called otherwise, so an unrecorded op
/// saves nothing.
pub(crate) fn output<B: Alloc<E> + 'static, E: Elem>(
    kind: &'static str,
    inputs: &[&dyn Input],
    dev: &Arc<B>,
    shape: Vec<usize>,
    data: B::Owned,
    make: impl FnOnce(Rc<GradCell<B, E>>, &OutData<B, E>) -> BackwardFn,
) -> Tensor<B, E> {
    let data = Rc::new(RefCell::new(data));
    stats::forward_done(kind);
    if !recording(inputs) {
        return Tensor::from_op(dev, shape, data, None);
    }
    stats::recorded(kind);
    let n = crate::tensor::numel(&shape);
    let cell = GradCell::new(n);
    let out = OutData { data: data.clone(), bytes: n * std::mem::size_of::<E>() };
    let parents = inputs.iter().filter_map(|t| t.tape_node()).collect();
    let node = Rc::new(Node {
        kind,
        seq: take_seq(),
        parents,
        leaves: leaves_of(inputs),
        backward: RefCell::new(Some(stats::saving_as(kind, || make(cell.clone(), &out)))),
    });
    Tensor::from_op(dev, shape, data, Some((cell, node)))
}

/// Like [`output`], for an op whose output shares its input's storage (a reshape).
pub(crate) fn output_shared<B: Alloc<E> + 'static, E: Elem>(
    kind: &'static str,
    x: &Tensor<B, E>,
    shape: Vec<usize>,
    make: impl FnOnce(Rc<GradCell<B, E>>) -> BackwardFn,
) -> Tensor<B, E> {
    let data = x.inner.data.clone();
    stats::forward_done(kind);
    if !recording(&[x]) {
        return Tensor::from_op(x.device(), shape, data, None);
    }
    stats::recorded(kind);
    let cell = GradCell::new(crate::tensor::numel(&shape));
    let node = Rc::new(Node {
        kind,
        seq: take_seq(),
        parents: x.node().into_iter().collect(),
        leaves: leaves_of(&[x]),
        backward: RefCell::new(Some(stats::saving_as(kind, || make(cell.clone())))),
    });
    Tensor::from_op(x.device(), shape, data, Some((cell, node)))
}

/// An op's own output data, offered to its backward.
pub(crate) struct OutData<B: Alloc<E>, E: Elem> {
    data: Rc<RefCell<B::Owned>>,
    bytes: usize,
}

impl<B: Alloc<E>, E: Elem> OutData<B, E> {
    /// Keep the output's data for the backward (counted as saved bytes until dropped).
    pub(crate) fn save(&self) -> SavedOut<B, E> {
        SavedOut { data: self.data.clone(), _bytes: SavedBytes::new(self.bytes) }
    }
}

/// An op's output data kept by its backward.
///
/// The saved wrappers expose their contents through methods, never public fields: a `move`
/// closure that named a field would capture only that field (edition 2021's disjoint capture)
/// and drop the byte counter at once.
pub(crate) struct SavedOut<B: Alloc<E>, E: Elem> {
    data: Rc<RefCell<B::Owned>>,
    _bytes: SavedBytes,
}

impl<B: Alloc<E>, E: Elem> SavedOut<B, E> {
    pub(crate) fn data(&self) -> std::cell::Ref<'_, B::Owned> {
        self.data.borrow()
    }
}

/// A raw buffer (statistics such as row log-sum-exps) kept by a backward, counted until dropped.
pub(crate) struct SavedBuf<T> {
    buf: T,
    _bytes: SavedBytes,
}

impl<T> SavedBuf<T> {
    pub(crate) fn buf(&self) -> &T {
        &self.buf
    }
    pub(crate) fn new(buf: T, bytes: usize) -> Self {
        SavedBuf { buf, _bytes: SavedBytes::new(bytes) }
    }
}

/// A tensor kept for the backward pass. An activation (an op's output, recorded or not) is
/// counted in [`stats::Stats::saved_bytes`] until dropped; a tensor the caller made (a weight,
/// an input) is not, since it lives on whether or not a backward keeps it.
pub(crate) struct Saved<B: Alloc<E>, E: Elem> {
    t: Tensor<B, E>,
    _bytes: SavedBytes,
}

impl<B: Alloc<E> + 'static, E: Elem> Saved<B, E> {
    pub(crate) fn new(t: &Tensor<B, E>) -> Self {
        Saved { t: t.clone(), _bytes: SavedBytes::new(if t.is_activation() { t.bytes() } else { 0 }) }
    }
    pub(crate) fn t(&self) -> &Tensor<B, E> {
        &self.t
    }
}

/// Count one backward kernel launch of `kind`.
pub(crate) fn launched(kind: &'static str) {
    stats::launched(kind)
}

/// A node whose backward is `backward`, after `parents`, adding to the gradients of the trainable
/// leaves `leaves` (a checkpoint's).
pub(crate) fn node(kind: &'static str, parents: Vec<Rc<Node>>, leaves: Vec<u64>, backward: BackwardFn) -> Rc<Node> {
    stats::recorded(kind);
    Rc::new(Node { kind, seq: take_seq(), parents, leaves, backward: RefCell::new(Some(backward)) })
}

/// The kind of a checkpoint's node: its backward is timed by the nodes it recomputes and runs,
/// not as a whole (which would count that time twice).
pub(crate) const CHECKPOINT_KIND: &str = "checkpoint";

/// Run the backward closures reachable from `root`, each once, in reverse topological order.
pub(crate) fn run_backward(root: Rc<Node>) -> Result<()> {
    run_backward_from(root, 0)
}

/// [`run_backward`], calling `complete(id)` for each trainable leaf as soon as its gradient is
/// complete: right after the last node (in the order run) whose inputs list it has run. Nodes
/// run later never read that leaf (an op that reads a parameter lists it as an input, and a
/// node using something derived from it runs before the node that derived it), so `complete`
/// may update the leaf in place and free its gradient (the optimizer in the backward). A
/// checkpoint's node lists the leaves its block reads, so its recompute sees them unchanged.
pub(crate) fn run_backward_updating(root: Rc<Node>, complete: &mut dyn FnMut(u64) -> Result<()>) -> Result<()> {
    let order = backward_order(&root, 0)?;
    let mut left: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    for n in &order {
        for &id in &n.leaves {
            *left.entry(id).or_insert(0) += 1;
        }
    }
    run_nodes(order, |node| {
        for id in &node.leaves {
            let n = left.get_mut(id).expect("counted above");
            *n -= 1;
            if *n == 0 {
                complete(*id)?;
            }
        }
        Ok(())
    })
}

/// [`run_backward`] over the nodes made since creation number `since` only: a checkpoint's
/// recomputed graph, whose inputs' nodes (older) the outer backward runs in its own order.
pub(crate) fn run_backward_from(root: Rc<Node>, since: u64) -> Result<()> {
    let order = backward_order(&root, since)?;
    run_nodes(order, |_| Ok(()))
}

/// The nodes reachable from `root` made since `since`, inputs before outputs (run them reversed).
fn backward_order(root: &Rc<Node>, since: u64) -> Result<Vec<Rc<Node>>> {
    if root.backward.borrow().is_none() {
        return Err(Error::Backward(format!(
            "the graph behind this loss (last op `{}`) was already differentiated; build it again",
            root.kind
        )));
    }
    // Iterative post-order DFS: children (inputs) before parents (outputs).
    let root = root.clone();
    let mut order: Vec<Rc<Node>> = Vec::new();
    let mut seen: HashSet<*const Node> = HashSet::new();
    let mut stack: Vec<(Rc<Node>, usize)> = vec![(root.clone(), 0)];
    seen.insert(Rc::as_ptr(&root));
    while let Some((node, i)) = stack.pop() {
        if i < node.parents.len() {
            let child = node.parents[i].clone();
            stack.push((node, i + 1));
            if child.seq >= since && seen.insert(Rc::as_ptr(&child)) {
                stack.push((child, 0));
            }
        } else {
            order.push(node);
        }
    }
    // A node reached here that has already run (a graph shared with a loss differentiated
    // before) would pass no gradient on: refuse rather than silently lose it.
    if let Some(done) = order.iter().find(|n| n.backward.borrow().is_none()) {
        return Err(Error::Backward(format!(
            "part of the graph behind this loss (op `{}`) was already differentiated by another loss; \
             sum the losses and differentiate once, or build the graph again",
            done.kind
        )));
    }
    Ok(order)
}

/// Run `order`'s backward closures last to first, calling `after` with each node once it has run.
fn run_nodes(order: Vec<Rc<Node>>, mut after: impl FnMut(&Node) -> Result<()>) -> Result<()> {
    let timed = stats::profiling();
    for node in order.into_iter().rev() {
        let f = node.backward.borrow_mut().take();
        if let Some(f) = f {
            let t0 = (timed && node.kind != CHECKPOINT_KIND).then(std::time::Instant::now);
            f()?;
            if let Some(t0) = t0 {
                stats::backward_done(node.kind, t0.elapsed().as_nanos() as u64);
            }
            after(&node)?;
        }
    }
    Ok(())
}
