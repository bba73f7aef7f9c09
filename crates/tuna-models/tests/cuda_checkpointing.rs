//! Activation checkpointing on CUDA (f32): on the tiny fixtures, LoRA with dropout and prefix
//! tuning through its MLP give the same loss and gradients with every block checkpointed as
//! without. Skips by name without a GPU (`TUNA_CUDA_EMULATE=1` runs it on the emulated device).

mod adapt_common;
mod golden_common;

use adapt_common::{fixture, peft_methods, take_grads};
use tuna_kernels::testing::{cuda_or_skip, Tol};
use tuna_kernels::Cuda;
use tuna_models::adapt::{LoraConfig, Method, PromptInit};
use tuna_models::checkpointing::Checkpointing;
use tuna_models::model::AnyModel;

/// The loss and every trainable gradient of one step on `m` under `policy`.
fn step(m: &mut AnyModel<Cuda, f32>, policy: Checkpointing) -> (Vec<f32>, Vec<(String, Vec<f32>)>) {
    let loss = fixture_loss(m, policy);
    let l = loss.to_vec().unwrap();
    loss.backward().unwrap();
    let grads = take_grads(m);
    (l, grads)
}

fn fixture_loss(m: &mut AnyModel<Cuda, f32>, policy: Checkpointing) -> tuna_autograd::Tensor<Cuda, f32> {
    m.set_checkpointing(policy);
    m.adapt().seed_dropout(99);
    let (batch, seq) = (2, 6);
    let vocab = m.shape().vocab;
    let ids: Vec<u32> = (0..batch * seq).map(|i| (3 + (i * 41 + 5) % (vocab - 3)) as u32).collect();
    let mask: Vec<u8> = (0..batch * seq).map(|i| u8::from(i != 0)).collect();
    if m.is_decoder() {
        let labels: Vec<i32> = ids.iter().zip(&mask).map(|(&t, &k)| if k == 1 { t as i32 } else { -100 }).collect();
        m.lm_loss(&ids, &mask, &labels, batch).unwrap()
    } else {
        let pooled = m.mean_pooled(&ids, &mask, batch).unwrap();
        tuna_autograd::ops::loss::cross_entropy(
            pooled,
            &tuna_autograd::Ints::new(&m.dev, &[batch], &[1i32, 4]).unwrap(),
            -100,
        )
        .unwrap()
    }
}

/// The tolerance of two runs of the same kernels on the same data: the emulated device
/// (sequential) gives the same bits; a real GPU's atomic adds (scatter-add backwards) may sum in
/// another order, hence a few f32 roundings there.
fn same_kernels_tol(emulated: &'static str, gpu: &'static str) -> Tol {
    if tuna_kernels::cuda::emulation_setting() == Ok(true) {
        Tol::new(emulated, 0.0, 0.0)
    } else {
        Tol::new(gpu, 1e-6, 1e-5)
    }
}

#[test]
fn cuda_updating_in_the_backward_gives_backward_then_step() {
    use tuna_autograd::optim::{AdamW, AdamWParams, MomentStorage};
    let Some(dev) = cuda_or_skip("models::cuda_updating_in_the_backward_gives_backward_then_step") else { return };
    // Each parameter's update reads only its own gradient and moments, so the order of updates
    // changes no bits.
    let tol = same_kernels_tol(
        "AdamW in the backward vs after it, emulated device (bitwise)",
        "AdamW in the backward vs after it on CUDA (atomic-add order)",
    );
    for arch in ["gpt2", "llama", "bert"] {
        for policy in [Checkpointing::Off, Checkpointing::Every(1)] {
            for storage in [MomentStorage::Master, MomentStorage::Bf16] {
                let open = || AnyModel::<Cuda, f32>::open(&dev, &fixture(arch), |_| true).unwrap();
                let (mut a, mut b) = (open(), open());
                let (pa, pb) = (a.trainable(), b.trainable());
                let hp = AdamWParams { weight_decay: 0.01, ..AdamWParams::new(1e-3) };
                let mut oa = AdamW::with_storage(&pa.iter().map(|(_, t)| t).collect::<Vec<_>>(), hp, storage).unwrap();
                let mut ob = AdamW::with_storage(&pb.iter().map(|(_, t)| t).collect::<Vec<_>>(), hp, storage).unwrap();
                for s in 0..2 {
                    fixture_loss(&mut a, policy).backward().unwrap();
                    oa.step().unwrap();
                    let out = ob.backward_and_step(&fixture_loss(&mut b, policy)).unwrap();
                    assert_eq!(out.updated, pb.len(), "{arch} {policy} {storage}: {out:?}");
                    for ((n, x), (_, y)) in pa.iter().zip(&pb) {
                        let what = format!("{arch} {n}, checkpointing {policy}, {storage} moments, step {s}");
                        tol.assert_close(&what, &y.to_vec().unwrap(), &x.to_vec().unwrap());
                    }
                }
            }
        }
    }
}

#[test]
fn cuda_checkpointed_blocks_give_the_plain_gradients() {
    let Some(dev) = cuda_or_skip("models::cuda_checkpointed_blocks_give_the_plain_gradients") else { return };
    // The recompute launches the same kernels on the same data in the same order.
    let tol = same_kernels_tol(
        "checkpointed vs plain on the emulated device (bitwise)",
        "checkpointed vs plain on CUDA (atomic-add order)",
    );
    for arch in ["gpt2", "llama", "bert"] {
        let lora = match peft_methods(arch).pop() {
            Some(Method::Lora(c)) => Method::Lora(LoraConfig { dropout: 0.2, ..c }),
            other => panic!("{other:?}"),
        };
        let prefix_mlp = Method::Prefix { n: 2, projection: Some(8), init: PromptInit::Random };
        for method in [lora, prefix_mlp] {
            let what = format!("{arch}/{}", method.name());
            let mut m = AnyModel::<Cuda, f32>::open(&dev, &fixture(arch), |_| false).unwrap();
            m.install(&method, 5, None).unwrap();
            m.adapt().set_training(true);
            let (loss, plain) = step(&mut m, Checkpointing::Off);
            for policy in [Checkpointing::Every(1), Checkpointing::Every(2)] {
                let (l, got) = step(&mut m, policy);
                tol.assert_close(&format!("{what} loss, checkpointing {policy}"), &l, &loss);
                for ((n, g), (_, p)) in got.iter().zip(&plain) {
                    tol.assert_close(&format!("{what} {n}, checkpointing {policy}"), g, p);
                }
            }
        }
    }
}
