//! bf16 mixed precision on the fixture models (GPT-2, Llama, BERT), on CUDA (the emulated device
//! without a GPU): every method trains with bf16 activations and frozen weights, f32 masters,
//! gradients and moments, and follows the f32 run on the same device. Skips by name without CUDA.
//! A module of the `cuda_models` test binary (one binary: the GPU check carries it).

use crate::golden_common;

use half::bf16;
use std::sync::Arc;
use tuna_autograd::ops::elem::mean_pool;
use tuna_autograd::ops::linear::{linear, WeightLayout};
use tuna_autograd::ops::loss::cross_entropy;
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::optim::{AdamW, AdamWParams, OptimKernels};
use tuna_autograd::{Float, Ints, Tensor};
use tuna_kernels::testing::cuda_or_skip;
use tuna_kernels::Cuda;
use tuna_models::adapt::{EncoderKind, LoraConfig, Method, PromptInit};
use tuna_models::model::{AnyModel, Net};

const IDS: [u32; 12] = [5, 9, 2, 7, 1, 3, 8, 4, 6, 2, 9, 1];

/// Every method, small: full fine-tuning and each parameter-efficient one.
fn methods(arch: &str) -> Vec<Method> {
    let targets: Vec<String> = match arch {
        "gpt2" => vec!["c_attn".into(), "c_fc".into()],
        "llama" => vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        _ => vec!["query".into(), "value".into()],
    };
    vec![
        Method::Full { patterns: vec![] },
        Method::Prompt { n: 3, init: PromptInit::Random },
        Method::Prefix { n: 3, projection: None, init: PromptInit::Random },
        Method::Prefix { n: 2, projection: Some(8), init: PromptInit::Random },
        Method::PTuningV2 { n: 2, init: PromptInit::Random },
        Method::PTuning { n: 2, encoder: EncoderKind::Mlp, hidden: Some(8) },
        Method::Houlsby { bottleneck: 4 },
        Method::Lora(LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, targets }),
    ]
}

/// The training loss of the fixture tests: next-token cross-entropy for the decoders, a fixed
/// 3-class head over BERT's mean-pooled states.
fn loss<B: OptimKernels<E>, E: Float>(m: &AnyModel<B, E>, dev: &Arc<B>) -> Tensor<B, E> {
    let (batch, seq) = (2, IDS.len() / 2);
    let t = Ints::new(dev, &[batch, seq], &IDS).unwrap();
    let labels: Vec<i32> = IDS.iter().map(|&x| x as i32).collect();
    match &m.net {
        Net::Gpt2(n) => n.loss(&t, &labels).unwrap(),
        Net::Llama(n) => n.loss(&t, &labels).unwrap(),
        Net::Bert(n) => {
            let mask = Ints::new(dev, &[batch, seq], &vec![1u8; batch * seq]).unwrap();
            let (h, mask) = n.encode(&t, &mask).unwrap();
            let pooled = mean_pool(&h, &mask).unwrap();
            let hid = n.cfg.hidden_size;
            let w: Vec<E> = (0..3 * hid).map(|i| E::c(((i * 7919) % 13) as f64 / 13.0 - 0.5)).collect();
            let w = Tensor::constant(dev, &[3, hid], &w).unwrap();
            let logits = reshape(&linear(&pooled, &w, WeightLayout::OutIn, None).unwrap(), &[batch, 3]).unwrap();
            let classes: Vec<i32> = (0..batch).map(|r| (IDS[r * seq] % 3) as i32).collect();
            cross_entropy(logits, &Ints::new(dev, &[batch], &classes).unwrap(), -100).unwrap()
        }
        Net::T5(_) => unreachable!("T5 is not among these fixtures"),
    }
}

/// The losses of `steps` AdamW steps of `method` on `arch`, and the model.
fn train<E: Float>(dev: &Arc<Cuda>, arch: &str, method: &Method, steps: usize) -> (Vec<f64>, AnyModel<Cuda, E>)
where
    Cuda: OptimKernels<E>,
{
    let full = matches!(method, Method::Full { .. });
    let mut m = AnyModel::<Cuda, E>::open(dev, &golden_common::fixture(arch), move |_| full).unwrap();
    if !full {
        m.install(method, 7, None).unwrap();
    }
    let params: Vec<Tensor<Cuda, E>> = m.trainable().into_iter().map(|(_, t)| t).collect();
    let refs: Vec<&Tensor<Cuda, E>> = params.iter().collect();
    let mut opt = AdamW::new(&refs, AdamWParams::new(if full { 3e-3 } else { 3e-2 })).unwrap();
    let mut losses = Vec::new();
    for _ in 0..steps {
        let l = loss(&m, dev);
        losses.push(l.to_vec().unwrap()[0].to_f64());
        l.backward().unwrap();
        opt.step().unwrap();
    }
    (losses, m)
}

