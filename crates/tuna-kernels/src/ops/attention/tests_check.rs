//! The device's attention check (`self_check.rs`): it passes on the emulated device and leaves
//! bf16 calls on the tensor cores; with the tensor-core results corrupted as a misread fragment
//! layout would (`Fault`), it sends bf16 calls to the SIMT kernels, which still match the CPU;
//! with both corrupted, attention is refused on the device, f32 included. Each test opens its own
//! device (the verdict is per device); the faults are the calling thread's. A device that runs no
//! attention on tensor cores (below sm_80) has nothing to check: the tests skip by name there.

use super::cuda_tests::{cpu_fwd, run_cuda};
use super::self_check::{case_count, inject_fault, Fault, Verdict};
use super::tests::{grad_starts, Data, Pad};
use super::*;
use crate::testing::{cuda_or_skip, round_bf16, Tol};
use crate::Cuda;
use half::bf16;

/// A fresh device (its own check state), or `None` where CUDA tests skip or the device runs no
/// attention on tensor cores (said by name).
fn fresh_device(test: &str) -> Option<Cuda> {
    cuda_or_skip(test)?;
    let dev = Cuda::new(0).expect("a device opened once opens again");
    if case_count(&dev) == 0 {
        crate::testing::note_skip(test, "this device runs no attention on tensor cores (nothing to check)");
        return None;
    }
    Some(dev)
}

/// A bf16 case the tensor cores cover, its inputs rounded to bf16.
fn case() -> Data {
    let mut d = Data::new(9100, 2, 2, 1, 40, 40, 3, 64, true, Pad::Right);
    for v in [&mut d.q, &mut d.k, &mut d.v, &mut d.pk, &mut d.pv, &mut d.d_o] {
        *v = round_bf16(v);
    }
    d
}

#[test]
fn the_check_passes_on_the_emulated_device_and_bf16_calls_take_the_tensor_cores() {
    let Some(dev) = fresh_device("attention::the_check_passes_on_the_emulated_device") else { return };
    let d = case();
    // An f32 call does not need the check and does not run it.
    run_cuda::<f32>(&dev, &d, &grad_starts(&d.p, 1));
    assert_eq!(dev.attention_checked(), None);
    let out = run_cuda::<bf16>(&dev, &d, &grad_starts(&d.p, 1));
    // Three cases at each of the head dims 32, 64, 128 on the emulated device (sm_90).
    let n = case_count(&dev);
    assert!(n > 0 && (!dev.is_emulated() || n == 9), "{n} cases");
    assert_eq!(dev.attention_checked(), Some(&Verdict::TensorCores { cases: n }));
    assert_eq!((last_fwd_path(), last_bwd_path()), (Some(FwdPath::TensorCore), Some(BwdPath::TensorCore)));
    Tol::new("tc-bf16", 1e-2, 1e-2).assert_close("o", &out.o, &cpu_fwd(&d).0);
}

#[test]
fn the_check_runs_the_tensor_cores_on_a_forced_simt_thread_and_restores_its_settings() {
    let Some(dev) = fresh_device("attention::the_check_runs_the_tensor_cores_on_a_forced_simt_thread") else {
        return;
    };
    let d = case();
    force_simt(true);
    run_cuda::<bf16>(&dev, &d, &grad_starts(&d.p, 1));
    let forced = FwdPath::Simt("forced (ops::attention::force_simt)");
    assert_eq!(last_fwd_path(), Some(forced));
    assert_eq!(dev.attention_checked(), None, "a forced-SIMT call needs no check");
    // Asked directly, the check still runs the tensor cores (it confirms each call's path), and
    // the thread's setting and last paths are as they were.
    assert!(matches!(dev.attention_check().unwrap(), Verdict::TensorCores { cases } if *cases > 0));
    assert!(simt_forced());
    assert_eq!((last_fwd_path(), last_bwd_path()), (Some(forced), Some(forced)));
    force_simt(false);
}

#[test]
fn a_wrong_tensor_core_backward_fails_the_check_too() {
    let Some(dev) = fresh_device("attention::a_wrong_tensor_core_backward_fails_the_check_too") else { return };
    inject_fault(Fault::TensorCoreBackward);
    let v = dev.attention_check().unwrap().clone();
    inject_fault(Fault::None);
    let Verdict::Simt { why } = v else { panic!("expected the SIMT fallback, got {v:?}") };
    assert!(why.contains(": dk["), "{why}");
}

#[test]
fn a_failed_tensor_core_check_sends_bf16_calls_to_the_simt_kernels() {
    let Some(dev) = fresh_device("attention::a_failed_tensor_core_check_sends_bf16_calls_to_simt") else { return };
    inject_fault(Fault::TensorCore);
    let d = case();
    let out = run_cuda::<bf16>(&dev, &d, &grad_starts(&d.p, 1));
    inject_fault(Fault::None);
    let Some(Verdict::Simt { why }) = dev.attention_checked() else {
        panic!("expected the SIMT fallback, got {:?}", dev.attention_checked())
    };
    assert!(why.starts_with("head dim 32, causal") && why.contains(": o["), "{why}");
    let simt = FwdPath::Simt("the tensor-core kernels failed this device's check");
    assert_eq!((last_fwd_path(), last_bwd_path()), (Some(simt), Some(simt)));
    assert_eq!(<Cuda as AttentionKernel<bf16>>::attn_paths(&dev, &d.p), Some((simt, simt)));
    Tol::CUDA_BF16.assert_close("o", &out.o, &cpu_fwd(&d).0);
    // The verdict stays: later calls do not check again.
    run_cuda::<bf16>(&dev, &d, &grad_starts(&d.p, 2));
    assert_eq!(last_fwd_path(), Some(simt));
}

/// A plain self-attention forward in `E` on `d`'s queries (as keys and values too).
fn self_attention<E: crate::cuda::CudaElem>(dev: &Cuda, d: &Data) -> Result<()> {
    let q = dev.upload(&d.q.iter().map(|&a| E::from_f32(a)).collect::<Vec<E>>())?;
    let mut p = d.p;
    (p.prefix_len, p.has_mask, p.kv_len, p.kv_heads) = (0, 0, p.q_len, p.heads);
    let x = AttnInputs::<Cuda, E> { q: &q, k: &q, v: &q, prefix: None, key_mask: None, prefix_rows: None, bias: None };
    let (mut o, mut lse) = (dev.zeros::<E>(p.q_elems())?, dev.zeros::<f32>(p.lse_elems())?);
    <Cuda as AttentionKernel<E>>::attn_fwd(dev, &p, x, &mut o, &mut lse)
}

#[test]
fn attention_is_refused_where_both_kernels_fail_the_check() {
    let Some(dev) = fresh_device("attention::attention_is_refused_where_both_kernels_fail") else { return };
    inject_fault(Fault::Both);
    let d = case();
    let e = self_attention::<bf16>(&dev, &d).unwrap_err().to_string();
    inject_fault(Fault::None);
    assert!(
        e.contains("the device's attention check failed: tensor cores: head dim 32") && e.contains("; SIMT: "),
        "{e}"
    );
    assert!(matches!(dev.attention_checked(), Some(Verdict::Refused { .. })));
    // f32 calls are refused too (the SIMT kernels are one template), and bf16 ones stay refused.
    let e = self_attention::<f32>(&dev, &d).unwrap_err().to_string();
    assert!(e.contains("the device's attention check failed"), "{e}");
    assert!(self_attention::<bf16>(&dev, &d).is_err());
}
