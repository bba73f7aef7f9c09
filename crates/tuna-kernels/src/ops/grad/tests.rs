//! Gradient bookkeeping tests: accumulation over micro-batches, the global norm over several
//! tensors and clipping against f64 references, errors, and CUDA against the CPU.

use super::cuda::NORM_MAX_BLOCKS;
use super::*;
use crate::cuda::CudaElem;
use crate::testing::{cuda_or_skip, round_bf16, Rng, Tol};
use crate::{Cpu, CpuFloat, Cuda};
use half::bf16;

/// Ragged tensor sizes: 1 element, less than a warp, not a multiple of 256, and (CUDA) more than
/// NORM_MAX_BLOCKS * 256 elements, so the squared-norm kernel's grid is capped and strides.
const SIZES: [usize; 4] = [1, 17, 4099, 300_007];

fn tensors(seed: u64, scale: f32) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    SIZES.iter().map(|&n| rng.normal_vec(n, scale)).collect()
}

fn f64_norm(ts: &[Vec<f32>]) -> f64 {
    ts.iter().flatten().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt()
}

/// `v` converted to the float under test.
fn conv<F: CpuFloat>(v: &[f32]) -> Vec<F> {
    v.iter().map(|&x| F::c(x as f64)).collect()
}

/// Micro-batch accumulation and cast on F (f32, or f64 for gradient checks) against f64.
fn accumulate_case<F: CpuFloat>(tol: Tol) {
    let (n, k) = (5003, 5);
    let mut rng = Rng::new(1);
    let micro: Vec<Vec<f32>> = (0..k).map(|_| rng.normal_vec(n, 1.0)).collect();
    let mut dst = conv::<F>(&rng.normal_vec(n, 1.0)); // garbage until zeroed
    Cpu.grad_zero(&mut dst).unwrap();
    for g in &micro {
        Cpu.grad_accumulate(&mut dst, &conv::<F>(g)[..], F::one() / F::c(k as f64)).unwrap();
    }
    let want: Vec<f64> = (0..n).map(|i| micro.iter().map(|g| g[i] as f64).sum::<f64>() / k as f64).collect();
    tol.assert_close(&format!("grad {} accumulate mean of micro-batches", F::NAME), &dst, &want);
    // Accumulation keeps what is there.
    Cpu.grad_accumulate(&mut dst, &conv::<F>(&micro[0])[..], F::c(2.0)).unwrap();
    let want: Vec<f64> = (0..n).map(|i| want[i] + 2.0 * micro[0][i] as f64).collect();
    tol.assert_close(&format!("grad {} accumulate on top", F::NAME), &dst, &want);
    let mut copy = vec![F::zero(); n];
    Cpu.cast(&dst, &mut copy).unwrap();
    assert!(copy == dst);
}

#[test]
fn k_micro_batch_accumulations_equal_one_sum() {
    accumulate_case::<f32>(Tol::F32);
}

#[test]
fn f64_k_micro_batch_accumulations_equal_one_sum() {
    accumulate_case::<f64>(Tol::F64);
}

/// The squared norm over several tensors on F against f64.
fn global_norm_case<F: CpuFloat>(tol: Tol) {
    let ts = tensors(2, 0.3);
    let mut acc = vec![F::c(123.0)];
    Cpu.grad_zero(&mut acc).unwrap();
    for t in &ts {
        Cpu.grad_sq_norm_acc(&conv::<F>(t), &mut acc).unwrap();
    }
    tol.assert_close(&format!("global grad norm {}", F::NAME), &[acc[0].sqrt()], &[f64_norm(&ts)]);
}

#[test]
fn global_norm_over_several_tensors_matches_f64() {
    global_norm_case::<f32>(Tol::F32);
}

#[test]
fn f64_global_norm_over_several_tensors_matches_f64() {
    global_norm_case::<f64>(Tol::F64);
}

/// Clipping on F against f64, above and below the threshold, and the norm after clipping.
fn clip_case<F: CpuFloat>(tol: Tol) {
    let ts = tensors(3, 0.3);
    let norm = f64_norm(&ts);
    let acc = [F::c(norm * norm)];
    for max_norm in [norm / 4.0, norm * 2.0] {
        let factor = (max_norm / (norm + 1e-6)).min(1.0);
        for t in &ts {
            let mut g = conv::<F>(t);
            Cpu.grad_clip(&acc, F::c(max_norm), &mut g).unwrap();
            let want: Vec<f64> = t.iter().map(|&x| x as f64 * factor).collect();
            tol.assert_close(&format!("clip {} to {max_norm}", F::NAME), &g, &want);
            if factor == 1.0 {
                assert!(g == conv::<F>(t), "clipping below the threshold changed the gradient");
            }
        }
    }
    // After clipping above the threshold, the global norm is max_norm (less the 1e-6 epsilon's share).
    let max_norm = F::c(norm / 3.0);
    let mut acc2 = [F::zero()];
    for t in &ts {
        let mut g = conv::<F>(t);
        Cpu.grad_clip(&acc, max_norm, &mut g).unwrap();
        Cpu.grad_sq_norm_acc(&g, &mut acc2).unwrap();
    }
    let want = max_norm.into() * norm / (norm + 1e-6);
    tol.assert_close(&format!("norm after clipping {}", F::NAME), &[acc2[0].sqrt()], &[want]);
}

