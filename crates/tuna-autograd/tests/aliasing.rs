//! One tensor feeding an op more than once (`op(&x, &x)`), a graph shared by two losses, and a
//! parameter listed twice: gradients must be summed, never lost, and nothing may panic.

mod common;
use common::{cpu, param, T64};
use tuna_autograd::gradcheck::{check, GRAD_TOL};
use tuna_autograd::ops::act::swiglu;
use tuna_autograd::ops::attention::{attention, AttnOptions};
use tuna_autograd::ops::elem::{add, add_bias, mul};
use tuna_autograd::ops::embed::{embedding, Prompt};
use tuna_autograd::ops::linear::{matmul, MatmulParams};
use tuna_autograd::ops::loss::cross_entropy;
use tuna_autograd::ops::norm::{add_layernorm, add_rmsnorm, layernorm};
use tuna_autograd::{Ints, Result};
use tuna_kernels::testing::Rng;

const H: f64 = 1e-5;

fn ce(y: T64) -> Result<T64> {
    let vocab = *y.shape().last().unwrap();
    let rows = y.numel() / vocab;
    let t: Vec<i32> = (0..rows).map(|r| (r * 7 % vocab) as i32).collect();
    cross_entropy(y, &Ints::new(&cpu(), &[rows], &t)?, -100)
}

#[test]
fn add_mul_matmul_of_a_tensor_with_itself() {
    let mut rng = Rng::new(11);
    let x = param(&mut rng, "x", &[4, 4], 1.0);
    check(&[&x], || ce(add(&x, &x)?), H, GRAD_TOL, 64).unwrap();
    check(&[&x], || ce(mul(&x, &x)?), H, GRAD_TOL, 64).unwrap();
    check(&[&x], || ce(matmul(&x, &x, MatmulParams::new(4, 4, 4))?), H, GRAD_TOL, 64).unwrap();
}

#[test]
fn swiglu_of_a_tensor_with_itself() {
    let mut rng = Rng::new(12);
    let x = param(&mut rng, "x", &[3, 5], 1.0);
    check(&[&x], || ce(swiglu(&x, &x)?), H, GRAD_TOL, 64).unwrap();
}

#[test]
fn attention_with_q_k_v_the_same_tensor() {
    let mut rng = Rng::new(13);
    let x = param(&mut rng, "x", &[1, 3, 2, 4], 1.0);
    let opt = AttnOptions { causal: true, scale: None, kv_len: None };
    check(&[&x], || ce(attention(&x, &x, &x, None, None, opt)?), H, GRAD_TOL, 64).unwrap();
    let q = param(&mut rng, "q", &[1, 3, 2, 4], 1.0);
    check(&[&q, &x], || ce(attention(&q, &x, &x, None, None, opt)?), H, GRAD_TOL, 64).unwrap();
}

#[test]
fn layernorm_with_gamma_as_beta_and_bias_as_input() {
    let mut rng = Rng::new(14);
    let x = param(&mut rng, "x", &[3, 5], 1.0);
    let g = param(&mut rng, "g", &[5], 1.0);
    check(&[&x, &g], || ce(layernorm(&x, &g, &g, 1e-5)?), H, GRAD_TOL, 64).unwrap();
    check(&[&g], || ce(add_bias(&g, &g)?), H, GRAD_TOL, 64).unwrap();
}

/// The fused residual add + norm with the residual and the stream the same tensor (`h = 2x`), and
/// both outputs in the loss: x's gradient gets the add's two contributions and the norm's.
#[test]
fn add_norm_of_a_tensor_with_itself() {
    let mut rng = Rng::new(15);
    let x = param(&mut rng, "x", &[3, 5], 1.0);
    let g = param(&mut rng, "g", &[5], 1.0);
    let both = |(h, y): (T64, T64)| ce(add(&mul(&h, &h)?, &y)?);
    check(&[&x, &g], || both(add_layernorm(&x, &x, &g, &g, 1e-5)?), H, GRAD_TOL, 64).unwrap();
    check(&[&x, &g], || both(add_rmsnorm(&x, &x, &g, 1e-6)?), H, GRAD_TOL, 64).unwrap();
}

#[test]
fn embedding_with_the_table_as_its_prompt() {
    let mut rng = Rng::new(15);
    let t = param(&mut rng, "t", &[3, 4], 1.0);
    let ids = Ints::new(&cpu(), &[1, 2], &[2u32, 0]).unwrap();
    let at = Ints::new(&cpu(), &[1], &[1u32]).unwrap();
    check(&[&t], || ce(embedding(&t, &ids, Some(Prompt { vectors: &t, at: &at }))?), H, GRAD_TOL, 64).unwrap();
}

/// Two losses over one shared activation: differentiating the second after the first has freed
/// the shared part of the graph must fail loudly, not silently drop the second's gradient.
#[test]
fn second_loss_over_a_freed_shared_graph_is_an_error() {
    let mut rng = Rng::new(16);
    let x = param(&mut rng, "x", &[2, 3], 1.0);
    let h = mul(&x, &x).unwrap();
    let l1 = ce(h.clone()).unwrap();
    let l2 = ce(add(&h, &h).unwrap()).unwrap();
    l1.backward().unwrap();
    let e = l2.backward().expect_err("the shared `mul` node was already differentiated");
    assert!(e.to_string().contains("already differentiated"), "{e}");
}

/// A parameter listed twice counts once in the global norm and is clipped once.
#[test]
fn clip_grad_norm_with_a_parameter_listed_twice() {
    use tuna_autograd::optim::clip_grad_norm;
    let x = tuna_autograd::Tensor::<tuna_kernels::Cpu, f64>::param(&cpu(), "x", &[2], &[0.0, 0.0]).unwrap();
    let w = tuna_autograd::Tensor::constant(&cpu(), &[2], &[3.0, 4.0]).unwrap();
    let y = mul(&x, &w).unwrap();
    let l = ce(tuna_autograd::ops::shape::reshape(&y, &[1, 2]).unwrap()).unwrap();
    l.backward().unwrap();
    let g = x.grad().unwrap().unwrap();
    let norm = (g[0] * g[0] + g[1] * g[1]).sqrt();
    let reported = clip_grad_norm(&[&x, &x], norm / 2.0).unwrap();
    assert!((reported - norm).abs() < 1e-12, "norm {reported} vs {norm}");
    let c = x.grad().unwrap().unwrap();
    let clipped = (c[0] * c[0] + c[1] * c[1]).sqrt();
    // PyTorch divides by norm + 1e-6.
    assert!((clipped - norm / 2.0).abs() < 1e-5, "clipped to {clipped}, wanted {}", norm / 2.0);
}
