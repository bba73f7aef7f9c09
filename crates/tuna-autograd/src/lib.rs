//! tuna-autograd: a minimal tape over tuna's kernels that makes frozen weights cost nothing.
//!
//! A [`Tensor`] holds its shape, element type, device storage, and whether it needs a gradient.
//! An op records itself on the tape only when one of its inputs needs a gradient, and its
//! backward keeps only what it will use for the inputs that need one: a frozen linear computes
//! `dX = dY W` and never `dW`, and keeps no `X` for a `dW`; ops below the first trainable tensor
//! record nothing; saved activations are freed as soon as the backward has used them.
//! [`stats`] makes this visible.

pub mod error;
pub mod gradcheck;
pub mod graph;
pub mod ints;
pub mod ops;
pub mod optim;
pub mod stats;
pub mod tensor;

pub use error::{Error, Result};
pub use graph::{grad_enabled, no_grad};
pub use ints::Ints;
pub use tensor::{Float, Tensor};
pub use tuna_kernels::{Cpu, Device};
