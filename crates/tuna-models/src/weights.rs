//! The interface between checkpoint readers (Hugging Face safetensors, GGUF) and the models:
//! named f32 tensors under Hugging Face names, with the file they came from for errors.

use crate::error::{Error, Result};
use std::borrow::Cow;
use std::path::Path;
use tuna_kernels::ops::lowp::Q4Format;

/// A source of named tensors, converted to f32 (dequantized where quantized). Names are Hugging
/// Face's (e.g. `model.layers.0.self_attn.q_proj.weight`), whatever the file format.
pub trait WeightSource {
    /// The file (or folder) errors should name.
    fn path(&self) -> &Path;
    /// Every float tensor's name (non-float tensors are skipped by the readers).
    fn names(&self) -> Vec<String>;
    /// Shape of `name`, if present.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// The values of `name` as f32: borrowed from the memory map where the file holds aligned
    /// f32 (zero-copy), converted otherwise. `None` if absent.
    fn get(&self, name: &str) -> Option<Result<Cow<'_, [f32]>>>;

    /// The ggml 4-bit block format `name` is stored in (a GGUF's Q4_0 / Q4_1), if any: such a
    /// tensor can be kept as its blocks (`--base-precision q4`). `None` for every other storage.
    fn q4_format(&self, name: &str) -> Option<Q4Format> {
        let _ = name;
        None
    }

    /// The stored blocks of a tensor [`WeightSource::q4_format`] names, rows in the order
    /// [`WeightSource::get`] gives them (row `r` of the `[out, in]` weight is bytes
    /// `r * in / 32 * block_bytes..`), exactly the values `get` dequantizes. `None` if absent or
    /// not stored in Q4.
    fn q4_blocks(&self, name: &str) -> Option<Result<(Q4Format, Cow<'_, [u8]>)>> {
        let _ = name;
        None
    }

    /// The name, as [`WeightSource::names`] lists it, that a lookup of `name` reads (`None` if
    /// absent). Sources that resolve names (a Hugging Face folder's optional base prefix) say which
    /// stored tensor a request took, so that the tensors no request took can be told.
    fn stored_name(&self, name: &str) -> Option<String> {
        self.shape(name).map(|_| name.to_string())
    }

    /// `name` with exactly `expected` shape, or an error naming the tensor, its expected shape and
    /// what was found.
    fn require(&self, name: &str, expected: &[usize]) -> Result<Cow<'_, [f32]>> {
        match self.shape(name) {
            None => Err(Error::MissingTensor {
                path: self.path().to_path_buf(),
                name: name.into(),
                expected: expected.to_vec(),
            }),
            Some(s) if s != expected => Err(Error::TensorShape {
                path: self.path().to_path_buf(),
                name: name.into(),
                expected: expected.to_vec(),
                found: s,
            }),
            Some(_) => self.get(name).expect("shape() said present"),
        }
    }
}
