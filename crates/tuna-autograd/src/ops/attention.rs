//! Fused attention with optional prefix keys/values, key padding mask and additive score bias.

use super::{finish_slots, unfilled, AccSlot, GradSlot, Kernels};
use crate::error::{Error, Result};
use crate::graph::{launched, output, Input, Saved, SavedBuf};
use crate::ints::Ints;
use crate::tensor::AccOwned;
use crate::tensor::{Float, Tensor};
use tuna_kernels::ops::attention::{AttentionKernel, AttnGrads, AttnInputs, AttnParams, FwdPath};
use tuna_kernels::Alloc;

/// Options of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnOptions {
    pub causal: bool,
    /// Score scale; `None` means `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Keys per sequence: the first `kv_len` rows of each sequence of `k`/`v`, whose second dim
    /// is then their capacity (a KV cache's preallocated buffer, read in place; the rest is
    /// never read). `None`: all of them. Forward only: the backward refuses a capacity above the
    /// length (caches are inference-only).
    pub kv_len: Option<usize>,
}

/// Per-layer prefix keys and values (`[prefix_len, kv_heads, head_dim]` each), shared by the batch,
/// or, with `rows`, a table of several prefixes stacked of which each sequence sees its own slice.
pub struct Prefix<'a, B: Kernels<E>, E: Float> {
    pub k: &'a Tensor<B, E>,
    pub v: &'a Tensor<B, E>,
    /// Per-sequence `(start, len)` into the table (`[batch, 2]`; `len` 0: no prefix for that
    /// sequence). `None`: every sequence sees the whole table. Sequences sharing rows add their
    /// gradients into them.
    pub rows: Option<&'a Ints<B, u32>>,
}

fn dims4(op_what: &'static str, t: &[usize]) -> Result<[usize; 4]> {
    match *t {
        [a, b, c, d] => Ok([a, b, c, d]),
        _ => Err(Error::Shape { op: "attention", what: op_what, left: t.to_vec(), right: vec![] }),
    }
}

/// `softmax(q k^T * scale + mask) v` over the prefix keys then the content keys.
///
/// `q`: `[batch, q_len, heads, head_dim]`; `k`, `v`: `[batch, kv_len, kv_heads, head_dim]` (or
/// `[batch, capacity, ..]` with [`AttnOptions::kv_len`]); `mask`: `[batch, kv_len]` (1 = attend).
/// Returns `[batch, q_len, heads, head_dim]`. Causal attention needs `q_len <= kv_len`;
/// bidirectional attention (cross-attention) takes any lengths.
pub fn attention<B: Kernels<E>, E: Float>(
    q: &Tensor<B, E>,
    k: &Tensor<B, E>,
    v: &Tensor<B, E>,
    prefix: Option<Prefix<'_, B, E>>,
    mask: Option<&Ints<B, u8>>,
    opt: AttnOptions,
) -> Result<Tensor<B, E>> {
    attention_biased(q, k, v, prefix, mask, None, opt)
}

