//! The autograd crate's one error type.

/// Everything that can go wrong building or differentiating a graph.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A kernel rejected its inputs or failed on the device.
    #[error(transparent)]
    Kernel(#[from] tuna_kernels::Error),
    /// Tensor shapes an op cannot combine: names the op and both shapes.
    #[error("{op}: shape mismatch: {what}: {left:?} vs {right:?}")]
    Shape { op: &'static str, what: &'static str, left: Vec<usize>, right: Vec<usize> },
    /// `backward` needs a scalar (one element) that depends on something trainable.
    #[error("backward: {0}")]
    Backward(String),
    /// Data whose length does not match the shape it was given.
    #[error("tensor `{name}`: {len} values for shape {shape:?} ({expected} expected)")]
    Data { name: String, len: usize, shape: Vec<usize>, expected: usize },
    /// A tensor whose storage was released (a frozen weight held packed in low precision).
    #[error(
        "tensor `{0}`: its f32 storage was released (the weight is held packed: --base-precision); it cannot be read"
    )]
    Released(String),
    /// A request no tensor can satisfy, said in words.
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Check two shapes are equal, naming the op and what is compared.
pub fn same_shape(op: &'static str, what: &'static str, a: &[usize], b: &[usize]) -> Result<()> {
    if a == b {
        Ok(())
    } else {
        Err(Error::Shape { op, what, left: a.to_vec(), right: b.to_vec() })
    }
}
