//! Per-op timing (`stats::set_profiling`): every op kind of a forward and backward is charged,
//! nothing is recorded while it is off.

use std::sync::Arc;
use tuna_autograd::ops::act::{gelu, GeluKind};
use tuna_autograd::ops::linear::{linear, WeightLayout};
use tuna_autograd::ops::loss::cross_entropy;
use tuna_autograd::{stats, Ints, Tensor};
use tuna_kernels::Cpu;

fn step(dev: &Arc<Cpu>, w: &Tensor<Cpu, f32>) {
    let x = Tensor::constant(dev, &[8, 16], &vec![0.5; 128]).unwrap();
    let h = gelu(&linear(&x, w, WeightLayout::OutIn, None).unwrap(), GeluKind::Tanh).unwrap();
    let t = Ints::new(dev, &[8], &[1, 2, 3, 4, 5, 6, 7, 0]).unwrap();
    cross_entropy(h, &t, -100).unwrap().backward().unwrap();
}

#[test]
fn profiling_charges_every_op_kind_forward_and_backward() {
    let dev = Arc::new(Cpu);
    let w = Tensor::param(&dev, "w", &[10, 16], &vec![0.1; 160]).unwrap();
    stats::reset();
    step(&dev, &w);
    let off = stats::snapshot();
    assert!(off.forward_time.is_empty() && off.backward_time.is_empty(), "{off:?}");

    stats::set_profiling(true);
    stats::mark();
    step(&dev, &w);
    step(&dev, &w);
    stats::set_profiling(false);
    let on = stats::snapshot();
    for kind in ["matmul", "gelu", "cross_entropy"] {
        let f = on.forward_time.get(kind).unwrap_or_else(|| panic!("no forward time for {kind}: {on:?}"));
        assert_eq!(f.calls, 2, "{kind}");
        let b = on.backward_time.get(kind).unwrap_or_else(|| panic!("no backward time for {kind}: {on:?}"));
        assert_eq!(b.calls, 2, "{kind}");
    }
    assert!(on.backward_time.values().map(|t| t.nanos).sum::<u64>() > 0);
}

#[test]
fn the_peak_of_saved_bytes_is_charged_to_the_op_kinds_that_held_it() {
    let dev = Arc::new(Cpu);
    let w = Tensor::param(&dev, "w", &[10, 16], &vec![0.1; 160]).unwrap();
    let x = Tensor::constant(&dev, &[8, 16], &vec![0.5; 128]).unwrap();
    stats::set_profiling(true);
    stats::reset();
    let y = linear(&x, &w, WeightLayout::OutIn, None).unwrap();
    let h = gelu(&y, GeluKind::Tanh).unwrap();
    let t = Ints::new(&dev, &[8], &[1, 2, 3, 4, 5, 6, 7, 0]).unwrap();
    let loss = cross_entropy(h, &t, -100).unwrap();
    drop(y);
    loss.backward().unwrap();
    stats::set_profiling(false);
    let s = stats::snapshot();
    // gelu keeps what its backward reads of the matmul's output and cross-entropy its
    // probabilities; the matmul keeps only x, a caller's tensor (counted as 0).
    for kind in ["gelu", "cross_entropy"] {
        assert!(s.saved_at_peak.get(kind).is_some_and(|&b| b >= 8 * 10 * 4), "{kind}: {:?}", s.saved_at_peak);
    }
    assert_eq!(s.saved_at_peak.get("matmul").copied().unwrap_or(0), 0, "{:?}", s.saved_at_peak);
    assert_eq!(s.saved_at_peak.values().sum::<usize>(), s.peak_saved_bytes, "{:?}", s.saved_at_peak);
    assert_eq!(s.saved_bytes, 0, "freed by the backward");
}
