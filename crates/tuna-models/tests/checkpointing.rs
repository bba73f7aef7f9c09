//! Activation checkpointing on the tiny fixtures (GPT-2, Llama with GQA, BERT; two blocks each):
//! for every method (full fine-tuning, prompt, prefix, prefix through its MLP, P-tuning v2,
//! Houlsby, LoRA with and without dropout), the loss and every trainable gradient with every
//! block checkpointed, and with every 2nd (the first block checkpointed, the second not), are
//! bitwise those of the plain forward: the recompute runs the same ops in the same order and
//! adds into the same gradients in the order the plain backward does (see
//! `tuna_autograd::checkpoint`), and draws the same dropout masks.

mod adapt_common;
mod golden_common;

use adapt_common::{load, peft_methods, perturb, take_grads, Fixture, Model, ARCHS};
use tuna_autograd::stats;
use tuna_models::adapt::{LoraConfig, Method};
use tuna_models::checkpointing::Checkpointing;

/// Every method of the crate for `arch`, and whether its base weights train (full fine-tuning).
fn methods(arch: &str) -> Vec<(Method, bool)> {
    let mut v: Vec<(Method, bool)> = peft_methods(arch).into_iter().map(|m| (m, false)).collect();
    if let Some((Method::Lora(c), _)) = v.last() {
        // Dropout draws masks inside the block: the recompute must draw the same.
        let dropped = Method::Lora(LoraConfig { dropout: 0.25, ..c.clone() });
        v.push((dropped, false));
    }
    v.push((Method::Full { patterns: vec![] }, true));
    v
}

fn model(arch: &str, method: &Method, full: bool) -> Model<f32> {
    let mut m: Model<f32> = if full { load(arch, |_| true) } else { load(arch, |_| false) };
    m.apply(method, 11);
    perturb(m.adapt(), 0.05);
    m.adapt().set_training(true);
    m
}

/// Left-padded decoder batches (prompt placement, positions from the mask) or BERT's fixture loss.
fn loss_and_grads(m: &mut Model<f32>, policy: Checkpointing) -> (u32, Vec<(String, Vec<f32>)>) {
    stats::reset();
    let loss = fixture_loss(m, policy);
    let value = loss.to_vec().unwrap()[0].to_bits();
    let blocks = stats::snapshot().recorded.get("checkpoint").copied().unwrap_or(0);
    let want = (0..2).filter(|&l| policy.applies(l)).count() as u64;
    assert_eq!(blocks, want, "blocks checkpointed under {policy}");
    loss.backward().unwrap();
    let grads = take_grads(m);
    (value, grads)
}

fn fixture_loss(m: &mut Model<f32>, policy: Checkpointing) -> tuna_autograd::Tensor<tuna_kernels::Cpu, f32> {
    m.set_checkpointing(policy);
    m.adapt().seed_dropout(1234);
    let vocab = m.shape().vocab;
    let (batch, seq) = (2, 7);
    let ids: Vec<u32> = (0..batch * seq).map(|i| (3 + (i * 37 + i * i) % (vocab - 3)) as u32).collect();
    if m.is_decoder() {
        let mask: Vec<u8> = (0..batch * seq).map(|i| u8::from(i >= 2)).collect();
        let labels: Vec<i32> = ids.iter().zip(&mask).map(|(&t, &k)| if k == 1 { t as i32 } else { -100 }).collect();
        m.lm_loss(&ids, &mask, &labels, batch).unwrap()
    } else {
        m.loss(&ids, batch)
    }
}

