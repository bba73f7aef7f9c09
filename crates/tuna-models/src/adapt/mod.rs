//! Adaptation methods, hooked into GPT-2, Llama and BERT: soft prompts (prompt tuning, and
//! P-tuning's encoded ones), per-layer prefix keys/values (prefix tuning, P-tuning v2), Houlsby
//! adapters and LoRA; full fine-tuning is a choice of trainable base weights at load time
//! ([`full_finetune_predicate`]).
//!
//! Every model holds an [`Adapt`] (empty by default) that its forward consults at four points: the
//! input embeddings (soft prompt inserted next to the content, also under left padding), each
//! attention (prefix keys/values through the fused kernel's prefix input), each linear (LoRA's
//! low-rank update), and each sublayer output (Houlsby bottlenecks). Generation goes through the
//! same forward, so every method works with the KV cache.
//!
//! Positions follow Hugging Face PEFT: with `n` virtual tokens (prompt or prefix) the content
//! takes positions `n..`; a soft prompt takes `0..n` (after a prefix's, when both are present).
//! Mixed batches ([`mixed`]): a bank of adapters over one base and a per-row routing; the same
//! four hooks then dispatch per row (see [`Adapt::set_routing`]).
//! Checkpoints: [`peft`] reads and writes PEFT's `adapter_config.json` +
//! `adapter_model.safetensors` (and tuna's documented Houlsby format); every config field is
//! honored or refused by name (`peft_fields`).

mod build;
mod houlsby;
mod lora;
pub mod mixed;
mod model;
pub mod peft;
mod peft_fields;
mod peft_load;
mod prefix;
mod prefix_init;
mod prompt;
mod ptuning;
mod targets;
pub use targets::default_lora_targets;

pub use build::{full_finetune_predicate, Method, PromptInit};
pub use houlsby::{Houlsby, HoulsbyBlock};
pub use lora::{Lora, LoraConfig};
pub use model::{Adaptable, Arch, LinearModule, ModelShape};
pub use prefix::{PrefixKind, PrefixParams, PrefixTuning};
pub use prompt::{PromptParams, SoftPrompt};
pub use ptuning::{EncoderKind, EncoderSpec, LstmCell, PromptEncoder, LSTM_LAYERS};

use crate::error::{Error, Result};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use tuna_autograd::ops::act::{gelu, GeluKind};
use tuna_autograd::ops::attention::Prefix;
use tuna_autograd::ops::embed::{embedding, Prompt};
use tuna_autograd::ops::linear::{linear_act, Activation};
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Ints, Tensor};
use tuna_kernels::rng::SplitMix64;

/// One layer's prefix `(keys, values)`, each `[n, kv_heads, head_dim]`.
pub type LayerKv<B, E> = (Tensor<B, E>, Tensor<B, E>);

use crate::IGNORE_INDEX;

/// The adaptation state of one model: what is inserted or added where. Empty = the base model.
pub struct Adapt<B: Kernels<E>, E: Float> {
    pub prompt: Option<SoftPrompt<B, E>>,
    pub prefix: Option<PrefixTuning<B, E>>,
    pub houlsby: Option<Houlsby<B, E>>,
    /// LoRA updates by Hugging Face module name (`model.layers.0.self_attn.q_proj`).
    pub lora: BTreeMap<String, Lora<B, E>>,
    /// The LoRA hyperparameters (saved in the adapter config).
    pub lora_config: Option<LoraConfig>,
    /// Extra trainable tensors that travel with the adapter (e.g. a classification head), by name.
    pub extra: Vec<(String, Tensor<B, E>)>,
    /// Named adapters over this same base, for mixed batches (see [`mixed`]).
    pub bank: Vec<(String, Adapt<B, E>)>,
    /// The bank adapter of each batch row (`None`: the base) while a mixed forward runs.
    routing: RefCell<Option<Vec<Option<usize>>>>,
    training: Cell<bool>,
    /// Shared with the per-block views of checkpointed blocks (see [`Adapt::block_view`]).
    dropout_rng: Rc<RefCell<SplitMix64>>,
}

impl<B: Kernels<E>, E: Float> Default for Adapt<B, E> {
    fn default() -> Self {
        Adapt {
            prompt: None,
            prefix: None,
            houlsby: None,
            lora: BTreeMap::new(),
            lora_config: None,
            extra: Vec::new(),
            bank: Vec::new(),
            routing: RefCell::new(None),
            training: Cell::new(false),
            dropout_rng: Rc::new(RefCell::new(SplitMix64::new(0x5eed))),
        }
    }
}

