//! The tiny Hugging Face fixtures (GPT-2, Llama with GQA, BERT) as adaptable models, with one loss
//! per architecture, for the adaptation tests.
#![allow(dead_code)]

use std::sync::Arc;
use tuna_autograd::ops::elem::mean_pool;
use tuna_autograd::ops::linear::{linear, WeightLayout};
use tuna_autograd::ops::loss::cross_entropy;
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::{Float, Ints, Tensor};
use tuna_kernels::Cpu;

/// The floats the CPU tape runs on (f32, f64): their own accumulators.
pub trait CpuTape: Float + tuna_kernels::CpuFloat {}
impl<T: Float + tuna_kernels::CpuFloat> CpuTape for T {}
use tuna_models::adapt::{Adapt, EncoderKind, LoraConfig, Method, PromptInit};
use tuna_models::generate::{CausalLm, KvCache};
use tuna_models::model::AnyModel;
pub use tuna_models::model::Net;

pub const ARCHS: [&str; 3] = ["gpt2", "llama", "bert"];

/// The fixture folder of `arch` (the golden tests' lookup: `$TUNA_FIXTURES_DIR` or this crate's).
pub use crate::golden_common::fixture;

/// The fixture models, as the one model interface every caller of the crate uses.
pub type Model<E> = AnyModel<Cpu, E>;

/// The fixture model of `arch`, frozen (or with base weights trainable as `trainable` says).
pub fn load<E: CpuTape>(arch: &str, trainable: impl Fn(&str) -> bool + 'static) -> Model<E> {
    AnyModel::open(&Arc::new(Cpu), &fixture(arch), trainable).unwrap()
}

pub fn frozen<E: CpuTape>(arch: &str) -> Model<E> {
    load(arch, |_| false)
}

/// What the adaptation tests compute on a fixture model beyond the model interface: outputs per
/// position, a loss per architecture, and the KV cache's last logits.
pub trait Fixture<E: CpuTape> {
    /// Install `method` (seeded).
    fn apply(&mut self, method: &Method, seed: u64);
    fn outputs(&self, ids: &[u32], batch: usize, mask: Option<&[u8]>) -> Tensor<Cpu, E>;
    fn loss(&self, ids: &[u32], batch: usize) -> Tensor<Cpu, E>;
    fn cached_last_logits(&self, ids: &[u32]) -> Vec<E>;
}

impl<E: CpuTape> Fixture<E> for Model<E> {
    fn apply(&mut self, method: &Method, seed: u64) {
        self.install(method, seed, None).unwrap()
    }

    /// Output per position: logits `[batch, seq', vocab]` for decoders, the last hidden states for
    /// BERT, with content `positions` (`0..` from each row's first token) and an optional mask.
    fn outputs(&self, ids: &[u32], batch: usize, mask: Option<&[u8]>) -> Tensor<Cpu, E> {
        let dev = Arc::new(Cpu);
        let seq = ids.len() / batch;
        let ids = Ints::new(&dev, &[batch, seq], ids).unwrap();
        let pos = tuna_models::positions::positions_from_mask(&mask_or_ones(mask, ids.host().len()), batch, seq);
        let pos = Ints::new(&dev, &[batch, seq], &pos).unwrap();
        let mask = mask.map(|m| Ints::new(&dev, &[batch, seq], m).unwrap());
        match &self.net {
            Net::Gpt2(m) => m.forward_masked(&ids, &pos, mask.as_ref()).unwrap(),
            Net::Llama(m) => m.forward(&ids, &pos, mask.as_ref(), None).unwrap(),
            Net::Bert(m) => {
                let mask = mask.unwrap_or_else(|| Ints::new(&dev, &[batch, seq], &vec![1u8; batch * seq]).unwrap());
                m.forward(&ids, &mask).unwrap()
            }
            Net::T5(_) => unreachable!("T5 has its own tests (golden_t5, peft_t5)"),
        }
    }

