//! Rotary position embedding (RoPE) in the Hugging Face Llama `rotate_half` convention (the two
//! halves of each head are rotated against each other, not interleaved pairs), forward and backward.
//!
//! Layouts (row-major): `x`, `y`, `dy`, `dx`: `[batch, seq, heads, head_dim]` (E), never in place;
//! `pos`: `[batch * seq]` u32, each token's absolute position (so left padding and tokens after a
//! prefix or KV cache get their true positions). With `D = head_dim` (even), for `i < D/2`:
//! `inv_freq[i] = 1 / theta^(2i/D)` as Hugging Face computes it in f32 (see [`inv_freq`]),
//! `angle = (pos as f32) * inv_freq[i]` in f32, `c, s = cos, sin(angle)` in f32 (the f64 CPU
//! kernel takes the same f32 angle and computes cos/sin and the rotation in f64), and
//! - forward: `y[i] = x[i] c - x[i+D/2] s`, `y[i+D/2] = x[i+D/2] c + x[i] s`;
//! - backward (the transposed rotation, accumulated): `dx[i] += dy[i] c + dy[i+D/2] s`,
//!   `dx[i+D/2] += dy[i+D/2] c - dy[i] s`.

mod cpu;
mod cuda;
#[cfg(test)]
mod tests;

use crate::backend::{Backend, Elem};
use crate::error::{check_len, Error, Result};

/// Kernel parameters, mirrored by `struct RopeParams` in `kernels/rope.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeParams {
    pub batch: u32,
    pub seq: u32,
    /// Heads of the tensor rotated (query heads for q, KV heads for k).
    pub heads: u32,
    /// Rotated over entirely; even.
    pub head_dim: u32,
    /// Base of the frequencies: Llama 1e4, SmolLM2 1e5.
    pub theta: f32,
}

impl RopeParams {
    pub fn new(batch: usize, seq: usize, heads: usize, head_dim: usize, theta: f32) -> Self {
        RopeParams { batch: batch as u32, seq: seq as u32, heads: heads as u32, head_dim: head_dim as u32, theta }
    }
    /// Tokens: `batch * seq` (the length of `pos`).
    pub fn tokens(&self) -> usize {
        self.batch as usize * self.seq as usize
    }
    /// Elements of `x`: `batch * seq * heads * head_dim`.
    pub fn elems(&self) -> usize {
        self.tokens() * self.heads as usize * self.head_dim as usize
    }
    /// Validate the parameters themselves.
    pub fn validate(&self) -> Result<()> {
        if self.heads == 0 || self.head_dim == 0 || self.head_dim & 1 != 0 {
            let msg = format!("heads {} must be positive and head_dim {} positive and even", self.heads, self.head_dim);
            return Err(Error::Invalid { op: "rope", msg });
        }
        if !(self.theta > 0.0 && self.theta.is_finite()) {
            return Err(Error::Invalid {
                op: "rope",
                msg: format!("theta {} must be positive and finite", self.theta),
            });
        }
        Ok(())
    }
}

/// `inv_freq[i] = 1 / theta^(2i/D)` for `i < D/2`, as Hugging Face computes it in f32
/// (`1.0 / (theta ** (arange(0, D, 2).float() / D))`): the exponent and the reciprocal in f32, the
/// power rounded to f32 once from f64 — a correctly rounded f32 `powf`, which the CUDA kernel
/// computes the same way, so both devices get the same bits (f32 `powf` implementations differ by
/// an ulp or more, which at positions ~1e4 would move the angle by ~1e-3).
pub fn inv_freq(theta: f32, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / head_dim as f32;
            1.0 / (theta as f64).powf(e as f64) as f32
        })
        .collect()
}

/// RoPE on a device: forward and backward together.
pub trait RopeKernel<E: Elem>: Backend {
    /// Writes `y`, the rotation of `x` at positions `pos`.
    fn rope_fwd(&self, p: &RopeParams, pos: &Self::Buf<u32>, x: &Self::Buf<E>, y: &mut Self::Buf<E>) -> Result<()>;
    /// Accumulates into `dx` the gradient of `sum(y * dy)`: the inverse rotation of `dy`.
    fn rope_bwd(&self, p: &RopeParams, pos: &Self::Buf<u32>, dy: &Self::Buf<E>, dx: &mut Self::Buf<E>) -> Result<()>;
}

/// Check the parameters, `pos`, and the lengths of the `[batch, seq, heads, head_dim]` tensors.
fn check(p: &RopeParams, pos: usize, tensors: &[(&'static str, usize)]) -> Result<()> {
    p.validate()?;
    let shape = || format!("{p:?}");
    check_len("rope", "pos", pos, p.tokens(), shape)?;
    for &(name, len) in tensors {
        check_len("rope", name, len, p.elems(), shape)?;
    }
    Ok(())
}
