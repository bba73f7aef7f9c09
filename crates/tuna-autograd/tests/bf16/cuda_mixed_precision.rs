//! bf16 mixed precision through the tape, on CUDA (the emulated device without a GPU): bf16
//! activations and frozen weights, f32 masters, f32 gradients and f32 AdamW moments for the
//! trainable leaves. Checked against the f32 tape on the CPU running the same (bf16-rounded)
//! values. Skips by name without CUDA.

use crate::common::cpu;
use crate::common::tiny::{Tiny, Train};
use half::bf16;
use tuna_autograd::ops::elem::{add, scale};
use tuna_autograd::ops::linear::{linear, matmul, MatmulParams, WeightLayout};
use tuna_autograd::ops::loss::cross_entropy;
use tuna_autograd::ops::norm::layernorm;
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::ops::Kernels;
use tuna_autograd::optim::{clip_grad_norm, AdamW, AdamWParams, OptimKernels};
use tuna_autograd::{Float, Ints, Tensor};
use tuna_kernels::testing::{cuda_or_skip, Rng};
use tuna_kernels::{Cpu, Cuda};

const IDS: [u32; 10] = [1, 4, 2, 9, 3, 7, 7, 0, 10, 5];
const SEED: u64 = 21;

// Compile-time: CUDA implements every kernel the tape and the optimizer call, for bf16.
fn _cuda_has_every_bf16_kernel<B: OptimKernels<bf16>>() {}
const _: fn() = _cuda_has_every_bf16_kernel::<Cuda>;

/// The f32 CPU twin of a bf16 model: the same tensors holding the bf16 model's values.
fn twin(g: &Tiny<Cuda, bf16>, train: Train) -> Tiny<Cpu, f32> {
    let c = Tiny::<Cpu, f32>::new(&cpu(), SEED, train);
    for (a, b) in c.tensors().into_iter().zip(g.tensors()) {
        a.load_master(&b.master_to_vec().unwrap()).unwrap();
    }
    c
}

/// `max |got - want| / max |want|`: the error against the reference's scale.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, &w| m.max((w as f64).abs())).max(1e-30);
    got.iter().zip(want).fold(0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs())) / scale
}

fn is_bf16(x: f32) -> bool {
    bf16::from_f32(x).to_f32() == x
}

// The bound on a loss or a gradient of the bf16 tape against f32 on the same values, relative to
// the reference's largest magnitude. Every op rounds its output to bf16 (relative 2^-9 = 0.2%),
// about 30 roundings deep in the two blocks and back; measured worst on the emulated device:
// loss 0.1%, gradients 1.1% (all trainable sets). 4% leaves room for other seeds and devices.
const TAPE_TOL: f64 = 0.04;

#[test]
fn bf16_tape_matches_f32_on_the_same_values() {
    let Some(dev) = cuda_or_skip("autograd::bf16_tape_matches_f32_on_the_same_values") else { return };
    for train in [Train::All, Train::PromptOnly, Train::PrefixOnly] {
        let g = Tiny::<Cuda, bf16>::new(&dev, SEED, train);
        let c = twin(&g, train);
        let (lg, lc) = (g.loss(&IDS, 2).unwrap(), c.loss(&IDS, 2).unwrap());
        let (vg, vc) = (lg.to_vec().unwrap()[0].to_f32(), lc.to_vec().unwrap()[0]);
        let e = ((vg - vc) / vc).abs() as f64;
        eprintln!("{train:?}: loss bf16 {vg} f32 {vc} (rel {e:.2e})");
        assert!(e < TAPE_TOL, "{train:?} loss: bf16 {vg} vs f32 {vc}");
        lg.backward().unwrap();
        lc.backward().unwrap();
        for (a, b) in c.trainable().iter().zip(g.trainable()) {
            let name = a.name().unwrap();
            assert!(b.has_master() && !a.has_master(), "{name}: a bf16 leaf keeps a master, an f32 one none");
            let (gg, gc): (Vec<f32>, Vec<f32>) = (b.grad().unwrap().unwrap(), a.grad().unwrap().unwrap());
            let e = rel_err(&gg, &gc);
            eprintln!("{train:?} {name}: grad rel err {e:.2e}");
            assert!(e < TAPE_TOL, "{train:?} grad {name}: {e:.3e} relative to its largest element");
            // Accumulated in f32: a gradient rounded through bf16 would hold only bf16 values.
            assert!(gg.iter().any(|&x| !is_bf16(x)), "{train:?} grad {name} holds only bf16 values");
        }
    }
}

