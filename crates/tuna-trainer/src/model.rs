//! The model a run trains: the models crate's [`AnyModel`] (any architecture, its tokenizer, the
//! adaptation and the task heads) in f32, on a backend that has the optimizer's kernels.

use tuna_autograd::optim::OptimKernels;
pub use tuna_models::model::AnyModel;

/// The element types a run trains in: f32, and bf16 (mixed precision, CUDA) — those whose
/// masters, gradients and optimizer moments are f32.
pub trait RunFloat: tuna_autograd::Float<Acc = f32> {}
impl<T: tuna_autograd::Float<Acc = f32>> RunFloat for T {}

/// The backends a run can train on in element type `E` (the CPU and CUDA in f32, CUDA in bf16):
/// every op and the optimizer kernels.
pub trait Backend<E: RunFloat = f32>: OptimKernels<E> {}
impl<B: OptimKernels<E>, E: RunFloat> Backend<E> for B {}

/// The model of a run on backend `B` in element type `E`.
pub type Model<B, E = f32> = AnyModel<B, E>;
