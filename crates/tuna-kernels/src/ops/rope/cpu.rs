//! RoPE on the CPU: rayon over tokens; each token's (cos, sin) are computed once and used by
//! every head.

use super::{check, inv_freq, RopeKernel, RopeParams};
use crate::backend::Cpu;
use crate::error::Result;
use rayon::prelude::*;

/// Rotate every head of one token: `out = R in` (forward) or `out += R^T in` (backward).
/// `cs` holds `[cos; D/2]` then `[sin; D/2]`.
fn rotate_token(inp: &[f32], out: &mut [f32], cs: &[f32], head_dim: usize, backward: bool) {
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
fn apply(p: &RopeParams, pos: &[u32], inp: &[f32], out: &mut [f32], backward: bool) {
    let d = p.head_dim as usize;
    let inv = inv_freq(p.theta, d);
    let tok = p.heads as usize * d;
    out.par_chunks_mut(tok).zip(inp.par_chunks(tok)).zip(pos.par_iter()).for_each_init(
        || vec![0.0f32; d],
        |cs, ((out, inp), &t)| {
            for (i, &f) in inv.iter().enumerate() {
                let angle = t as f32 * f;
                cs[i] = angle.cos();
                cs[d / 2 + i] = angle.sin();
            }
            rotate_token(inp, out, cs, d, backward);
        },
    );
}

impl RopeKernel<f32> for Cpu {
    fn rope_fwd(&self, p: &RopeParams, pos: &[u32], x: &[f32], y: &mut [f32]) -> Result<()> {
        check(p, pos.len(), &[("x", x.len()), ("y", y.len())])?;
        apply(p, pos, x, y, false);
        Ok(())
    }

    fn rope_bwd(&self, p: &RopeParams, pos: &[u32], dy: &[f32], dx: &mut [f32]) -> Result<()> {
        check(p, pos.len(), &[("dy", dy.len()), ("dx", dx.len())])?;
        apply(p, pos, dy, dx, true);
        Ok(())
    }
}
