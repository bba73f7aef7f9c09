//! GELU, tanh approximation (GPT-2) and exact erf form (BERT), forward and backward.

mod cpu;
mod cuda;
mod fast;

pub(crate) use cpu::{fwd_chunk as cpu_fwd_chunk, CHUNK as CPU_CHUNK};

use crate::backend::{Backend, Elem};
use crate::error::{check_len, Result};

/// Which GELU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum GeluKind {
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, GPT-2's `gelu_new`.
    Tanh = 0,
    /// `0.5 x (1 + erf(x / sqrt(2)))`, BERT's `gelu`.
    Erf = 1,
    /// `max(x, 0)` (T5's feed-forward): not a GELU, but the same elementwise kernel. Its
    /// gradient at 0 is 0, as PyTorch's.
    Relu = 2,
}

/// Kernel parameters, mirrored by `struct GeluParams` in `kernels/gelu.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GeluParams {
    pub n: u64,
    pub kind: u32,
    pub _pad: u32,
}

/// GELU on a device: forward and backward together.
pub trait GeluKernel<E: Elem>: Backend {
    /// `y = gelu(x)`, elementwise.
    fn gelu_fwd(&self, kind: GeluKind, x: &Self::Buf<E>, y: &mut Self::Buf<E>) -> Result<()>;
    /// `dx += dy * gelu'(x)`.
    fn gelu_bwd(&self, kind: GeluKind, x: &Self::Buf<E>, dy: &Self::Buf<E>, dx: &mut Self::Buf<E>) -> Result<()>;
}

