//! Mixed-adapter batches on [`AnyModel`]: load adapters into the bank, then run batches whose rows
//! each name their adapter (or none): outputs per position, the causal LM loss, class scores (a
//! BERT row scored by its own adapter's head), one decode step through a [`KvCache`], and batched
//! greedy generation. Each row's output equals running it alone with its adapter installed
//! (see [`crate::adapt::mixed`] for how the rows are laid out).

use crate::adapt::mixed::scatter_rows;
use crate::adapt::{Adapt, Method};
use crate::error::{Error, Result};
use crate::generate::{argmax, CausalLm, KvCache};
use crate::model::{AnyModel, Net};
use crate::positions::positions_from_mask;
use std::path::Path;
use tuna_autograd::ops::elem::{mean_pool, slice_cols};
use tuna_autograd::ops::linear::{linear, WeightLayout};
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{no_grad, Float, Ints, Tensor};

/// One row's adapter: an index into the bank ([`AnyModel::load_bank_adapter`]), `None` = base.
pub type Route = Option<usize>;

impl<B: Kernels<E>, E: Float> AnyModel<B, E> {
    /// Load the adapter saved in `dir` (PEFT's format or tuna's, with a task head beside it)
    /// into the bank under `name` (replacing one of that name); returns its bank index. The
    /// model's own adaptation is left as it was.
    pub fn load_bank_adapter(&mut self, name: &str, dir: &Path) -> Result<usize> {
        let own = std::mem::take(self.adapt_mut());
        let loaded = self.load_adapter(dir);
        let adapter = std::mem::replace(self.adapt_mut(), own);
        loaded?;
        Ok(self.adapt_mut().add_to_bank(name, adapter))
    }

    /// Install `method` (seeded, as [`AnyModel::install`] does) as a new adapter in the bank under
    /// `name` (replacing one of that name); returns its bank index. The model's own adaptation is
    /// left as it was.
    pub fn install_bank_adapter(
        &mut self,
        name: &str,
        method: &Method,
        seed: u64,
        init_text: Option<&str>,
    ) -> Result<usize> {
        let i = self.adapt_mut().add_to_bank(name, Adapt::default());
        let installed = self.with_bank_adapter(i, |m| m.install(method, seed, init_text));
        if installed.is_err() {
            self.adapt_mut().bank.remove(i);
        }
        installed.map(|()| i)
    }

    /// `f` on the model with bank adapter `i` installed as its own adaptation (the model's own,
    /// bank included, set aside meanwhile); restored after. What `f` adds to the adaptation (a task
    /// head) stays with the bank adapter. Running a batch of one adapter's rows so computes exactly
    /// what a model with only that adapter computes (`tuna eval` on its export), task heads and
    /// the first-token rule of soft prompts included.
    pub fn with_bank_adapter<T>(&mut self, i: usize, f: impl FnOnce(&mut Self) -> T) -> T {
        let adapter = std::mem::take(&mut self.adapt_mut().bank[i].1);
        let own = std::mem::replace(self.adapt_mut(), adapter);
        let out = f(self);
        let adapter = std::mem::replace(self.adapt_mut(), own);
        self.adapt_mut().bank[i].1 = adapter;
        out
    }

    /// Every trainable tensor of the bank's adapters, named `<adapter>/<checkpoint name>` (for an
    /// optimizer over a multi-task run: a mixed batch's loss sends each row's gradient to its own
    /// adapter's tensors).
    pub fn bank_params(&self) -> Vec<(String, Tensor<B, E>)> {
        let bank = &self.adapt().bank;
        bank.iter().flat_map(|(n, a)| a.params().into_iter().map(move |(p, t)| (format!("{n}/{p}"), t))).collect()
    }

