//! RMSNorm over the last dim (Llama), forward and backward.
//!
//! Layouts (row-major): `x`, `y`, `dy`, `dx`: `[rows, dim]` (E); `gamma`: `[dim]` (E);
//! `rstd`: `[rows]` (`E::Acc`: f32 for f32/bf16, f64 for f64), written by the forward and read by
//! the backward; `dgamma`: `[dim]` (`E::Acc`).
//!
//! - forward: `rstd = 1/sqrt(mean(x^2) + eps)`, `y = x*rstd*gamma`.
//! - backward, with `xhat = x*rstd` and `g = dy*gamma`: `dx += rstd * (g - xhat*mean(g*xhat))`,
//!   `dgamma += sum_rows dy*xhat`.
//! - add + forward (`add_rmsnorm_fwd`): `h = x + r`, then the forward of `h`, in one pass over
//!   each row (a pre-norm block's residual add and the norm that reads it); bitwise `add_fwd` then
//!   `rmsnorm_fwd`. No fused backward: the pair's backward is the two ops' own.
//!
//! `dgamma` is optional (a frozen gamma): with `None` no parameter-gradient work runs (CPU: no
//! partial sums; CUDA: no partials or reduction launch).
//!
//! CUDA uses the launch scheme of layernorm (`kernels/norm.cuh`): one warp per row for
//! `dim <= 1024`, one block per row above, and dgamma from per-chunk partials in a scratch buffer
//! reduced by a second kernel (no atomics: bitwise reproducible).

mod cpu;
mod cuda;
#[cfg(test)]
mod tests;

use crate::backend::{Backend, Elem};
use crate::error::{Error, Result};
use crate::ops::layernorm::{check_extents, Extent};

/// Kernel parameters, mirrored by `struct RmsNormParams` in `kernels/rmsnorm.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RmsNormParams {
    /// Product of the leading dims.
    pub rows: u32,
    /// The normalized (last) dim.
    pub dim: u32,
    /// Added to the mean square (Llama: `rms_norm_eps`, e.g. 1e-5 or 1e-6).
    pub eps: f32,
}

impl RmsNormParams {
    pub fn new(rows: usize, dim: usize, eps: f32) -> Self {
        RmsNormParams { rows: rows as u32, dim: dim as u32, eps }
    }
    /// Validate the parameters themselves.
    pub fn validate(&self) -> Result<()> {
        if self.dim == 0 || !(self.eps >= 0.0 && self.eps.is_finite()) {
            let msg = format!("dim {} must be positive and eps {} finite and >= 0", self.dim, self.eps);
            return Err(Error::Invalid { op: "rmsnorm", msg });
        }
        Ok(())
    }
}

/// RMSNorm on a device: forward and backward together.
pub trait RmsNormKernel<E: Elem>: Backend {
    /// Writes `y` and the row statistic `rstd` for the backward.
    fn rmsnorm_fwd(
        &self,
        p: &RmsNormParams,
        x: &Self::Buf<E>,
        gamma: &Self::Buf<E>,
        y: &mut Self::Buf<E>,
        rstd: &mut Self::Buf<E::Acc>,
    ) -> Result<()>;
    /// Writes `h = x + r` and the forward of `h` (`y`, `rstd`) in one pass: bitwise
    /// `add_fwd(x, r, h)` then `rmsnorm_fwd(h, ..)`.
    #[allow(clippy::too_many_arguments)]
    fn add_rmsnorm_fwd(
        &self,
        p: &RmsNormParams,
        x: &Self::Buf<E>,
        r: &Self::Buf<E>,
        gamma: &Self::Buf<E>,
        h: &mut Self::Buf<E>,
        y: &mut Self::Buf<E>,
        rstd: &mut Self::Buf<E::Acc>,
    ) -> Result<()>;
    /// Accumulates into `dx`, and into `dgamma` when given, the gradients of `sum(y * dy)`.
    fn rmsnorm_bwd(
        &self,
        p: &RmsNormParams,
        x: &Self::Buf<E>,
        gamma: &Self::Buf<E>,
        rstd: &Self::Buf<E::Acc>,
        dy: &Self::Buf<E>,
        dx: &mut Self::Buf<E>,
        dgamma: Option<&mut Self::Buf<E::Acc>>,
    ) -> Result<()>;
}

/// Check the parameters and the length of every `(name, extent, len)`; shared by both devices.
fn check(p: &RmsNormParams, bufs: &[(&'static str, Extent, usize)]) -> Result<()> {
    p.validate()?;
    check_extents("rmsnorm", p.rows, p.dim, bufs)
}
