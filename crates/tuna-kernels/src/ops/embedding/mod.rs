//! Token embedding lookup with soft-prompt injection, forward and backward.
//!
//! Layouts (row-major):
//! - `table`: `[vocab, hidden]` (E); `ids`: `[batch, seq]` u32.
//! - soft prompt `vectors`: `[n_prompt, hidden]` (E), shared by the whole batch, with per-row
//!   insertion positions `at`: `[batch]` u32, `0 <= at[b] <= seq` (0 = PEFT's layout, prompt
//!   first; larger = after left padding, so the prompt sits next to the content).
//! - `out`, `d_out`: `[batch, seq + n_prompt, hidden]` (E). For row `b`, positions `0..at` hold
//!   `table[ids[b, 0..at]]`, then the `n_prompt` prompt vectors, then `table[ids[b, at..]]`.
//!
//! The backward accumulates (`+=`) only into the gradients asked for: `d_table` (`E::Acc`: f32 for
//! f32/bf16, f64 for f64; a scatter-add of `d_out` rows by id) and `d_prompt` (`E::Acc`, summed over
//! the batch). With neither it does nothing.
//!
//! Ids must be `< vocab`: the CPU checks them (an [`Error::Invalid`] naming the position, before
//! anything is written). A CUDA kernel cannot return an error, so the CUDA launchers expect ids
//! already checked with [`validate_ids`] where they were made on the host (before upload); an
//! out-of-range id that still reaches a kernel reads and writes nothing out of bounds (its output
//! row is zeros, its gradient is dropped), and an `at` beyond `seq` is clamped to `seq`.

mod cpu;
mod cuda;
#[cfg(test)]
mod tests;

use crate::backend::{Backend, Elem};
use crate::error::{check_len, Error, Result};

/// Kernel parameters, mirrored by `struct EmbedParams` in `kernels/embedding.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedParams {
    pub batch: u32,
    /// Token positions per row (without the prompt).
    pub seq: u32,
    pub vocab: u32,
    pub hidden: u32,
    /// Soft-prompt vectors inserted into every row (0 = none).
    pub n_prompt: u32,
    pub _pad: u32,
}

impl EmbedParams {
    /// A plain lookup, no soft prompt.
    pub fn new(batch: usize, seq: usize, vocab: usize, hidden: usize) -> Self {
        EmbedParams {
            batch: batch as u32,
            seq: seq as u32,
            vocab: vocab as u32,
            hidden: hidden as u32,
            n_prompt: 0,
            _pad: 0,
        }
    }
    /// The same lookup with `n` soft-prompt vectors inserted into every row.
    pub fn with_prompt(self, n: usize) -> Self {
        EmbedParams { n_prompt: n as u32, ..self }
    }
    /// Output positions per row: `seq + n_prompt`.
    pub fn out_len(&self) -> usize {
        self.seq as usize + self.n_prompt as usize
    }
    pub fn ids_elems(&self) -> usize {
        self.batch as usize * self.seq as usize
    }
    pub fn table_elems(&self) -> usize {
        self.vocab as usize * self.hidden as usize
    }
    pub fn prompt_elems(&self) -> usize {
        self.n_prompt as usize * self.hidden as usize
    }
    pub fn out_elems(&self) -> usize {
        self.batch as usize * self.out_len() * self.hidden as usize
    }

    /// Validate the parameters themselves.
    pub fn validate(&self) -> Result<()> {
        if self.hidden == 0 {
            return Err(Error::Invalid { op: "embedding", msg: "hidden must be positive".into() });
        }
        Ok(())
    }
}

/// A soft prompt to insert: its vectors and where each row inserts them.
pub struct SoftPrompt<'a, B: Backend + ?Sized, E: Elem> {
    /// `[n_prompt, hidden]`.
    pub vectors: &'a B::Buf<E>,
    /// `[batch]` insertion positions, each in `0..=seq`.
    pub at: &'a B::Buf<u32>,
}

impl<B: Backend + ?Sized, E: Elem> Clone for SoftPrompt<'_, B, E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend + ?Sized, E: Elem> Copy for SoftPrompt<'_, B, E> {}

/// Embedding lookup on a device: forward and backward together.
pub trait EmbeddingKernel<E: Elem>: Backend {
    /// Writes `out` (`[batch, seq + n_prompt, hidden]`). `prompt` is present iff `n_prompt > 0`.
    fn embed_fwd(
        &self,
        p: &EmbedParams,
        table: &Self::Buf<E>,
        ids: &Self::Buf<u32>,
        prompt: Option<SoftPrompt<'_, Self, E>>,
        out: &mut Self::Buf<E>,
    ) -> Result<()>;
    /// Accumulates `d_out` into `d_table` (by id) and `d_prompt` (summed over the batch), each only
    /// where given. `at` is present iff `n_prompt > 0`; `d_prompt` may be given only then.
    fn embed_bwd(
        &self,
        p: &EmbedParams,
        ids: &Self::Buf<u32>,
        at: Option<&Self::Buf<u32>>,
        d_out: &Self::Buf<E>,
        d_table: Option<&mut Self::Buf<E::Acc>>,
        d_prompt: Option<&mut Self::Buf<E::Acc>>,
    ) -> Result<()>;
}