#[test]
fn bf16_training_follows_f32_and_the_masters_keep_what_bf16_cannot() {
    let Some(dev) = cuda_or_skip("autograd::bf16_training_follows_f32_and_the_masters_keep_what_bf16_cannot") else {
        return;
    };
    for train in [Train::All, Train::PrefixOnly] {
        let g = Tiny::<Cuda, bf16>::new(&dev, SEED, train);
        let c = twin(&g, train);
        let hp = AdamWParams { weight_decay: 0.01, ..AdamWParams::new(0.02) };
        let (mut og, mut oc) = (AdamW::new(&g.trainable(), hp).unwrap(), AdamW::new(&c.trainable(), hp).unwrap());
        let (mut first, mut last) = ((0f32, 0f32), (0f32, 0f32));
        let mut curve = Vec::new();
        for step in 0..30 {
            let (lg, lc) = (g.loss(&IDS, 2).unwrap(), c.loss(&IDS, 2).unwrap());
            let (vg, vc) = (lg.to_vec().unwrap()[0].to_f32(), lc.to_vec().unwrap()[0]);
            if step == 0 {
                first = (vg, vc);
            }
            last = (vg, vc);
            lg.backward().unwrap();
            lc.backward().unwrap();
            let (ng, nc) = (clip_grad_norm(&g.trainable(), 1.0).unwrap(), clip_grad_norm(&c.trainable(), 1.0).unwrap());
            curve.push((vg, vc, ng, nc));
            if step == 0 {
                assert!(((ng - nc) / nc).abs() < TAPE_TOL, "{train:?}: first grad norm bf16 {ng} vs f32 {nc}");
            }
            og.step().unwrap();
            oc.step().unwrap();
        }
        eprintln!("{train:?}: (loss bf16, f32, grad norm bf16, f32) per step: {curve:?}");
        // Both learn, by the same amount: the bf16 run's loss falls by the f32 run's fall within 5%
        // (measured 0.1% training everything, 1.3% the prefix alone; the bf16 loss itself is a bf16
        // value, 2^-6 apart near 3).
        let (drop_b, drop_f) = (first.0 - last.0, first.1 - last.1);
        assert!(drop_f > 0.1 * first.1, "{train:?}: f32 did not learn: {first:?} -> {last:?}");
        assert!(
            (drop_b - drop_f).abs() < 0.05 * drop_f,
            "{train:?}: the loss fell by {drop_b} in bf16, {drop_f} in f32"
        );
        for p in g.trainable() {
            let (m, d) = (p.master_to_vec().unwrap(), p.to_vec().unwrap());
            // The data the ops read is the master rounded to nearest.
            assert!(m.iter().zip(&d).all(|(&m, &d)| bf16::from_f32(m) == d), "{:?}: data is not bf16(master)", p);
            // The master holds what bf16 cannot (nearly every updated value).
            let off = m.iter().filter(|&&x| !is_bf16(x)).count();
            assert!(off * 2 > m.len(), "{:?}: only {off} of {} master values are off the bf16 grid", p, m.len());
        }
    }
}

