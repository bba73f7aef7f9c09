//! The model a run trains: the models crate's [`AnyModel`] (any architecture, its tokenizer, the
//! adaptation and the task heads) in f32, on a backend that has the optimizer's kernels.

use tuna_autograd::optim::OptimKernels;
pub use tuna_models::model::AnyModel;

/// The backends a run can train on (the CPU, CUDA): every op and the optimizer kernels in f32.
pub trait Backend: OptimKernels<f32> {}
impl<B: OptimKernels<f32>> Backend for B {}

/// The model of a run on backend `B`.
pub type Model<B> = AnyModel<B, f32>;
