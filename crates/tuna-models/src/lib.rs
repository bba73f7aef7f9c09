//! tuna-models: GPT-2, Llama and BERT on tuna's autograd; loading from Hugging Face folders and
//! GGUF files (or by id from the local Hugging Face cache); tokenizers; generation; adaptation
//! methods.

pub mod adapt;
pub mod bert;
pub mod checkpointing;
pub mod config;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod gpt2;
pub mod hf;
pub mod hub;
pub mod io;
pub mod linear;
pub mod llama;
pub mod mixed_model;
pub mod model;
pub mod params;
pub mod positions;
pub mod t5;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
/// The label a loss ignores (PyTorch's and Hugging Face's -100), defined by the kernel crate.
pub use tuna_kernels::ops::cross_entropy::IGNORE_INDEX;
