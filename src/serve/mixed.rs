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
//!   adapters in use are moved into the model's bank for the step ([`Registry::with_bank`]), and
//!   one [`AnyModel::mixed_step`] runs every row's new token.
//!
//! The stacked cache ([`Stacked`]) is kept across steps while the same sequences decode together:
//! every row grows by one column a step, so each row's left padding stays what it was and the
//! next step appends in place (the cache's buffers have room to spare). Only when a sequence
//! joins or leaves the decoding batch are the rows handed back to their sequences' own caches and
//! the new set stacked (`tuna_restacked_rows_total` counts the rows copied).
//!
//! Cost: a restack copies every decoding row's keys and values, `O(batch x length)` per layer
//! (on the device, no host round trip), once per change of the batch rather than every step. A
//! sequence whose adapter the bank refuses (a merged LoRA) is stepped alone through the swap
//! path in the same step, as is a batch of a single decoding sequence (nothing to batch).
//! Sampling is per sequence from its own logits and generator, as in `tuna generate`. If the
//! mixed forward fails, the batch cache is cut back to before the step, its rows are handed back
//! and each is stepped again alone, so only a row that fails alone ends its request. While a
//! sequence's row lives in the batch cache, its own cache is emptied (only its reservation kept),
//! so its keys and values are not held twice.

use super::adapters::Registry;
use super::step::{empty_cache, logits_step, Seq, Stepper};
use tuna_autograd::no_grad;
use tuna_autograd::ops::Kernels;
use tuna_models::generate::KvCache;
use tuna_models::mixed_model::Route;
use tuna_models::model::AnyModel;

/// The decoding sequences' caches stacked into one batch, kept from one step to the next while
/// the same sequences decode together; meanwhile their own caches are stale.
pub struct Stacked<B: Kernels<f32>> {
    /// The sequences' ids ([`Seq::id`]), in row order.
    ids: Vec<u64>,
    /// Each row's left padding (the columns before its soft prompt and content).
    pads: Vec<usize>,
    cache: KvCache<B, f32>,
}

impl<B: Kernels<f32>> Stacked<B> {
    /// Each row back into its sequence's own cache (those of `seqs` still here), with the
    /// sequence's reservation (a row comes back at its length, so its next appends would regrow);
    /// a row that cannot be taken out fails its sequence in `logits` (never decoded stale).
    fn hand_back(self, seqs: &mut [&mut Seq<B>], logits: &mut [Option<Result<Vec<f32>, String>>]) {
        for (r, (id, &pad)) in self.ids.iter().zip(&self.pads).enumerate() {
            if let Some(i) = seqs.iter().position(|s| s.id == *id) {
                match self.cache.row(r, pad) {
                    Ok(mut c) => {
                        c.reserve(seqs[i].cache.reserved());
                        seqs[i].cache = c;
                    }
                    Err(e) => logits[i] = Some(Err(e.to_string())),
                }
            }
        }
    }
}

