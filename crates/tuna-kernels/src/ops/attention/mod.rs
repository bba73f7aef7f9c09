//! Fused attention, FlashAttention-2 style (tiled, online softmax, never a full T x S score
//! matrix), forward and backward, with causal or bidirectional masking, a key padding mask,
//! grouped-query attention, prefix-KV injection, and an additive score bias (T5's relative
//! position bias).
//!
//! Layouts (row-major):
//! - `q`, `o`, `dq`, `d_o`: `[batch, q_len, heads, head_dim]`
//! - `k`, `v`, `dk`, `dv`: `[batch, kv_len, kv_heads, head_dim]`; query head `h` reads KV head
//!   `h / (heads / kv_heads)`. The forward also reads `k`, `v` of `[batch, kv_cap, kv_heads,
//!   head_dim]` with `kv_cap > kv_len` (a KV cache's preallocated buffer: only the first `kv_len`
//!   rows of each sequence are keys, the rest is not read); the backward refuses that, since a
//!   cache is inference-only and its gradients would need the same stride.
//! - prefix `pk`, `pv`: `[prefix_len, kv_heads, head_dim]`, one buffer shared by the whole batch,
//!   read in place (never concatenated into K/V); their gradients `dpk`, `dpv` (`E::Acc`: f32
//!   for f32/bf16, f64 for f64; same shape) are summed over the batch.
//! - `prefix_rows` (optional, `has_prefix_rows == 1`): `[batch, 2]` u32, row `b`'s `(start, len)`
//!   in the prefix table: sequence `b` sees prefix rows `start..start + len` only (`len` 0: no
//!   prefix), so a batch mixing adapters passes their prefixes stacked once. Without it every
//!   sequence sees the whole table.
//! - `key_mask`: `[batch, kv_len]` u8, 1 = attend, 0 = padding. Prefix keys are never masked.
//! - `bias` (optional, `has_bias` 1, or 2 when no gradient is wanted for it): `[heads, q_len, prefix_len + kv_len]` in `E`, an additive
//!   bias on the scaled scores (T5's relative position bias), shared by the whole batch: the score
//!   of query row `i` of this call (row `i` of `q`, also in a KV cache's query block) and key
//!   column `c` is `q.k * scale + bias[h, i, c]`, where column `c < prefix_len` is prefix row `c`
//!   of the table (absolute, also under `prefix_rows`) and `prefix_len + j` is content key `j`.
//!   Masking applies after it. Its gradient `dbias` (same shape, `E::Acc`) is `dS` (the score
//!   gradient, before `scale`), summed over the batch; GQA heads keep their own query-head rows.
//! - `lse`: `[batch, heads, q_len]` in `E::Acc`, the natural log-sum-exp of the scaled (and
//!   biased) scores of each query row, saved by the forward for the backward.
//!
//! Masking: query `i` has absolute position `kv_len - q_len + i` (so `q_len < kv_len` is a
//! query block after a KV cache). Under `causal` it sees content keys `j <= kv_len - q_len + i`
//! (and `q_len <= kv_len` is required); without it, it sees every content key, and `q_len` may
//! exceed `kv_len` (cross-attention of a longer decoder over an encoder). It always sees every
//! prefix key. A query row that sees no key at all (fully padded, no prefix) outputs zeros, has
//! `lse = -inf`, and gets zero gradients.
//!
//! Backward accumulates (`+=`) into `dq`, `dk`, `dv`, `dpk`, `dpv`, `dbias`.

mod cpu;
mod cuda;

pub use cuda::{
    force_simt, last_bwd_path, last_fwd_path, simt_forced, tc_bwd_refusal, tc_fwd_refusal, BwdPath, FwdPath,
    TC_HEAD_DIMS,
};

use crate::backend::{Backend, Elem};
use crate::error::{check_len, Error, Result};

