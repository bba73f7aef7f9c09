//! `linear_act` (the product, bias and GELU-tanh in one op on the fused kernel) against
//! `gelu(linear(..), Tanh)`: gradient-checked in f64; bitwise the unfused pair's forward and
//! gradients in f32 on the CPU, as one tape op; on the emulated CUDA device in f32 and bf16
//! against the CPU.

mod common;
use common::{constant, cpu, param};
use half::bf16;
use std::sync::Arc;
use tuna_autograd::gradcheck::{check, GRAD_TOL};
use tuna_autograd::ops::act::{gelu, GeluKind};
use tuna_autograd::ops::linear::{linear, linear_act, matmul, Activation, MatmulParams, WeightLayout};
use tuna_autograd::ops::Kernels;
use tuna_autograd::{stats, Float, Result, Tensor};
use tuna_kernels::ops::matmul::{last_epilogue_path, EpiloguePath};
use tuna_kernels::testing::{cuda_or_skip, round_bf16, Rng, Tol};
use tuna_kernels::{Cpu, Cuda};

/// `sum(y * r)`: every output element gets its own gradient `r`.
fn weighted_sum<B: Kernels<E>, E: Float>(y: &Tensor<B, E>, r: &Tensor<B, E>) -> Result<Tensor<B, E>> {
    let n = y.numel();
    let prod = tuna_autograd::ops::elem::mul(y, r)?;
    let flat = tuna_autograd::ops::shape::reshape(&prod, &[1, n])?;
    let ones = Tensor::constant(y.device(), &[n, 1], &vec![E::from_f32(1.0); n])?;
    matmul(&flat, &ones, MatmulParams::new(1, 1, n))
}

#[test]
fn gradcheck_f64() {
    let mut rng = Rng::new(60);
    let x = param(&mut rng, "x", &[2, 3, 5], 1.0);
    let w_oi = param(&mut rng, "w_out_in", &[4, 5], 0.7);
    let w_io = param(&mut rng, "w_in_out", &[5, 4], 0.7);
    let bias = param(&mut rng, "bias", &[4], 0.5);
    let r = constant(&mut rng, &[2, 3, 4], 1.0);
    let g = Activation::GeluTanh;
    let f = |w: &Tensor<Cpu, f64>, layout, b: Option<&Tensor<Cpu, f64>>| {
        weighted_sum(&linear_act(&x, w, layout, b, g)?, &r)
    };
    check(&[&x, &w_oi, &bias], || f(&w_oi, WeightLayout::OutIn, Some(&bias)), 1e-5, GRAD_TOL, 30).unwrap();
    check(&[&x, &w_io, &bias], || f(&w_io, WeightLayout::InOut, Some(&bias)), 1e-5, GRAD_TOL, 30).unwrap();
    check(&[&x, &w_io], || f(&w_io, WeightLayout::InOut, None), 1e-5, GRAD_TOL, 30).unwrap();
    // frozen weight and input: only the bias trains; frozen weight: only x
    let (xc, wc) = (constant(&mut rng, &[2, 3, 5], 1.0), constant(&mut rng, &[5, 4], 0.7));
    check(
        &[&bias],
        || weighted_sum(&linear_act(&xc, &wc, WeightLayout::InOut, Some(&bias), g)?, &r),
        1e-5,
        GRAD_TOL,
        30,
    )
    .unwrap();
    check(&[&x], || weighted_sum(&linear_act(&x, &wc, WeightLayout::InOut, Some(&bias), g)?, &r), 1e-5, GRAD_TOL, 30)
        .unwrap();
}

type T = Tensor<Cpu, f32>;

/// Forward and the gradients of x, w and bias (all trainable) of `sum(f(x, w, b) * r)`.
fn run<B: Kernels<E>, E: Float>(
    dev: &Arc<B>,
    vals: &[Vec<f32>; 4],
    shapes: ([usize; 3], [usize; 2], usize),
    layout: WeightLayout,
    fused: bool,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let narrow = |v: &[f32]| v.iter().map(|&a| E::from_f32(a)).collect::<Vec<E>>();
    let x = Tensor::<B, E>::param_from_master(dev, "x", &shapes.0, &widen_acc::<E>(&vals[0])).unwrap();
    let w = Tensor::<B, E>::param_from_master(dev, "w", &shapes.1, &widen_acc::<E>(&vals[1])).unwrap();
    let b = Tensor::<B, E>::param_from_master(dev, "b", &[shapes.2], &widen_acc::<E>(&vals[2])).unwrap();
    let mut oshape = shapes.0.to_vec();
    *oshape.last_mut().unwrap() = shapes.2;
    let r = Tensor::<B, E>::constant(dev, &oshape, &narrow(&vals[3])).unwrap();
    let y = if fused {
        linear_act(&x, &w, layout, Some(&b), Activation::GeluTanh).unwrap()
    } else {
        gelu(&linear(&x, &w, layout, Some(&b)).unwrap(), GeluKind::Tanh).unwrap()
    };
    weighted_sum(&y, &r).unwrap().backward().unwrap();
    let acc = |v: Vec<E::Acc>| v.into_iter().map(tuna_kernels::Elem::to_f32).collect::<Vec<f32>>();
    let grads = [&x, &w, &b].iter().map(|t| acc(t.grad().unwrap().unwrap())).collect();
    (y.to_vec().unwrap().into_iter().map(|a| a.to_f32()).collect(), grads)
}

fn widen_acc<E: Float>(v: &[f32]) -> Vec<E::Acc> {
    v.iter().map(|&a| <E::Acc as tuna_kernels::Elem>::from_f32(a)).collect()
}

