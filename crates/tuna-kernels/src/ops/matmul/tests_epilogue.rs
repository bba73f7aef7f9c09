//! The fused forward `y = act(op(a) op(b) + bias)` (`matmul_epilogue_fwd`): on the CPU bitwise the
//! unfused ops (product, `add_bias_inplace`, `gelu_fwd`) in f32 and f64, and the f64 one against an
//! f64 formula; on the emulated CUDA device, f32 and bf16, against the CPU on bf16-rounded inputs,
//! on both its paths (the emulated cuBLASLt epilogue and the forced fallback); the checks.

use super::*;
use crate::backend::CpuFloat;
use crate::ops::elementwise::{BiasParams, ElementwiseKernel};
use crate::ops::gelu::{GeluKernel, GeluKind};
use crate::testing::{cuda_or_skip, round_bf16, to_f64, Rng, Tol};
use crate::{Cpu, Cuda};
use half::bf16;

/// (m, n, k): one row; k not a multiple of 8; n not a multiple of 8 (a real device refuses aux
/// there and falls back); more elements than one CPU GELU chunk (16384) with rows crossing chunks.
const SHAPES: [(usize, usize, usize); 4] = [(1, 24, 13), (5, 20, 17), (37, 520, 9), (3, 8, 64)];
const ACTS: [Activation; 2] = [Activation::None, Activation::GeluTanh];

/// The unfused CPU ops in turn: `pre = op(a) op(b) (+ bias)`, `y = act(pre)`.
fn unfused<F: CpuFloat<Acc = F>>(
    p: &MatmulParams,
    act: Activation,
    a: &[F],
    b: &[F],
    bias: Option<&[F]>,
) -> (Vec<F>, Vec<F>)
where
    Cpu: MatmulKernel<F> + ElementwiseKernel<F> + GeluKernel<F>,
{
    let mut pre = vec![F::zero(); p.m * p.n];
    Cpu.matmul_fwd(p, a, b, &mut pre).unwrap();
    if let Some(bias) = bias {
        Cpu.add_bias_inplace(&BiasParams::new(p.m, p.n), bias, &mut pre).unwrap();
    }
    let y = match act {
        Activation::None => pre.clone(),
        Activation::GeluTanh => {
            let mut y = vec![F::zero(); pre.len()];
            Cpu.gelu_fwd(GeluKind::Tanh, &pre, &mut y).unwrap();
            y
        }
    };
    (pre, y)
}

fn bits<F: CpuFloat>(v: &[F]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().expect("a float").to_bits()).collect()
}

/// Every shape, layout (`trans_b`: `nn.Linear` and Conv1D), activation, with and without bias and
/// aux: the fused CPU forward is bitwise the unfused ops.
fn cpu_bitwise<F: CpuFloat<Acc = F>>(conv: impl Fn(&[f32]) -> Vec<F>)
where
    Cpu: MatmulKernel<F> + ElementwiseKernel<F> + GeluKernel<F>,
{
    let mut rng = Rng::new(40);
    for (m, n, k) in SHAPES {
        for tb in [false, true] {
            let p = MatmulParams { trans_b: tb, ..MatmulParams::new(m, n, k) };
            let (a, b, bias) =
                (conv(&rng.vec(m * k, -2.0, 2.0)), conv(&rng.vec(k * n, -1.0, 1.0)), conv(&rng.vec(n, -1.0, 1.0)));
            for act in ACTS {
                for with_bias in [false, true] {
                    let bias = with_bias.then_some(&bias[..]);
                    let (pre, want) = unfused(&p, act, &a, &b, bias);
                    let what = format!("{m}x{n}x{k} tb={tb} {act:?} bias={with_bias}");
                    let mut y = vec![F::c(7.0); m * n]; // overwritten
                    Cpu.matmul_epilogue_fwd(&p, act, &a, &b, bias, &mut y, None).unwrap();
                    assert!(bits(&y) == bits(&want), "{what}: y differs from the unfused ops");
                    if act != Activation::None {
                        let (mut y, mut aux) = (vec![F::c(7.0); m * n], vec![F::c(7.0); m * n]);
                        Cpu.matmul_epilogue_fwd(&p, act, &a, &b, bias, &mut y, Some(&mut aux)).unwrap();
                        assert!(bits(&y) == bits(&want), "{what}: y (with aux) differs from the unfused ops");
                        assert!(bits(&aux) == bits(&pre), "{what}: aux differs from the pre-activation");
                    }
                }
            }
        }
    }
}

