//! tuna-kernels: every op of tuna, forward and backward, on the CPU (rayon, `gemm`) and on
//! CUDA (hand-written kernels compiled by NVRTC, cuBLAS for GEMMs), side by side.
//!
//! Each op family lives in `ops/<op>/`: `mod.rs` (parameters, the op's trait with forward and
//! backward declared together, shape checks, tests), `cpu.rs` and `cuda.rs`; its CUDA source is
//! `kernels/<op>.cu` at the workspace root, embedded at build time.
//!
//! Conventions shared by every op:
//! - CPU computes in f32; CUDA takes f32 or bf16 activations with fp32 accumulation, fp32
//!   saved statistics and fp32 parameter gradients.
//! - Every backward **accumulates** (`+=`) into every gradient buffer it is given; the caller
//!   zeroes them. Gradient accumulation across micro-batches is therefore free.
//! - Shapes are runtime values checked against buffer lengths; a mismatch is
//!   [`Error::Shape`] naming the op, the tensor, and both sizes.
//!
//! ```
//! use tuna_kernels::ops::gelu::{GeluKernel, GeluKind};
//! use tuna_kernels::Cpu;
//! let x = vec![0.5f32, -1.0, 2.0];
//! let mut y = vec![0.0; 3];
//! Cpu.gelu_fwd(GeluKind::Tanh, &x, &mut y)?; // the same call on a `Cuda` takes CudaBufs
//! let mut dx = vec![0.0; 3];
//! Cpu.gelu_bwd(GeluKind::Tanh, &x, &[1.0; 3], &mut dx)?; // backward accumulates (+=)
//! assert!((y[2] - 1.9546).abs() < 1e-3 && dx[2] > 1.0);
//! # Ok::<(), tuna_kernels::Error>(())
//! ```

#![allow(clippy::too_many_arguments)]

pub mod backend;
pub mod cuda;
pub mod device;
pub mod error;
pub mod heap;
pub mod ops;
pub mod rng;
pub mod testing;

pub use backend::{Alloc, Backend, Cpu, CpuFloat, Elem};
pub use cuda::Cuda;
pub use device::Device;
pub use error::{Error, Result};