/// Kernel parameters, mirrored by `struct AttnParams` in `kernels/attention.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnParams {
    pub batch: u32,
    /// Query heads.
    pub heads: u32,
    /// Key/value heads; divides `heads` (GQA when smaller).
    pub kv_heads: u32,
    /// Queries per sequence (T).
    pub q_len: u32,
    /// Content keys per sequence (S; `S >= T` under `causal`).
    pub kv_len: u32,
    /// Prefix positions (0 = none).
    pub prefix_len: u32,
    pub head_dim: u32,
    /// 1 = causal.
    pub causal: u32,
    /// 1 = a key padding mask is given.
    pub has_mask: u32,
    /// 1 = per-sequence prefix ranges are given (`prefix_rows`).
    pub has_prefix_rows: u32,
    /// Key/value rows per sequence in the `k`/`v` buffers (their batch stride), `>= kv_len`;
    /// 0 = `kv_len` (contiguous). Lets the forward read a KV cache's preallocated buffer in place.
    pub kv_cap: u32,
    /// An additive score bias `[heads, q_len, prefix_len + kv_len]` (`bias`): 0 = none, 1 = given
    /// and the backward adds its gradient into `dbias`, 2 = given, no gradient wanted (no `dbias`:
    /// the CPU keeps its parallel split, CUDA skips the atomics).
    pub has_bias: u32,
    /// Score scale, usually `1/sqrt(head_dim)`.
    pub scale: f32,
}

impl AttnParams {
    /// Self-attention over `len` tokens with no prefix and no mask; scale `1/sqrt(head_dim)`.
    pub fn new(batch: usize, heads: usize, kv_heads: usize, len: usize, head_dim: usize, causal: bool) -> Self {
        AttnParams {
            batch: batch as u32,
            heads: heads as u32,
            kv_heads: kv_heads as u32,
            q_len: len as u32,
            kv_len: len as u32,
            prefix_len: 0,
            head_dim: head_dim as u32,
            causal: causal as u32,
            has_mask: 0,
            has_prefix_rows: 0,
            kv_cap: 0,
            has_bias: 0,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }
    pub fn q_elems(&self) -> usize {
        self.batch as usize * self.q_len as usize * self.heads as usize * self.head_dim as usize
    }
    /// Key/value rows per sequence in the buffers: `kv_cap`, or `kv_len` when it is 0.
    pub fn kv_rows(&self) -> usize {
        if self.kv_cap == 0 {
            self.kv_len as usize
        } else {
            self.kv_cap as usize
        }
    }
    /// Elements of `k`, `v` (and `dk`, `dv`): `batch * kv_rows * kv_heads * head_dim`.
    pub fn kv_elems(&self) -> usize {
        self.batch as usize * self.kv_rows() * self.kv_heads as usize * self.head_dim as usize
    }
    pub fn prefix_elems(&self) -> usize {
        self.prefix_len as usize * self.kv_heads as usize * self.head_dim as usize
    }
    pub fn lse_elems(&self) -> usize {
        self.batch as usize * self.heads as usize * self.q_len as usize
    }
    /// Elements of `bias` and `dbias`: `heads * q_len * (prefix_len + kv_len)`.
    pub fn bias_elems(&self) -> usize {
        self.heads as usize * self.q_len as usize * (self.prefix_len as usize + self.kv_len as usize)
    }
    /// Multiply-adds of the forward pass (QK^T and PV, counting masked blocks too): `2 * 2 * B*H*T*(P+S)*D` FLOPs.
    pub fn fwd_flops(&self) -> f64 {
        4.0 * self.batch as f64
            * self.heads as f64
            * self.q_len as f64
            * (self.prefix_len + self.kv_len) as f64
            * self.head_dim as f64
    }

    /// Validate the parameters themselves.
    pub fn validate(&self) -> Result<()> {
        if self.has_prefix_rows > 1 || self.has_mask > 1 || self.causal > 1 || self.has_bias > 2 {
            return Err(Error::Invalid {
                op: "attention",
                msg: format!("flags must be 0 or 1 (has_bias 0 to 2): {self:?}"),
            });
        }
        let bad = |msg: String| Err(Error::Invalid { op: "attention", msg });
        if self.heads == 0 || self.kv_heads == 0 || self.head_dim == 0 {
            return bad(format!(
                "heads {}, kv_heads {}, head_dim {} must be positive",
                self.heads, self.kv_heads, self.head_dim
            ));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!("heads {} not divisible by kv_heads {}", self.heads, self.kv_heads));
        }
        if self.causal == 1 && self.q_len > self.kv_len {
            return bad(format!("q_len {} exceeds kv_len {} under causal masking", self.q_len, self.kv_len));
        }
        if self.kv_cap != 0 && self.kv_cap < self.kv_len {
            return bad(format!("kv_cap {} below kv_len {}", self.kv_cap, self.kv_len));
        }
        if !self.scale.is_finite() {
            return bad(format!("scale {} is not finite", self.scale));
        }
        Ok(())
    }
}