#[test]
fn cpu_fused_is_bitwise_the_unfused_ops_f32() {
    cpu_bitwise::<f32>(|v| v.to_vec());
}

#[test]
fn cpu_fused_is_bitwise_the_unfused_ops_f64() {
    cpu_bitwise::<f64>(to_f64);
}

/// The f64 fused forward against the formula in f64 (gemm summation order only).
#[test]
fn cpu_f64_matches_formula() {
    let mut rng = Rng::new(41);
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let gelu = |x: f64| 0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh());
    for (m, n, k) in SHAPES {
        let p = MatmulParams::linear(m, n, k); // w [n, k]
        let (a, w, bias) =
            (to_f64(&rng.vec(m * k, -2.0, 2.0)), to_f64(&rng.vec(n * k, -1.0, 1.0)), to_f64(&rng.vec(n, -1.0, 1.0)));
        let pre: Vec<f64> = (0..m * n)
            .map(|i| (0..k).map(|l| a[i / n * k + l] * w[i % n * k + l]).sum::<f64>() + bias[i % n])
            .collect();
        let (mut y, mut aux) = (vec![0.0; m * n], vec![0.0; m * n]);
        Cpu.matmul_epilogue_fwd(&p, Activation::GeluTanh, &a, &w, Some(&bias), &mut y, Some(&mut aux)).unwrap();
        Tol::F64.assert_close("fused f64 aux", &aux, &pre);
        Tol::F64.assert_close("fused f64 y", &y, &pre.iter().map(|&x| gelu(x)).collect::<Vec<_>>());
    }
}

/// The path the last fused product must have taken: the forced fallback, the emulated epilogue, or
/// on a GPU cuBLASLt itself (or the fallback for a call its rules refuse, never the fallback after
/// a cuBLASLt failure: on a GPU this test is what reveals a wrong cuBLASLt call).
fn assert_path(dev: &Cuda, forced: bool, what: &str) {
    let got = last_epilogue_path();
    let ok = if forced {
        got == Some(EpiloguePath::Unfused("forced"))
    } else if dev.is_emulated() {
        got == Some(EpiloguePath::Emulated)
    } else {
        match got {
            Some(EpiloguePath::CublasLt) => true,
            Some(EpiloguePath::Unfused(why)) => !why.contains("failed"),
            _ => false,
        }
    };
    assert!(ok, "{what}: path {got:?} (forced {forced}, emulated {})", dev.is_emulated());
}

/// Within one bf16 rounding (plus f32 noise) of `want`: a bf16 ulp is at most 2^-7 of the value.
fn assert_bf16_rounding(what: &str, got: &[f32], want: &[f32]) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= w.abs() * 2f32.powi(-7) + 1e-5, "{what}[{i}]: {g} vs {w}");
    }
}

