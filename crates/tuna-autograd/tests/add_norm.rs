//! `add_layernorm` / `add_rmsnorm` (the residual add and the norm that reads it, one kernel pass)
//! against `add` then the norm: gradient-checked in f64 with both outputs in the loss; bitwise the
//! pair's values and gradients in f32 on the CPU, recorded as the same two tape ops with the
//! forward charged to one profile kind; on the emulated CUDA device, bitwise the device's own pair
//! in f32 and bf16, and the CPU's values within tolerance.

mod common;
use common::{constant, param};
use half::bf16;
use std::sync::Arc;
use tuna_autograd::gradcheck::{check, GRAD_TOL};
use tuna_autograd::ops::elem::{add, mul};
use tuna_autograd::ops::linear::{matmul, MatmulParams};
use tuna_autograd::ops::norm::{add_layernorm, add_rmsnorm, layernorm, rmsnorm};
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{stats, Float, Result, Tensor};
use tuna_kernels::testing::{cuda_or_skip, round_bf16, Rng, Tol};
use tuna_kernels::{Cpu, Cuda};

/// `sum(y * w)`: every element of `y` gets its own gradient `w`.
fn weighted_sum<B: Kernels<E>, E: Float>(y: &Tensor<B, E>, w: &Tensor<B, E>) -> Result<Tensor<B, E>> {
    let n = y.numel();
    let flat = reshape(&mul(y, w)?, &[1, n])?;
    let ones = Tensor::constant(y.device(), &[n, 1], &vec![E::from_f32(1.0); n])?;
    matmul(&flat, &ones, MatmulParams::new(1, 1, n))
}

/// Which norm: LayerNorm (gamma and beta) or RMSNorm (gamma).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Norm {
    Layer,
    Rms,
}

/// `(h, y)` of the fused op, or of `add` then the norm.
fn forward<B: Kernels<E>, E: Float>(
    norm: Norm,
    fused: bool,
    [x, r, g, b]: [&Tensor<B, E>; 4],
) -> Result<(Tensor<B, E>, Tensor<B, E>)> {
    match (norm, fused) {
        (Norm::Layer, true) => add_layernorm(x, r, g, b, 1e-5),
        (Norm::Rms, true) => add_rmsnorm(x, r, g, 1e-6),
        (Norm::Layer, false) => {
            let h = add(x, r)?;
            let y = layernorm(&h, g, b, 1e-5)?;
            Ok((h, y))
        }
        (Norm::Rms, false) => {
            let h = add(x, r)?;
            let y = rmsnorm(&h, g, 1e-6)?;
            Ok((h, y))
        }
    }
}

/// A loss that reads both outputs: `sum(h * wh) + sum(y * wy)`, so h's gradient is the sum of its
/// own and the norm's backward.
fn loss<B: Kernels<E>, E: Float>(
    norm: Norm,
    fused: bool,
    ins: [&Tensor<B, E>; 4],
    wh: &Tensor<B, E>,
    wy: &Tensor<B, E>,
) -> Result<Tensor<B, E>> {
    let (h, y) = forward(norm, fused, ins)?;
    add(&weighted_sum(&h, wh)?, &weighted_sum(&y, wy)?)
}

#[test]
fn gradcheck_f64() {
    let mut rng = Rng::new(70);
    let x = param(&mut rng, "x", &[2, 3, 5], 1.0);
    let r = param(&mut rng, "r", &[2, 3, 5], 1.0);
    let g = param(&mut rng, "gamma", &[5], 1.0);
    let b = param(&mut rng, "beta", &[5], 1.0);
    let (wh, wy) = (constant(&mut rng, &[2, 3, 5], 1.0), constant(&mut rng, &[2, 3, 5], 1.0));
    let ins = [&x, &r, &g, &b];
    check(&ins, || loss(Norm::Layer, true, ins, &wh, &wy), 1e-5, GRAD_TOL, 40).unwrap();
    check(&[&x, &r, &g], || loss(Norm::Rms, true, ins, &wh, &wy), 1e-5, GRAD_TOL, 40).unwrap();
    // frozen gamma and beta, and a frozen residual branch: only x trains
    let (g0, b0, r0) =
        (constant(&mut rng, &[5], 1.0), constant(&mut rng, &[5], 1.0), constant(&mut rng, &[2, 3, 5], 1.0));
    let frozen = [&x, &r0, &g0, &b0];
    check(&[&x], || loss(Norm::Layer, true, frozen, &wh, &wy), 1e-5, GRAD_TOL, 30).unwrap();
    check(&[&x], || loss(Norm::Rms, true, frozen, &wh, &wy), 1e-5, GRAD_TOL, 30).unwrap();
}