/// Prefix keys and values `(pk, pv)` on backend `B`.
pub type PrefixKv<'a, B, E> = (&'a <B as Backend>::Buf<E>, &'a <B as Backend>::Buf<E>);

/// Prefix key and value gradients `(dpk, dpv)` on backend `B` for element type `E`, in `E::Acc`
/// (parameter gradients: f32 for f32 and bf16, f64 for f64).
pub type PrefixGrads<'a, B, E> =
    (&'a mut <B as Backend>::Buf<<E as Elem>::Acc>, &'a mut <B as Backend>::Buf<<E as Elem>::Acc>);

/// The inputs of attention on backend `B`.
pub struct AttnInputs<'a, B: Backend + ?Sized, E: Elem> {
    pub q: &'a B::Buf<E>,
    pub k: &'a B::Buf<E>,
    pub v: &'a B::Buf<E>,
    /// Prefix keys and values `(pk, pv)`, present iff `prefix_len > 0`.
    pub prefix: Option<PrefixKv<'a, B, E>>,
    /// Key padding mask, present iff `has_mask == 1`.
    pub key_mask: Option<&'a B::Buf<u8>>,
    /// Per-sequence prefix ranges `[batch, 2]` (start, len), present iff `has_prefix_rows == 1`.
    pub prefix_rows: Option<&'a B::Buf<u32>>,
    /// Additive score bias `[heads, q_len, prefix_len + kv_len]`, present iff `has_bias == 1`.
    pub bias: Option<&'a B::Buf<E>>,
}

impl<B: Backend + ?Sized, E: Elem> Clone for AttnInputs<'_, B, E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend + ?Sized, E: Elem> Copy for AttnInputs<'_, B, E> {}

/// The gradient buffers the backward accumulates into.
pub struct AttnGrads<'a, B: Backend + ?Sized, E: Elem> {
    pub dq: &'a mut B::Buf<E>,
    pub dk: &'a mut B::Buf<E>,
    pub dv: &'a mut B::Buf<E>,
    /// `(dpk, dpv)` in `E::Acc`, present iff `prefix_len > 0`.
    pub dprefix: Option<PrefixGrads<'a, B, E>>,
    /// The bias gradient `[heads, q_len, prefix_len + kv_len]` in `E::Acc`, summed over the
    /// batch, present iff `has_bias == 1`.
    pub dbias: Option<&'a mut B::Buf<E::Acc>>,
}

/// Fused attention on a device: forward and backward together.
pub trait AttentionKernel<E: Elem>: Backend {
    /// Writes `o` and `lse` (`lse` in `E::Acc`).
    fn attn_fwd(
        &self,
        p: &AttnParams,
        x: AttnInputs<'_, Self, E>,
        o: &mut Self::Buf<E>,
        lse: &mut Self::Buf<E::Acc>,
    ) -> Result<()>;
    /// Accumulates into `g` the gradients of `sum(o * d_o)`.
    fn attn_bwd(
        &self,
        p: &AttnParams,
        x: AttnInputs<'_, Self, E>,
        o: &Self::Buf<E>,
        d_o: &Self::Buf<E>,
        lse: &Self::Buf<E::Acc>,
        g: AttnGrads<'_, Self, E>,
    ) -> Result<()>;
    /// Which kernels a call with `p` takes, forward and backward, where a device has more than one
    /// (`tuna profile` names its rows by them); `None` where there is one (the CPU). The buffers'
    /// alignment, checked at launch, can still send a call to the SIMT kernel.
    fn attn_paths(&self, _p: &AttnParams) -> Option<(FwdPath, BwdPath)> {
        None
    }
}