/// The emulated device (both paths: the emulated cuBLASLt epilogue, and the GemmEx + kernels
/// fallback forced) against the CPU on bf16-rounded inputs: f32 within the CUDA f32 tolerance; bf16
/// y and aux within one bf16 rounding of the CPU's f32 values (cuBLASLt's epilogue works on the
/// f32 accumulator and rounds once; the fallback, which rounds the product to bf16, adds the bias
/// in bf16 and rounds again before its GELU, within the bf16 tolerance).
#[test]
fn cuda_matches_cpu() {
    let Some(dev) = cuda_or_skip("matmul::epilogue cuda_matches_cpu") else { return };
    let mut rng = Rng::new(42);
    let tb16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    let f = |v: Vec<bf16>| v.into_iter().map(f32::from).collect::<Vec<_>>();
    for forced in [false, true] {
        force_epilogue_fallback(forced);
        for (m, n, k) in SHAPES {
            for tb in [false, true] {
                let p = MatmulParams { trans_b: tb, ..MatmulParams::new(m, n, k) };
                let a = round_bf16(&rng.vec(m * k, -2.0, 2.0));
                let b = round_bf16(&rng.vec(k * n, -1.0, 1.0));
                let bias = round_bf16(&rng.vec(n, -1.0, 1.0));
                for act in ACTS {
                    for with_bias in [false, true] {
                        let bias_h = with_bias.then_some(&bias[..]);
                        let (pre, want) = unfused(&p, act, &a, &b, bias_h);
                        let what = format!("{m}x{n}x{k} tb={tb} {act:?} bias={with_bias} forced={forced}");
                        let want_aux = act != Activation::None;
                        // f32
                        let (ad, bd, biasd) =
                            (dev.upload(&a).unwrap(), dev.upload(&b).unwrap(), dev.upload(&bias).unwrap());
                        let (mut yd, mut auxd) =
                            (dev.upload(&vec![7.0f32; m * n]).unwrap(), dev.zeros::<f32>(m * n).unwrap());
                        let biasd = with_bias.then_some(&biasd);
                        MatmulKernel::<f32>::matmul_epilogue_fwd(
                            &*dev,
                            &p,
                            act,
                            &ad,
                            &bd,
                            biasd,
                            &mut yd,
                            want_aux.then_some(&mut auxd),
                        )
                        .unwrap();
                        assert_path(&dev, forced, &what);
                        Tol::CUDA_F32.assert_close(&format!("{what} f32 y"), &dev.download(&yd).unwrap(), &want);
                        if want_aux {
                            Tol::CUDA_F32.assert_close(&format!("{what} f32 aux"), &dev.download(&auxd).unwrap(), &pre);
                        }
                        // bf16
                        let (ab, bb, biasb) = (
                            dev.upload(&tb16(&a)).unwrap(),
                            dev.upload(&tb16(&b)).unwrap(),
                            dev.upload(&tb16(&bias)).unwrap(),
                        );
                        let (mut yb, mut auxb) = (dev.zeros::<bf16>(m * n).unwrap(), dev.zeros::<bf16>(m * n).unwrap());
                        let biasb = with_bias.then_some(&biasb);
                        <Cuda as MatmulKernel<bf16>>::matmul_epilogue_fwd(
                            &dev,
                            &p,
                            act,
                            &ab,
                            &bb,
                            biasb,
                            &mut yb,
                            want_aux.then_some(&mut auxb),
                        )
                        .unwrap();
                        assert_path(&dev, forced, &format!("{what} bf16"));
                        let (y, aux) = (f(dev.download(&yb).unwrap()), f(dev.download(&auxb).unwrap()));
                        if forced {
                            Tol::CUDA_BF16.assert_close(&format!("{what} bf16 y"), &y, &want);
                            if want_aux {
                                Tol::CUDA_BF16.assert_close(&format!("{what} bf16 aux"), &aux, &pre);
                            }
                        } else {
                            assert_bf16_rounding(&format!("{what} bf16 y"), &y, &want);
                            if want_aux {
                                assert_bf16_rounding(&format!("{what} bf16 aux"), &aux, &pre);
                            }
                        }
                    }
                }
            }
        }
    }
    force_epilogue_fallback(false);
}