/// [`attention`] with an additive bias on the scaled scores, `softmax(q k^T * scale + bias +
/// mask) v` (T5's relative position bias).
///
/// `bias`: `[heads, q_len, prefix_len + kv_len]`, shared by the batch: row `i` is query `i` of
/// `q`, columns are the prefix table's rows (all of them, also with [`Prefix::rows`]) then the
/// content keys. Its gradient (when it needs one) is summed over the batch.
pub fn attention_biased<B: Kernels<E>, E: Float>(
    q: &Tensor<B, E>,
    k: &Tensor<B, E>,
    v: &Tensor<B, E>,
    prefix: Option<Prefix<'_, B, E>>,
    mask: Option<&Ints<B, u8>>,
    bias: Option<&Tensor<B, E>>,
    opt: AttnOptions,
) -> Result<Tensor<B, E>> {
    let [b, t, h, d] = dims4("q must be [batch, q_len, heads, head_dim]", q.shape())?;
    let [bk, s, kvh, dk] = dims4("k must be [batch, kv_len, kv_heads, head_dim]", k.shape())?;
    if [bk, dk] != [b, d] || v.shape() != k.shape() {
        return Err(Error::Shape {
            op: "attention",
            what: "k/v vs q (batch, head_dim)",
            left: k.shape().to_vec(),
            right: q.shape().to_vec(),
        });
    }
    let rows = s;
    let s = opt.kv_len.unwrap_or(rows);
    if s > rows || (opt.causal && s < t) {
        return Err(Error::Shape {
            op: "attention",
            what: "kv_len vs the keys' rows (at most) and, when causal, q_len (at least)",
            left: vec![s],
            right: vec![rows, t],
        });
    }
    let mut p = AttnParams::new(b, h, kvh, s, d, opt.causal);
    p.q_len = t as u32;
    if rows != s {
        p.kv_cap = rows as u32;
    }
    if let Some(sc) = opt.scale {
        p.scale = sc;
    }
    if let Some(pr) = &prefix {
        let ps = pr.k.shape();
        if ps.len() != 3 || ps[1..] != [kvh, d] || pr.v.shape() != ps {
            return Err(Error::Shape {
                op: "attention",
                what: "prefix k/v vs [prefix_len, kv_heads, head_dim]",
                left: ps.to_vec(),
                right: vec![0, kvh, d],
            });
        }
        p.prefix_len = ps[0] as u32;
        if let Some(r) = pr.rows {
            let bad = r.host().chunks(2).position(|x| x.len() < 2 || x[0] as usize + x[1] as usize > ps[0]);
            if r.shape() != [b, 2] || bad.is_some() {
                return Err(Error::Shape {
                    op: "attention",
                    what: "prefix rows vs [batch, 2] (start, len) inside the prefix table [prefix_len]",
                    left: bad.map_or(r.shape().to_vec(), |i| {
                        r.host()[2 * i..].iter().take(2).map(|&x| x as usize).collect()
                    }),
                    right: vec![b, 2, ps[0]],
                });
            }
            p.has_prefix_rows = 1;
        }
    }
    // A prefix of zero positions adds no keys: attend without one (the kernels refuse empty
    // prefix buffers, and an empty prefix has no gradient to receive).
    let prefix = prefix.filter(|pr| pr.k.shape()[0] > 0);
    if prefix.is_none() {
        p.has_prefix_rows = 0;
    }
    let rows = prefix.as_ref().and_then(|pr| pr.rows.cloned());
    if let Some(m) = mask {
        if m.shape() != [b, s] {
            return Err(Error::Shape {
                op: "attention",
                what: "mask vs [batch, kv_len]",
                left: m.shape().to_vec(),
                right: vec![b, s],
            });
        }
        p.has_mask = 1;
    }
    if let Some(bt) = bias {
        let want = [h, t, p.prefix_len as usize + s];
        if bt.shape() != want {
            return Err(Error::Shape {
                op: "attention",
                what: "bias vs [heads, q_len, prefix_len + kv_len]",
                left: bt.shape().to_vec(),
                right: want.to_vec(),
            });
        }
        if prefix.as_ref().is_some_and(|pr| pr.rows.is_some()) {
            // The bias's prefix columns are the table's absolute rows, shared by the batch: with
            // per-sequence ranges a sequence's prefix would take another's positions.
            return Err(Error::Shape {
                op: "attention",
                what: "a score bias with per-sequence prefix rows (mixed batches) is not supported",
                left: bt.shape().to_vec(),
                right: vec![],
            });
        }
        // 2: the bias needs no gradient (a frozen position table), so the backward makes none.
        p.has_bias = if bt.requires_grad() { 1 } else { 2 };
    }
    let dev = q.device();
    // every output row is written (a row that sees no key as zeros)
    let mut o = unfilled::<B, E>(dev, p.q_elems())?;
    let mut lse: AccOwned<B, E> = Alloc::<E::Acc>::zeros(&**dev, p.lse_elems())?;
    {
        let (qb, kb, vb) = (q.buf(), k.buf(), v.buf());
        let pkv = prefix.as_ref().map(|pr| (pr.k.buf(), pr.v.buf()));
        let bb = bias.map(|bt| bt.buf());
        let x = AttnInputs {
            q: &*qb,
            k: &*kb,
            v: &*vb,
            prefix: pkv.as_ref().map(|(a, b)| (&**a, &**b)),
            key_mask: mask.map(|m| m.buf()),
            prefix_rows: rows.as_ref().map(|r| r.buf()),
            bias: bb.as_deref(),
        };
        dev.attn_fwd(&p, x, <B as Alloc<E>>::buf_mut(&mut o), <B as Alloc<E::Acc>>::buf_mut(&mut lse))?;
    }
    let fwd_flops = attention_flops(&p);
    let kind = op_kind(AttentionKernel::<E>::attn_paths(&**dev, &p));
    crate::stats::flops(kind, false, fwd_flops);
    let mut inputs: Vec<&dyn Input> = vec![q, k, v];
    if let Some(pr) = &prefix {
        inputs.extend([pr.k as &dyn Input, pr.v as &dyn Input]);
    }
    if let Some(bt) = bias {
        inputs.push(bt as &dyn Input);
    }
    let shape = q.shape().to_vec();
    Ok(output(kind, &inputs, dev, shape, o, |out, o_data| {
        // FlashAttention's backward recomputes the probabilities: it needs q, k, v (and the
        // prefix and bias), the output, the row log-sum-exps and the mask.
        let (qs, ks, vs) = (Saved::new(q), Saved::new(k), Saved::new(v));
        let ps = prefix.as_ref().map(|pr| (Saved::new(pr.k), Saved::new(pr.v)));
        let bs = bias.map(Saved::new);
        let cb = bias.map(|bt| bt.cell());
        let os = o_data.save();
        let lse = SavedBuf::new(lse, p.lse_elems() * std::mem::size_of::<E::Acc>());
        let mask = mask.cloned();
        let rows = rows.clone();
        let (cq, ck, cv) = (q.cell(), k.cell(), v.cell());
        let pcells = prefix.as_ref().map(|pr| (pr.k.cell(), pr.v.cell()));
        let dev = dev.clone();
        Box::new(move || {
            let Some(g) = out.take() else { return Ok(()) };
            launched("attention.bwd");
            // FlashAttention's count: the backward's five products against the forward's two.
            crate::stats::flops(kind, true, 2.5 * fwd_flops);
            // The kernel writes dq, dk, dv (and the prefix gradients when there is a prefix);
            // a scratch buffer stands in for an input that needs no gradient.
            let mut sq = GradSlot::new(&*dev, &cq, p.q_elems())?;
            let mut sk = GradSlot::new(&*dev, &ck, p.kv_elems())?;
            let mut sv = GradSlot::new(&*dev, &cv, p.kv_elems())?;
            let mut sp = match &pcells {
                Some((a, b)) => {
                    Some((AccSlot::new(&*dev, a, p.prefix_elems())?, AccSlot::new(&*dev, b, p.prefix_elems())?))
                }
                None => None,
            };
            let dprefix = sp.as_mut().map(|(a, b)| (a.buf(), b.buf()));
            // The prefix and bias gradients are in E::Acc.
            let mut sb = match &cb {
                Some(c) if p.has_bias == 1 => Some(AccSlot::new(&*dev, c, p.bias_elems())?),
                _ => None,
            };
            let dbias = sb.as_mut().map(|b| b.buf());
            let (dq, dk, dv) = (sq.buf(), sk.buf(), sv.buf());
            let (qb, kb, vb) = (qs.t().buf(), ks.t().buf(), vs.t().buf());
            let pkv = ps.as_ref().map(|(a, b)| (a.t().buf(), b.t().buf()));
            let bb = bs.as_ref().map(|b| b.t().buf());
            let x = AttnInputs {
                q: &*qb,
                k: &*kb,
                v: &*vb,
                prefix: pkv.as_ref().map(|(a, b)| (&**a, &**b)),
                key_mask: mask.as_ref().map(|m| m.buf()),
                prefix_rows: rows.as_ref().map(|r| r.buf()),
                bias: bb.as_deref(),
            };
            let o = os.data();
            let grads = AttnGrads { dq, dk, dv, dprefix, dbias };
            dev.attn_bwd(
                &p,
                x,
                <B as Alloc<E>>::buf(&*o),
                <B as Alloc<E>>::buf(&g),
                <B as Alloc<E::Acc>>::buf(lse.buf()),
                grads,
            )?;
            let (spk, spv) = sp.map_or((None, None), |(a, b)| (Some(a), Some(b)));
            finish_slots(&*dev, [Some(sq), Some(sk), Some(sv)], [spk, spv, sb])
        })
    }))
}