    /// A training loss: next-token cross-entropy for decoders; for BERT, cross-entropy of a fixed
    /// random 3-class head over the mean-pooled states against `classes` (the sequence's first
    /// token mod 3 when `None`).
    fn loss(&self, ids: &[u32], batch: usize) -> Tensor<Cpu, E> {
        let dev = Arc::new(Cpu);
        let seq = ids.len() / batch;
        let t = Ints::new(&dev, &[batch, seq], ids).unwrap();
        let labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
        match &self.net {
            Net::Gpt2(m) => m.loss(&t, &labels).unwrap(),
            Net::Llama(m) => m.loss(&t, &labels).unwrap(),
            Net::Bert(m) => {
                let mask = Ints::new(&dev, &[batch, seq], &vec![1u8; batch * seq]).unwrap();
                let (h, mask) = m.encode(&t, &mask).unwrap();
                let pooled = mean_pool(&h, &mask).unwrap();
                let hid = m.cfg.hidden_size;
                let w: Vec<E> = (0..3 * hid).map(|i| <E as Float>::c(((i * 7919) % 13) as f64 / 13.0 - 0.5)).collect();
                let w = Tensor::constant(&dev, &[3, hid], &w).unwrap();
                let logits = reshape(&linear(&pooled, &w, WeightLayout::OutIn, None).unwrap(), &[batch, 3]).unwrap();
                let classes: Vec<i32> = (0..batch).map(|r| (ids[r * seq] % 3) as i32).collect();
                cross_entropy(logits, &Ints::new(&dev, &[batch], &classes).unwrap(), -100).unwrap()
            }
            Net::T5(_) => unreachable!("T5 has its own tests (golden_t5, peft_t5)"),
        }
    }

    /// Logits of the last position after feeding `ids` (one sequence) through the KV cache in
    /// two steps (prefill of all but the last token, then the last).
    fn cached_last_logits(&self, ids: &[u32]) -> Vec<E> {
        fn run<E: CpuTape, M: CausalLm<Cpu, E>>(m: &M, ids: &[u32]) -> Vec<E> {
            let mut cache: KvCache<Cpu, E> = m.new_cache();
            let n = ids.len();
            let pos: Vec<u32> = (0..n as u32).collect();
            m.logits_step(&ids[..n - 1], &pos[..n - 1], &mut cache).unwrap();
            m.logits_step(&ids[n - 1..], &pos[n - 1..], &mut cache).unwrap()
        }
        match &self.net {
            Net::Gpt2(m) => run(m, ids),
            Net::Llama(m) => run(m, ids),
            Net::Bert(_) => panic!("BERT does not generate"),
            Net::T5(_) => unreachable!("T5 has its own tests (golden_t5, peft_t5)"),
        }
    }
}

pub fn mask_or_ones(mask: Option<&[u8]>, n: usize) -> Vec<u8> {
    mask.map_or_else(|| vec![1; n], |m| m.to_vec())
}

/// Every parameter-efficient method, small, for the tiny fixtures.
pub fn peft_methods(arch: &str) -> Vec<Method> {
    let targets: Vec<String> = match arch {
        "gpt2" => vec!["c_attn".into(), "c_fc".into()],
        "llama" => vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        _ => vec!["query".into(), "value".into()],
    };
    vec![
        Method::Prompt { n: 3, init: PromptInit::SampleVocab },
        Method::Prefix { n: 3, projection: None, init: PromptInit::Random },
        Method::Prefix { n: 2, projection: Some(8), init: PromptInit::Random },
        Method::PTuningV2 { n: 2, init: PromptInit::Random },
        Method::PTuning { n: 2, encoder: EncoderKind::Mlp, hidden: Some(8) },
        Method::PTuning { n: 2, encoder: EncoderKind::Lstm, hidden: Some(4) },
        Method::Houlsby { bottleneck: 4 },
        Method::Lora(LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, targets }),
    ]
}

/// Deterministic token ids in `3..vocab`.
pub fn ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    (0..n as u64).map(|i| (3 + (i * 31 + seed * 17 + (i * i) % 7) % (vocab as u64 - 3)) as u32).collect()
}

/// Add seeded noise of `std` to every adapter tensor, so no method sits at an identity init.
pub fn perturb<E: CpuTape>(a: &Adapt<Cpu, E>, std: f64) {
    for (k, (_, t)) in a.params().iter().enumerate() {
        let mut v = t.to_vec().unwrap();
        for (i, x) in v.iter_mut().enumerate() {
            let r = ((i as u64 * 2654435761 + k as u64 * 97) % 1000) as f64 / 1000.0 - 0.5;
            *x = <E as Float>::c((*x).into() + 2.0 * std * r);
        }
        *t.data_mut() = v;
    }
}

pub fn f64s<E: CpuTape>(v: &[E]) -> Vec<f64> {
    v.iter().map(|&x| x.into()).collect()
}

/// Each trainable tensor's gradient by name, taken (the gradients are zeroed for the next step).
pub fn take_grads<B: tuna_autograd::ops::Kernels<E>, E: CpuTape>(m: &AnyModel<B, E>) -> Vec<(String, Vec<E>)> {
    m.trainable()
        .into_iter()
        .map(|(n, t)| {
            let g = t.grad().unwrap().unwrap_or_else(|| panic!("{n}: no gradient"));
            t.zero_grad();
            (n, g)
        })
        .collect()
}