    /// Save bank adapter `name` into `dir` as the folder [`AnyModel::save_adapter`] writes.
    pub fn save_bank_adapter(&mut self, name: &str, dir: &Path, base_name: &str) -> Result<()> {
        let Some(i) = self.adapt().bank_index(name) else {
            return Err(Error::InvalidArgument(format!("no adapter {name:?} in the bank")));
        };
        let adapter = std::mem::take(&mut self.adapt_mut().bank[i].1);
        let own = std::mem::replace(self.adapt_mut(), adapter);
        let saved = self.save_adapter(dir, base_name);
        let adapter = std::mem::replace(self.adapt_mut(), own);
        self.adapt_mut().bank[i].1 = adapter;
        saved
    }

    /// An empty KV cache for this decoder.
    pub fn new_cache(&self) -> Result<KvCache<B, E>> {
        match &self.net {
            Net::Gpt2(g) => Ok(g.new_cache()),
            Net::Llama(l) => Ok(l.new_cache()),
            Net::Bert(_) => Err(not_a_decoder()),
            Net::T5(_) => Err(no_t5()),
        }
    }

    /// Outputs per position of a mixed batch (`ids`, `mask` `[batch, seq]`; decoders left-pad,
    /// BERT right-pads; `rows[r]` row `r`'s adapter): logits `[batch, width, vocab]` for decoders,
    /// the last hidden states for BERT, with the mask of the output columns (`[batch, width]`;
    /// `width` = `seq` + the longest routed soft prompt). Row `r`'s columns where the mask is 1
    /// are what it computes alone (its prompt, then its tokens).
    pub fn forward_mixed(
        &self,
        ids: &[u32],
        mask: &[u8],
        batch: usize,
        rows: &[Route],
    ) -> Result<(Tensor<B, E>, Vec<u8>)> {
        let (h, mask) = self.hidden_mixed(ids, mask, batch, rows)?;
        match &self.net {
            Net::Bert(_) => Ok((h, mask)),
            _ => Ok((self.lm_head(&h)?, mask)),
        }
    }

    /// The last hidden states `[batch, width, hidden]` of a mixed batch with the mask of the
    /// output columns: [`AnyModel::forward_mixed`] before a decoder's head (a multi-task step
    /// takes the logits only of the rows that need them, and classification rows' verbalizer
    /// tokens at the last position, as [`AnyModel::class_scores`] does).
    pub fn hidden_mixed(
        &self,
        ids: &[u32],
        mask: &[u8],
        batch: usize,
        rows: &[Route],
    ) -> Result<(Tensor<B, E>, Vec<u8>)> {
        let (t, m, pos) = self.inputs(ids, mask, batch)?;
        self.adapt().with_routing(rows, || {
            let (h, mask) = match &self.net {
                Net::Gpt2(g) => {
                    let (h, prep) = g.hidden_states(&t, &pos, Some(&m), None)?;
                    (h, prep.mask)
                }
                Net::Llama(l) => {
                    let (h, prep) = l.hidden_states(&t, &pos, Some(&m), None)?;
                    (h, prep.mask)
                }
                Net::Bert(b) => {
                    let (h, mask) = b.encode(&t, &m)?;
                    (h, Some(mask))
                }
                Net::T5(_) => return Err(no_t5()),
            };
            Ok((h, mask.map_or_else(|| mask_of(mask_len(ids, batch), batch), |m| m.host().to_vec())))
        })
    }

    /// A decoder's LM head over hidden states (`[.., hidden]` -> `[.., vocab]`).
    pub fn lm_head(&self, h: &Tensor<B, E>) -> Result<Tensor<B, E>> {
        match &self.net {
            Net::Gpt2(g) => g.head(h),
            Net::Llama(l) => l.head(h),
            Net::Bert(_) => Err(not_a_decoder()),
            Net::T5(t) => t.head(h),
        }
    }

    /// The causal LM loss of a mixed batch (as [`AnyModel::lm_loss`]: the mean over every
    /// row's kept targets, so each adapter's gradient is the sum over its rows).
    pub fn lm_loss_mixed(
        &self,
        ids: &[u32],
        mask: &[u8],
        labels: &[i32],
        batch: usize,
        rows: &[Route],
    ) -> Result<Tensor<B, E>> {
        self.adapt().with_routing(rows, || self.lm_loss(ids, mask, labels, batch))
    }