#[test]
fn clip_matches_f64_reference_and_is_a_noop_below_threshold() {
    clip_case::<f32>(Tol::F32);
}

#[test]
fn f64_clip_matches_f64_reference_and_is_a_noop_below_threshold() {
    clip_case::<f64>(Tol::F64);
}

#[test]
fn bad_lengths_and_parameters_are_errors() {
    let e = Cpu.grad_accumulate(&mut [0.0f32; 3], &[0.0f32; 4][..], 1.0).unwrap_err().to_string();
    assert!(e.contains("grad_accumulate") && e.contains("`src`"), "{e}");
    let e = Cpu.cast(&[0.0f32; 3], &mut [0.0f32; 2][..]).unwrap_err().to_string();
    assert!(e.contains("`dst`"), "{e}");
    let e = Cpu.grad_sq_norm_acc(&[0.0f32; 3], &mut [0.0; 2]).unwrap_err().to_string();
    assert!(e.contains("grad_sq_norm_acc") && e.contains("`acc`"), "{e}");
    let e = Cpu.grad_clip(&[1.0f32], 0.0, &mut [0.0; 2]).unwrap_err().to_string();
    assert!(e.contains("max_norm"), "{e}");
    let e = Cpu.grad_clip(&[], 1.0f32, &mut [0.0; 2]).unwrap_err().to_string();
    assert!(e.contains("`acc`"), "{e}");
}

/// CUDA `grad_accumulate` and `cast` for one element type against the CPU.
fn cuda_accumulate_and_cast<E: CudaElem>(dev: &Cuda, tol: Tol, what: &str)
where
    Cuda: GradKernel<E>,
{
    let n = 4099;
    let mut rng = Rng::new(4);
    let micro: Vec<Vec<f32>> = (0..3).map(|_| round_bf16(&rng.normal_vec(n, 1.0))).collect();
    let start = rng.normal_vec(n, 1.0);
    let mut want = start.clone();
    let mut dst = dev.upload(&start).unwrap();
    for (k, g) in micro.iter().enumerate() {
        let scale = 0.5 + k as f32;
        Cpu.grad_accumulate(&mut want, &g[..], scale).unwrap();
        let ge: Vec<E> = g.iter().map(|&x| E::from_f32(x)).collect();
        GradKernel::<E>::grad_accumulate(dev, &mut dst, &dev.upload(&ge).unwrap(), scale).unwrap();
    }
    // The source is exact in E and the sum is f32 on both sides: f32 tolerance for both types.
    Tol::CUDA_F32.assert_close(&format!("{what} accumulate"), &dev.download(&dst).unwrap(), &want);
    let mut out = dev.zeros::<E>(n).unwrap();
    GradKernel::<E>::cast(dev, &dst, &mut out).unwrap();
    let got: Vec<f32> = dev.download(&out).unwrap().into_iter().map(|x| x.to_f32()).collect();
    tol.assert_close(&format!("{what} cast"), &got, &want);
}

#[test]
fn cuda_matches_cpu() {
    let Some(dev) = cuda_or_skip("grad::cuda_matches_cpu") else { return };
    cuda_accumulate_and_cast::<f32>(&dev, Tol::CUDA_F32, "grad cuda f32");
    cuda_accumulate_and_cast::<bf16>(&dev, Tol::CUDA_BF16, "grad cuda bf16");
    // Norm over several tensors (the largest caps the grid at NORM_MAX_BLOCKS and strides).
    assert!(SIZES[3] > NORM_MAX_BLOCKS * 256);
    let ts = tensors(5, 0.3);
    let devs: Vec<_> = ts.iter().map(|t| dev.upload(t).unwrap()).collect();
    let mut acc = dev.upload(&[77.0f32]).unwrap();
    dev.grad_zero(&mut acc).unwrap();
    for t in &devs {
        dev.grad_sq_norm_acc(t, &mut acc).unwrap();
    }
    let sq = dev.download(&acc).unwrap()[0];
    Tol::CUDA_F32.assert_close("grad cuda global norm", &[sq.sqrt()], &[f64_norm(&ts)]);
    // Clip above and below the threshold, reading the norm from the device buffer.
    for max_norm in [sq.sqrt() / 4.0, sq.sqrt() * 2.0] {
        for (t, td) in ts.iter().zip(&devs) {
            let mut g = td.clone();
            dev.grad_clip(&acc, max_norm, &mut g).unwrap();
            let mut want = t.clone();
            Cpu.grad_clip(&[sq], max_norm, &mut want).unwrap();
            Tol::CUDA_F32.assert_close(&format!("grad cuda clip to {max_norm}"), &dev.download(&g).unwrap(), &want);
        }
    }
}
