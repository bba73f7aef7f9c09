//! LayerNorm over the last dim (GPT-2, BERT), forward and backward.
//!
//! Layouts (row-major): `x`, `y`, `dy`, `dx`: `[rows, dim]` (E); `gamma`, `beta`: `[dim]` (E);
//! `mean`, `rstd`: `[rows]` (`E::Acc`: f32 for f32/bf16, f64 for f64), written by the forward and
//! read by the backward; `dgamma`, `dbeta`: `[dim]` (`E::Acc`).
//!
//! - forward: `mean = sum(x)/dim`, `rstd = 1/sqrt(sum((x-mean)^2)/dim + eps)` (biased variance,
//!   as PyTorch), `y = (x-mean)*rstd*gamma + beta`.
//! - backward, with `xhat = (x-mean)*rstd` and `g = dy*gamma`:
//!   `dx += rstd * (g - mean(g) - xhat*mean(g*xhat))`, `dgamma += sum_rows dy*xhat`,
//!   `dbeta += sum_rows dy`.
//!
//! - add + forward (`add_layernorm_fwd`): `h = x + r`, then the forward of `h`, in one pass over
//!   each row: the residual add and the norm that reads it (a pre-norm block's second norm, a
//!   post-norm block's both). `h` is an output (the residual stream, and the input the backward
//!   reads); the results are bitwise `add_fwd` then `layernorm_fwd`. There is no fused backward:
//!   the pair's backward is the two ops' own.
//!
//! `dgamma` and `dbeta` are each optional (a frozen parameter): with both `None` no
//! parameter-gradient work runs at all (CPU: no partial sums; CUDA: no partials or reduction
//! launch); with one `None` only the other is reduced.
//!
//! On CUDA, `dim <= 1024` runs one warp per row and larger dims one block per row; dgamma and
//! dbeta are reduced without atomics (per-chunk partials in a scratch buffer, then a reduction
//! kernel), so results are bitwise reproducible. The partials kernel computes both partials, so
//! with only one gradient asked for the other's partials go to scratch and are not reduced.

mod cpu;
mod cuda;
#[cfg(test)]
mod tests;

// The launch scheme is shared with rmsnorm, whose kernels use the same `kernels/norm.cuh`.
pub(crate) use cpu::lane_sum;
pub(crate) use cuda::{param_chunks, partials_launch, row_launch};

use crate::backend::{Backend, Elem};
use crate::error::{check_len, Error, Result};

/// Kernel parameters, mirrored by `struct LayerNormParams` in `kernels/layernorm.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerNormParams {
    /// Product of the leading dims.
    pub rows: u32,
    /// The normalized (last) dim.
    pub dim: u32,
    /// Added to the variance: BERT 1e-12, GPT-2 1e-5.
    pub eps: f32,
}

impl LayerNormParams {
    pub fn new(rows: usize, dim: usize, eps: f32) -> Self {
        LayerNormParams { rows: rows as u32, dim: dim as u32, eps }
    }
    /// Elements of `x`: `rows * dim`.
    pub fn elems(&self) -> usize {
        self.rows as usize * self.dim as usize
    }
    /// Validate the parameters themselves.
    pub fn validate(&self) -> Result<()> {
        if self.dim == 0 || !(self.eps >= 0.0 && self.eps.is_finite()) {
            let msg = format!("dim {} must be positive and eps {} finite and >= 0", self.dim, self.eps);
            return Err(Error::Invalid { op: "layernorm", msg });
        }
        Ok(())
    }
}

/// LayerNorm on a device: forward and backward together.
pub trait LayerNormKernel<E: Elem>: Backend {
    /// Writes `y`, and the row statistics `mean` and `rstd` for the backward.
    fn layernorm_fwd(
        &self,
        p: &LayerNormParams,
        x: &Self::Buf<E>,
        gamma: &Self::Buf<E>,
        beta: &Self::Buf<E>,
        y: &mut Self::Buf<E>,
        mean: &mut Self::Buf<E::Acc>,
        rstd: &mut Self::Buf<E::Acc>,
    ) -> Result<()>;
    /// Writes `h = x + r` and the forward of `h` (`y`, `mean`, `rstd`) in one pass: bitwise
    /// `add_fwd(x, r, h)` then `layernorm_fwd(h, ..)`.
    #[allow(clippy::too_many_arguments)]
    fn add_layernorm_fwd(
        &self,
        p: &LayerNormParams,
        x: &Self::Buf<E>,
        r: &Self::Buf<E>,
        gamma: &Self::Buf<E>,
        beta: &Self::Buf<E>,
        h: &mut Self::Buf<E>,
        y: &mut Self::Buf<E>,
        mean: &mut Self::Buf<E::Acc>,
        rstd: &mut Self::Buf<E::Acc>,
    ) -> Result<()>;
    /// Accumulates into `dx`, and into `dgamma` and `dbeta` where given, the gradients of
    /// `sum(y * dy)`. A `None` parameter gradient is not computed.
    fn layernorm_bwd(
        &self,
        p: &LayerNormParams,
        x: &Self::Buf<E>,
        gamma: &Self::Buf<E>,
        mean: &Self::Buf<E::Acc>,
        rstd: &Self::Buf<E::Acc>,
        dy: &Self::Buf<E>,
        dx: &mut Self::Buf<E>,
        dgamma: Option<&mut Self::Buf<E::Acc>>,
        dbeta: Option<&mut Self::Buf<E::Acc>>,
    ) -> Result<()>;
}

/// Which buffer a length belongs to: `[rows, dim]`, `[dim]` or `[rows]`.
#[derive(Clone, Copy)]
pub(crate) enum Extent {
    Full,
    Dim,
    Rows,
}

/// Check the parameters and the length of every `(name, extent, len)`; shared by both devices.
pub(crate) fn check(p: &LayerNormParams, bufs: &[(&'static str, Extent, usize)]) -> Result<()> {
    p.validate()?;
    check_extents("layernorm", p.rows, p.dim, bufs)
}

/// The length checks of a row-wise norm over `[rows, dim]` (shared with rmsnorm).
pub(crate) fn check_extents(
    op: &'static str,
    rows: u32,
    dim: u32,
    bufs: &[(&'static str, Extent, usize)],
) -> Result<()> {
    for &(name, extent, len) in bufs {
        let want = match extent {
            Extent::Full => rows as usize * dim as usize,
            Extent::Dim => dim as usize,
            Extent::Rows => rows as usize,
        };
        check_len(op, name, len, want, || format!("rows {rows}, dim {dim}"))?;
    }
    Ok(())
}
