//! [`MixedStepper`]: one forward per step for every decoding sequence together, each row through
//! its own adapter (the models crate's mixed-adapter batches: prompts, prefixes, LoRA, Houlsby).
//!
//! Each sequence keeps its own batch-of-one KV cache, so sequences join and leave the batch
//! between any two steps. A step:
//!
//! - prefills each new sequence alone, as [`super::step::SwapStepper`] does (its adapter swapped in, a
//!   batch-of-one forward of its prompt into its own cache);
//! - decodes the others together: their caches are stacked into one batch, each row left-padded
//!   to the longest (masked; a soft prompt's columns sit where the mixed layout puts them), the
//!   adapters in use are moved into the model's bank for the step ([`Registry::with_bank`]), one
//!   [`AnyModel::mixed_step`] runs every row's new token, and each sequence takes its row of the
//!   grown cache back.
//!
//! Cost: stacking and splitting copy every decoding row's keys and values, `O(batch x length)`
//! per layer per step (on the device, no host round trip), on top of the forward itself. A
//! sequence whose adapter the bank refuses (a merged LoRA) is stepped alone through the swap
//! path in the same step, as is a batch of a single decoding sequence (nothing to batch).
//! Sampling is per sequence from its own logits and generator, as in `tuna generate`. If the
//! mixed forward fails, its rows are stepped again alone (the caches are untouched by the failure),
//! so only a row that fails alone ends its request.

use super::adapters::Registry;
use super::step::{empty_cache, logits_step, Seq, Stepper};
use tuna_autograd::no_grad;
use tuna_autograd::ops::Kernels;
use tuna_models::generate::KvCache;
use tuna_models::mixed_model::Route;
use tuna_models::model::AnyModel;

/// The batched stepper (see the module docs).
pub struct MixedStepper<'a, B: Kernels<f32>> {
    pub model: &'a mut AnyModel<B, f32>,
    pub registry: &'a mut Registry<B>,
    /// Sequences the last step decoded together (see [`Stepper::batched_rows`]).
    pub batched: usize,
}

impl<B: Kernels<f32>> Stepper<B> for MixedStepper<'_, B> {
    fn step(&mut self, seqs: &mut [&mut Seq<B>]) -> Vec<Result<u32, String>> {
        no_grad(|| {
            let n = seqs.len();
            let mut logits: Vec<Option<Result<Vec<f32>, String>>> = (0..n).map(|_| None).collect();
            let decoder = self.model.is_decoder();
            let batched: Vec<usize> = (0..n)
                .filter(|&i| {
                    let s = &seqs[i];
                    decoder && !s.out.is_empty() && s.slot.is_none_or(|slot| self.registry.mixable(slot))
                })
                .collect();
            let batched = if batched.len() > 1 { batched } else { Vec::new() };
            self.batched = batched.len();
            // Prefills, refused adapters and a lone decoder: a batch-of-one forward each.
            for (i, s) in seqs.iter_mut().enumerate().filter(|(i, _)| !batched.contains(i)) {
                let (ids, pos) = s.next_input();
                let r = self.registry.with_installed(self.model, s.slot, |m| logits_step(m, &ids, &pos, &mut s.cache));
                logits[i] = Some(r.and_then(|r| r));
            }
            if !batched.is_empty() {
                let mut slots: Vec<u64> = batched.iter().filter_map(|&i| seqs[i].slot).collect();
                slots.sort_unstable();
                slots.dedup();
                let routes: Vec<Route> =
                    batched.iter().map(|&i| seqs[i].slot.and_then(|s| slots.iter().position(|&x| x == s))).collect();
                let r = self.registry.with_bank(self.model, &slots, |m| decode(m, seqs, &batched, &routes));
                match r.and_then(|r| r) {
                    Ok(rows) => batched.iter().zip(rows).for_each(|(&i, l)| logits[i] = Some(Ok(l))),
                    // One row's failure must not end the others: the caches are as they were, so
                    // each row is stepped alone and only the ones that fail alone fail.
                    Err(_) => {
                        self.batched = 0;
                        for &i in &batched {
                            let s = &mut seqs[i];
                            let (ids, pos) = s.next_input();
                            let r = self
                                .registry
                                .with_installed(self.model, s.slot, |m| logits_step(m, &ids, &pos, &mut s.cache));
                            logits[i] = Some(r.and_then(|r| r));
                        }
                    }
                }
            }
            seqs.iter_mut()
                .zip(logits)
                .map(|(s, l)| {
                    let t = s.choose(&l.unwrap_or_else(|| Err("the step skipped this sequence".into()))?);
                    s.out.push(t);
                    Ok(t)
                })
                .collect()
        })
    }

    fn new_cache(&self) -> KvCache<B, f32> {
        empty_cache(self.model)
    }

    fn batched_rows(&self) -> usize {
        self.batched
    }
}

/// One mixed decode step of `seqs[idx]` (each past its prefill; row `r` routed `routes[r]` in the
/// model's bank): each row's logits, and each sequence's cache grown by its new token. On error
/// the caches are as they were.
fn decode<B: Kernels<f32>>(
    m: &AnyModel<B, f32>,
    seqs: &mut [&mut Seq<B>],
    idx: &[usize],
    routes: &[Route],
) -> Result<Vec<Vec<f32>>, String> {
    let b = idx.len();
    // Content tokens cached per row (the prompt and all but the newest token), and the soft
    // prompt's columns before them (the rest of the row's cache).
    let mut lens = Vec::with_capacity(b);
    let mut soft = Vec::with_capacity(b);
    for &i in idx {
        let s = &seqs[i];
        let len = s.prompt.len() + s.out.len() - 1;
        let np = s.cache.len().checked_sub(len).ok_or("a sequence's cache is shorter than its tokens")?;
        lens.push(len);
        soft.push(np);
    }
    let (max_np, width) = (soft.iter().copied().max().unwrap_or(0), lens.iter().copied().max().unwrap_or(0));
    // Mixed layout of row r: [pads][its soft prompt][its content], `max_np + width` columns.
    let pads: Vec<usize> = (0..b).map(|r| max_np + width - soft[r] - lens[r]).collect();
    let caches: Vec<&KvCache<B, f32>> = idx.iter().map(|&i| &seqs[i].cache).collect();
    let mut cache = KvCache::stack_rows(&caches, &pads).map_err(|e| e.to_string())?;
    let (mut ids, mut pos, mut mask) =
        (Vec::with_capacity(b), Vec::with_capacity(b), Vec::with_capacity(b * (width + 1)));
    for (r, &i) in idx.iter().enumerate() {
        let (id, p) = seqs[i].next_input();
        ids.extend(id);
        pos.extend(p);
        mask.extend(std::iter::repeat_n(0u8, width - lens[r]).chain(std::iter::repeat_n(1u8, lens[r] + 1)));
    }
    let out = m.mixed_step(&ids, &mask, &pos, b, routes, &mut cache).and_then(|t| Ok(t.to_vec()?));
    let out = out.map_err(|e| e.to_string())?;
    let mut grown = Vec::with_capacity(b);
    for (r, &pad) in pads.iter().enumerate() {
        grown.push(cache.row(r, pad).map_err(|e| e.to_string())?);
    }
    for (&i, c) in idx.iter().zip(grown) {
        seqs[i].cache = c;
    }
    let vocab = out.len() / b;
    Ok(out.chunks(vocab.max(1)).map(|c| c.to_vec()).collect())
}
