//! tuna-autograd: a minimal tape over tuna's kernels that makes frozen weights cost nothing.
//!
//! A [`Tensor`] holds its shape, element type, device storage, and whether it needs a gradient.
//! An op records itself on the tape only when one of its inputs needs a gradient, and its
//! backward keeps only what it will use for the inputs that need one: a frozen linear computes
//! `dX = dY W` and never `dW`, and keeps no `X` for a `dW`; ops below the first trainable tensor
//! record nothing; saved activations are freed as soon as the backward has used them.
//! [`stats`] makes this visible.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use tuna_autograd::ops::{elem::add, linear::{linear, WeightLayout}, loss::cross_entropy};
//! use tuna_autograd::{stats, Ints, Tensor};
//! use tuna_kernels::Cpu;
//!
//! let dev = Arc::new(Cpu);
//! let x = Tensor::<Cpu, f32>::constant(&dev, &[4, 8], &[0.1; 32])?; // input: no gradient
//! let w = Tensor::constant(&dev, &[16, 8], &[0.01; 128])?; // frozen weight [out, in]
//! let soft = Tensor::param(&dev, "soft", &[4, 8], &[0.0; 32])?; // the only trainable tensor
//! let logits = linear(&add(&x, &soft)?, &w, WeightLayout::OutIn, None)?; // records dX only
//! let loss = cross_entropy(logits, &Ints::new(&dev, &[4], &[1i32, 2, 3, 4])?, -100)?;
//! loss.backward()?;
//! assert!(soft.grad()?.is_some());
//! assert_eq!(stats::snapshot().launches("linear.dW"), 0);
//! # Ok(())
//! # }
//! ```

pub mod checkpoint;
pub mod error;
pub mod gradcheck;
pub mod graph;
pub mod ints;
pub mod ops;
pub mod optim;
pub mod stats;
pub mod tensor;

pub use checkpoint::checkpoint;
pub use error::{Error, Result};
pub use graph::{grad_enabled, no_grad};
pub use ints::Ints;
pub use tensor::{Float, Tensor};
pub use tuna_kernels::{Cpu, Device};