/// The batched stepper (see the module docs).
pub struct MixedStepper<'a, B: Kernels<f32>> {
    pub model: &'a mut AnyModel<B, f32>,
    pub registry: &'a mut Registry<B>,
    /// The batch cache of the last step, if it decoded a batch (the engine keeps it).
    pub stacked: &'a mut Option<Stacked<B>>,
    /// Sequences the last step decoded together (see [`Stepper::batched_rows`]).
    pub batched: usize,
    /// Sequences whose caches the last step stacked (see [`Stepper::restacked_rows`]).
    pub restacked: usize,
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
            let mut batched = if batched.len() > 1 { batched } else { Vec::new() };
            self.restacked = 0;
            // A batch other than last step's: its rows go back to their sequences (those still
            // here) before anything reads their caches.
            let ids: Vec<u64> = batched.iter().map(|&i| seqs[i].id).collect();
            if self.stacked.as_ref().is_some_and(|st| st.ids != ids) {
                let st = self.stacked.take().expect("checked above");
                st.hand_back(seqs, &mut logits);
                batched.retain(|&i| logits[i].is_none());
                if batched.len() < 2 {
                    batched.clear();
                }
            }
            self.batched = batched.len();
            // Prefills, refused adapters and a lone decoder: a batch-of-one forward each.
            let alone: Vec<usize> = (0..n).filter(|i| !batched.contains(i) && logits[*i].is_none()).collect();
            for i in alone {
                let s = &mut *seqs[i];
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
                // The batch cache's columns before this step, if last step's is kept.
                let before = self.stacked.as_ref().map(|st| st.cache.len());
                let stacked = &mut *self.stacked;
                let restacked = &mut self.restacked;
                let r = self
                    .registry
                    .with_bank(self.model, &slots, |m| decode(m, seqs, &batched, &routes, stacked, restacked));
                match r.and_then(|r| r) {
                    Ok(rows) => {
                        for (&i, l) in batched.iter().zip(rows) {
                            logits[i] = Some(Ok(l));
                            // Its keys and values live in the batch cache now: not held twice.
                            let emptied = seqs[i].cache.emptied();
                            seqs[i].cache = emptied;
                        }
                    }
                    // One row's failure must not end the others: each row is stepped again alone
                    // from its cache as it was, and only the ones that fail alone fail.
                    Err(_) => {
                        self.batched = 0;
                        // The batch cache back to before this step (a forward that failed part
                        // way has appended to some layers), its rows handed back to their
                        // sequences (a batch cache made this step: their own caches are current).
                        if let (Some(mut st), Some(before)) = (self.stacked.take(), before) {
                            st.cache.truncate(before);
                            st.hand_back(seqs, &mut logits);
                        }
                        let again: Vec<usize> = batched.iter().copied().filter(|&i| logits[i].is_none()).collect();
                        for i in again {
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

    fn restacked_rows(&self) -> usize {
        self.restacked
    }
}

/// One mixed decode step of `seqs[idx]` (each past its prefill; row `r` routed `routes[r]` in the
/// model's bank) through `stacked`, the batch cache of exactly these sequences if the last step
/// decoded them (else they are stacked from their own caches here, counted in `restacked`):
/// each row's logits, the batch cache grown by each row's new token.
fn decode<B: Kernels<f32>>(
    m: &AnyModel<B, f32>,
    seqs: &mut [&mut Seq<B>],
    idx: &[usize],
    routes: &[Route],
    stacked: &mut Option<Stacked<B>>,
    restacked: &mut usize,
) -> Result<Vec<Vec<f32>>, String> {
    let b = idx.len();
    // Content tokens cached per row: the prompt and all but the newest token.
    let lens: Vec<usize> = idx.iter().map(|&i| seqs[i].prompt.len() + seqs[i].out.len() - 1).collect();
    let width = lens.iter().copied().max().unwrap_or(0);
    if stacked.is_none() {
        // The soft prompt's columns before each row's content: the rest of the row's cache.
        let mut soft = Vec::with_capacity(b);
        for (&i, &len) in idx.iter().zip(&lens) {
            soft.push(seqs[i].cache.len().checked_sub(len).ok_or("a sequence's cache is shorter than its tokens")?);
        }
        let max_np = soft.iter().copied().max().unwrap_or(0);
        // Mixed layout of row r: [pads][its soft prompt][its content], `max_np + width` columns,
        // with as many spare columns (the rows grow by one a step while the batch stays).
        let pads: Vec<usize> = (0..b).map(|r| max_np + width - soft[r] - lens[r]).collect();
        let caches: Vec<&KvCache<B, f32>> = idx.iter().map(|&i| &seqs[i].cache).collect();
        let spare = (max_np + width).max(8);
        let cache = KvCache::stack_rows(&caches, &pads, spare).map_err(|e| e.to_string())?;
        *restacked += b;
        *stacked = Some(Stacked { ids: idx.iter().map(|&i| seqs[i].id).collect(), pads, cache });
    }
    let st = stacked.as_mut().expect("stacked above");
    // Each row's padded length is its pad, soft prompt and content: one for all rows.
    if let Some(r) = (0..b).find(|&r| st.pads[r] + lens[r] > st.cache.len()) {
        return Err(format!(
            "row {r}: {} pads and {} tokens exceed the batch cache's {}",
            st.pads[r],
            lens[r],
            st.cache.len()
        ));
    }
    let (mut ids, mut pos, mut mask) =
        (Vec::with_capacity(b), Vec::with_capacity(b), Vec::with_capacity(b * (width + 1)));
    for (r, &i) in idx.iter().enumerate() {
        let (id, p) = seqs[i].next_input();
        ids.extend(id);
        pos.extend(p);
        mask.extend(std::iter::repeat_n(0u8, width - lens[r]).chain(std::iter::repeat_n(1u8, lens[r] + 1)));
    }
    let out = m.mixed_step(&ids, &mask, &pos, b, routes, &mut st.cache).and_then(|t| Ok(t.to_vec()?));
    let out = out.map_err(|e| e.to_string())?;
    let vocab = out.len() / b;
    Ok(out.chunks(vocab.max(1)).map(|c| c.to_vec()).collect())
}
