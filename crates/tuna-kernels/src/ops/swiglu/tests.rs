//! SiLU/SwiGLU tests: f64 reference (proven by central differences), CPU against it, shape
//! errors, and CUDA against CPU in f32 and bf16.

use super::*;
use crate::testing::{cuda_or_skip, round_bf16, Rng, Tol};
use crate::{Cpu, Cuda};
use half::bf16;

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}
fn silu_grad(x: f64) -> f64 {
    let s = 1.0 / (1.0 + (-x).exp());
    s * (1.0 + x * (1.0 - s))
}

#[test]
fn reference_gradient_matches_central_differences() {
    let mut rng = Rng::new(31);
    let h = 1e-5;
    for _ in 0..200 {
        let (x, u) = (rng.uniform(-12.0, 12.0) as f64, rng.uniform(-2.0, 2.0) as f64);
        let fd = (silu(x + h) - silu(x - h)) / (2.0 * h);
        Tol::GRAD_CHECK.assert_close(&format!("silu' at {x}"), &[silu_grad(x)], &[fd]);
        // swiglu(g, u) = silu(g) * u: d/dg = u silu'(g), d/du = silu(g)
        let fdg = (silu(x + h) * u - silu(x - h) * u) / (2.0 * h);
        let fdu = (silu(x) * (u + h) - silu(x) * (u - h)) / (2.0 * h);
        Tol::GRAD_CHECK.assert_close(&format!("swiglu d/dgate at {x}"), &[u * silu_grad(x)], &[fdg]);
        Tol::GRAD_CHECK.assert_close(&format!("swiglu d/dup at {x}"), &[silu(x)], &[fdu]);
    }
}

#[test]
fn cpu_matches_f64_reference() {
    let n = 40_961; // more than two rayon chunks, not a multiple of any
    let mut rng = Rng::new(32);
    let (gate, up, dy) = (rng.vec(n, -20.0, 20.0), rng.vec(n, -3.0, 3.0), rng.vec(n, -1.0, 1.0));
    let mut y = vec![0.0; n];
    Cpu.silu_fwd(&gate, &mut y).unwrap();
    let want: Vec<f64> = gate.iter().map(|&g| silu(g as f64)).collect();
    Tol::F32.assert_close("silu fwd", &y, &want);
    let mut dx = vec![0.5; n]; // backward accumulates
    Cpu.silu_bwd(&gate, &dy, &mut dx).unwrap();
    let want: Vec<f64> = (0..n).map(|i| 0.5 + dy[i] as f64 * silu_grad(gate[i] as f64)).collect();
    Tol::F32.assert_close("silu bwd", &dx, &want);

    Cpu.swiglu_fwd(&gate, &up, &mut y).unwrap();
    let want: Vec<f64> = (0..n).map(|i| silu(gate[i] as f64) * up[i] as f64).collect();
    Tol::F32.assert_close("swiglu fwd", &y, &want);
    let (mut dg, mut du) = (vec![0.25; n], vec![-0.25; n]);
    Cpu.swiglu_bwd(&gate, &up, &dy, &mut dg, &mut du).unwrap();
    let (g, u, d) = (|i: usize| gate[i] as f64, |i: usize| up[i] as f64, |i: usize| dy[i] as f64);
    let want_g: Vec<f64> = (0..n).map(|i| 0.25 + d(i) * u(i) * silu_grad(g(i))).collect();
    let want_u: Vec<f64> = (0..n).map(|i| -0.25 + d(i) * silu(g(i))).collect();
    Tol::F32.assert_close("swiglu bwd dgate", &dg, &want_g);
    Tol::F32.assert_close("swiglu bwd dup", &du, &want_u);
}

/// The f64 kernels against the f64 reference (elementwise: no summation at all).
#[test]
fn cpu_f64_matches_f64_reference() {
    let n = 40_961;
    let mut rng = Rng::new(34);
    let f = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
    let (gate, up, dy) = (f(rng.vec(n, -20.0, 20.0)), f(rng.vec(n, -3.0, 3.0)), f(rng.vec(n, -1.0, 1.0)));
    let mut y = vec![0.0f64; n];
    Cpu.silu_fwd(&gate, &mut y).unwrap();
    let want: Vec<f64> = gate.iter().map(|&g| silu(g)).collect();
    Tol::F64.assert_close("silu f64 fwd", &y, &want);
    let mut dx = vec![0.5f64; n]; // backward accumulates
    Cpu.silu_bwd(&gate, &dy, &mut dx).unwrap();
    let want: Vec<f64> = (0..n).map(|i| 0.5 + dy[i] * silu_grad(gate[i])).collect();
    Tol::F64.assert_close("silu f64 bwd", &dx, &want);

    Cpu.swiglu_fwd(&gate, &up, &mut y).unwrap();
    let want: Vec<f64> = (0..n).map(|i| silu(gate[i]) * up[i]).collect();
    Tol::F64.assert_close("swiglu f64 fwd", &y, &want);
    let (mut dg, mut du) = (vec![0.25f64; n], vec![-0.25f64; n]);
    Cpu.swiglu_bwd(&gate, &up, &dy, &mut dg, &mut du).unwrap();
    let want_g: Vec<f64> = (0..n).map(|i| 0.25 + dy[i] * up[i] * silu_grad(gate[i])).collect();
    let want_u: Vec<f64> = (0..n).map(|i| -0.25 + dy[i] * silu(gate[i])).collect();
    Tol::F64.assert_close("swiglu f64 bwd dgate", &dg, &want_g);
    Tol::F64.assert_close("swiglu f64 bwd dup", &du, &want_u);
}