fn widen_acc<E: Float>(v: &[f32]) -> Vec<E::Acc> {
    v.iter().map(|&a| <E::Acc as tuna_kernels::Elem>::from_f32(a)).collect()
}

/// `[h, y]` and the gradients of x, r, gamma, beta (all trainable), widened to f32.
fn run<B: Kernels<E>, E: Float>(
    dev: &Arc<B>,
    norm: Norm,
    fused: bool,
    vals: &[Vec<f32>; 6],
    shape: &[usize],
) -> ([Vec<f32>; 2], Vec<Vec<f32>>) {
    let narrow = |v: &[f32]| v.iter().map(|&a| E::from_f32(a)).collect::<Vec<E>>();
    let dim = *shape.last().unwrap();
    let p = |name: &str, shape: &[usize], v: &[f32]| {
        Tensor::<B, E>::param_from_master(dev, name, shape, &widen_acc::<E>(v)).unwrap()
    };
    let (x, r, g, b) =
        (p("x", shape, &vals[0]), p("r", shape, &vals[1]), p("gamma", &[dim], &vals[2]), p("beta", &[dim], &vals[3]));
    let wh = Tensor::<B, E>::constant(dev, shape, &narrow(&vals[4])).unwrap();
    let wy = Tensor::<B, E>::constant(dev, shape, &narrow(&vals[5])).unwrap();
    let (h, y) = forward(norm, fused, [&x, &r, &g, &b]).unwrap();
    add(&weighted_sum(&h, &wh).unwrap(), &weighted_sum(&y, &wy).unwrap()).unwrap().backward().unwrap();
    let f32s = |t: &Tensor<B, E>| t.to_vec().unwrap().into_iter().map(|a| a.to_f32()).collect::<Vec<f32>>();
    let acc = |v: Vec<E::Acc>| v.into_iter().map(tuna_kernels::Elem::to_f32).collect::<Vec<f32>>();
    let trained: &[&Tensor<B, E>] = if norm == Norm::Layer { &[&x, &r, &g, &b] } else { &[&x, &r, &g] };
    ([f32s(&h), f32s(&y)], trained.iter().map(|t| acc(t.grad().unwrap().unwrap())).collect())
}

/// Shapes: one element per row, odd dims, one above 1024 (the CUDA block-per-row kernels).
const SHAPES: [&[usize]; 4] = [&[3, 1], &[2, 7, 33], &[5, 384], &[2, 1025]];

fn values(rng: &mut Rng, shape: &[usize]) -> [Vec<f32>; 6] {
    let (n, dim) = (shape.iter().product(), *shape.last().unwrap());
    let mut v = || round_bf16(&rng.vec(n, -1.5, 1.5));
    let (x, r, wh, wy) = (v(), v(), v(), v());
    [x, r, round_bf16(&rng.vec(dim, 0.5, 1.5)), round_bf16(&rng.vec(dim, -0.5, 0.5)), wh, wy]
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|a| a.to_bits()).collect()
}

#[test]
fn cpu_f32_is_bitwise_add_then_norm_as_the_same_two_tape_ops() {
    let dev = Arc::new(Cpu);
    let mut rng = Rng::new(71);
    for shape in SHAPES {
        for norm in [Norm::Layer, Norm::Rms] {
            let vals = values(&mut rng, shape);
            stats::reset();
            let (of, gf) = run::<Cpu, f32>(&dev, norm, true, &vals, shape);
            let fused = stats::snapshot();
            stats::reset();
            let (ou, gu) = run::<Cpu, f32>(&dev, norm, false, &vals, shape);
            let pair = stats::snapshot();
            let what = format!("{norm:?} {shape:?}");
            for (name, (a, b)) in ["h", "y"].iter().zip(of.iter().zip(&ou)) {
                assert!(bits(a) == bits(b), "{what}: {name} differs from add then the norm");
            }
            for (name, (a, b)) in ["dx", "dr", "dgamma", "dbeta"].iter().zip(gf.iter().zip(&gu)) {
                assert!(bits(a) == bits(b), "{what}: {name} differs from add then the norm");
            }
            // the same ops on the tape, so the same backward kernels
            assert_eq!(fused.recorded, pair.recorded, "{what}");
            assert_eq!(fused.backward_launches, pair.backward_launches, "{what}");
        }
    }
}

