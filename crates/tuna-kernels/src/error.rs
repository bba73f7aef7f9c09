//! The kernel crate's one error type.

/// Everything that can go wrong in an op or in loading kernels.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A buffer's length does not match what the op's parameters imply.
    #[error("{op}: tensor `{tensor}` has {got} elements, expected {expected} ({detail})")]
    Shape { op: &'static str, tensor: &'static str, expected: usize, got: usize, detail: String },
    /// Parameters that no shape can satisfy (zero heads, head count not divisible, ...).
    #[error("{op}: invalid parameters: {msg}")]
    Invalid { op: &'static str, msg: String },
    /// This op or configuration is not available on this device (e.g. a head dim without a kernel).
    #[error("{op}: unsupported on {device}: {msg}")]
    Unsupported { op: &'static str, device: String, msg: String },
    /// No CUDA driver or device: the reason, said plainly.
    #[error("CUDA unavailable: {0}")]
    NoCuda(String),
    /// A CUDA driver or cuBLAS call failed.
    #[error("CUDA error in {context}: {msg}")]
    Cuda { context: String, msg: String },
    /// NVRTC failed to compile a kernel source; `log` is the compiler's log.
    #[error("NVRTC failed to compile kernels/{kernel}.cu for {arch}:\n{log}")]
    Compile { kernel: String, arch: String, log: String },
    /// Reading or writing the kernel cache.
    #[error("kernel cache {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for a CUDA failure with context.
    pub fn cuda(context: impl Into<String>, err: impl std::fmt::Debug) -> Self {
        Error::Cuda { context: context.into(), msg: format!("{err:?}") }
    }
}

/// Check that `tensor` of `op` has `expected` elements.
pub fn check_len(
    op: &'static str,
    tensor: &'static str,
    got: usize,
    expected: usize,
    detail: impl FnOnce() -> String,
) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::Shape { op, tensor, expected, got, detail: detail() })
    }
}