/// AdamW inside the backward (each parameter updated as soon as its gradient is complete, its
/// gradient freed then) leaves every method's parameters bitwise where backward-then-step does,
/// plain and with every block checkpointed (a checkpointed block's recompute reads its parameters,
/// which must not have been updated yet).
#[test]
fn updating_in_the_backward_gives_backward_then_step_bitwise() {
    use tuna_autograd::optim::{AdamW, AdamWParams};
    for arch in ARCHS {
        for (method, full) in methods(arch) {
            for policy in [Checkpointing::Off, Checkpointing::Every(1)] {
                let what = format!("{arch}/{}, checkpointing {policy}", method.name());
                let (mut a, mut b) = (model(arch, &method, full), model(arch, &method, full));
                let (pa, pb) = (a.trainable(), b.trainable());
                let hp = AdamWParams { weight_decay: 0.01, ..AdamWParams::new(0.01) };
                let mut oa = AdamW::new(&pa.iter().map(|(_, t)| t).collect::<Vec<_>>(), hp).unwrap();
                let mut ob = AdamW::new(&pb.iter().map(|(_, t)| t).collect::<Vec<_>>(), hp).unwrap();
                for step in 0..2 {
                    fixture_loss(&mut a, policy).backward().unwrap();
                    oa.step().unwrap();
                    let out = ob.backward_and_step(&fixture_loss(&mut b, policy)).unwrap();
                    assert_eq!(out.updated, pb.len(), "{what}, step {step}: {out:?}");
                    if full {
                        // The blocks' gradients complete (and are freed) one block at a time,
                        // checkpointed blocks included: never all of them at once.
                        let total: usize = pb.iter().map(|(_, t)| t.bytes()).sum();
                        let held = out.peak_grad_bytes;
                        assert!(held < total * 3 / 4, "{what}: {held} of {total} gradient bytes held at once");
                    }
                    for ((n, x), (_, y)) in pa.iter().zip(&pb) {
                        let (x, y) = (x.to_vec().unwrap(), y.to_vec().unwrap());
                        let same = x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits());
                        assert!(same, "{what}, step {step}: {n} differs");
                    }
                }
            }
        }
    }
}

#[test]
fn every_method_gives_the_plain_loss_and_gradients_bitwise() {
    for arch in ARCHS {
        for (method, full) in methods(arch) {
            let what = format!(
                "{arch}/{}{}",
                method.name(),
                if let Method::Lora(c) = &method { format!(" dropout {}", c.dropout) } else { String::new() }
            );
            let mut m = model(arch, &method, full);
            let (loss, plain) = loss_and_grads(&mut m, Checkpointing::Off);
            assert!(!plain.is_empty(), "{what}: nothing trains");
            for policy in [Checkpointing::Every(1), Checkpointing::Every(2)] {
                let (l, got) = loss_and_grads(&mut m, policy);
                assert_eq!(f32::from_bits(l), f32::from_bits(loss), "{what}, checkpointing {policy}: loss");
                for ((n, g), (_, p)) in got.iter().zip(&plain) {
                    let same = g.len() == p.len() && g.iter().zip(p).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{what}, checkpointing {policy}: gradient of {n} differs");
                }
            }
        }
    }
}

#[test]
fn checkpointing_every_block_keeps_fewer_activations() {
    for arch in ARCHS {
        let lora = peft_methods(arch).pop().unwrap();
        let mut m = model(arch, &lora, false);
        let mut peak = |policy| {
            stats::reset();
            let base = stats::snapshot().saved_bytes;
            loss_and_grads(&mut m, policy);
            stats::snapshot().peak_saved_bytes - base
        };
        let (off, every) = (peak(Checkpointing::Off), peak(Checkpointing::Every(1)));
        assert!(every < off, "{arch}: peak saved activations {every} B checkpointed vs {off} B plain");
    }
}

#[test]
fn without_gradients_checkpointing_changes_nothing() {
    for arch in ARCHS {
        let lora = peft_methods(arch).pop().unwrap();
        let mut m = model(arch, &lora, false);
        m.adapt().set_training(false);
        let ids: Vec<u32> = (0..12).map(|i| 3 + i).collect();
        let out = |m: &Model<f32>| tuna_autograd::no_grad(|| m.outputs(&ids, 2, None)).to_vec().unwrap();
        let plain = out(&m);
        m.set_checkpointing(Checkpointing::Every(1));
        assert_eq!(out(&m), plain, "{arch}");
        let before = stats::snapshot().recorded_total();
        tuna_autograd::no_grad(|| m.outputs(&ids, 2, None));
        assert_eq!(stats::snapshot().recorded_total(), before, "{arch}: recorded under no_grad");
    }
}
