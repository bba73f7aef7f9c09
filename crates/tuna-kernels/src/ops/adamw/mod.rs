//! AdamW, fused: one pass over f32 parameters, gradients and moments, with decoupled weight decay
//! exactly as PyTorch's `torch.optim.AdamW`:
//!
//! ```text
//! p -= lr * wd * p
//! m = beta1 * m + (1 - beta1) * g
//! v = beta2 * v + (1 - beta2) * g^2
//! p -= lr * (m / (1 - beta1^step)) / (sqrt(v / (1 - beta2^step)) + eps)
//! ```
//!
//! An optimizer has no backward. It works on masters of a float type F: f32 on both devices, and
//! f64 on the CPU (an f64 training loop, for gradient checks of whole models). The hyperparameters
//! are f32 on every F; the f64 CPU step widens them and computes its bias corrections in f64. The
//! kernel symbol is `adamw_step_f32`. [`AdamWBf16Kernel`] is the same step with moments stored in
//! bf16 (stochastic rounding).

mod cpu;
mod cuda;

use crate::backend::{Backend, Elem};
use crate::error::{check_len, Error, Result};

/// The hyperparameters of one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number, for bias correction.
    pub step: u32,
}

impl AdamWParams {
    /// PyTorch's defaults (betas 0.9/0.999, eps 1e-8, weight decay 0.01) at `lr`, step 1.
    pub fn new(lr: f32) -> Self {
        AdamWParams { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 1 }
    }

    /// Validate, and compute the kernel parameters for `n` elements (bias corrections in f64).
    pub fn kernel_params(&self, n: usize) -> Result<AdamWKernelParams> {
        let bad = |msg: String| Err(Error::Invalid { op: "adamw", msg });
        if self.step == 0 {
            return bad("step is 1-based; got 0".into());
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad(format!("betas ({}, {}) must be in [0, 1)", self.beta1, self.beta2));
        }
        if ![self.lr, self.eps, self.weight_decay].iter().all(|x| x.is_finite()) {
            return bad(format!("lr {}, eps {}, weight_decay {} must be finite", self.lr, self.eps, self.weight_decay));
        }
        let (bc1, bc2) = self.bias_corrections();
        Ok(AdamWKernelParams {
            n: n as u64,
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            bias_c1: bc1 as f32,
            bias_c2: bc2 as f32,
            _pad: 0,
        })
    }

    /// `(1 - beta1^step, 1 - beta2^step)` in f64.
    pub fn bias_corrections(&self) -> (f64, f64) {
        let bc = |beta: f32| 1.0 - (beta as f64).powi(self.step.min(i32::MAX as u32) as i32);
        (bc(self.beta1), bc(self.beta2))
    }
}

/// Kernel parameters, mirrored by `struct AdamWKernelParams` in `kernels/adamw.cu`; both devices
/// compute from these, so they apply the same bias corrections.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWKernelParams {
    pub n: u64,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// `1 - beta1^step`.
    pub bias_c1: f32,
    /// `1 - beta2^step`.
    pub bias_c2: f32,
    pub _pad: u32,
}

/// The fused AdamW step on a device, on masters of float type `F`.
pub trait AdamWKernel<F: Elem>: Backend {
    /// Updates `params`, `m` and `v` in place from `grads` (all `[n]` of F).
    fn adamw_step(
        &self,
        p: &AdamWParams,
        params: &mut Self::Buf<F>,
        grads: &Self::Buf<F>,
        m: &mut Self::Buf<F>,
        v: &mut Self::Buf<F>,
    ) -> Result<()>;
}

/// AdamW with its moments stored in bf16 (half the optimizer memory): each step widens them to
/// the masters' float, updates as [`AdamWKernel::adamw_step`] does (the parameter update uses the
/// unrounded moments of the step), and stores them back with stochastic rounding, since
/// round-to-nearest would freeze them (beta2 = 0.999 moves `v` by 0.1%, under bf16's half-ulp).
/// The draw is a counter-based hash of `(seed, index, moment)` ([`stochastic_bf16`]): a step is
/// reproducible, and both devices draw the same bits. Kernel symbol `adamw_step_f32_bf16_moments`.
pub trait AdamWBf16Kernel<F: Elem>: Backend {
    fn adamw_step_bf16_moments(
        &self,
        p: &AdamWParams,
        seed: u32,
        params: &mut Self::Buf<F>,
        grads: &Self::Buf<F>,
        m: &mut Self::Buf<half::bf16>,
        v: &mut Self::Buf<half::bf16>,
    ) -> Result<()>;
}