/// Inputs of one forward after the adaptation's bookkeeping: positions shifted past the virtual
/// tokens, the mask widened by the soft prompt, and where the prompt goes in each row.
pub struct Prepared<B: Kernels<E>, E: Float> {
    pub positions: Ints<B, u32>,
    pub mask: Option<Ints<B, u8>>,
    /// Insertion column of the soft prompt per row (`None`: nothing inserted in this forward).
    pub at: Option<Ints<B, u32>>,
    /// A mixed batch's per-row layout (see [`mixed`]).
    pub(crate) mixed: Option<mixed::MixedPrep>,
    _e: std::marker::PhantomData<E>,
}

/// Each layer's prefix keys and values for one forward, with the rows each sequence sees of them
/// (`rows`: `[batch, 2]` (start, len), only in a mixed batch).
pub struct PrefixKv<B: Kernels<E>, E: Float> {
    pub layers: Vec<LayerKv<B, E>>,
    pub rows: Option<Ints<B, u32>>,
}

impl<B: Kernels<E>, E: Float> Adapt<B, E> {
    /// No adaptation at all (the base model's own forward).
    pub fn is_empty(&self) -> bool {
        self.prompt.is_none() && self.prefix.is_none() && self.houlsby.is_none() && self.lora.is_empty()
    }

    /// Virtual tokens of the soft prompt (0 without one).
    pub fn prompt_len(&self) -> usize {
        self.prompt.as_ref().map_or(0, |p| p.len())
    }

    /// Prefix positions per layer (0 without a prefix).
    pub fn prefix_len(&self) -> usize {
        self.prefix.as_ref().map_or(0, |p| p.n)
    }

    /// Switch training-only behavior (LoRA dropout) on or off; off after construction. The bank's
    /// adapters follow.
    pub fn set_training(&self, on: bool) {
        self.training.set(on);
        self.bank.iter().for_each(|(_, a)| a.set_training(on));
    }

    pub fn training(&self) -> bool {
        self.training.get()
    }

