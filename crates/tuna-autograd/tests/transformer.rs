//! The tape on a whole (tiny) transformer: an end-to-end gradient check, frozen-base accounting
//! (soft prompt only, prefix only, against everything trainable), micro-batch accumulation, and
//! the freeing of saved activations.

mod common;
use common::cpu;
use common::tiny::{Tiny, Train};
use tuna_autograd::gradcheck::{check, GRAD_TOL};
use tuna_autograd::{no_grad, stats};
use tuna_kernels::Cpu;

const IDS: [u32; 10] = [1, 4, 2, 9, 3, 7, 7, 0, 10, 5];

#[test]
fn two_block_transformer_passes_the_gradient_check() {
    let m = Tiny::<Cpu, f64>::new(&cpu(), 1, Train::All);
    let params = m.trainable();
    assert_eq!(params.len(), 2 + 2 * 13 + 3);
    let r = check(&params, || m.loss(&IDS, 2), 1e-5, GRAD_TOL, 6).unwrap();
    assert!(r.checked > 150, "{r:?}");
}

struct Run {
    stats: stats::Stats,
    loss: f64,
    grads: Vec<(String, Vec<f64>)>,
}

fn run(train: Train) -> Run {
    let m = Tiny::<Cpu, f64>::new(&cpu(), 7, train);
    stats::reset();
    let loss = m.loss(&IDS, 2).unwrap();
    let lv = loss.to_vec().unwrap()[0];
    loss.backward().unwrap();
    let stats = stats::snapshot();
    let grads =
        m.trainable().iter().map(|t| (t.name().unwrap().to_string(), t.grad().unwrap().expect("a gradient"))).collect();
    Run { stats, loss: lv, grads }
}

#[test]
fn frozen_base_launches_no_dw_and_saves_less() {
    let all = run(Train::All);
    let prompt = run(Train::PromptOnly);
    let prefix = run(Train::PrefixOnly);
    for (name, r) in [("prompt only", &prompt), ("prefix only", &prefix)] {
        // the same forward
        assert_eq!(r.loss, all.loss, "{name}");
        // no weight-gradient kernel for a frozen weight
        for kind in ["linear.dW", "layernorm.dW", "add_bias.bwd_bias", "matmul.dB"] {
            assert_eq!(r.stats.launches(kind), 0, "{name}: {kind} launched {:?}", r.stats.backward_launches);
        }
        assert!(
            r.stats.peak_saved_bytes < all.stats.peak_saved_bytes,
            "{name}: {} vs {}",
            r.stats.peak_saved_bytes,
            all.stats.peak_saved_bytes
        );
        // identical gradients for what trains
        for (n, g) in &r.grads {
            let (_, ga) = all.grads.iter().find(|(m, _)| m == n).expect("trainable in (a) too");
            assert_eq!(g, ga, "{name}: gradient of `{n}` differs from the all-trainable run");
        }
    }
    assert!(all.stats.launches("linear.dW") > 0);
    assert_eq!(prompt.grads.len(), 1);
    assert_eq!(prefix.grads.len(), 4);
    // prefix only: nothing below the first trainable tensor is recorded (the embedding, block 0's
    // first layernorm and its q/k/v projections and rope).
    assert_eq!(prefix.stats.recorded.get("embedding"), None);
    assert!(prefix.stats.recorded_total() < prompt.stats.recorded_total());
    // all three run backward through the whole attention stack
    assert_eq!(prefix.stats.launches("attention.bwd"), 2);
}