#[test]
fn updates_below_bf16_resolution_accumulate_in_the_master() {
    let Some(dev) = cuda_or_skip("autograd::updates_below_bf16_resolution_accumulate_in_the_master") else { return };
    // Weights at 1.5 (bf16 spacing 2^-7 on [1, 2)); AdamW's steps of about lr = 1e-4 are a
    // fortieth of a spacing: bf16 weights alone would never move, the masters move 20 lr.
    let ones = vec![bf16::from_f32(1.5); 32];
    let w = Tensor::<Cuda, bf16>::param(&dev, "w", &[4, 8], &ones).unwrap();
    let x = Tensor::constant(&dev, &[2, 8], &[bf16::from_f32(0.5); 16]).unwrap();
    let t = Ints::new(&dev, &[2], &[0i32, 3]).unwrap();
    let mut opt = AdamW::new(&[&w], AdamWParams::new(1e-4)).unwrap();
    for _ in 0..20 {
        cross_entropy(linear(&x, &w, WeightLayout::OutIn, None).unwrap(), &t, -100).unwrap().backward().unwrap();
        opt.step().unwrap();
    }
    let (m, d) = (w.master_to_vec().unwrap(), w.to_vec().unwrap());
    assert!(d.iter().all(|&x| x == bf16::from_f32(1.5)), "the bf16 data moved by less than half a spacing: {d:?}");
    let moved: Vec<f32> = m.iter().map(|&x| (x - 1.5).abs()).collect();
    assert!(moved.iter().all(|&x| x > 1.5e-3 && x < 2.5e-3), "masters moved 20 steps of ~1e-4: {moved:?}");
}

/// A loss over every gradient path of the tape that differs for a bf16 leaf or activation: an
/// activation as a norm weight and as a product's right operand (their gradients come from the
/// kernels in f32 and are rounded into the activation's bf16 gradient), one leaf used twice by an
/// op, a reshaped leaf (its whole gradient handed over, widened into the master's), a bias.
fn paths_loss<B: Kernels<E>, E: Float>(p: &[Tensor<B, E>; 5], x: &Tensor<B, E>, t: &Ints<B, i32>) -> Tensor<B, E> {
    let [w, g, b, w2, bias] = p;
    let h = layernorm(x, &scale(g, 1.5).unwrap(), b, 1e-5).unwrap();
    let h = linear(&h, &add(w, w).unwrap(), WeightLayout::OutIn, Some(bias)).unwrap();
    let w2a = scale(&reshape(w2, &[8, 5]).unwrap(), 0.5).unwrap();
    let y = matmul(&h, &w2a, MatmulParams::new(4, 5, 8)).unwrap();
    cross_entropy(y, t, -100).unwrap()
}

fn paths_params<B: Kernels<E>, E: Float>(dev: &std::sync::Arc<B>) -> ([Tensor<B, E>; 5], Tensor<B, E>) {
    let mut rng = Rng::new(5);
    let mut v = |n: usize, s: f32, c: f32| -> Vec<E> { (0..n).map(|_| E::from_f32(c + s * rng.normal())).collect() };
    let p = [
        Tensor::param(dev, "w", &[8, 6], &v(48, 0.4, 0.0)).unwrap(),
        Tensor::param(dev, "g", &[6], &v(6, 0.1, 1.0)).unwrap(),
        Tensor::param(dev, "b", &[6], &v(6, 0.1, 0.0)).unwrap(),
        Tensor::param(dev, "w2", &[40], &v(40, 0.5, 0.0)).unwrap(),
        Tensor::param(dev, "bias", &[8], &v(8, 0.1, 0.0)).unwrap(),
    ];
    let x = Tensor::constant(dev, &[4, 6], &v(24, 1.0, 0.0)).unwrap();
    (p, x)
}

#[test]
fn every_gradient_path_of_a_bf16_leaf_or_activation_matches_f32() {
    let Some(dev) = cuda_or_skip("autograd::every_gradient_path_of_a_bf16_leaf_or_activation_matches_f32") else {
        return;
    };
    let (pg, xg) = paths_params::<Cuda, bf16>(&dev);
    let (pc, xc) = paths_params::<Cpu, f32>(&cpu());
    let targets = [1i32, 4, 0, 2];
    let lg = paths_loss(&pg, &xg, &Ints::new(&dev, &[4], &targets).unwrap());
    let lc = paths_loss(&pc, &xc, &Ints::new(&cpu(), &[4], &targets).unwrap());
    lg.backward().unwrap();
    lc.backward().unwrap();
    for (a, b) in pc.iter().zip(&pg) {
        let name = a.name().unwrap();
        let e = rel_err(&b.grad().unwrap().unwrap(), &a.grad().unwrap().unwrap());
        eprintln!("{name}: grad rel err {e:.2e}");
        // Two to four bf16 roundings deep: measured worst 1.0%.
        assert!(e < 0.02, "grad {name}: {e:.3e} relative to its largest element");
    }
}

