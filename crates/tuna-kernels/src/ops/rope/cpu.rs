//! RoPE on the CPU: rayon over tokens; each token's (cos, sin) are computed once and used by
//! every head. Generic over f32 and f64 ([`CpuFloat`]).
//!
//! The angles are the same for both: Hugging Face's f32 angles (`inv_freq` and `pos * inv_freq`
//! in f32, exactly as [`inv_freq`] and the CUDA kernel compute them), widened exactly to `F`; only
//! cos/sin and the rotation run in `F`. So an f64 model rotates by the very angles the f32 model
//! and Hugging Face use, and differs from them only by f32 rounding in cos/sin and the products.
//! (The angles do not depend on `x`, so either choice is a fixed linear map for gradient checks.)

use super::{check, inv_freq, RopeKernel, RopeParams};
use crate::backend::{Cpu, CpuFloat};
use crate::error::Result;
use rayon::prelude::*;

/// Rotate every head of one token: `out = R in` (forward) or `out += R^T in` (backward).
/// `cs` holds `[cos; D/2]` then `[sin; D/2]`.
fn rotate_token<F: CpuFloat>(inp: &[F], out: &mut [F], cs: &[F], head_dim: usize, backward: bool) {
    let half = head_dim / 2;
    let (cos, sin) = cs.split_at(half);
    for (inp, out) in inp.chunks(head_dim).zip(out.chunks_mut(head_dim)) {
        for i in 0..half {
            let (a, b, c, s) = (inp[i], inp[i + half], cos[i], sin[i]);
            if backward {
                out[i] += a * c + b * s;
                out[i + half] += b * c - a * s;
            } else {
                out[i] = a * c - b * s;
                out[i + half] = b * c + a * s;
            }
        }
    }
}

/// Apply the rotation to every token of `inp` into `out`.
fn apply<F: CpuFloat>(p: &RopeParams, pos: &[u32], inp: &[F], out: &mut [F], backward: bool) {
    let d = p.head_dim as usize;
    let inv = inv_freq(p.theta, d);
    let tok = p.heads as usize * d;
    out.par_chunks_mut(tok).zip(inp.par_chunks(tok)).zip(pos.par_iter()).for_each_init(
        || vec![F::zero(); d],
        |cs, ((out, inp), &t)| {
            for (i, &f) in inv.iter().enumerate() {
                let angle = F::c((t as f32 * f) as f64); // the f32 angle, exactly
                cs[i] = angle.cos();
                cs[d / 2 + i] = angle.sin();
            }
            rotate_token(inp, out, cs, d, backward);
        },
    );
}

impl<F: CpuFloat> RopeKernel<F> for Cpu {
    fn rope_fwd(&self, p: &RopeParams, pos: &[u32], x: &[F], y: &mut [F]) -> Result<()> {
        check(p, pos.len(), &[("x", x.len()), ("y", y.len())])?;
        apply(p, pos, x, y, false);
        Ok(())
    }

    fn rope_bwd(&self, p: &RopeParams, pos: &[u32], dy: &[F], dx: &mut [F]) -> Result<()> {
        check(p, pos.len(), &[("dy", dy.len()), ("dx", dx.len())])?;
        apply(p, pos, dy, dx, true);
        Ok(())
    }
}