// bf16 against f32 on the same device: the base weights, every activation and the adapters' data
// rounded to bf16 (relative 2^-9 each), so the losses differ by the rounding's effect through the
// network, not by a training difference. Measured worst over every arch and method: the first loss
// 1.6% (BERT P-tuning), a later one 1.8% of the first loss (Llama P-tuning, step 1), measured
// against the first loss since the later ones near 0 (BERT full fine-tuning reaches 0.01); the
// bf16 loss is itself a bf16 value (2^-5 apart near 5). Bounds at about twice.
const FIRST_TOL: f64 = 0.03;
const CURVE_TOL: f64 = 0.04;

#[test]
fn every_method_trains_in_bf16_on_cuda_and_follows_f32() {
    let Some(dev) = cuda_or_skip("tuna-models::every_method_trains_in_bf16_on_cuda_and_follows_f32") else { return };
    for arch in ["gpt2", "llama", "bert"] {
        for method in methods(arch) {
            let what = format!("{arch} {}", method.name());
            let (f, _) = train::<f32>(&dev, arch, &method, 6);
            let (b, m) = train::<bf16>(&dev, arch, &method, 6);
            eprintln!("{what}: f32 {f:.4?}\n{what}: bf16 {b:.4?}");
            let rel = |i: usize| ((b[i] - f[i]) / f[0]).abs();
            assert!(rel(0) < FIRST_TOL, "{what}: first loss bf16 {} vs f32 {}", b[0], f[0]);
            for i in 1..f.len() {
                assert!(rel(i) < CURVE_TOL, "{what}: step {i} loss bf16 {} vs f32 {} (first {})", b[i], f[i], f[0]);
            }
            assert!(b[5] < b[0], "{what}: bf16 did not learn: {b:?}");
            // Every trainable tensor is a mixed-precision leaf whose data is its master rounded.
            for (name, t) in m.trainable() {
                assert!(t.has_master(), "{what}: {name} has no master");
                let (mv, dv) = (t.master_to_vec().unwrap(), t.to_vec().unwrap());
                assert!(
                    mv.iter().zip(&dv).all(|(&a, &d)| bf16::from_f32(a) == d),
                    "{what}: {name} data != bf16(master)"
                );
            }
        }
    }
}

/// A saved adapter of every method loads into a bf16 model with the saved f32 values in its
/// masters (the data their rounding), so training it goes on from what was saved.
#[test]
fn a_saved_adapter_loads_into_a_bf16_model_with_its_f32_values_in_the_masters() {
    let Some(dev) =
        cuda_or_skip("tuna-models::a_saved_adapter_loads_into_a_bf16_model_with_its_f32_values_in_the_masters")
    else {
        return;
    };
    for arch in ["gpt2", "llama", "bert"] {
        for method in methods(arch).into_iter().filter(|m| !matches!(m, Method::Full { .. })) {
            let what = format!("{arch} {}", method.name());
            let dir =
                std::env::temp_dir().join(format!("tuna-bf16-load-{}-{arch}-{}", std::process::id(), method.name()));
            // Trained a few steps in f32 so that the values are nothing an initializer gives.
            let (_, m) = train::<f32>(&dev, arch, &method, 2);
            m.save_adapter(&dir, arch).unwrap();
            let saved: Vec<(String, Vec<f32>)> =
                m.trainable().into_iter().map(|(n, t)| (n, t.master_to_vec().unwrap())).collect();
            let mut b = AnyModel::<Cuda, bf16>::open(&dev, &golden_common::fixture(arch), |_| false).unwrap();
            b.load_adapter(&dir).unwrap();
            let loaded: Vec<(String, Tensor<Cuda, bf16>)> = b.trainable();
            if matches!(method, Method::Prefix { projection: Some(_), .. } | Method::PTuning { .. }) {
                // Saved as PEFT does, the encoder's output (the prefix or prompt it computes): the
                // loaded table is that output, f32 values off bf16's grid, in the master.
                for (name, t) in &loaded {
                    let (mv, d) = (t.master_to_vec().unwrap(), t.to_vec().unwrap());
                    assert!(mv.iter().any(|&x| bf16::from_f32(x).to_f32() != x), "{what}: {name} master is bf16");
                    assert!(mv.iter().zip(&d).all(|(&w, &d)| bf16::from_f32(w) == d), "{what}: {name} data");
                }
                std::fs::remove_dir_all(&dir).ok();
                continue;
            }
            assert_eq!(loaded.len(), saved.len(), "{what}: trainable tensors");
            for ((name, want), (lname, t)) in saved.iter().zip(&loaded) {
                assert_eq!(name, lname, "{what}");
                assert!(t.has_master(), "{what}: {name} has no master");
                assert_eq!(&t.master_to_vec().unwrap(), want, "{what}: {name}'s master is not the saved values");
                let d = t.to_vec().unwrap();
                assert!(
                    want.iter().zip(&d).all(|(&w, &d)| bf16::from_f32(w) == d),
                    "{what}: {name} data != bf16(saved)"
                );
            }
            std::fs::remove_dir_all(&dir).ok();
        }
    }
}