/// The forward's floating-point operations: `QK^T` and `PV` over the (query, key) pairs a query
/// sees (prefix keys, then content keys up to its own position when causal; padding counted), 2
/// per multiply-add.
fn attention_flops(p: &AttnParams) -> f64 {
    let (t, s, pre) = (p.q_len as u64, p.kv_len as u64, p.prefix_len as u64);
    let content: u64 = if p.causal != 0 {
        // The queries are the last t of the s positions: query i sees s - t + i + 1 keys.
        (0..t).map(|i| (s.saturating_sub(t) + i + 1).min(s)).sum()
    } else {
        t * s
    };
    let pairs = (pre * t + content) as f64;
    4.0 * p.batch as f64 * p.heads as f64 * pairs * p.head_dim as f64
}

/// The op's kind on the tape and in `tuna profile`: `attention`, or where the device has more than
/// one kernel, which ones the call takes (e.g. `attention (SIMT)` for f32 on CUDA).
fn op_kind(paths: Option<(FwdPath, FwdPath)>) -> &'static str {
    use FwdPath::{Simt, TensorCore};
    match paths {
        None => "attention",
        Some((TensorCore, TensorCore)) => "attention (tensor cores)",
        Some((Simt(_), Simt(_))) => "attention (SIMT)",
        Some((TensorCore, Simt(_))) => "attention (tensor-core fwd, SIMT bwd)",
        Some((Simt(_), TensorCore)) => "attention (SIMT fwd, tensor-core bwd)",
    }
}
