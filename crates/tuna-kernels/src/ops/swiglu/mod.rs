//! SiLU and SwiGLU (the Llama MLP's `silu(gate) * up`), elementwise, forward and backward.
//!
//! `silu(x) = x * sigmoid(x)`; `swiglu(gate, up) = silu(gate) * up` with `gate` and `up` separate
//! buffers of one length. Backwards accumulate: `dx += dy * silu'(x)`;
//! `dgate += dy * up * silu'(gate)`, `dup += dy * silu(gate)`.

mod cpu;
mod cuda;
#[cfg(test)]
mod tests;

use crate::backend::{Backend, Elem};
use crate::error::{check_len, Result};

/// Kernel parameters, mirrored by `struct SwigluParams` in `kernels/swiglu.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwigluParams {
    /// Elements of every buffer.
    pub n: u64,
}

/// SiLU and SwiGLU on a device: forwards and backwards together.
pub trait SwigluKernel<E: Elem>: Backend {
    /// `y = silu(x)`, elementwise.
    fn silu_fwd(&self, x: &Self::Buf<E>, y: &mut Self::Buf<E>) -> Result<()>;
    /// `dx += dy * silu'(x)`.
    fn silu_bwd(&self, x: &Self::Buf<E>, dy: &Self::Buf<E>, dx: &mut Self::Buf<E>) -> Result<()>;
    /// `y = silu(gate) * up`, elementwise.
    fn swiglu_fwd(&self, gate: &Self::Buf<E>, up: &Self::Buf<E>, y: &mut Self::Buf<E>) -> Result<()>;
    /// `dgate += dy * up * silu'(gate)`, `dup += dy * silu(gate)`.
    fn swiglu_bwd(
        &self,
        gate: &Self::Buf<E>,
        up: &Self::Buf<E>,
        dy: &Self::Buf<E>,
        dgate: &mut Self::Buf<E>,
        dup: &mut Self::Buf<E>,
    ) -> Result<()>;
}

/// Every buffer of `op` has the length `n` of its first input (`first` names it).
fn check(op: &'static str, first: &'static str, n: usize, others: &[(&'static str, usize)]) -> Result<SwigluParams> {
    for &(name, len) in others {
        check_len(op, name, len, n, || format!("same length as {first} ({n})"))?;
    }
    Ok(SwigluParams { n: n as u64 })
}
