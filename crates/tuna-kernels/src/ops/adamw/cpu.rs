//! AdamW on the CPU: rayon over fixed-size chunks. Generic over the float ([`CpuFloat`]): f32
//! (the same arithmetic as `adamw.cu`), or f64 for an f64 training loop.

use super::{check, stochastic_bf16, AdamWBf16Kernel, AdamWKernel, AdamWParams, SALT_M, SALT_V};
use crate::backend::{Cpu, CpuFloat};
use crate::error::Result;
use rayon::prelude::*;

const CHUNK: usize = 16 * 1024;

/// The step's constants in F. For f32 they equal the kernel parameters' fields exactly (the bias
/// corrections are rounded from the same f64 values); for f64 nothing is rounded to f32 but the
/// f32 hyperparameters themselves.
struct Hyper<F> {
    lr: F,
    beta1: F,
    beta2: F,
    eps: F,
    weight_decay: F,
    bias_c1: F,
    bias_c2: F,
}

impl<F: CpuFloat> Hyper<F> {
    fn new(p: &AdamWParams) -> Self {
        let (bc1, bc2) = p.bias_corrections();
        let w = |x: f32| F::c(x as f64);
        Hyper {
            lr: w(p.lr),
            beta1: w(p.beta1),
            beta2: w(p.beta2),
            eps: w(p.eps),
            weight_decay: w(p.weight_decay),
            bias_c1: F::c(bc1),
            bias_c2: F::c(bc2),
        }
    }
}

/// One element's update; for f32 the same arithmetic as `adamw.cu`.
#[inline]
fn update<F: CpuFloat>(k: &Hyper<F>, x: &mut F, g: F, m: &mut F, v: &mut F) {
    *x -= k.lr * k.weight_decay * *x;
    *m = k.beta1 * *m + (F::one() - k.beta1) * g;
    *v = k.beta2 * *v + (F::one() - k.beta2) * g * g;
    let (mhat, vhat) = (*m / k.bias_c1, *v / k.bias_c2);
    *x -= k.lr * mhat / (vhat.sqrt() + k.eps);
}

impl<F: CpuFloat> AdamWKernel<F> for Cpu {
    fn adamw_step(&self, p: &AdamWParams, params: &mut [F], grads: &[F], m: &mut [F], v: &mut [F]) -> Result<()> {
        check::<Cpu, F>(p, params, grads, m, v)?;
        let k = Hyper::<F>::new(p);
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

impl<F: CpuFloat> AdamWBf16Kernel<F> for Cpu {
    fn adamw_step_bf16_moments(
        &self,
        p: &AdamWParams,
        seed: u32,
        params: &mut [F],
        grads: &[F],
        m: &mut [half::bf16],
        v: &mut [half::bf16],
    ) -> Result<()> {
        let n = params.len();
        let detail = || format!("same length as params ({n})");
        crate::error::check_len("adamw", "grads", grads.len(), n, detail)?;
        crate::error::check_len("adamw", "m", m.len(), n, detail)?;
        crate::error::check_len("adamw", "v", v.len(), n, detail)?;
        p.kernel_params(n)?;
        let k = Hyper::<F>::new(p);
        params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .enumerate()
            .for_each(|(c, ((x, g), (m, v)))| {
                for (j, (((x, &g), m), v)) in x.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()).enumerate() {
                    let (mut mf, mut vf) = (F::c(m.to_f64()), F::c(v.to_f64()));
                    update(&k, x, g, &mut mf, &mut vf);
                    let i = (c * CHUNK + j) as u64;
                    *m = stochastic_bf16(mf.to_f32(), seed, i, SALT_M);
                    *v = stochastic_bf16(vf.to_f32(), seed, i, SALT_V);
                }
            });
        Ok(())
    }
}