#[test]
fn shape_mismatch_is_an_error() {
    let e = Cpu.silu_fwd(&[0.0; 3], &mut [0.0; 4]).unwrap_err();
    assert!(e.to_string().contains("silu") && e.to_string().contains("`y`"), "{e}");
    let e = Cpu.swiglu_fwd(&[0.0; 3], &[0.0; 2], &mut [0.0; 3]).unwrap_err();
    assert!(e.to_string().contains("swiglu") && e.to_string().contains("`up`"), "{e}");
    let e = Cpu.swiglu_bwd(&[0.0; 3], &[0.0; 3], &[0.0; 3], &mut [0.0; 3], &mut [0.0; 5]).unwrap_err();
    assert!(e.to_string().contains("`dup`"), "{e}");
}

/// `(silu y, silu dx, swiglu y, dgate, dup)` on the CPU, gradients starting at 0.5, 0.25, -0.25.
fn run_cpu(gate: &[f32], up: &[f32], dy: &[f32]) -> [Vec<f32>; 5] {
    let n = gate.len();
    let (mut sy, mut sdx, mut y, mut dg, mut du) =
        (vec![0.0; n], vec![0.5; n], vec![0.0; n], vec![0.25; n], vec![-0.25; n]);
    Cpu.silu_fwd(gate, &mut sy).unwrap();
    Cpu.silu_bwd(gate, dy, &mut sdx).unwrap();
    Cpu.swiglu_fwd(gate, up, &mut y).unwrap();
    Cpu.swiglu_bwd(gate, up, dy, &mut dg, &mut du).unwrap();
    [sy, sdx, y, dg, du]
}

/// The same on CUDA in element type `E`, widened to f32.
fn run_cuda<E: crate::cuda::CudaElem>(dev: &Cuda, gate: &[f32], up: &[f32], dy: &[f32]) -> [Vec<f32>; 5]
where
    Cuda: SwigluKernel<E>,
{
    let upl = |v: &[f32]| dev.upload(&v.iter().map(|&a| E::from_f32(a)).collect::<Vec<E>>()).unwrap();
    let down = |d: &crate::cuda::CudaBuf<E>| dev.download(d).unwrap().iter().map(|v| v.to_f32()).collect();
    let n = gate.len();
    let (g, u, d) = (upl(gate), upl(up), upl(dy));
    let (mut sy, mut y) = (dev.zeros::<E>(n).unwrap(), dev.zeros::<E>(n).unwrap());
    let (mut sdx, mut dg, mut du) = (upl(&vec![0.5; n]), upl(&vec![0.25; n]), upl(&vec![-0.25; n]));
    dev.silu_fwd(&g, &mut sy).unwrap();
    dev.silu_bwd(&g, &d, &mut sdx).unwrap();
    dev.swiglu_fwd(&g, &u, &mut y).unwrap();
    dev.swiglu_bwd(&g, &u, &d, &mut dg, &mut du).unwrap();
    [down(&sy), down(&sdx), down(&y), down(&dg), down(&du)]
}

#[test]
fn cuda_matches_cpu() {
    let Some(dev) = cuda_or_skip("swiglu::cuda_matches_cpu") else { return };
    let names = ["silu fwd", "silu bwd", "swiglu fwd", "swiglu bwd dgate", "swiglu bwd dup"];
    let mut rng = Rng::new(33);
    for n in [1, 5003, 300_001] {
        let gate = round_bf16(&rng.vec(n, -12.0, 12.0));
        let up = round_bf16(&rng.vec(n, -3.0, 3.0));
        let dy = round_bf16(&rng.vec(n, -1.0, 1.0));
        let want = run_cpu(&gate, &up, &dy);
        for ((name, got), want) in names.iter().zip(run_cuda::<f32>(&dev, &gate, &up, &dy)).zip(&want) {
            Tol::CUDA_F32.assert_close(&format!("{name} cuda f32 n={n}"), &got, want);
        }
        for ((name, got), want) in names.iter().zip(run_cuda::<bf16>(&dev, &gate, &up, &dy)).zip(&want) {
            Tol::CUDA_BF16.assert_close(&format!("{name} cuda bf16 n={n}"), &got, want);
        }
    }
}