#[test]
fn micro_batches_accumulate_to_the_full_batch() {
    // one batch of 2 rows against 2 micro-batches of 1 row, each loss halved (both rows have
    // the same number of valid targets, so the full-batch mean is the mean of the halves)
    let full = Tiny::<Cpu, f64>::new(&cpu(), 3, Train::All);
    full.loss(&IDS, 2).unwrap().backward().unwrap();
    let micro = Tiny::<Cpu, f64>::new(&cpu(), 3, Train::All);
    for row in IDS.chunks(5) {
        let l = micro.loss(row, 1).unwrap();
        tuna_autograd::ops::elem::scale(&l, 0.5).unwrap().backward().unwrap();
    }
    let tol = tuna_kernels::testing::Tol::new("f64 accumulation order", 1e-12, 1e-10);
    for (a, b) in full.trainable().iter().zip(micro.trainable()) {
        tol.assert_close(a.name().unwrap(), &b.grad().unwrap().unwrap(), &a.grad().unwrap().unwrap());
    }
    // zeroing at the optimizer step
    for p in micro.trainable() {
        p.zero_grad();
        assert!(p.grad().unwrap().is_none());
    }
}

#[test]
fn saved_activations_are_freed_by_backward_and_no_grad_records_nothing() {
    let m = Tiny::<Cpu, f32>::new(&cpu(), 5, Train::PrefixOnly);
    let base = stats::snapshot().saved_bytes;
    let loss = m.loss(&IDS, 2).unwrap();
    assert!(stats::snapshot().saved_bytes > base, "{:?} base {base}", stats::snapshot());
    loss.backward().unwrap();
    assert_eq!(stats::snapshot().saved_bytes, base, "backward must drop what it saved");
    // a graph dropped without backward frees its saves too
    let loss = m.loss(&IDS, 2).unwrap();
    drop(loss);
    assert_eq!(stats::snapshot().saved_bytes, base);
    // no_grad: nothing recorded, nothing saved
    stats::reset();
    let l = no_grad(|| m.loss(&IDS, 2)).unwrap();
    assert!(!l.requires_grad());
    assert_eq!(stats::snapshot().recorded_total(), 0);
    assert_eq!(stats::snapshot().peak_saved_bytes, base);
    // differentiating twice is a clear error
    let l = m.loss(&IDS, 2).unwrap();
    l.backward().unwrap();
    assert!(l.backward().unwrap_err().to_string().contains("already differentiated"));
}

#[test]
fn adamw_and_clipping_train_the_prefix() {
    use tuna_autograd::optim::{clip_grad_norm, AdamW, AdamWParams};
    let m = Tiny::<Cpu, f64>::new(&cpu(), 9, Train::PrefixOnly);
    let params = m.trainable();
    let base: Vec<Vec<f64>> = params.iter().map(|p| p.to_vec().unwrap()).collect();
    let frozen_before = m.blocks[0].wq.to_vec().unwrap();
    let mut opt = AdamW::new(&params, AdamWParams { weight_decay: 0.0, ..AdamWParams::new(0.05) }).unwrap();
    let first = m.loss(&IDS, 2).unwrap().to_vec().unwrap()[0];
    let mut last = first;
    for step in 0..15 {
        let loss = m.loss(&IDS, 2).unwrap();
        last = loss.to_vec().unwrap()[0];
        loss.backward().unwrap();
        // the norm reported is the f64 norm of all gradients; clipping brings it to max_norm
        let want: f64 =
            params.iter().map(|p| p.grad().unwrap().unwrap().iter().map(|g| g * g).sum::<f64>()).sum::<f64>().sqrt();
        let norm = clip_grad_norm(&params, 0.5).unwrap();
        assert!((norm - want).abs() <= 1e-12 * want.max(1.0), "step {step}: {norm} vs {want}");
        let after: f64 =
            params.iter().map(|p| p.grad().unwrap().unwrap().iter().map(|g| g * g).sum::<f64>()).sum::<f64>().sqrt();
        assert!(after <= 0.5 + 1e-9, "clipped norm {after}");
        opt.step().unwrap();
        assert!(params.iter().all(|p| p.grad().unwrap().is_none()), "step zeroes the gradients");
    }
    assert!(last < first - 0.05, "loss did not fall: {first} -> {last}");
    assert!(params.iter().zip(&base).all(|(p, b)| p.to_vec().unwrap() != *b), "every trainable tensor moved");
    assert_eq!(m.blocks[0].wq.to_vec().unwrap(), frozen_before, "a frozen weight is bit-identical");
}
