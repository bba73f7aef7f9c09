//! tuna: adapt pretrained transformers by every method from full fine-tuning to prompt tuning.
//!
//! This facade re-exports the workspace's crates, which form a strict chain:
//! [`kernels`] (ops, CPU and CUDA) <- [`autograd`] <- [`models`] <- [`trainer`].

pub use tuna_autograd as autograd;
pub use tuna_kernels as kernels;
pub use tuna_models as models;
pub use tuna_trainer as trainer;

pub mod cli;
pub mod compare_cmd;
pub mod compare_report;
pub mod generate_cmd;
pub mod info;
pub mod serve;
pub mod tasks_cmd;
pub mod train_cmd;