#[test]
fn a_master_keeps_f32_values_exactly_and_the_data_is_their_rounding() {
    let Some(dev) = cuda_or_skip("autograd::a_master_keeps_f32_values_exactly_and_the_data_is_their_rounding") else {
        return;
    };
    let v: Vec<f32> = (0..7).map(|i| 1.0 + i as f32 * 1e-3).collect();
    let p = Tensor::<Cuda, bf16>::param_from_master(&dev, "p", &[7], &v).unwrap();
    assert_eq!(p.master_to_vec().unwrap(), v);
    assert_eq!(p.to_vec().unwrap(), v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>());
    let w: Vec<f32> = v.iter().map(|x| -x).collect();
    p.load_master(&w).unwrap();
    assert_eq!(p.master_to_vec().unwrap(), w);
    assert_eq!(p.to_vec().unwrap(), w.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>());
    assert!(p.load_master(&w[..3]).is_err(), "a length mismatch is an error");
    // A frozen bf16 tensor has no master: its values widen, and loading rounds them.
    let k = Tensor::<Cuda, bf16>::constant(&dev, &[2], &[bf16::from_f32(0.5), bf16::from_f32(2.0)]).unwrap();
    assert!(!k.has_master());
    assert_eq!(k.master_to_vec().unwrap(), vec![0.5, 2.0]);
}

/// `linear_cross_entropy`'s weight gradient over many chunks, in bf16 on CUDA against f32 on the
/// CPU on the same values: summed in f32 over the chunks as the unfused product's dW is.
fn lce_grads<B: Kernels<E>, E: Float>(dev: &std::sync::Arc<B>, chunk: usize) -> (Vec<E::Acc>, Vec<E::Acc>) {
    use tuna_autograd::ops::loss::linear_cross_entropy;
    let (rows, hidden, vocab) = (64, 16, 11);
    let mut rng = Rng::new(9);
    let mut v = |n: usize, s: f32| -> Vec<E> { (0..n).map(|_| E::from_f32(s * rng.normal())).collect() };
    let h = Tensor::param(dev, "h", &[rows, hidden], &v(rows * hidden, 1.0)).unwrap();
    let w = Tensor::param(dev, "w", &[vocab, hidden], &v(vocab * hidden, 0.5)).unwrap();
    let targets: Vec<i32> = (0..rows as i32).map(|r| (r * 7) % vocab as i32).collect();
    linear_cross_entropy(&h, &w, &targets, -100, Some(chunk)).unwrap().backward().unwrap();
    (h.grad().unwrap().unwrap(), w.grad().unwrap().unwrap())
}

#[test]
fn linear_cross_entropy_sums_a_bf16_weight_gradient_in_f32_over_its_chunks() {
    let Some(dev) = cuda_or_skip("autograd::linear_cross_entropy_sums_a_bf16_weight_gradient_in_f32_over_its_chunks")
    else {
        return;
    };
    let (hc, wc) = lce_grads::<Cpu, f32>(&cpu(), 64);
    let (h1, w1) = lce_grads::<Cuda, bf16>(&dev, 64);
    // Against f32: the logits are bf16 (rounded before the softmax), which dominates: measured
    // 3.9e-3 (dw) and 6.9e-3 (dh) of the largest element.
    let (eh, ew) = (rel_err(&h1, &hc), rel_err(&w1, &wc));
    eprintln!("one chunk vs f32: dh rel err {eh:.2e}, dw rel err {ew:.2e}");
    assert!(ew < 1e-2 && eh < 2e-2, "bf16 vs f32: dw {ew:.3e}, dh {eh:.3e}");
    // 64 chunks of one row against one chunk of 64 on the same bf16 logits: only the order of the
    // f32 sums differs (measured: none); summed in bf16 over the chunks, dw moved by 8.1e-3.
    let (h64, w64) = lce_grads::<Cuda, bf16>(&dev, 1);
    let (eh, ew) = (rel_err(&h64, &h1), rel_err(&w64, &w1));
    eprintln!("64 chunks vs one: dh rel err {eh:.2e}, dw rel err {ew:.2e}");
    assert!(ew < 1e-4, "dw over 64 chunks vs one: {ew:.3e} relative to its largest element");
    assert!(eh < 1e-4, "dh over 64 chunks vs one: {eh:.3e} relative to its largest element");
}

