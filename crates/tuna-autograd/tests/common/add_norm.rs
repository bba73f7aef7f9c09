//! Helpers of the add + norm tests (`tests/add_norm.rs`, and the CUDA test in the `cuda` binary,
//! `tests/bf16/cuda_add_norm.rs`, which the GPU check's bundle carries).

use std::sync::Arc;
use tuna_autograd::ops::elem::{add, mul};
use tuna_autograd::ops::linear::{matmul, MatmulParams};
use tuna_autograd::ops::norm::{add_layernorm, add_rmsnorm, layernorm, rmsnorm};
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Result, Tensor};
use tuna_kernels::testing::{round_bf16, Rng};

/// `sum(y * w)`: every element of `y` gets its own gradient `w`.
pub fn weighted_sum<B: Kernels<E>, E: Float>(y: &Tensor<B, E>, w: &Tensor<B, E>) -> Result<Tensor<B, E>> {
    let n = y.numel();
    let flat = reshape(&mul(y, w)?, &[1, n])?;
    let ones = Tensor::constant(y.device(), &[n, 1], &vec![E::from_f32(1.0); n])?;
    matmul(&flat, &ones, MatmulParams::new(1, 1, n))
}

/// Which norm: LayerNorm (gamma and beta) or RMSNorm (gamma).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Norm {
    Layer,
    Rms,
}

/// `(h, y)` of the fused op, or of `add` then the norm.
pub fn forward<B: Kernels<E>, E: Float>(
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
pub fn loss<B: Kernels<E>, E: Float>(
    norm: Norm,
    fused: bool,
    ins: [&Tensor<B, E>; 4],
    wh: &Tensor<B, E>,
    wy: &Tensor<B, E>,
) -> Result<Tensor<B, E>> {
    let (h, y) = forward(norm, fused, ins)?;
    add(&weighted_sum(&h, wh)?, &weighted_sum(&y, wy)?)
}

pub fn widen_acc<E: Float>(v: &[f32]) -> Vec<E::Acc> {
    v.iter().map(|&a| <E::Acc as tuna_kernels::Elem>::from_f32(a)).collect()
}

/// `[h, y]` and the gradients of x, r, gamma, beta (all trainable), widened to f32.
pub fn run<B: Kernels<E>, E: Float>(
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
pub const SHAPES: [&[usize]; 4] = [&[3, 1], &[2, 7, 33], &[5, 384], &[2, 1025]];

pub fn values(rng: &mut Rng, shape: &[usize]) -> [Vec<f32>; 6] {
    let (n, dim) = (shape.iter().product(), *shape.last().unwrap());
    let mut v = || round_bf16(&rng.vec(n, -1.5, 1.5));
    let (x, r, wh, wy) = (v(), v(), v(), v());
    [x, r, round_bf16(&rng.vec(dim, 0.5, 1.5)), round_bf16(&rng.vec(dim, -0.5, 0.5)), wh, wy]
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|a| a.to_bits()).collect()
}