/// The emulated epilogue applies GELU to the f32 pre-activation and rounds once: its bf16 output
/// is `bf16(gelu(f32 pre))`, not `bf16(gelu(bf16(pre)))` (what the unfused bf16 ops compute).
#[test]
fn cuda_emulated_epilogue_rounds_once() {
    let Some(dev) = cuda_or_skip("matmul::epilogue cuda_emulated_epilogue_rounds_once") else { return };
    if !dev.is_emulated() {
        // cuBLASLt's own GELU may differ in the last bit; cuda_matches_cpu bounds it on a GPU.
        crate::testing::note_skip(
            "matmul::epilogue cuda_emulated_epilogue_rounds_once",
            "the emulated device's rounding; a GPU runs cuBLASLt's",
        );
        return;
    }
    // One row, k = 1: pre = 1 * 1 + bias exactly in f32, bias = 0.5 + j 2^-8 (bf16 values), so
    // pre = 1.5 + j 2^-8, which bf16 (spacing 2^-7 in [1, 2)) cannot hold for odd j.
    let p = MatmulParams::linear(1, 8, 1);
    let tb16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    let bias: Vec<f32> = (1..=8).map(|j| 0.5 + j as f32 * 2f32.powi(-8)).collect();
    assert_eq!(round_bf16(&bias), bias);
    let (ad, wd, biasd) =
        (dev.upload(&tb16(&[1.0])).unwrap(), dev.upload(&tb16(&[1.0; 8])).unwrap(), dev.upload(&tb16(&bias)).unwrap());
    let mut yd = dev.zeros::<bf16>(8).unwrap();
    force_epilogue_fallback(false);
    <Cuda as MatmulKernel<bf16>>::matmul_epilogue_fwd(
        &dev,
        &p,
        Activation::GeluTanh,
        &ad,
        &wd,
        Some(&biasd),
        &mut yd,
        None,
    )
    .unwrap();
    assert_eq!(last_epilogue_path(), Some(EpiloguePath::Emulated));
    let y = dev.download(&yd).unwrap();
    let c = (2.0f32 / std::f32::consts::PI).sqrt();
    let gelu = |x: f32| 0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh());
    let mut differs = 0;
    for (i, &b) in bias.iter().enumerate() {
        let pre = 1.0 + b;
        assert_eq!(y[i], bf16::from_f32(gelu(pre)), "element {i}: one rounding of gelu(f32 pre)");
        differs += (y[i] != bf16::from_f32(gelu(f32::from(bf16::from_f32(pre))))) as usize;
    }
    assert!(differs > 0, "the inputs should tell one rounding from two");
}

#[test]
fn checks_name_the_buffer() {
    let p = MatmulParams::linear(2, 8, 3);
    let (a, b, bias) = (vec![0.0f32; 6], vec![0.0f32; 24], vec![0.0f32; 8]);
    let mut y = vec![0.0f32; 16];
    let err = |r: Result<()>| r.unwrap_err().to_string();
    let e = err(Cpu.matmul_epilogue_fwd(&p, Activation::GeluTanh, &a, &b, Some(&bias[..7]), &mut y, None));
    assert!(e.contains("`bias`"), "{e}");
    let e = err(Cpu.matmul_epilogue_fwd(&p, Activation::GeluTanh, &a, &b, None, &mut y, Some(&mut [0.0; 15])));
    assert!(e.contains("`aux`"), "{e}");
    let e = err(Cpu.matmul_epilogue_fwd(&p, Activation::GeluTanh, &a, &b, None, &mut y[..15], None));
    assert!(e.contains("`y`"), "{e}");
    let e = err(Cpu.matmul_epilogue_fwd(&p, Activation::GeluTanh, &a[..5], &b, None, &mut y, None));
    assert!(e.contains("`a`"), "{e}");
    let acc = MatmulParams { accumulate: true, ..p };
    let e = err(Cpu.matmul_epilogue_fwd(&acc, Activation::GeluTanh, &a, &b, None, &mut y, None));
    assert!(e.contains("accumulate"), "{e}");
    let e = err(Cpu.matmul_epilogue_fwd(&p, Activation::None, &a, &b, None, &mut y, Some(&mut [0.0; 16])));
    assert!(e.contains("aux"), "{e}");
    if let Some(dev) = cuda_or_skip("matmul::epilogue checks_name_the_buffer (cuda)") {
        let (ad, bd, biasd) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap(), dev.upload(&bias[..7]).unwrap());
        let mut yd = dev.zeros::<f32>(16).unwrap();
        let e = err(MatmulKernel::<f32>::matmul_epilogue_fwd(
            &*dev,
            &p,
            Activation::GeluTanh,
            &ad,
            &bd,
            Some(&biasd),
            &mut yd,
            None,
        ));
        assert!(e.contains("`bias`"), "cuda: {e}");
        let mut auxd = dev.zeros::<f32>(15).unwrap();
        let e = err(MatmulKernel::<f32>::matmul_epilogue_fwd(
            &*dev,
            &p,
            Activation::GeluTanh,
            &ad,
            &bd,
            None,
            &mut yd,
            Some(&mut auxd),
        ));
        assert!(e.contains("`aux`"), "cuda: {e}");
    }
}
