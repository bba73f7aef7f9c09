//! Mixed-adapter batches: a bank of named adapters ([`Adapt::bank`], each an [`Adapt`] loaded
//! with the PEFT loader: any method, rank, target modules, prompt or prefix length) over one base,
//! and a routing that names each batch row's adapter (`None`: the base). While a routing is set
//! ([`Adapt::set_routing`], or scoped by [`Adapt::with_routing`]) the four hooks dispatch per row,
//! so that each row's output equals running it alone with its adapter installed:
//!
//! - soft prompts: row `r` becomes `[extra left pads][its left pads][its prompt][content]`, the
//!   extra pads (`max prompt - its prompt`, masked) making the rows one width; positions as the
//!   row alone has them (content shifted past its own prompt and prefix). The prompt vectors of
//!   the adapters in use are stacked once and gathered into place with the token embeddings.
//! - prefixes: the adapters' per-layer keys/values stacked once, each row seeing its own slice
//!   through the attention kernel's per-sequence prefix ranges (no per-row copies).
//! - LoRA and Houlsby: for each adapter, its rows are gathered, the update computed at its own
//!   rank (or bottleneck), and the updates of all adapters scattered back into batch order with
//!   one gather over `[updates; zero row]` and added (rows without one add zeros).
//!
//! Gathers go through the embedding op (its backward scatter-adds), so training a mixed batch
//! sends each row's gradient to its own adapter's tensors. The model's own methods must be
//! empty while routing (a task head in `extra` may stay); a merged LoRA in the bank is refused.

use super::{leading_pads, Adapt, PrefixKv, Prepared};
use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::IGNORE_INDEX;
use std::cell::Ref;
use std::sync::Arc;
use tuna_autograd::ops::elem::{add, concat_cols};
use tuna_autograd::ops::embed::embedding;
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Ints, Tensor};

/// A mixed batch's layout after [`Adapt::prepare`]: where each output column's embedding comes
/// from (a content token, a prompt vector, or the zero row of an extra pad).
pub(crate) struct MixedPrep {
    /// Per output slot (`[batch, width]`): a row of `[content tokens (batch * seq); the prompts
    /// of `prompts`, stacked; one zero row]`. Empty when nothing is inserted.
    src: Vec<u32>,
    /// Bank indices whose prompts are stacked in `src`'s table, in order.
    prompts: Vec<usize>,
    batch: usize,
    seq: usize,
    width: usize,
    /// `src`'s index of the zero row (the extra pads).
    zero: u32,
}

impl MixedPrep {
    /// Labels `[batch, seq]` spread over the widened rows, [`IGNORE_INDEX`] at prompt and pad
    /// slots. A content label right after an extra pad is ignored too: as the next-token target
    /// of that pad it would be a prediction the row alone never makes (nothing precedes its first
    /// token there).
    pub(crate) fn widen_labels(&self, labels: &[i32]) -> Vec<i32> {
        if self.src.is_empty() {
            return labels.to_vec();
        }
        let n = self.batch * self.seq;
        let mut out: Vec<i32> =
            self.src.iter().map(|&s| if (s as usize) < n { labels[s as usize] } else { IGNORE_INDEX }).collect();
        for (row, src) in out.chunks_mut(self.width.max(1)).zip(self.src.chunks(self.width.max(1))) {
            for c in 1..src.len() {
                if src[c - 1] == self.zero && (src[c] as usize) < n {
                    row[c] = IGNORE_INDEX;
                }
            }
        }
        out
    }
}

impl<B: Kernels<E>, E: Float> Adapt<B, E> {
    /// Add `adapt` to the bank under `name` (replacing one of that name); returns its index.
    pub fn add_to_bank(&mut self, name: &str, adapt: Adapt<B, E>) -> usize {
        match self.bank.iter().position(|(n, _)| n == name) {
            Some(i) => {
                self.bank[i].1 = adapt;
                i
            }
            None => {
                self.bank.push((name.to_string(), adapt));
                self.bank.len() - 1
            }
        }
    }

    /// The bank index of adapter `name`.
    pub fn bank_index(&self, name: &str) -> Option<usize> {
        self.bank.iter().position(|(n, _)| n == name)
    }