/// Both cross-entropies on `(rows, vocab)` logits drawn from seed 5 (as `E`): the unfused loss on
/// the logits, and the fused one on `h W^T` with the logits' values as `h` and an identity `W`.
fn ce_losses<B: Kernels<E>, E: Float>(dev: &std::sync::Arc<B>) -> (Vec<f32>, [Tensor<B, E>; 2]) {
    use tuna_autograd::ops::loss::linear_cross_entropy;
    let (rows, vocab) = (37, 13);
    let mut rng = Rng::new(5);
    let logits: Vec<E> = (0..rows * vocab).map(|_| E::from_f32(3.0 * rng.normal())).collect();
    let targets: Vec<i32> = (0..rows as i32).map(|r| (r * 5) % vocab as i32).collect();
    let x = Tensor::param(dev, "logits", &[rows, vocab], &logits).unwrap();
    let t = Ints::new(dev, &[rows], &targets).unwrap();
    let eye: Vec<E> = (0..vocab * vocab).map(|i| E::from_f32(if i % (vocab + 1) == 0 { 1.0 } else { 0.0 })).collect();
    let w = Tensor::constant(dev, &[vocab, vocab], &eye).unwrap();
    let fused = linear_cross_entropy(&x, &w, &targets, -100, Some(8)).unwrap();
    let widened: Vec<f32> = logits.iter().map(|v| v.to_f32()).collect();
    (widened, [cross_entropy(x.clone(), &t, -100).unwrap(), fused])
}

/// The mean cross-entropy of `logits` in f64 (`ce_losses`' targets).
fn ce_f64(logits: &[f32], vocab: usize) -> f64 {
    let rows = logits.len() / vocab;
    let mut sum = 0.0;
    for (r, row) in logits.chunks(vocab).enumerate() {
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        sum += lse - row[(r * 5) % vocab] as f64;
    }
    sum / rows as f64
}

/// A loss's `value()`: on a bf16 tape the f32 mean the op computed (the loss tensor's own bf16
/// element is 2^-6 apart near 3), matching the f64 loss of the same bf16 logits to f32 accuracy;
/// on an f32 tape exactly the tensor's element (what the trainer logged before). Both the unfused
/// and the chunked fused cross-entropy. The f32 part runs anywhere; the bf16 part skips by name
/// without CUDA.
#[test]
fn a_loss_value_is_its_f32_mean_on_a_bf16_tape() {
    for t in ce_losses::<Cpu, f32>(&cpu()).1 {
        assert_eq!(t.value().unwrap().to_bits(), (t.to_vec().unwrap()[0] as f64).to_bits());
    }
    let Some(dev) = cuda_or_skip("autograd::a_loss_value_is_its_f32_mean_on_a_bf16_tape") else { return };
    let (logits, losses) = ce_losses::<Cuda, bf16>(&dev);
    let want = ce_f64(&logits, 13);
    for t in losses {
        let (v, elem) = (t.value().unwrap(), t.to_vec().unwrap()[0].to_f32() as f64);
        eprintln!("bf16 loss: value {v} element {elem} f64 {want}");
        assert!((v - want).abs() <= 1e-5 * want.abs(), "value {v} vs the f64 loss {want}");
        assert_eq!(v, v as f32 as f64, "value {v} is not an f32");
        assert!(!is_bf16(v as f32), "value {v} is the bf16 element's, not the f32 mean");
        assert_eq!(bf16::from_f64(v).to_f32() as f64, elem, "the element is value's bf16 rounding");
    }
    let one = Tensor::<Cuda, bf16>::constant(&dev, &[2], &[bf16::ONE; 2]).unwrap();
    assert!(one.value().is_err(), "value() of a two-element tensor");
}