/// The hash of `adamw.cu`'s stochastic rounding (lowbias32).
#[inline]
pub(crate) fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// `f` rounded to bf16 stochastically: up with probability equal to the fraction of the ulp it
/// lies above the lower neighbour (in magnitude), so the rounding is unbiased; the 16 random bits
/// come from `(seed, i, salt)`. Infinities and NaN are kept as they are.
#[inline]
pub fn stochastic_bf16(f: f32, seed: u32, i: u64, salt: u32) -> half::bf16 {
    let bits = f.to_bits();
    if bits & 0x7f80_0000 == 0x7f80_0000 {
        return half::bf16::from_bits((bits >> 16) as u16);
    }
    let h = mix32(seed ^ mix32((i as u32) ^ mix32(((i >> 32) as u32).wrapping_add(salt))));
    half::bf16::from_bits((bits.wrapping_add(h & 0xffff) >> 16) as u16)
}

/// The salts of the two moments' draws (as in `adamw.cu`).
pub(crate) const SALT_M: u32 = 0x6d6d;
pub(crate) const SALT_V: u32 = 0x7676;

/// Shape checks shared by both devices; returns the kernel parameters.
fn check<B: Backend + ?Sized, F: Elem>(
    p: &AdamWParams,
    params: &B::Buf<F>,
    grads: &B::Buf<F>,
    m: &B::Buf<F>,
    v: &B::Buf<F>,
) -> Result<AdamWKernelParams> {
    let n = B::len(params);
    let detail = || format!("same length as params ({n})");
    check_len("adamw", "grads", B::len(grads), n, detail)?;
    check_len("adamw", "m", B::len(m), n, detail)?;
    check_len("adamw", "v", B::len(v), n, detail)?;
    p.kernel_params(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{cuda_or_skip, to_f64, Rng, Tol};
    use crate::{Cpu, CpuFloat};

    /// PyTorch's AdamW, in f64, over the given steps (grads[s] at step s + 1).
    fn reference(p: &AdamWParams, params: &[f64], grads: &[Vec<f64>]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (lr, b1, b2, eps, wd) = (p.lr as f64, p.beta1 as f64, p.beta2 as f64, p.eps as f64, p.weight_decay as f64);
        let n = params.len();
        let (mut x, mut m, mut v) = (params.to_vec(), vec![0.0; n], vec![0.0; n]);
        for (s, g) in grads.iter().enumerate() {
            let t = (s + 1) as i32;
            for i in 0..n {
                x[i] -= lr * wd * x[i];
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let (mhat, vhat) = (m[i] / (1.0 - b1.powi(t)), v[i] / (1.0 - b2.powi(t)));
                x[i] -= lr * mhat / (vhat.sqrt() + eps);
            }
        }
        (x, m, v)
    }

    fn setup(n: usize, steps: usize) -> (AdamWParams, Vec<f32>, Vec<Vec<f32>>) {
        let mut rng = Rng::new(1);
        let p = AdamWParams { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 1 };
        let params = rng.normal_vec(n, 1.0);
        let grads = (0..steps).map(|_| rng.normal_vec(n, 0.5)).collect();
        (p, params, grads)
    }

    /// Several CPU steps on F (f32, or f64 for an f64 training loop) against the f64 reference.
    fn cpu_case<F: CpuFloat>(tol: Tol) {
        let (n, steps) = (10_007, 7);
        let (p, params, grads) = setup(n, steps);
        let conv = |v: &[f32]| v.iter().map(|&x| F::c(x as f64)).collect::<Vec<F>>();
        let (mut x, mut m, mut v) = (conv(&params), vec![F::zero(); n], vec![F::zero(); n]);
        for (s, g) in grads.iter().enumerate() {
            Cpu.adamw_step(&AdamWParams { step: s as u32 + 1, ..p }, &mut x, &conv(g), &mut m, &mut v).unwrap();
        }
        let grads64: Vec<Vec<f64>> = grads.iter().map(|g| to_f64(g)).collect();
        let (rx, rm, rv) = reference(&p, &to_f64(&params), &grads64);
        tol.assert_close(&format!("adamw {} params", F::NAME), &x, &rx);
        tol.assert_close(&format!("adamw {} m", F::NAME), &m, &rm);
        tol.assert_close(&format!("adamw {} v", F::NAME), &v, &rv);
    }

    #[test]
    fn cpu_matches_f64_reference_over_several_steps() {
        cpu_case::<f32>(Tol::F32);
    }

    #[test]
    fn cpu_f64_matches_f64_reference_over_several_steps() {
        cpu_case::<f64>(Tol::F64);
    }

    #[test]
    fn bad_parameters_and_shapes_are_errors() {
        let (mut x, mut m, mut v) = (vec![0.0f32; 4], vec![0.0; 4], vec![0.0; 3]);
        let e = Cpu.adamw_step(&AdamWParams::new(1e-3), &mut x, &[0.0; 4], &mut m, &mut v).unwrap_err().to_string();
        assert!(e.contains("adamw") && e.contains("`v`"), "{e}");
        let mut v = vec![0.0; 4];
        let e = Cpu
            .adamw_step(&AdamWParams { step: 0, ..AdamWParams::new(1e-3) }, &mut x, &[0.0; 4], &mut m, &mut v)
            .unwrap_err();
        assert!(e.to_string().contains("step"), "{e}");
    }

    #[test]
    fn stochastic_rounding_is_unbiased_reproducible_and_keeps_exact_values() {
        // 1 + 0.3 ulp (bf16 ulp at 1 is 2^-7): rounds up about 30% of the time.
        let x = 1.0f32 + 0.3 * (1.0 / 128.0);
        let n = 100_000u64;
        let mean: f64 = (0..n).map(|i| stochastic_bf16(x, 7, i, SALT_M).to_f64()).sum::<f64>() / n as f64;
        assert!((mean - x as f64).abs() < 2e-5, "mean {mean} vs {x}");
        let neg: f64 = (0..n).map(|i| stochastic_bf16(-x, 7, i, SALT_V).to_f64()).sum::<f64>() / n as f64;
        assert!((neg + x as f64).abs() < 2e-5, "mean {neg} vs {}", -x);
        assert_eq!(stochastic_bf16(x, 3, 11, SALT_M), stochastic_bf16(x, 3, 11, SALT_M));
        for exact in [0.0f32, -0.0, 1.0, -2.5, f32::from_bits(0x0020_0000), f32::INFINITY, f32::NEG_INFINITY] {
            assert_eq!(stochastic_bf16(exact, 1, 2, SALT_M).to_f32().to_bits(), exact.to_bits(), "{exact}");
        }
        assert!(stochastic_bf16(f32::NAN, 1, 2, SALT_M).is_nan());
    }

    /// bf16 moments follow f32 moments: `v` still decays at beta2 = 0.999 (round-to-nearest would
    /// hold it), and the parameters stay close over many steps.
    #[test]
    fn bf16_moments_track_f32_moments() {
        let (n, steps) = (4096, 300);
        let mut rng = Rng::new(3);
        let p = AdamWParams { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 1 };
        let params = rng.normal_vec(n, 1.0);
        let (mut x32, mut m32, mut v32) = (params.clone(), vec![0.0f32; n], vec![0.0f32; n]);
        let (mut x16, mut m16, mut v16) = (params.clone(), vec![half::bf16::ZERO; n], vec![half::bf16::ZERO; n]);
        for s in 0..steps {
            // Large gradients for 10 steps, then small ones: v must decay towards them.
            let scale = if s < 10 { 1.0 } else { 0.01 };
            let g = rng.normal_vec(n, scale);
            let ps = AdamWParams { step: s as u32 + 1, ..p };
            Cpu.adamw_step(&ps, &mut x32, &g, &mut m32, &mut v32).unwrap();
            Cpu.adamw_step_bf16_moments(&ps, s as u32, &mut x16, &g, &mut m16, &mut v16).unwrap();
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let v16f: Vec<f64> = v16.iter().map(|x| x.to_f64()).collect();
        let (a, b) = (mean(&v16f), mean(&to_f64(&v32)));
        assert!((a - b).abs() < 0.02 * b, "mean v: bf16 {a} vs f32 {b}");
        // 290 steps of decay from ~1e-2 (v after the large gradients): far below where it started.
        assert!(a < 0.8 * 1e-2, "v did not decay: {a}");
        // Parameters: the two runs differ by a few percent of how far the parameters moved.
        let mean_abs =
            |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).sum::<f64>() / n as f64;
        let (dx, moved) = (mean_abs(&x16, &x32), mean_abs(&x32, &params));
        assert!(moved > 1e-3 && dx < 0.05 * moved, "params differ by {dx} on average (mean move {moved})");
    }

    #[test]
    fn cuda_bf16_moments_match_cpu() {
        let Some(dev) = cuda_or_skip("adamw::cuda_bf16_moments_match_cpu") else { return };
        let (n, steps) = (70_001, 5);
        let (p, params, grads) = setup(n, steps);
        let (mut x, mut m, mut v) = (params.clone(), vec![half::bf16::ZERO; n], vec![half::bf16::ZERO; n]);
        let (mut xd, mut md, mut vd) =
            (dev.upload(&params).unwrap(), dev.zeros::<half::bf16>(n).unwrap(), dev.zeros::<half::bf16>(n).unwrap());
        for (s, g) in grads.iter().enumerate() {
            let ps = AdamWParams { step: s as u32 + 1, ..p };
            Cpu.adamw_step_bf16_moments(&ps, 40 + s as u32, &mut x, g, &mut m, &mut v).unwrap();
            let gd = dev.upload(g).unwrap();
            dev.adamw_step_bf16_moments(&ps, 40 + s as u32, &mut xd, &gd, &mut md, &mut vd).unwrap();
        }
        Tol::CUDA_F32.assert_close("adamw bf16-moments cuda params", &dev.download(&xd).unwrap(), &to_f64(&x));
        // The same draws: moments agree to one bf16 step where an FMA tipped a rounding.
        let f = |v: &[half::bf16]| v.iter().map(|x| x.to_f64()).collect::<Vec<f64>>();
        Tol::CUDA_BF16.assert_close("adamw bf16-moments cuda m", &f(&dev.download(&md).unwrap()), &f(&m));
        Tol::CUDA_BF16.assert_close("adamw bf16-moments cuda v", &f(&dev.download(&vd).unwrap()), &f(&v));
    }

    #[test]
    fn cuda_matches_cpu() {
        let Some(dev) = cuda_or_skip("adamw::cuda_matches_cpu") else { return };
        let (n, steps) = (70_001, 5); // not a multiple of the 256-thread block
        let (p, params, grads) = setup(n, steps);
        let (mut x, mut m, mut v) = (params.clone(), vec![0.0; n], vec![0.0; n]);
        let (mut xd, mut md, mut vd) =
            (dev.upload(&params).unwrap(), dev.zeros::<f32>(n).unwrap(), dev.zeros::<f32>(n).unwrap());
        for (s, g) in grads.iter().enumerate() {
            let ps = AdamWParams { step: s as u32 + 1, ..p };
            Cpu.adamw_step(&ps, &mut x, g, &mut m, &mut v).unwrap();
            let gd = dev.upload(g).unwrap();
            dev.adamw_step(&ps, &mut xd, &gd, &mut md, &mut vd).unwrap();
        }
        Tol::CUDA_F32.assert_close("adamw cuda params", &dev.download(&xd).unwrap(), &x);
        Tol::CUDA_F32.assert_close("adamw cuda m", &dev.download(&md).unwrap(), &m);
        Tol::CUDA_F32.assert_close("adamw cuda v", &dev.download(&vd).unwrap(), &v);
    }
}