    /// Route the rows of the next forwards: `rows[r]` is row `r`'s bank index (`None`: the base);
    /// `None` ends routing. Refused when the model has its own adapter installed, for an index
    /// outside the bank, or for a merged LoRA in a routed adapter.
    pub fn set_routing(&self, rows: Option<Vec<Option<usize>>>) -> Result<()> {
        if let Some(rows) = &rows {
            if self.prompt.is_some() || self.prefix.is_some() || self.houlsby.is_some() || !self.lora.is_empty() {
                return Err(Error::InvalidArgument(
                    "mixed batch: the model has its own adapter installed; put it in the bank instead".into(),
                ));
            }
            for &i in rows.iter().flatten() {
                let Some((name, a)) = self.bank.get(i) else {
                    return Err(Error::InvalidArgument(format!(
                        "mixed batch: adapter index {i} but the bank holds {}",
                        self.bank.len()
                    )));
                };
                if let Some((m, _)) = a.lora.iter().find(|(_, l)| l.is_merged()) {
                    return Err(Error::InvalidArgument(format!(
                        "mixed batch: adapter {name} has its LoRA merged into {m} (unmerge it first)"
                    )));
                }
            }
        }
        *self.routing.borrow_mut() = rows;
        Ok(())
    }

    /// `f` with `rows` routed, the routing cleared after however `f` ends (a value, an error or a
    /// panic that a caller catches: a server that survives a panicking forward must not leave its
    /// next plain forward routed).
    pub fn with_routing<T>(&self, rows: &[Option<usize>], f: impl FnOnce() -> Result<T>) -> Result<T> {
        struct Clear<'a>(&'a std::cell::RefCell<Option<Vec<Option<usize>>>>);
        impl Drop for Clear<'_> {
            fn drop(&mut self) {
                *self.0.borrow_mut() = None;
            }
        }
        self.set_routing(Some(rows.to_vec()))?;
        let _clear = Clear(&self.routing);
        f()
    }

    /// The routing in force, if any.
    pub fn routing(&self) -> Option<Vec<Option<usize>>> {
        self.routing.borrow().clone()
    }

    pub(super) fn routing_rows(&self) -> Option<Ref<'_, Vec<Option<usize>>>> {
        Ref::filter_map(self.routing.borrow(), |r| r.as_ref()).ok()
    }

    /// Columns a soft prompt adds before the content: the prompt's length, or in a mixed batch
    /// the longest routed prompt.
    pub fn prompt_width(&self) -> usize {
        match self.routing_rows() {
            Some(rows) => rows.iter().flatten().map(|&i| self.bank[i].1.prompt_len()).max().unwrap_or(0),
            None => self.prompt_len(),
        }
    }

    /// Row `r`'s adapter.
    fn row(&self, rows: &[Option<usize>], r: usize) -> Option<&Adapt<B, E>> {
        rows[r].map(|i| &self.bank[i].1)
    }

    /// The distinct bank indices routed that `has` holds for, each with its rows (ascending).
    fn groups(&self, rows: &[Option<usize>], has: impl Fn(&Adapt<B, E>) -> bool) -> Vec<(usize, Vec<u32>)> {
        let mut out: Vec<(usize, Vec<u32>)> = Vec::new();
        for (r, &i) in rows.iter().enumerate() {
            let Some(i) = i.filter(|&i| has(&self.bank[i].1)) else { continue };
            match out.iter_mut().find(|(j, _)| *j == i) {
                Some((_, v)) => v.push(r as u32),
                None => out.push((i, vec![r as u32])),
            }
        }
        out.sort_by_key(|(i, _)| *i);
        out
    }

    pub(super) fn mixed_prepare(
        &self,
        dev: &Arc<B>,
        rows: &[Option<usize>],
        positions: &Ints<B, u32>,
        mask: Option<&Ints<B, u8>>,
        cached: usize,
    ) -> Result<Prepared<B, E>> {
        let &[batch, seq] = positions.shape() else {
            return Err(Error::InvalidArgument(format!("positions must be [batch, seq], got {:?}", positions.shape())));
        };
        if rows.len() != batch {
            return Err(shape_err("routing rows vs batch", &[rows.len()], &[batch]));
        }
        if let Some(m) = mask.filter(|m| m.shape().len() != 2 || m.shape()[0] != batch) {
            return Err(shape_err("mask vs [batch, cached + seq]", m.shape(), &[batch]));
        }
        let np: Vec<usize> = (0..batch).map(|r| self.row(rows, r).map_or(0, |a| a.prompt_len())).collect();
        let nx: Vec<usize> = (0..batch).map(|r| self.row(rows, r).map_or(0, |a| a.prefix_len())).collect();
        let max_np = np.iter().copied().max().unwrap_or(0);
        let insert = max_np > 0 && cached == 0;
        let lead = leading_pads(mask, batch);
        let new_mask = if max_np > 0 {
            // Content columns: the mask's, or (none given) every cached content token and the new ones.
            let w = mask.map_or(cached.saturating_sub(max_np) + seq, |m| m.shape()[1]);
            let ones = vec![1u8; w];
            let mut v = Vec::with_capacity(batch * (w + max_np));
            for r in 0..batch {
                let row = mask.map_or(&ones[..], |m| &m.host()[r * w..][..w]);
                v.extend(std::iter::repeat_n(0u8, max_np - np[r]));
                v.extend_from_slice(&row[..lead[r]]);
                v.extend(std::iter::repeat_n(1u8, np[r]));
                v.extend_from_slice(&row[lead[r]..]);
            }
            Some(Ints::new(dev, &[batch, w + max_np], &v)?)
        } else {
            mask.cloned()
        };
        let width = seq + if insert { max_np } else { 0 };
        let prompts: Vec<usize> =
            if insert { self.groups(rows, |a| a.prompt.is_some()).iter().map(|g| g.0).collect() } else { vec![] };
        let mut off = batch * seq;
        let mut prompt_off = Vec::with_capacity(prompts.len());
        for &i in &prompts {
            prompt_off.push(off);
            off += self.bank[i].1.prompt_len();
        }
        let zero = off as u32;
        let (mut pos, mut src) = (Vec::with_capacity(batch * width), Vec::new());
        for (r, row) in positions.host().chunks(seq.max(1)).take(batch).enumerate() {
            let shift = (np[r] + nx[r]) as u32;
            if !insert {
                pos.extend(row.iter().map(|&p| p + shift));
                continue;
            }
            let pads = lead[r].min(seq);
            let content = |j: usize| (r * seq + j) as u32;
            pos.extend(std::iter::repeat_n(0, max_np - np[r]));
            src.extend(std::iter::repeat_n(zero, max_np - np[r]));
            pos.extend_from_slice(&row[..pads]);
            src.extend((0..pads).map(content));
            pos.extend((0..np[r] as u32).map(|i| nx[r] as u32 + i));
            if let Some(i) = rows[r].filter(|_| np[r] > 0) {
                let base = prompt_off[prompts.iter().position(|&p| p == i).expect("stacked")];
                src.extend((0..np[r]).map(|k| (base + k) as u32));
            }
            pos.extend(row[pads..].iter().map(|&p| p + shift));
            src.extend((pads..seq).map(content));
        }
        Ok(Prepared {
            positions: Ints::new(dev, &[batch, width], &pos)?,
            mask: new_mask,
            at: None,
            mixed: Some(MixedPrep { src, prompts, batch, seq, width, zero }),
            _e: Default::default(),
        })
    }

    /// Token embeddings with each row's prompt gathered into place.
    pub(super) fn mixed_embed(&self, table: &Tensor<B, E>, ids: &Ints<B, u32>, m: &MixedPrep) -> Result<Tensor<B, E>> {
        let tok = embedding(table, ids, None)?;
        if m.src.is_empty() {
            return Ok(tok);
        }
        let hidden = table.shape()[1];
        let mut parts = vec![tok];
        for &i in &m.prompts {
            parts.push(self.bank[i].1.prompt.as_ref().expect("a prompt").vectors()?);
        }
        let all = stack_rows(&parts, hidden, true)?;
        let src = Ints::new(table.device(), &[m.batch, m.width], &m.src)?;
        Ok(embedding(&all, &src, None)?)
    }

    pub(super) fn mixed_prefix(&self, rows: &[Option<usize>]) -> Result<PrefixKv<B, E>> {
        let users = self.groups(rows, |a| a.prefix.is_some());
        if users.is_empty() {
            return Ok(PrefixKv { layers: Vec::new(), rows: None });
        }
        let kvs: Vec<Vec<super::LayerKv<B, E>>> =
            users.iter().map(|(i, _)| self.bank[*i].1.prefix_kv()).collect::<Result<_>>()?;
        let mut ranges = vec![0u32; 2 * rows.len()];
        let mut off = 0u32;
        for ((_, rs), kv) in users.iter().zip(&kvs) {
            let n = kv[0].0.shape()[0] as u32;
            for &r in rs {
                ranges[2 * r as usize..][..2].copy_from_slice(&[off, n]);
            }
            off += n;
        }
        let first = &kvs[0][0].0;
        let (kvh, hd) = (first.shape()[1], first.shape()[2]);
        let layers = (0..kvs[0].len())
            .map(|l| {
                let stack = |pick: fn(&super::LayerKv<B, E>) -> &Tensor<B, E>| -> Result<Tensor<B, E>> {
                    let parts: Vec<Tensor<B, E>> = kvs.iter().map(|kv| pick(&kv[l]).clone()).collect();
                    Ok(reshape(&stack_rows(&parts, kvh * hd, false)?, &[off as usize, kvh, hd])?)
                };
                Ok((stack(|kv| &kv.0)?, stack(|kv| &kv.1)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let rows = Ints::new(first.device(), &[rows.len(), 2], &ranges)?;
        Ok(PrefixKv { layers, rows: Some(rows) })
    }

    pub(super) fn mixed_linear(
        &self,
        rows: &[Option<usize>],
        lin: &Linear<B, E>,
        x: &Tensor<B, E>,
    ) -> Result<Tensor<B, E>> {
        let y = lin.apply(x)?;
        let groups = self.groups(rows, |a| a.lora.contains_key(&lin.name));
        if groups.is_empty() {
            return Ok(y);
        }
        let updates = groups
            .iter()
            .map(|(i, rs)| {
                let a = &self.bank[*i].1;
                let xa = gather_rows(x, rs, rows.len())?;
                a.lora[&lin.name].update(&xa, a.training.get(), &a.dropout_rng)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(add(&y, &scatter_rows(&groups, &updates, y.shape())?)?)
    }

    pub(super) fn mixed_sublayer(
        &self,
        rows: &[Option<usize>],
        i: usize,
        ffn: bool,
        y: Tensor<B, E>,
    ) -> Result<Tensor<B, E>> {
        let groups = self.groups(rows, |a| a.houlsby.as_ref().is_some_and(|h| h.layers.len() > i));
        if groups.is_empty() {
            return Ok(y);
        }
        let deltas = groups
            .iter()
            .map(|(a, rs)| {
                let ya = gather_rows(&y, rs, rows.len())?;
                let h = self.bank[*a].1.houlsby.as_ref().expect("grouped by houlsby");
                Ok(h.delta(i, ffn, &ya)?.expect("layer checked"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(add(&y, &scatter_rows(&groups, &deltas, y.shape())?)?)
    }
}

/// Rows `rs` of `x` (`[batch, ...]`), as `[rs.len(), ...]` (a gather whose backward scatter-adds).
pub fn gather_rows<B: Kernels<E>, E: Float>(x: &Tensor<B, E>, rs: &[u32], batch: usize) -> Result<Tensor<B, E>> {
    let shape = x.shape();
    if shape.first() != Some(&batch) {
        return Err(shape_err("gather_rows: x vs [batch, ...]", shape, &[batch]));
    }
    let width: usize = shape[1..].iter().product();
    let ids = Ints::new(x.device(), &[1, rs.len()], rs)?;
    let g = embedding(&reshape(x, &[batch, width])?, &ids, None)?;
    let mut out = shape.to_vec();
    out[0] = rs.len();
    Ok(reshape(&g, &out)?)
}

/// `[batch, ...]` (`shape`) holding `parts[k]` (`[groups[k].1.len(), ...]`) at rows `groups[k].1`
/// and zeros elsewhere: one gather over the parts stacked with a zero row.
pub fn scatter_rows<B: Kernels<E>, E: Float>(
    groups: &[(usize, Vec<u32>)],
    parts: &[Tensor<B, E>],
    shape: &[usize],
) -> Result<Tensor<B, E>> {
    let (batch, width) = (shape[0], shape[1..].iter().product::<usize>());
    let mut map = vec![u32::MAX; batch];
    let mut next = 0u32;
    for (_, rs) in groups {
        for &r in rs {
            map[r as usize] = next;
            next += 1;
        }
    }
    map.iter_mut().filter(|m| **m == u32::MAX).for_each(|m| *m = next);
    let all = stack_rows(parts, width, true)?;
    let ids = Ints::new(all.device(), &[1, batch], &map)?;
    Ok(reshape(&embedding(&all, &ids, None)?, shape)?)
}

/// `parts` (each `[n_k, ...]` of `width` per row) stacked as `[sum n_k (+1), width]`, with a zero
/// row last when `zero_row`.
fn stack_rows<B: Kernels<E>, E: Float>(parts: &[Tensor<B, E>], width: usize, zero_row: bool) -> Result<Tensor<B, E>> {
    let dev = parts[0].device().clone();
    let mut flat = parts.iter().map(|p| Ok(reshape(p, &[1, p.numel()])?)).collect::<Result<Vec<_>>>()?;
    if zero_row {
        flat.push(Tensor::constant(&dev, &[1, width], &vec![E::c(0.0); width])?);
    }
    let n: usize = flat.iter().map(|t| t.numel()).sum::<usize>() / width.max(1);
    let joined =
        if flat.len() == 1 { flat.pop().expect("one") } else { concat_cols(&flat.iter().collect::<Vec<_>>())? };
    Ok(reshape(&joined, &[n, width])?)
}

fn shape_err(what: &'static str, left: &[usize], right: &[usize]) -> Error {
    tuna_autograd::Error::Shape { op: "mixed batch", what, left: left.to_vec(), right: right.to_vec() }.into()
}
