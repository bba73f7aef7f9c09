//! `linear` with a bias (the bias fused into the product) against the unfused composition
//! `add_bias(linear(x, w, None), b)`: the same forward and gradients in f32 on the CPU, one tape
//! op instead of two, and the bias's backward kernel counted as before.

use std::sync::Arc;
use tuna_autograd::ops::elem::add_bias;
use tuna_autograd::ops::linear::{linear, WeightLayout};
use tuna_autograd::{stats, Result, Tensor};
use tuna_kernels::testing::{Rng, Tol};
use tuna_kernels::Cpu;

type T = Tensor<Cpu, f32>;

/// `sum(y * r)` for fixed random `r`, so every output element gets its own gradient.
fn weighted_sum(y: &T, seed: u64) -> Result<T> {
    let mut rng = Rng::new(seed);
    let r = Tensor::constant(&Arc::new(Cpu), y.shape(), &rng.vec(y.numel(), -1.0, 1.0))?;
    let n = y.numel();
    let prod = tuna_autograd::ops::elem::mul(y, &r)?;
    let flat = tuna_autograd::ops::shape::reshape(&prod, &[1, n])?;
    let ones = Tensor::constant(&Arc::new(Cpu), &[n, 1], &vec![1.0; n])?;
    tuna_autograd::ops::linear::matmul(&flat, &ones, tuna_autograd::ops::linear::MatmulParams::new(1, 1, n))
}

#[test]
fn fused_bias_matches_add_bias_after_the_product() {
    let dev = Arc::new(Cpu);
    let mut rng = Rng::new(5);
    // 3 x 70 rows, 33 in, 47 out: ragged against every chunk and vector width
    for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
        let (m, k, n) = (210, 33, 47);
        let wshape = if layout == WeightLayout::OutIn { [n, k] } else { [k, n] };
        let x = T::param(&dev, "x", &[3, 70, k], &rng.vec(m * k, -1.0, 1.0)).unwrap();
        let w = T::param(&dev, "w", &wshape, &rng.vec(n * k, -0.5, 0.5)).unwrap();
        let b = T::param(&dev, "b", &[n], &rng.vec(n, -1.0, 1.0)).unwrap();

        stats::reset();
        let fused = linear(&x, &w, layout, Some(&b)).unwrap();
        assert_eq!(stats::snapshot().recorded_total(), 1, "{layout:?}: the fused linear is one op");
        assert_eq!(fused.shape(), &[3, 70, n]);
        weighted_sum(&fused, 9).unwrap().backward().unwrap();
        let launches = stats::snapshot();
        assert_eq!(launches.launches("add_bias.bwd_bias"), 1, "{layout:?}: {:?}", launches.backward_launches);
        assert_eq!(launches.launches("add_bias.bwd_x"), 0, "{layout:?}");
        assert_eq!(launches.launches("linear.dX"), 1, "{layout:?}");
        assert_eq!(launches.launches("linear.dW"), 1, "{layout:?}");
        let got: Vec<Vec<f32>> = [&x, &w, &b].iter().map(|t| t.grad().unwrap().unwrap()).collect();
        for t in [&x, &w, &b] {
            t.zero_grad();
        }

        let unfused = add_bias(&linear(&x, &w, layout, None).unwrap(), &b).unwrap();
        weighted_sum(&unfused, 9).unwrap().backward().unwrap();
        let want: Vec<Vec<f32>> = [&x, &w, &b].iter().map(|t| t.grad().unwrap().unwrap()).collect();

        let tol = Tol::new("fused vs unfused f32", 1e-5, 1e-5);
        tol.assert_close(&format!("{layout:?} y"), &fused.to_vec().unwrap(), &unfused.to_vec().unwrap());
        for (name, (g, w)) in ["dx", "dw", "dbias"].iter().zip(got.iter().zip(&want)) {
            tol.assert_close(&format!("{layout:?} {name}"), g, w);
        }
        // the bias's gradient is the same reduction of the same dY: the same bits
        assert_eq!(got[2], want[2], "{layout:?}: dbias");
    }
}

#[test]
fn a_bias_of_the_wrong_length_is_an_error() {
    let dev = Arc::new(Cpu);
    let x = T::constant(&dev, &[2, 3], &[0.0; 6]).unwrap();
    let w = T::constant(&dev, &[4, 3], &[0.0; 12]).unwrap();
    let b = T::constant(&dev, &[3], &[0.0; 3]).unwrap();
    let e = linear(&x, &w, WeightLayout::OutIn, Some(&b)).unwrap_err().to_string();
    assert!(e.contains("linear") && e.contains("bias"), "{e}");
}
