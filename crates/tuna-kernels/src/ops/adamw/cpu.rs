//! AdamW on the CPU: rayon over fixed-size chunks.

use super::{check, AdamWKernel, AdamWKernelParams, AdamWParams};
use crate::backend::Cpu;
use crate::error::Result;
use rayon::prelude::*;

const CHUNK: usize = 16 * 1024;

/// One element's update; the same arithmetic as `adamw.cu`.
#[inline]
fn update(k: &AdamWKernelParams, x: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
    *x -= k.lr * k.weight_decay * *x;
    *m = k.beta1 * *m + (1.0 - k.beta1) * g;
    *v = k.beta2 * *v + (1.0 - k.beta2) * g * g;
    let (mhat, vhat) = (*m / k.bias_c1, *v / k.bias_c2);
    *x -= k.lr * mhat / (vhat.sqrt() + k.eps);
}

impl AdamWKernel for Cpu {
    fn adamw_step(
        &self,
        p: &AdamWParams,
        params: &mut [f32],
        grads: &[f32],
        m: &mut [f32],
        v: &mut [f32],
    ) -> Result<()> {
        let k = check::<Cpu>(p, params, grads, m, v)?;
        params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((x, g), (m, v))| {
                for (((x, &g), m), v) in x.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    update(&k, x, g, m, v);
                }
            });
        Ok(())
    }
}
