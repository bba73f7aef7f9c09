//! The models on CUDA (f32) against the CPU on the Hugging Face fixtures: GPT-2 and Llama logits,
//! BERT hidden states, T5 logits, loss and gradients. Skips by name without a GPU.

mod golden_common;
// bf16 mixed precision on the fixture models: in this binary, so the GPU check's bundle carries it.
#[path = "bf16/cuda_bf16.rs"]
mod cuda_bf16;
use golden_common::{fixture, Golden};
use std::sync::Arc;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{no_grad, Ints};
use tuna_kernels::testing::{cuda_or_skip, Tol};
use tuna_kernels::Cpu;
use tuna_models::bert::Bert;
use tuna_models::config::ModelConfig;
use tuna_models::gpt2::Gpt2;
use tuna_models::hf::HfCheckpoint;
use tuna_models::llama::Llama;
use tuna_models::params::Loader;

fn ints<B: Kernels<f32> + tuna_kernels::Alloc<T>, T: tuna_kernels::Elem>(
    dev: &Arc<B>,
    g: &Golden,
    name: &str,
    f: impl Fn(i64) -> T,
) -> Ints<B, T> {
    let v: Vec<T> = g.i64(name).into_iter().map(f).collect();
    Ints::new(dev, &g.shape(name), &v).unwrap()
}

fn outputs<B: Kernels<f32>>(dev: &Arc<B>, arch: &str) -> Vec<f32> {
    let ck = HfCheckpoint::open(fixture(arch)).unwrap();
    let g = Golden::open(arch);
    let ids = ints(dev, &g, "input_ids", |v| v as u32);
    let mask = ints(dev, &g, "attention_mask", |v| v as u8);
    let pos = ints(dev, &g, "position_ids", |v| v as u32);
    let mut loader = Loader::<B, f32>::frozen(&ck, dev);
    no_grad(|| match ck.config() {
        ModelConfig::Gpt2(c) => Gpt2::load(c, &mut loader).unwrap().forward(&ids, &pos).unwrap().to_vec().unwrap(),
        ModelConfig::Llama(c) => {
            Llama::load(c, &mut loader).unwrap().forward(&ids, &pos, Some(&mask), None).unwrap().to_vec().unwrap()
        }
        ModelConfig::Bert(c) => Bert::load(c, &mut loader).unwrap().forward(&ids, &mask).unwrap().to_vec().unwrap(),
        ModelConfig::T5(_) => unreachable!("T5 has its own tests (golden_t5, peft_t5)"),
    })
}

#[test]
fn cuda_models_match_cpu() {
    let Some(dev) = cuda_or_skip("models::cuda_models_match_cpu") else { return };
    let cpu = Arc::new(Cpu);
    for arch in ["gpt2", "llama", "bert"] {
        Tol::CUDA_F32.assert_close(&format!("{arch} on cuda"), &outputs(&dev, arch), &outputs(&cpu, arch));
    }
}

/// T5's logits, loss and every gradient (the relative-position bias through the attention's score
/// bias and its gradient, cross-attention over a padded encoder) on CUDA against the CPU, for both
/// fixtures. (More queries than keys is the kernel tests' `cuda_more_queries_than_keys_match_cpu`.)
#[test]
fn cuda_t5_matches_cpu() {
    let Some(dev) = cuda_or_skip("models::cuda_t5_matches_cpu") else { return };
    fn run<B: Kernels<f32>>(dev: &Arc<B>, arch: &str) -> (Vec<f32>, Vec<f32>) {
        let ck = HfCheckpoint::open(fixture(arch)).unwrap();
        let ModelConfig::T5(c) = ck.config() else { panic!("{arch} is not t5") };
        let g = Golden::open(arch);
        let mut loader = Loader::<B, f32>::with_trainable(&ck, dev, |_| true);
        let m = tuna_models::t5::T5::load(c, &mut loader).unwrap();
        let ids = ints(dev, &g, "input_ids", |v| v as u32);
        let mask = ints(dev, &g, "attention_mask", |v| v as u8);
        let dec = ints(dev, &g, "decoder_input_ids", |v| v as u32);
        let labels: Vec<i32> = g.i64("labels").into_iter().map(|v| v as i32).collect();
        let logits = no_grad(|| m.forward(&ids, &mask, &dec)).unwrap().to_vec().unwrap();
        let loss = m.loss(&ids, &mask, &labels).unwrap();
        let mut out = loss.to_vec().unwrap();
        loss.backward().unwrap();
        for (_, p) in &loader.loaded {
            out.extend(p.grad().unwrap().unwrap());
        }
        (logits, out)
    }
    let cpu = Arc::new(Cpu);
    for arch in ["t5", "t5v11"] {
        let ((lg, gg), (lc, gc)) = (run(&dev, arch), run(&cpu, arch));
        Tol::CUDA_F32.assert_close(&format!("{arch} logits on cuda"), &lg, &lc);
        // Gradients through atomics (the bias's, the prefix's) in another order: relative to the largest.
        let max = gc.iter().fold(0.0f64, |m, &v| m.max(v.abs() as f64));
        Tol::new("t5 grads on cuda", 1e-5 * max, 1e-4).assert_close(
            &format!("{arch} loss and grads on cuda"),
            &gg,
            &gc,
        );
    }
}