/// (x shape, m k n): one row; k and n not multiples of 8; a GELU-chunk-crossing size.
const CASES: [([usize; 3], usize); 3] = [([1, 1, 13], 20), ([2, 3, 16], 24), ([3, 70, 33], 260)];

fn values(rng: &mut Rng, xs: [usize; 3], n: usize) -> [Vec<f32>; 4] {
    let (m, k) = (xs[0] * xs[1], xs[2]);
    [
        round_bf16(&rng.vec(m * k, -1.5, 1.5)),
        round_bf16(&rng.vec(k * n, -0.5, 0.5)),
        round_bf16(&rng.vec(n, -1.0, 1.0)),
        round_bf16(&rng.vec(m * n, -1.0, 1.0)),
    ]
}

fn wshape(layout: WeightLayout, k: usize, n: usize) -> [usize; 2] {
    if layout == WeightLayout::OutIn {
        [n, k]
    } else {
        [k, n]
    }
}

#[test]
fn cpu_f32_is_bitwise_gelu_of_linear_in_one_op() {
    let dev = Arc::new(Cpu);
    let mut rng = Rng::new(61);
    for (xs, n) in CASES {
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            let vals = values(&mut rng, xs, n);
            let shapes = (xs, wshape(layout, xs[2], n), n);
            stats::reset();
            let (yf, gf) = run::<Cpu, f32>(&dev, &vals, shapes, layout, true);
            let s = stats::snapshot();
            assert_eq!(s.launches("gelu.bwd"), 1, "{:?}", s.backward_launches);
            assert_eq!(s.launches("linear.dX") + s.launches("linear.dW") + s.launches("add_bias.bwd_bias"), 3);
            let (yu, gu) = run::<Cpu, f32>(&dev, &vals, shapes, layout, false);
            let what = format!("{xs:?} n={n} {layout:?}");
            assert!(yf.iter().map(|v| v.to_bits()).eq(yu.iter().map(|v| v.to_bits())), "{what}: y");
            for (name, (a, b)) in ["dx", "dw", "dbias"].iter().zip(gf.iter().zip(&gu)) {
                assert!(a.iter().map(|v| v.to_bits()).eq(b.iter().map(|v| v.to_bits())), "{what}: {name}");
            }
        }
    }
}

#[test]
fn one_tape_op_and_no_pre_activation_kept_without_a_gradient() {
    let dev = Arc::new(Cpu);
    let x = T::param(&dev, "x", &[2, 4], &[0.5; 8]).unwrap();
    let w = T::constant(&dev, &[3, 4], &[0.25; 12]).unwrap();
    stats::reset();
    let _y = linear_act(&x, &w, WeightLayout::OutIn, None, Activation::GeluTanh).unwrap();
    let s = stats::snapshot();
    assert_eq!(s.recorded_total(), 1);
    assert_eq!(s.recorded.get("linear+gelu"), Some(&1), "{:?}", s.recorded);
    // nothing needs a gradient: nothing recorded (and no pre-activation buffer is allocated)
    let xc = T::constant(&dev, &[2, 4], &[0.5; 8]).unwrap();
    stats::reset();
    let y = linear_act(&xc, &w, WeightLayout::OutIn, None, Activation::GeluTanh).unwrap();
    assert_eq!(stats::snapshot().recorded_total(), 0);
    assert_eq!(y.shape(), &[2, 3]);
    let e = linear_act(&xc, &w, WeightLayout::InOut, None, Activation::GeluTanh).unwrap_err().to_string();
    assert!(e.contains("linear"), "{e}");
}

/// The emulated device, fused, f32 and bf16, against the CPU's fused op on the same
/// (bf16-rounded) values; bf16 within 2% of each tensor's largest magnitude (one bf16 rounding of
/// the output and of the stored pre-activation and gradients: 2^-9 each, summed over the products).
#[test]
fn cuda_matches_cpu() {
    let Some(dev) = cuda_or_skip("autograd::linear_act cuda_matches_cpu") else { return };
    let mut rng = Rng::new(62);
    for (xs, n) in CASES {
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            let vals = values(&mut rng, xs, n);
            let shapes = (xs, wshape(layout, xs[2], n), n);
            let what = format!("{xs:?} n={n} {layout:?}");
            let (yc, gc) = run::<Cpu, f32>(&cpu(), &vals, shapes, layout, true);
            let (yg, gg) = run::<Cuda, f32>(&dev, &vals, shapes, layout, true);
            assert_eq!(last_epilogue_path(), Some(EpiloguePath::Emulated), "{what}");
            Tol::CUDA_F32.assert_close(&format!("{what} f32 y"), &yg, &yc);
            for (name, (a, b)) in ["dx", "dw", "dbias"].iter().zip(gg.iter().zip(&gc)) {
                Tol::CUDA_F32.assert_close(&format!("{what} f32 {name}"), a, b);
            }
            let (yb, gb) = run::<Cuda, bf16>(&dev, &vals, shapes, layout, true);
            assert_eq!(last_epilogue_path(), Some(EpiloguePath::Emulated), "{what}");
            let rel = |got: &[f32], want: &[f32], name: &str| {
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
                let err = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(err <= 0.02 * scale, "{what} bf16 {name}: max error {err:e} vs largest {scale:e}");
            };
            rel(&yb, &yc, "y");
            for (name, (a, b)) in ["dx", "dw", "dbias"].iter().zip(gb.iter().zip(&gc)) {
                rel(a, b, name);
            }
        }
    }
}
