//! `add_layernorm` / `add_rmsnorm` (the residual add and the norm that reads it, one kernel pass)
//! against `add` then the norm: gradient-checked in f64 with both outputs in the loss; bitwise the
//! pair's values and gradients in f32 on the CPU, recorded as the same two tape ops with the
//! forward charged to one profile kind. (The CUDA test is in the `cuda` binary:
//! `tests/bf16/cuda_add_norm.rs`.)

mod common;
use common::add_norm::{bits, forward, loss, run, values, Norm, SHAPES};
use common::{constant, param};
use std::sync::Arc;
use tuna_autograd::gradcheck::{check, GRAD_TOL};
use tuna_autograd::{stats, Tensor};
use tuna_kernels::testing::Rng;
use tuna_kernels::Cpu;

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