fn check(n: usize, others: &[(&'static str, usize)]) -> Result<GeluParams> {
    for &(name, len) in others {
        check_len("gelu", name, len, n, || format!("same length as x ({n})"))?;
    }
    Ok(GeluParams { n: n as u64, kind: 0, _pad: 0 })
}

/// The f32 CPU GELU's vector path on this CPU: `Some("avx2+fma")`, or `None` where it runs the
/// portable scalar path (see `ops/gelu/fast.rs` for both and their measured error).
pub fn cpu_f32_simd() -> Option<&'static str> {
    fast::has_avx2_fma().then_some("avx2+fma")
}

/// Benchmark hooks: the f32 CPU GELU on a chosen path, in parallel chunks as the kernel runs.
/// `Generic` is the code f32 ran before the vector path (f64's generic code instantiated for f32;
/// its f32 `gelu(-inf)` is NaN for Tanh and -inf for Erf, its gradient at +inf is inf), `Scalar` the
/// portable fallback, `Simd` the AVX2 path where the CPU has it (else `Scalar`).
#[doc(hidden)]
pub mod bench {
    use super::GeluKind;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Path {
        Generic,
        Scalar,
        Simd,
    }

    /// `y = gelu(x)` on `path`.
    pub fn fwd(path: Path, kind: GeluKind, x: &[f32], y: &mut [f32]) {
        assert_eq!(x.len(), y.len());
        match path {
            Path::Generic => super::cpu::generic_fwd(kind, x, y),
            _ => super::cpu::fwd_f32_path(kind, x, y, path == Path::Simd),
        }
    }

    /// `dx += dy * gelu'(x)` on `path`.
    pub fn bwd(path: Path, kind: GeluKind, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        assert!(x.len() == dy.len() && x.len() == dx.len());
        match path {
            Path::Generic => super::cpu::generic_bwd(kind, x, dy, dx),
            _ => super::cpu::bwd_f32_path(kind, x, dy, dx, path == Path::Simd),
        }
    }
}

/// `sqrt(2/pi)`; rounds to the f32 `0.797_884_6` the f32 kernels always used.
pub(crate) const SQRT_2_OVER_PI: f64 = std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2;
/// The cubic coefficient of the tanh approximation.
pub(crate) const GELU_C: f64 = 0.044_715;
/// `1/sqrt(2 pi)`; rounds to the f32 `0.398_942_3` the f32 kernels always used.
pub(crate) const FRAC_1_SQRT_2PI: f64 = 0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{cuda_or_skip, round_bf16, Rng, Tol};
    use crate::{Cpu, Cuda};
    use half::bf16;

    fn ref_fwd(kind: GeluKind, x: f64) -> f64 {
        match kind {
            GeluKind::Tanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
            }
            GeluKind::Erf => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
            GeluKind::Relu => x.max(0.0),
        }
    }
    fn ref_grad(kind: GeluKind, x: f64) -> f64 {
        match kind {
            GeluKind::Tanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                let u = c * (x + 0.044715 * x * x * x);
                let t = u.tanh();
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
            }
            GeluKind::Erf => {
                let cdf = 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
                cdf + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
            }
            GeluKind::Relu => (x > 0.0) as u8 as f64,
        }
    }
    const KINDS: [GeluKind; 3] = [GeluKind::Tanh, GeluKind::Erf, GeluKind::Relu];

    #[test]
    fn reference_gradient_matches_central_differences() {
        let mut rng = Rng::new(1);
        for kind in KINDS {
            for _ in 0..200 {
                let x = rng.uniform(-6.0, 6.0) as f64;
                let h = 1e-5;
                let fd = (ref_fwd(kind, x + h) - ref_fwd(kind, x - h)) / (2.0 * h);
                Tol::GRAD_CHECK.assert_close(&format!("gelu {kind:?} at {x}"), &[ref_grad(kind, x)], &[fd]);
            }
        }
    }

    #[test]
    fn cpu_matches_f64_reference() {
        let n = 4099; // not a multiple of any chunk size
        let mut rng = Rng::new(2);
        let x = rng.vec(n, -8.0, 8.0);
        let dy = rng.vec(n, -1.0, 1.0);
        for kind in KINDS {
            let mut y = vec![0.0; n];
            Cpu.gelu_fwd(kind, &x, &mut y).unwrap();
            let want: Vec<f64> = x.iter().map(|&v| ref_fwd(kind, v as f64)).collect();
            Tol::F32.assert_close(&format!("gelu {kind:?} fwd"), &y, &want);
            let mut dx = vec![0.5; n]; // backward accumulates
            Cpu.gelu_bwd(kind, &x, &dy, &mut dx).unwrap();
            let want: Vec<f64> = (0..n).map(|i| 0.5 + dy[i] as f64 * ref_grad(kind, x[i] as f64)).collect();
            Tol::F32.assert_close(&format!("gelu {kind:?} bwd"), &dx, &want);
        }
    }

    #[test]
    fn cpu_f64_matches_f64_reference() {
        let n = 4099;
        let mut rng = Rng::new(4);
        let x = crate::testing::to_f64(&rng.vec(n, -8.0, 8.0));
        let dy = crate::testing::to_f64(&rng.vec(n, -1.0, 1.0));
        for kind in KINDS {
            let mut y = vec![0.0f64; n];
            Cpu.gelu_fwd(kind, &x, &mut y).unwrap();
            let want: Vec<f64> = x.iter().map(|&v| ref_fwd(kind, v)).collect();
            Tol::F64.assert_close(&format!("gelu {kind:?} f64 fwd"), &y, &want);
            let mut dx = vec![0.5f64; n]; // backward accumulates
            Cpu.gelu_bwd(kind, &x, &dy, &mut dx).unwrap();
            let want: Vec<f64> = (0..n).map(|i| 0.5 + dy[i] * ref_grad(kind, x[i])).collect();
            Tol::F64.assert_close(&format!("gelu {kind:?} f64 bwd"), &dx, &want);
        }
    }

    /// The f64 constants round to the f32 literals the f32 kernels used before they were
    /// generic, so the f32 path computes the same bits.
    /// The f32 erf, exp and tanh behind the vectorized CPU GELU, against f64 libm over a fine grid:
    /// within the errors `CpuFloat` documents.
    #[test]
    fn f32_fast_functions_are_within_their_stated_errors() {
        use crate::backend::CpuFloat;
        let (mut erf, mut exp, mut tanh) = (0.0f64, 0.0f64, 0.0f64);
        for i in 0..=200_000 {
            let x = -10.0 + 20.0 * i as f64 / 200_000.0;
            let xf = x as f32;
            let xd = xf as f64;
            erf = erf.max((CpuFloat::erf(xf) as f64 - libm::erf(xd)).abs());
            tanh = tanh.max((xf.tanh_fast() as f64 - xd.tanh()).abs());
            let e = (8.0 * xd).exp(); // exp over [-80, 80]
            exp = exp.max(((8.0 * xf).exp_fast() as f64 - e).abs() / e);
        }
        assert!(erf < 4.5e-7, "erf max abs error {erf:e}");
        assert!(exp < 3e-7, "exp max relative error {exp:e}");
        assert!(tanh < 3e-7, "tanh max abs error {tanh:e}");
    }

    #[test]
    fn f32_constants_unchanged() {
        assert_eq!(SQRT_2_OVER_PI as f32, 0.797_884_6f32);
        assert_eq!(GELU_C as f32, 0.044_715f32);
        assert_eq!(FRAC_1_SQRT_2PI as f32, 0.398_942_3f32);
        assert!((SQRT_2_OVER_PI - (2.0 / std::f64::consts::PI).sqrt()).abs() < 1e-16);
        assert!((FRAC_1_SQRT_2PI - 1.0 / (2.0 * std::f64::consts::PI).sqrt()).abs() < 1e-16);
    }

    #[test]
    fn relu_passes_nan_through() {
        let (x, mut y, mut dx) = ([f32::NAN, -1.0, 2.0], [0.0; 3], [0.0; 3]);
        Cpu.gelu_fwd(GeluKind::Relu, &x, &mut y).unwrap();
        Cpu.gelu_bwd(GeluKind::Relu, &x, &[1.0; 3], &mut dx).unwrap();
        assert!(y[0].is_nan() && y[1..] == [0.0, 2.0], "{y:?}");
        assert!(dx[0].is_nan() && dx[1..] == [0.0, 1.0], "{dx:?}");
        if let Some(dev) = cuda_or_skip("gelu::relu_passes_nan_through (cuda)") {
            let xd = dev.upload(&x).unwrap();
            let mut yd = dev.zeros::<f32>(3).unwrap();
            GeluKernel::<f32>::gelu_fwd(&*dev, GeluKind::Relu, &xd, &mut yd).unwrap();
            let y = dev.download(&yd).unwrap();
            assert!(y[0].is_nan() && y[1..] == [0.0, 2.0], "cuda {y:?}");
        }
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let e = Cpu.gelu_fwd(GeluKind::Erf, &[0.0; 3], &mut [0.0; 4]).unwrap_err();
        assert!(e.to_string().contains("gelu") && e.to_string().contains("`y`"), "{e}");
    }

    #[test]
    fn cuda_matches_cpu() {
        let Some(dev) = cuda_or_skip("gelu::cuda_matches_cpu") else { return };
        let n = 5003;
        let mut rng = Rng::new(3);
        let x = round_bf16(&rng.vec(n, -6.0, 6.0));
        let dy = round_bf16(&rng.vec(n, -1.0, 1.0));
        for kind in KINDS {
            // backward accumulates: dx starts nonzero on both devices
            let (mut y, mut dx) = (vec![0.0; n], vec![0.5; n]);
            Cpu.gelu_fwd(kind, &x, &mut y).unwrap();
            Cpu.gelu_bwd(kind, &x, &dy, &mut dx).unwrap();
            // f32
            let (xd, dyd) = (dev.upload(&x).unwrap(), dev.upload(&dy).unwrap());
            let (mut yd, mut dxd) = (dev.zeros::<f32>(n).unwrap(), dev.upload(&vec![0.5f32; n]).unwrap());
            GeluKernel::<f32>::gelu_fwd(&*dev, kind, &xd, &mut yd).unwrap();
            GeluKernel::<f32>::gelu_bwd(&*dev, kind, &xd, &dyd, &mut dxd).unwrap();
            Tol::CUDA_F32.assert_close("gelu cuda f32 fwd", &dev.download(&yd).unwrap(), &y);
            Tol::CUDA_F32.assert_close("gelu cuda f32 bwd", &dev.download(&dxd).unwrap(), &dx);
            // bf16
            let to_b = |v: &[f32]| v.iter().map(|&a| bf16::from_f32(a)).collect::<Vec<_>>();
            let to_f = |v: Vec<bf16>| v.into_iter().map(f32::from).collect::<Vec<_>>();
            let (xb, dyb) = (dev.upload(&to_b(&x)).unwrap(), dev.upload(&to_b(&dy)).unwrap());
            let (mut yb, mut dxb) = (dev.zeros::<bf16>(n).unwrap(), dev.upload(&to_b(&vec![0.5; n])).unwrap());
            <Cuda as GeluKernel<bf16>>::gelu_fwd(&dev, kind, &xb, &mut yb).unwrap();
            <Cuda as GeluKernel<bf16>>::gelu_bwd(&dev, kind, &xb, &dyb, &mut dxb).unwrap();
            Tol::CUDA_BF16.assert_close("gelu cuda bf16 fwd", &to_f(dev.download(&yb).unwrap()), &y);
            Tol::CUDA_BF16.assert_close("gelu cuda bf16 bwd", &to_f(dev.download(&dxb).unwrap()), &dx);
        }
    }
}