    /// Reseed the dropout masks (the trainer does this per step, so a resumed run draws the same).
    pub fn seed_dropout(&self, seed: u64) {
        *self.dropout_rng.borrow_mut() = SplitMix64::new(seed);
        for (i, (_, a)) in self.bank.iter().enumerate() {
            a.seed_dropout(seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
    }

    /// The parts of this adaptation one block computes with, owned (for a checkpointed block's
    /// recompute, which runs after the forward's borrows end): the LoRA updates of the modules
    /// named `linears`, the Houlsby adapters and the training switch; the dropout generator is
    /// shared, not copied. No prompt, prefix (the caller passes the layer's), bank or routing.
    pub(crate) fn block_view<'a>(&self, linears: impl IntoIterator<Item = &'a str>) -> Self {
        let lora = linears.into_iter().filter_map(|n| self.lora.get(n).map(|l| (n.to_string(), l.clone()))).collect();
        Adapt {
            houlsby: self.houlsby.clone(),
            lora,
            training: Cell::new(self.training.get()),
            dropout_rng: self.dropout_rng.clone(),
            ..Adapt::default()
        }
    }

    /// Whether a mixed batch's routing is set (see [`Adapt::set_routing`]).
    pub(crate) fn is_mixed(&self) -> bool {
        self.routing_rows().is_some()
    }

    /// The dropout generator's state.
    pub(crate) fn dropout_state(&self) -> SplitMix64 {
        self.dropout_rng.borrow().clone()
    }

    /// Set the dropout generator's state, returning the one it had.
    pub(crate) fn replace_dropout_state(&self, state: SplitMix64) -> SplitMix64 {
        self.dropout_rng.replace(state)
    }

    /// Every trainable tensor of the adaptation, by its checkpoint name (LoRA and prompt names are
    /// PEFT's; the prefix MLP and P-tuning's encoder keep their weights under PEFT's parameter
    /// names, where PEFT's adapter file holds their output; Houlsby and extras are tuna's).
    pub fn params(&self) -> Vec<(String, Tensor<B, E>)> {
        let mut out = Vec::new();
        if let Some(p) = &self.prompt {
            out.extend(p.params());
        }
        if let Some(p) = &self.prefix {
            out.extend(p.params());
        }
        if let Some(h) = &self.houlsby {
            out.extend(h.params());
        }
        for (name, l) in &self.lora {
            out.push((format!("base_model.model.{name}.lora_A.weight"), l.a.clone()));
            out.push((format!("base_model.model.{name}.lora_B.weight"), l.b.clone()));
        }
        out.extend(self.extra.iter().cloned());
        out
    }

    /// Shift positions, widen the mask and place the soft prompt for a forward of `[batch, seq]`
    /// tokens after `cached` tokens already in a KV cache (0 without one). `positions` are the
    /// content's own (`0..` from each row's first real token); `mask` (`[batch, cached + seq]`,
    /// content only) may left-pad: the prompt goes right before each row's first real token.
    pub fn prepare(
        &self,
        dev: &Arc<B>,
        positions: &Ints<B, u32>,
        mask: Option<&Ints<B, u8>>,
        cached: usize,
    ) -> Result<Prepared<B, E>> {
        if let Some(rows) = self.routing_rows() {
            return self.mixed_prepare(dev, &rows, positions, mask, cached);
        }
        let (np, nx) = (self.prompt_len(), self.prefix_len());
        let none = Prepared {
            positions: positions.clone(),
            mask: mask.cloned(),
            at: None,
            mixed: None,
            _e: Default::default(),
        };
        if np == 0 && nx == 0 {
            return Ok(none);
        }
        let &[batch, seq] = positions.shape() else {
            return Err(Error::InvalidArgument(format!("positions must be [batch, seq], got {:?}", positions.shape())));
        };
        // With a prompt, the cache (if any) holds it already: the cached part of the mask widens.
        let insert = np > 0 && cached == 0;
        let lead = leading_pads(mask, batch);
        let new_mask = match mask {
            Some(m) if np > 0 => {
                let w = m.shape()[1];
                let mut v = Vec::with_capacity(batch * (w + np));
                for (r, row) in m.host().chunks(w.max(1)).take(batch).enumerate() {
                    v.extend_from_slice(&row[..lead[r]]);
                    v.extend(std::iter::repeat_n(1u8, np));
                    v.extend_from_slice(&row[lead[r]..]);
                }
                Some(Ints::new(dev, &[batch, w + np], &v)?)
            }
            _ => mask.cloned(),
        };
        let shift = (np + nx) as u32;
        let width = seq + if insert { np } else { 0 };
        let mut pos = Vec::with_capacity(batch * width);
        for (r, row) in positions.host().chunks(seq.max(1)).take(batch).enumerate() {
            // Columns of the content before the prompt: the row's left padding (in this forward).
            let pads = if insert { lead[r].min(seq) } else { 0 };
            pos.extend_from_slice(&row[..pads]);
            if insert {
                pos.extend((0..np as u32).map(|i| nx as u32 + i));
            }
            pos.extend(row[pads..].iter().map(|&p| p + shift));
        }
        let at = if insert {
            let at: Vec<u32> = lead.iter().map(|&l| l.min(seq) as u32).collect();
            Some(Ints::new(dev, &[batch], &at)?)
        } else {
            None
        };
        Ok(Prepared {
            positions: Ints::new(dev, &[batch, width], &pos)?,
            mask: new_mask,
            at,
            mixed: None,
            _e: Default::default(),
        })
    }

    /// The token embeddings of `ids` with the soft prompt inserted where `prep` says.
    pub fn embed(&self, table: &Tensor<B, E>, ids: &Ints<B, u32>, prep: &Prepared<B, E>) -> Result<Tensor<B, E>> {
        if let Some(m) = &prep.mixed {
            return self.mixed_embed(table, ids, m);
        }
        let vectors = match (&self.prompt, &prep.at) {
            (Some(p), Some(_)) => Some(p.vectors()?),
            _ => None,
        };
        let prompt = match (&vectors, &prep.at) {
            (Some(vectors), Some(at)) => Some(Prompt { vectors, at }),
            _ => None,
        };
        Ok(embedding(table, ids, prompt)?)
    }

    /// Labels `[batch, seq]` widened to the prompt-inserted sequence: [`IGNORE_INDEX`] at the
    /// virtual positions (as PEFT extends them).
    pub fn widen_labels(&self, labels: &[i32], batch: usize, prep: &Prepared<B, E>) -> Vec<i32> {
        if let Some(m) = &prep.mixed {
            return m.widen_labels(labels);
        }
        let (Some(at), np) = (&prep.at, self.prompt_len()) else { return labels.to_vec() };
        let seq = labels.len() / batch.max(1);
        let mut out = Vec::with_capacity(labels.len() + batch * np);
        for (r, row) in labels.chunks(seq.max(1)).take(batch).enumerate() {
            let a = at.host()[r] as usize;
            out.extend_from_slice(&row[..a]);
            out.extend(std::iter::repeat_n(IGNORE_INDEX, np));
            out.extend_from_slice(&row[a..]);
        }
        out
    }

    /// Each layer's prefix keys and values (`[n, kv_heads, head_dim]`), computed once per forward
    /// (through the MLP when reparameterized). Empty without a prefix.
    pub fn prefix_kv(&self) -> Result<Vec<LayerKv<B, E>>> {
        match &self.prefix {
            Some(p) => p.layer_kv(),
            None => Ok(Vec::new()),
        }
    }

    /// [`Adapt::prefix_kv`] with the rows each sequence sees (in a mixed batch: the prefixes
    /// of the adapters in use, stacked once per layer), for [`layer_prefix`].
    pub fn prefix_layers(&self) -> Result<PrefixKv<B, E>> {
        if let Some(rows) = self.routing_rows() {
            return self.mixed_prefix(&rows);
        }
        Ok(PrefixKv { layers: self.prefix_kv()?, rows: None })
    }

    /// `x W (+ bias)` of `lin`, plus the LoRA update of the module it names (if any).
    pub fn linear(&self, lin: &crate::linear::Linear<B, E>, x: &Tensor<B, E>) -> Result<Tensor<B, E>> {
        if let Some(rows) = self.routing_rows() {
            return self.mixed_linear(&rows, lin, x);
        }
        let y = lin.apply(x)?;
        if self.lora.is_empty() {
            return Ok(y);
        }
        match self.lora.get(&lin.name) {
            Some(l) => l.add_update(y, x, self.training.get(), &self.dropout_rng),
            None => Ok(y),
        }
    }

    /// `gelu(self.linear(lin, x), kind)`, as one fused op (`linear_act`: the product, bias and
    /// GELU-tanh on the fused kernel) where nothing adapts the layer's output: no LoRA on `lin`,
    /// not a mixed-adapter batch, the weight not packed (`--base-precision`), and the tanh GELU
    /// (the only one with an epilogue). Otherwise the two ops, as before.
    pub fn linear_gelu(
        &self,
        lin: &crate::linear::Linear<B, E>,
        x: &Tensor<B, E>,
        kind: GeluKind,
    ) -> Result<Tensor<B, E>> {
        let plain = kind == GeluKind::Tanh
            && self.routing_rows().is_none()
            && !self.lora.contains_key(&lin.name)
            && lin.packed().is_none();
        if plain {
            return Ok(linear_act(x, &lin.weight, lin.layout, lin.bias.as_ref(), Activation::GeluTanh)?);
        }
        Ok(gelu(&self.linear(lin, x)?, kind)?)
    }

    /// A sublayer's output after the layer-`i` adapter (`ffn` false: after attention).
    pub fn sublayer(&self, i: usize, ffn: bool, y: Tensor<B, E>) -> Result<Tensor<B, E>> {
        if let Some(rows) = self.routing_rows() {
            return self.mixed_sublayer(&rows, i, ffn, y);
        }
        match &self.houlsby {
            Some(h) => h.apply(i, ffn, y),
            None => Ok(y),
        }
    }
}

/// A layer's prefix for the attention op, from [`Adapt::prefix_layers`].
pub fn layer_prefix<B: Kernels<E>, E: Float>(kv: &PrefixKv<B, E>, i: usize) -> Option<Prefix<'_, B, E>> {
    kv.layers.get(i).map(|(k, v)| Prefix { k, v, rows: kv.rows.as_ref() })
}

