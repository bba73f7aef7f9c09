//! The models crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An op failed.
    #[error(transparent)]
    Autograd(#[from] tuna_autograd::Error),
    /// A kernel failed.
    #[error(transparent)]
    Kernel(#[from] tuna_kernels::Error),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file is malformed (truncated, bad header, bad JSON): names the file and what is wrong.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A tensor the model needs is missing from the checkpoint.
    #[error("{path}: missing tensor `{name}` (expected shape {expected:?})")]
    MissingTensor { path: PathBuf, name: String, expected: Vec<usize> },
    /// A tensor has the wrong shape.
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape { path: PathBuf, name: String, expected: Vec<usize>, found: Vec<usize> },
    /// A model type or tensor type tuna does not support.
    #[error("{path}: unsupported {what}")]
    Unsupported { path: PathBuf, what: String },
    /// An API argument out of its domain (a sampling temperature <= 0, labels of the wrong
    /// length, an empty prompt): says which and why.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Tokenizer failures.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How many names an error lists before it only counts the rest.
const NAMES_SHOWN: usize = 5;

/// A few of `names`, back-quoted, and how many there are in all: "`a`, `b` (2 in all)" or
/// "`a`, `b`, `c`, `d`, `e` and 7 more (12 in all)". For errors about sets of tensors or modules.
pub(crate) fn some_names<S: AsRef<str>>(names: &[S]) -> String {
    let shown: Vec<String> = names.iter().take(NAMES_SHOWN).map(|n| format!("`{}`", n.as_ref())).collect();
    let more = names.len().saturating_sub(NAMES_SHOWN);
    let more = if more > 0 { format!(" and {more} more") } else { String::new() };
    format!("{}{more} ({} in all)", shown.join(", "), names.len())
}
