//! The fused residual add + norm on CUDA (in the `cuda` test binary, so the GPU check's bundle
//! carries it): bitwise the device's own add then norm in f32 and bf16, and the CPU's values and
//! gradients within tolerance. Helpers in `tests/common/add_norm.rs`.

use crate::common::add_norm::{bits, run, values, Norm, SHAPES};
use half::bf16;
use std::sync::Arc;
use tuna_kernels::testing::{cuda_or_skip, Rng, Tol};
use tuna_kernels::{Cpu, Cuda};

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
