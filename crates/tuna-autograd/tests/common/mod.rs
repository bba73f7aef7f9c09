//! Helpers shared by the autograd tests.
#![allow(dead_code)]

pub mod add_norm;
pub mod tiny;

use std::sync::Arc;
use tuna_autograd::Tensor;
use tuna_kernels::testing::Rng;
use tuna_kernels::Cpu;

pub type T64 = Tensor<Cpu, f64>;

pub fn cpu() -> Arc<Cpu> {
    Arc::new(Cpu)
}

/// A trainable f64 tensor of normal values times `scale`.
pub fn param(rng: &mut Rng, name: &str, shape: &[usize], scale: f64) -> T64 {
    let n = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.normal() as f64 * scale).collect();
    Tensor::param(&cpu(), name, shape, &v).unwrap()
}

/// A constant f64 tensor of normal values times `scale`.
pub fn constant(rng: &mut Rng, shape: &[usize], scale: f64) -> T64 {
    let n = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.normal() as f64 * scale).collect();
    Tensor::constant(&cpu(), shape, &v).unwrap()
}
