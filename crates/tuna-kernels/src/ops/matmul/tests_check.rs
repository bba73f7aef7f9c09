//! The device's product check (`self_check.rs`): it passes on the emulated device (whose products
//! are the host semantics it checks) and leaves fused products on the fused path; with the fused
//! results corrupted (`ProductFault::Fused`), fused products take the unfused path and still match
//! the CPU; with `cublasGemmEx`'s corrupted, every product on the device is refused. Each test
//! opens its own device (the verdict is per device); the faults are the calling thread's.

use super::self_check::{inject_product_fault, ProductFault, ProductVerdict};
use super::*;
use crate::testing::{cuda_or_skip, Rng, Tol};
use crate::{Cpu, Cuda};

fn fresh_device(test: &str) -> Option<Cuda> {
    cuda_or_skip(test)?;
    Some(Cuda::new(0).expect("a device opened once opens again"))
}

/// A fused `linear` + bias + GELU of 5 x 16 x 12 on `dev` and on the CPU: (device, CPU) outputs.
fn fused_linear(dev: &Cuda) -> Result<(Vec<f32>, Vec<f32>)> {
    let p = MatmulParams::linear(5, 16, 12);
    let mut rng = Rng::new(3);
    let (a, w, bias) = (rng.vec(60, -1.0, 1.0), rng.vec(192, -1.0, 1.0), rng.vec(16, -1.0, 1.0));
    let (da, dw, db) = (dev.upload(&a)?, dev.upload(&w)?, dev.upload(&bias)?);
    let mut y = dev.zeros::<f32>(80)?;
    MatmulKernel::<f32>::matmul_epilogue_fwd(dev, &p, Activation::GeluTanh, &da, &dw, Some(&db), &mut y, None)?;
    let mut want = vec![0.0f32; 80];
    Cpu.matmul_epilogue_fwd(&p, Activation::GeluTanh, &a, &w, Some(&bias), &mut want, None)?;
    Ok((dev.download(&y)?, want))
}

#[test]
fn the_product_check_passes_on_the_emulated_device_and_fused_products_stay_fused() {
    let Some(dev) = fresh_device("matmul::the_product_check_passes_on_the_emulated_device") else { return };
    assert_eq!(dev.product_check_state().get(), None);
    let (got, want) = fused_linear(&dev).unwrap();
    // 15 cublasGemmEx cases (f32, bf16, bf16 into f32) and 12 fused ones (f32, bf16; both weight
    // layouts); on a GPU cuBLASLt may refuse or fail fused ones (not counted; fused products
    // then run unfused).
    let v = dev.product_check_state().get().cloned();
    let Some(ProductVerdict::Agrees { cases, fused }) = v else { panic!("expected agreement, got {v:?}") };
    let path = last_epilogue_path();
    if dev.is_emulated() {
        assert_eq!((cases, fused, path), (27, true, Some(EpiloguePath::Emulated)));
    } else {
        assert!(cases >= 15 && (!fused || cases == 27), "{cases} cases, fused {fused}");
        let unfused = EpiloguePath::Unfused("cuBLASLt did not run this device's check");
        assert_eq!(path, Some(if fused { EpiloguePath::CublasLt } else { unfused }));
    }
    Tol::CUDA_F32.assert_close("y", &got, &want);
}

#[test]
fn a_failed_fused_product_check_sends_fused_products_to_the_unfused_path() {
    let Some(dev) = fresh_device("matmul::a_failed_fused_product_check_sends_fused_products_unfused") else {
        return;
    };
    inject_product_fault(ProductFault::Fused);
    let v = dev.product_check().unwrap().clone();
    inject_product_fault(ProductFault::None);
    if let ProductVerdict::Agrees { fused: false, .. } = v {
        // A GPU whose cuBLASLt took none of the fused cases: nothing for the fault to corrupt.
        crate::testing::note_skip(
            "matmul::a_failed_fused_product_check_sends_fused_products_unfused",
            "cuBLASLt ran none of the check's fused products on this device",
        );
        return;
    }
    let ProductVerdict::Unfused { why } = v else { panic!("expected the unfused fallback, got {v:?}") };
    assert!(why.starts_with("fused 37x24x40 f32 (x W^T, W [out, in]) + bias: y: [5] = "), "{why}");
    let (got, want) = fused_linear(&dev).unwrap();
    assert_eq!(last_epilogue_path(), Some(EpiloguePath::Unfused("the fused path failed this device's check")));
    Tol::CUDA_F32.assert_close("y", &got, &want);
}

#[test]
fn products_are_refused_where_cublas_gemm_ex_fails_the_check() {
    let Some(dev) = fresh_device("matmul::products_are_refused_where_cublas_gemm_ex_fails_the_check") else {
        return;
    };
    inject_product_fault(ProductFault::Gemm);
    let e = fused_linear(&dev).unwrap_err().to_string();
    inject_product_fault(ProductFault::None);
    assert!(
        e.contains("the device's product check failed: cublasGemmEx 37x24x40 f32 into f32, A B, alpha 1: [5]"),
        "{e}"
    );
    // Every product is refused from then on, the plain ones too.
    let (a, b) = (dev.upload(&[1.0f32; 4]).unwrap(), dev.upload(&[1.0f32; 4]).unwrap());
    let mut c = dev.zeros::<f32>(4).unwrap();
    let e = MatmulKernel::<f32>::matmul_fwd(&dev, &MatmulParams::new(2, 2, 2), &a, &b, &mut c).unwrap_err();
    assert!(e.to_string().contains("the device's product check failed"), "{e}");
}