/// Layer `i`'s prefix keys and values and the rows each sequence sees, owned (for a checkpointed
/// block's recompute; [`layer_prefix`] borrows them back).
pub type OwnedPrefix<B, E> = (Tensor<B, E>, Tensor<B, E>, Option<Ints<B, u32>>);

/// [`layer_prefix`], owned: see [`OwnedPrefix`].
pub fn owned_prefix<B: Kernels<E>, E: Float>(kv: &PrefixKv<B, E>, i: usize) -> Option<OwnedPrefix<B, E>> {
    kv.layers.get(i).map(|(k, v)| (k.clone(), v.clone(), kv.rows.clone()))
}

/// Per row, the count of leading zeros of the mask (the left padding; 0 without a mask).
fn leading_pads<B: Kernels<E>, E: Float>(mask: Option<&Ints<B, u8>>, batch: usize) -> Vec<usize> {
    match mask {
        None => vec![0; batch],
        Some(m) => {
            let w = m.shape().get(1).copied().unwrap_or(0);
            m.host().chunks(w.max(1)).take(batch).map(|row| row.iter().take_while(|&&x| x == 0).count()).collect()
        }
    }
}

/// Standard normal draws (Box-Muller over SplitMix64), for initializations.
pub(crate) fn normal(rng: &mut SplitMix64, n: usize, std: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1 = rng.next_f64().max(f64::MIN_POSITIVE);
            let u2 = rng.next_f64();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
        })
        .collect()
}

/// A trainable tensor from f32 host values (kept exactly in a bf16 tensor's f32 master).
pub(crate) fn param<B: Kernels<E>, E: Float>(
    dev: &Arc<B>,
    name: &str,
    shape: &[usize],
    v: &[f32],
) -> Result<Tensor<B, E>> {
    let host: Vec<E::Acc> = v.iter().map(|&x| <E::Acc as tuna_kernels::Elem>::from_f32(x)).collect();
    Ok(Tensor::param_from_master(dev, name, shape, &host)?)
}

#[cfg(test)]
mod tests;