/// Check that every id is `< vocab`; the error names the first bad position.
pub fn validate_ids(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().position(|&id| id as usize >= vocab) {
        None => Ok(()),
        Some(i) => Err(Error::Invalid {
            op: "embedding",
            msg: format!("ids[{i}] = {} is out of range for vocab {vocab}", ids[i]),
        }),
    }
}

/// Check that every insertion position is `<= seq`; the error names the first bad row.
pub fn validate_at(at: &[u32], seq: usize) -> Result<()> {
    match at.iter().position(|&a| a as usize > seq) {
        None => Ok(()),
        Some(b) => Err(Error::Invalid { op: "embedding", msg: format!("at[{b}] = {} exceeds seq {seq}", at[b]) }),
    }
}

/// Where output position `t` of a row with insertion point `at` comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Token column `j` of the row's ids.
    Token(usize),
    /// Soft-prompt vector `k`.
    Prompt(usize),
}

pub(crate) fn source(t: usize, at: usize, n_prompt: usize) -> Source {
    if t < at {
        Source::Token(t)
    } else if t < at + n_prompt {
        Source::Prompt(t - at)
    } else {
        Source::Token(t - n_prompt)
    }
}

/// Output position of token column `j` in a row with insertion point `at`.
pub(crate) fn token_position(j: usize, at: usize, n_prompt: usize) -> usize {
    if j < at {
        j
    } else {
        j + n_prompt
    }
}

/// Forward shape checks shared by both devices.
fn check_fwd<B: Backend + ?Sized, E: Elem>(
    p: &EmbedParams,
    table: &B::Buf<E>,
    ids: &B::Buf<u32>,
    prompt: Option<&SoftPrompt<'_, B, E>>,
    out: &B::Buf<E>,
) -> Result<()> {
    p.validate()?;
    let shape = || format!("{p:?}");
    check_len("embedding", "table", B::len(table), p.table_elems(), shape)?;
    check_len("embedding", "ids", B::len(ids), p.ids_elems(), shape)?;
    check_prompt_presence(p, prompt.is_some())?;
    if let Some(sp) = prompt {
        check_len("embedding", "prompt", B::len(sp.vectors), p.prompt_elems(), shape)?;
        check_len("embedding", "at", B::len(sp.at), p.batch as usize, shape)?;
    }
    check_len("embedding", "out", B::len(out), p.out_elems(), shape)
}

/// Backward shape checks shared by both devices.
fn check_bwd<B: Backend + ?Sized, E: Elem>(
    p: &EmbedParams,
    ids: &B::Buf<u32>,
    at: Option<&B::Buf<u32>>,
    d_out: &B::Buf<E>,
    d_table: Option<&B::Buf<E::Acc>>,
    d_prompt: Option<&B::Buf<E::Acc>>,
) -> Result<()> {
    p.validate()?;
    let shape = || format!("{p:?}");
    check_len("embedding", "ids", B::len(ids), p.ids_elems(), shape)?;
    check_prompt_presence(p, at.is_some())?;
    if let Some(at) = at {
        check_len("embedding", "at", B::len(at), p.batch as usize, shape)?;
    }
    check_len("embedding", "d_out", B::len(d_out), p.out_elems(), shape)?;
    if let Some(d) = d_table {
        check_len("embedding", "d_table", B::len(d), p.table_elems(), shape)?;
    }
    match d_prompt {
        Some(_) if p.n_prompt == 0 => {
            Err(Error::Invalid { op: "embedding", msg: "d_prompt given with n_prompt 0".into() })
        }
        Some(d) => check_len("embedding", "d_prompt", B::len(d), p.prompt_elems(), shape),
        None => Ok(()),
    }
}

fn check_prompt_presence(p: &EmbedParams, given: bool) -> Result<()> {
    match (given, p.n_prompt) {
        (true, 0) => Err(Error::Invalid { op: "embedding", msg: "soft prompt given with n_prompt 0".into() }),
        (false, n) if n > 0 => {
            Err(Error::Invalid { op: "embedding", msg: format!("n_prompt {n} but no soft prompt / `at` given") })
        }
        _ => Ok(()),
    }
}