/// Check the parameters and every input's length; shared by both devices.
pub fn check_inputs<B: Backend + ?Sized, E: Elem>(p: &AttnParams, x: &AttnInputs<'_, B, E>) -> Result<()> {
    p.validate()?;
    let shape = || format!("{p:?}");
    check_len("attention", "q", B::len(x.q), p.q_elems(), shape)?;
    check_len("attention", "k", B::len(x.k), p.kv_elems(), shape)?;
    check_len("attention", "v", B::len(x.v), p.kv_elems(), shape)?;
    match (&x.prefix, p.prefix_len) {
        (None, 0) => {}
        (Some((pk, pv)), n) if n > 0 => {
            check_len("attention", "prefix_k", B::len(*pk), p.prefix_elems(), shape)?;
            check_len("attention", "prefix_v", B::len(*pv), p.prefix_elems(), shape)?;
        }
        (Some(_), _) => {
            return Err(Error::Invalid { op: "attention", msg: "prefix buffers given with prefix_len 0".into() })
        }
        (None, n) => {
            return Err(Error::Invalid { op: "attention", msg: format!("prefix_len {n} but no prefix buffers") })
        }
    }
    match (&x.key_mask, p.has_mask) {
        (None, 0) => {}
        (Some(m), 1) => check_len("attention", "key_mask", B::len(*m), p.batch as usize * p.kv_len as usize, shape)?,
        _ => return Err(Error::Invalid { op: "attention", msg: "key_mask presence and has_mask disagree".into() }),
    }
    match (&x.prefix_rows, p.has_prefix_rows) {
        (None, 0) => {}
        (Some(r), 1) if p.prefix_len > 0 => {
            check_len("attention", "prefix_rows", B::len(*r), 2 * p.batch as usize, shape)?
        }
        _ => {
            return Err(Error::Invalid {
                op: "attention",
                msg: "prefix_rows presence and has_prefix_rows disagree (or no prefix)".into(),
            })
        }
    }
    match (&x.bias, p.has_bias) {
        (None, 0) => {}
        (Some(b), 1 | 2) => check_len("attention", "bias", B::len(*b), p.bias_elems(), shape)?,
        _ => return Err(Error::Invalid { op: "attention", msg: "bias presence and has_bias disagree".into() }),
    }
    Ok(())
}

/// Check the backward's extra buffers.
pub fn check_bwd<B: Backend + ?Sized, E: Elem>(
    p: &AttnParams,
    o: &B::Buf<E>,
    d_o: &B::Buf<E>,
    lse: &B::Buf<E::Acc>,
    g: &AttnGrads<'_, B, E>,
) -> Result<()> {
    if p.kv_rows() != p.kv_len as usize {
        let msg = format!(
            "the backward reads contiguous keys/values: kv_cap {} != kv_len {} (a strided KV cache is inference-only)",
            p.kv_cap, p.kv_len
        );
        return Err(Error::Invalid { op: "attention", msg });
    }
    let shape = || format!("{p:?}");
    check_len("attention", "o", B::len(o), p.q_elems(), shape)?;
    check_len("attention", "d_o", B::len(d_o), p.q_elems(), shape)?;
    check_len("attention", "lse", B::len(lse), p.lse_elems(), shape)?;
    check_len("attention", "dq", B::len(&*g.dq), p.q_elems(), shape)?;
    check_len("attention", "dk", B::len(&*g.dk), p.kv_elems(), shape)?;
    check_len("attention", "dv", B::len(&*g.dv), p.kv_elems(), shape)?;
    match (&g.dprefix, p.prefix_len) {
        (None, 0) => {}
        (Some((a, b)), n) if n > 0 => {
            check_len("attention", "dprefix_k", B::len(&**a), p.prefix_elems(), shape)?;
            check_len("attention", "dprefix_v", B::len(&**b), p.prefix_elems(), shape)?;
        }
        _ => {
            return Err(Error::Invalid {
                op: "attention",
                msg: "prefix gradients must be given iff prefix_len > 0".into(),
            })
        }
    }
    match (&g.dbias, p.has_bias) {
        (None, 0) => Ok(()),
        (Some(d), 1) => check_len("attention", "dbias", B::len(&**d), p.bias_elems(), shape),
        (None, 2) => Ok(()),
        _ => Err(Error::Invalid { op: "attention", msg: "the bias gradient must be given iff has_bias == 1".into() }),
    }
}

#[cfg(test)]
mod cuda_tests;
pub mod self_check;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_bias;
#[cfg(test)]
mod tests_check;
#[cfg(test)]
mod tests_rows;
#[cfg(test)]
mod tests_tc;
#[cfg(test)]
mod tests_tc_bwd;