    /// Class scores `[batch, classes]` of a mixed batch: decoders through the verbalizer rows
    /// (as [`AnyModel::class_scores`]); BERT rows each through their adapter's head
    /// (`classifier.weight`/`bias` in its extras; base rows through the model's own), which must
    /// agree on the class count.
    pub fn class_scores_mixed(
        &self,
        ids: &[u32],
        mask: &[u8],
        batch: usize,
        verbalizer: &[u32],
        rows: &[Route],
    ) -> Result<Tensor<B, E>> {
        let Net::Bert(b) = &self.net else {
            return self.adapt().with_routing(rows, || self.class_scores(ids, mask, batch, verbalizer));
        };
        let (t, m, _) = self.inputs(ids, mask, batch)?;
        let pooled = self.adapt().with_routing(rows, || {
            let (h, m) = b.encode(&t, &m)?;
            Ok(mean_pool(&h, &m)?)
        })?;
        // Rows grouped by head: bank index + 1, 0 for the model's own.
        let mut groups: Vec<(usize, Vec<u32>)> = Vec::new();
        for (r, route) in rows.iter().enumerate() {
            let key = route.map_or(0, |i| i + 1);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(r as u32),
                None => groups.push((key, vec![r as u32])),
            }
        }
        let mut parts = Vec::with_capacity(groups.len());
        let mut classes = None;
        for (key, rs) in &groups {
            let (name, extra) = match key {
                0 => ("the base model", &self.adapt().extra),
                k => (self.adapt().bank[k - 1].0.as_str(), &self.adapt().bank[k - 1].1.extra),
            };
            let find = |n: &str| extra.iter().find(|(k, _)| k == n).map(|(_, t)| t.clone());
            let (Some(w), Some(bias)) = (find("classifier.weight"), find("classifier.bias")) else {
                return Err(Error::InvalidArgument(format!(
                    "mixed BERT classification: {name} has no head (classifier.weight/bias)"
                )));
            };
            if *classes.get_or_insert(w.shape()[0]) != w.shape()[0] {
                return Err(Error::InvalidArgument(format!(
                    "mixed BERT classification: {name}'s head has {} classes, another row's {}",
                    w.shape()[0],
                    classes.unwrap_or(0)
                )));
            }
            let rows_pooled = crate::adapt::mixed::gather_rows(&pooled, rs, batch)?;
            parts.push(linear(&rows_pooled, &w, WeightLayout::OutIn, Some(&bias))?);
        }
        scatter_rows(&groups, &parts, &[batch, classes.unwrap_or(0)])
    }

    /// One decode step of a mixed batch through `cache`: `ids` `[batch, t]` (the tokens after
    /// those cached), `mask` `[batch, cached content + t]` (content only: 1 = token, left padding
    /// 0; the soft prompts' columns are added per row), `positions` `[batch, t]` (each row's own
    /// count of real tokens before each token). Returns the logits of the last position
    /// `[batch, vocab]`. The first step (an empty cache) is the prefill.
    #[allow(clippy::too_many_arguments)]
    pub fn mixed_step(
        &self,
        ids: &[u32],
        mask: &[u8],
        positions: &[u32],
        batch: usize,
        rows: &[Route],
        cache: &mut KvCache<B, E>,
    ) -> Result<Tensor<B, E>> {
        let (t, w) = (ids.len() / batch.max(1), mask.len() / batch.max(1));
        if ids.len() != batch * t || positions.len() != ids.len() || mask.len() != batch * w || w < t {
            return Err(tuna_autograd::Error::Shape {
                op: "mixed_step",
                what: "ids, positions [batch, t] and mask [batch, cached + t]",
                left: vec![ids.len(), positions.len(), mask.len()],
                right: vec![batch, t, w],
            }
            .into());
        }
        let ids = Ints::new(&self.dev, &[batch, t], ids)?;
        let pos = Ints::new(&self.dev, &[batch, t], positions)?;
        let m = Ints::new(&self.dev, &[batch, w], mask)?;
        let h = self.adapt().with_routing(rows, || match &self.net {
            Net::Gpt2(g) => Ok(g.hidden_states(&ids, &pos, Some(&m), Some(&mut *cache))?.0),
            Net::Llama(l) => Ok(l.hidden_states(&ids, &pos, Some(&m), Some(&mut *cache))?.0),
            Net::Bert(_) => Err(not_a_decoder()),
            Net::T5(_) => Err(no_t5()),
        })?;
        let (s, hid) = (h.shape()[1], h.shape()[2]);
        let last = slice_cols(&reshape(&h, &[batch, s * hid])?, (s - 1) * hid, hid)?;
        match &self.net {
            Net::Gpt2(g) => g.head(&last),
            Net::Llama(l) => l.head(&last),
            Net::Bert(_) => Err(not_a_decoder()),
            Net::T5(_) => Err(no_t5()),
        }
    }

    /// Greedy generation for a mixed batch: up to `max_new_tokens` after each prompt (rows
    /// left-padded to one length, each with its own adapter), a row stopping after `eos`. Returns
    /// each row's new tokens. Runs under `no_grad`.
    pub fn generate_mixed(
        &self,
        prompts: &[Vec<u32>],
        rows: &[Route],
        max_new_tokens: usize,
        eos: Option<u32>,
    ) -> Result<Vec<Vec<u32>>> {
        let batch = prompts.len();
        if rows.len() != batch || prompts.iter().any(|p| p.is_empty()) {
            return Err(Error::InvalidArgument(format!(
                "generate_mixed: {batch} prompts (each at least one token) need {batch} routes, got {}",
                rows.len()
            )));
        }
        let len = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let (mut ids, mut mask) = (Vec::with_capacity(batch * len), Vec::with_capacity(batch * len));
        for p in prompts {
            ids.extend(std::iter::repeat_n(self.pad_id(), len - p.len()).chain(p.iter().copied()));
            mask.extend(std::iter::repeat_n(0u8, len - p.len()).chain(std::iter::repeat_n(1u8, p.len())));
        }
        let pos = positions_from_mask(&mask, batch, len);
        no_grad(|| {
            let mut cache = self.new_cache()?;
            cache.reserve(len + max_new_tokens);
            let mut out = vec![Vec::new(); batch];
            let mut done = vec![max_new_tokens == 0; batch];
            let mut logits = self.mixed_step(&ids, &mask, &pos, batch, rows, &mut cache)?;
            let mut width = len;
            while !done.iter().all(|&d| d) {
                let v: Vec<f64> = logits.to_vec()?.into_iter().map(|x| x.to_f64()).collect();
                let vocab = v.len() / batch;
                let next: Vec<u32> = v.chunks(vocab).map(|s| argmax(s) as u32).collect();
                for r in 0..batch {
                    if done[r] {
                        continue;
                    }
                    out[r].push(next[r]);
                    done[r] = out[r].len() == max_new_tokens || eos == Some(next[r]);
                }
                if done.iter().all(|&d| d) {
                    break;
                }
                // Every row steps (a finished row's output is ignored; rows never see each other).
                let mut wide = Vec::with_capacity(batch * (width + 1));
                for row in mask.chunks(width) {
                    wide.extend_from_slice(row);
                    wide.push(1);
                }
                (mask, width) = (wide, width + 1);
                let pos: Vec<u32> = prompts.iter().zip(&out).map(|(p, o)| (p.len() + o.len() - 1) as u32).collect();
                logits = self.mixed_step(&next, &mask, &pos, batch, rows, &mut cache)?;
            }
            Ok(out)
        })
    }
}

fn mask_len(ids: &[u32], batch: usize) -> usize {
    ids.len() / batch.max(1)
}

fn mask_of(seq: usize, batch: usize) -> Vec<u8> {
    vec![1; seq * batch]
}

fn no_t5() -> Error {
    Error::InvalidArgument(
        "mixed-adapter batches (tuna serve, train --tasks) are built for GPT-2, Llama and BERT, not yet for T5".into(),
    )
}

fn not_a_decoder() -> Error {
    Error::InvalidArgument("this needs a decoder (Llama family, GPT-2), not BERT".into())
}
