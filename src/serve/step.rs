//! The model's side of one scheduler step, behind [`Stepper`]: every active sequence advances by
//! one token (its first step prefills its prompt), each through its own adapter.
//!
//! [`SwapStepper`] is the simple implementation: for each sequence in turn it installs the
//! sequence's adapter ([`Registry::with_installed`], a swap of pointers) and runs a batch-of-one
//! forward against the sequence's own KV cache. Sequences join and leave between steps
//! (continuous batching at the scheduler), but the rows of a step are not one batched
//! forward; [`super::mixed::MixedStepper`] (the default) runs the decoding rows as one
//! mixed-adapter forward.

use super::adapters::Registry;
use tuna_autograd::no_grad;
use tuna_autograd::ops::Kernels;
use tuna_kernels::rng::SplitMix64;
use tuna_models::generate::{argmax, sample, CausalLm, KvCache, Sampling};
use tuna_models::model::{AnyModel, Net};

/// One sequence being decoded.
pub struct Seq<B: Kernels<f32>> {
    /// Unique per sequence (a stepper recognizes the sequences it decoded last step by it).
    pub id: u64,
    /// The adapter's registry slot (`None`: the base model).
    pub slot: Option<u64>,
    pub prompt: Vec<u32>,
    /// Tokens generated so far.
    pub out: Vec<u32>,
    /// The sequence's own keys and values (prompt and generated tokens; a soft prompt's columns
    /// too; prefix keys and values stay with the adapter). Stale while
    /// [`super::mixed::MixedStepper`] keeps the sequence's row in its stacked batch cache; it
    /// writes the row back here when the batch changes.
    pub cache: KvCache<B, f32>,
    pub sampling: Sampling,
    rng: Option<SplitMix64>,
}

impl<B: Kernels<f32>> Seq<B> {
    pub fn new(slot: Option<u64>, prompt: Vec<u32>, sampling: Sampling, cache: KvCache<B, f32>) -> Self {
        let rng = match &sampling {
            Sampling::Sample { seed, .. } => Some(SplitMix64::new(*seed)),
            Sampling::Greedy => None,
        };
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Seq { id, slot, prompt, out: Vec::new(), cache, sampling, rng }
    }

    /// The ids and positions this step feeds: the prompt at first, then the last new token.
    pub fn next_input(&self) -> (Vec<u32>, Vec<u32>) {
        match self.out.last() {
            None => (self.prompt.clone(), (0..self.prompt.len() as u32).collect()),
            Some(&t) => (vec![t], vec![(self.prompt.len() + self.out.len() - 1) as u32]),
        }
    }

    /// The next token from `logits`, as [`tuna_models::generate::generate`] picks it (same
    /// order of draws from the same seed, so results match `tuna generate`).
    pub fn choose(&mut self, logits: &[f32]) -> u32 {
        let scores: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
        (match (&self.sampling, self.rng.as_mut()) {
            (Sampling::Sample { temperature, top_k, top_p, .. }, Some(r)) => {
                sample(&scores, *temperature, *top_k, *top_p, r)
            }
            _ => argmax(&scores),
        }) as u32
    }
}

/// The per-step model work the scheduler calls.
pub trait Stepper<B: Kernels<f32>> {
    /// Advance each of `seqs` by one token, appending it to the sequence's `out` and its keys and
    /// values to its cache. One result per sequence, in order: the new token, or why this
    /// sequence failed (the others are unaffected).
    fn step(&mut self, seqs: &mut [&mut Seq<B>]) -> Vec<Result<u32, String>>;

    /// An empty KV cache for a new sequence.
    fn new_cache(&self) -> KvCache<B, f32>;

    /// Sequences the last [`Stepper::step`] decoded in one forward with others (0: none).
    fn batched_rows(&self) -> usize {
        0
    }

    /// Sequences whose caches the last [`Stepper::step`] copied into a stacked batch cache (0:
    /// none, or the batch of the step before was kept as it was).
    fn restacked_rows(&self) -> usize {
        0
    }
}

/// Batch-of-one forwards with the sequence's adapter swapped in (see the module docs).
pub struct SwapStepper<'a, B: Kernels<f32>> {
    pub model: &'a mut AnyModel<B, f32>,
    pub registry: &'a mut Registry<B>,
}

/// The model's logits after `ids` at `positions`, through `cache`.
pub fn logits_step<B: Kernels<f32>>(
    model: &AnyModel<B, f32>,
    ids: &[u32],
    positions: &[u32],
    cache: &mut KvCache<B, f32>,
) -> Result<Vec<f32>, String> {
    let r = match &model.net {
        Net::Llama(l) => l.logits_step(ids, positions, cache),
        Net::Gpt2(g) => g.logits_step(ids, positions, cache),
        Net::Bert(_) => return Err("BERT does not generate".into()),
        Net::T5(_) => return Err("tuna serve does not run T5 yet".into()),
    };
    r.map_err(|e| e.to_string())
}

/// An empty cache for `model` (none for BERT, which never decodes: a zero-layer cache).
pub fn empty_cache<B: Kernels<f32>>(model: &AnyModel<B, f32>) -> KvCache<B, f32> {
    match &model.net {
        Net::Llama(l) => l.new_cache(),
        Net::Gpt2(g) => g.new_cache(),
        Net::Bert(_) | Net::T5(_) => KvCache::new(0),
    }
}

impl<B: Kernels<f32>> Stepper<B> for SwapStepper<'_, B> {
    fn step(&mut self, seqs: &mut [&mut Seq<B>]) -> Vec<Result<u32, String>> {
        no_grad(|| {
            seqs.iter_mut()
                .map(|s| {
                    let (ids, pos) = s.next_input();
                    let logits = self
                        .registry
                        .with_installed(self.model, s.slot, |m| logits_step(m, &ids, &pos, &mut s.cache))??;
                    let t = s.choose(&logits);
                    s.out.push(t);
                    Ok(t)
                })
                .collect()
        })
    }

    fn new_cache(&self) -> KvCache<B, f32> {
        empty_cache(self.model)
    }
}