#[test]
fn the_forward_is_charged_to_the_fused_kind() {
    let dev = Arc::new(Cpu);
    let mut rng = Rng::new(72);
    let vals = values(&mut rng, &[4, 16]);
    for (norm, kind) in [(Norm::Layer, "add+layernorm"), (Norm::Rms, "add+rmsnorm")] {
        stats::reset();
        stats::set_profiling(true);
        stats::mark();
        let x = Tensor::<Cpu, f32>::param(&dev, "x", &[4, 16], &vals[0]).unwrap();
        let r = Tensor::<Cpu, f32>::constant(&dev, &[4, 16], &vals[1]).unwrap();
        let g = Tensor::<Cpu, f32>::constant(&dev, &[16], &vals[2][..16]).unwrap();
        let b = Tensor::<Cpu, f32>::constant(&dev, &[16], &vals[3][..16]).unwrap();
        let (h, y) = forward(norm, true, [&x, &r, &g, &b]).unwrap();
        let s = stats::snapshot();
        stats::set_profiling(false);
        assert_eq!(s.forward_time.get(kind).map(|t| t.calls), Some(1), "{:?}", s.forward_time);
        assert!(!s.forward_time.contains_key("add"), "{norm:?}: {:?}", s.forward_time);
        assert_eq!((h.shape(), y.shape()), (&[4usize, 16][..], &[4usize, 16][..]));
        // a residual of another shape is refused by name
        let bad = Tensor::<Cpu, f32>::constant(&dev, &[4, 15], &vals[1][..60]).unwrap();
        let e = forward(norm, true, [&x, &bad, &g, &b]).unwrap_err().to_string();
        assert!(e.contains("add_") && e.contains("r vs x"), "{e}");
    }
}

/// The emulated device: fused against the device's own add then norm, bit for bit (f32 and
/// bf16), and the fused f32 against the CPU's values and gradients.
#[test]
fn cuda_is_bitwise_its_add_then_norm_and_matches_cpu() {
    let Some(dev) = cuda_or_skip("autograd::add_norm cuda_is_bitwise_its_add_then_norm_and_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(73);
    for shape in SHAPES {
        for norm in [Norm::Layer, Norm::Rms] {
            let vals = values(&mut rng, shape);
            let what = format!("{norm:?} {shape:?}");
            let (oc, gc) = run::<Cpu, f32>(&Arc::new(Cpu), norm, true, &vals, shape);
            let (of, gf) = run::<Cuda, f32>(&dev, norm, true, &vals, shape);
            let (ou, gu) = run::<Cuda, f32>(&dev, norm, false, &vals, shape);
            let (ob, gb) = run::<Cuda, bf16>(&dev, norm, true, &vals, shape);
            let (obu, gbu) = run::<Cuda, bf16>(&dev, norm, false, &vals, shape);
            for (name, i) in [("h", 0), ("y", 1)] {
                assert!(bits(&of[i]) == bits(&ou[i]), "{what} f32 {name}");
                assert!(bits(&ob[i]) == bits(&obu[i]), "{what} bf16 {name}");
                Tol::CUDA_F32.assert_close(&format!("{what} f32 {name} vs cpu"), &of[i], &oc[i]);
            }
            for (i, name) in ["dx", "dr", "dgamma", "dbeta"].iter().enumerate().take(gf.len()) {
                assert!(bits(&gf[i]) == bits(&gu[i]), "{what} f32 {name}");
                assert!(bits(&gb[i]) == bits(&gbu[i]), "{what} bf16 {name}");
                Tol::CUDA_F32.assert_close(&format!("{what} f32 {name} vs cpu"), &gf[i], &gc[i]);
            }
        }
    }
}
