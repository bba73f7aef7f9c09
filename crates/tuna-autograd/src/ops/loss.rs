//! Softmax cross-entropy, fused with its backward.

use super::elem::{slice_cols, write_cols};
use super::embed::embedding;
use super::linear::{matmul, MatmulParams};
use super::shape::reshape;
use super::{acc_zeros, host, upload, zeros, Kernels};
use crate::error::{Error, Result};
use crate::graph::{launched, output, Saved, SavedBuf};
use crate::ints::Ints;
use crate::tensor::{Float, Tensor};
use tuna_kernels::ops::cross_entropy::{count_valid, validate_targets, CeParams};
use tuna_kernels::ops::elementwise::ElementwiseKernel;
use tuna_kernels::{Alloc, Elem};

/// Mean cross-entropy of `logits` (`[rows, vocab]`, or any shape whose last dim is the vocab)
/// against `targets` (`[rows]`), over the rows whose target is not `ignore_index` (0 if none).
///
/// When recorded, the gradient is computed in the same kernel as the loss and written over the
/// logits' own buffer (taken by value): no second `[rows, vocab]` buffer exists. Where another
/// clone of `logits` is still alive, or a backward kept its data, the data is copied first
/// (counted as `cross_entropy.copy`).
pub fn cross_entropy<B: Kernels<E>, E: Float>(
    logits: Tensor<B, E>,
    targets: &Ints<B, i32>,
    ignore_index: i32,
) -> Result<Tensor<B, E>> {
    let vocab = *logits.shape().last().unwrap_or(&0);
    let rows = logits.numel().checked_div(vocab).unwrap_or(0);
    if targets.shape() != [rows] {
        return Err(Error::Shape {
            op: "cross_entropy",
            what: "targets vs logits rows",
            left: targets.shape().to_vec(),
            right: vec![rows],
        });
    }
    validate_targets(targets.host(), vocab, ignore_index)?;
    let valid = count_valid(targets.host(), ignore_index);
    // The kernel's gradient scale is 1; the 1/valid of the mean is applied in the backward's
    // accumulate, in E's own precision.
    let p = CeParams::new(rows, vocab).with_ignore_index(ignore_index);
    let dev = logits.device().clone();
    let mut loss_rows = acc_zeros::<B, E>(&dev, rows)?;
    let recording = crate::graph::recording(&[&logits]);
    let grad_holder = if recording {
        // In place only where nothing else can see the logits: no other clone of the tensor and
        // no backward holding its data (an op that saved its own output).
        let sole = std::rc::Rc::strong_count(&logits.inner) == 1 && std::rc::Rc::strong_count(&logits.inner.data) == 1;
        let holder = if sole {
            logits.clone()
        } else {
            launched("cross_entropy.copy");
            logits.detach()?
        };
        dev.ce_fwd_bwd(
            &p,
            <B as Alloc<E>>::buf_mut(&mut *holder.data_mut()),
            targets.buf(),
            <B as Alloc<E::Acc>>::buf_mut(&mut loss_rows),
        )?;
        Some(holder)
    } else {
        dev.ce_fwd(&p, &logits.buf(), targets.buf(), <B as Alloc<E::Acc>>::buf_mut(&mut loss_rows))?;
        None
    };
    let sum: f64 = Alloc::<E::Acc>::to_host(&*dev, &loss_rows)?.into_iter().map(Elem::to_f64).sum();
    let mean = if valid == 0 { 0.0 } else { sum / valid as f64 };
    let value = upload::<B, E>(&dev, &[E::c(mean)])?;
    let out = output("cross_entropy", &[&logits], &dev, vec![], value, |out, _| {
        // The gradient, computed in the forward; counted as saved until the backward has used it.
        let holder = Saved::new(&grad_holder.expect("recorded"));
        let cl = logits.cell().expect("recorded");
        let dev2 = dev.clone();
        Box::new(move || {
            let Some(g) = out.take() else { return Ok(()) };
            if valid == 0 {
                return Ok(());
            }
            launched("cross_entropy.bwd");
            // In E::Acc (f32 for f32 and bf16: f64's quotient rounded once to f32 is f32's own).
            let scale = <E::Acc as Elem>::from_f64(host::<B, E>(&dev2, &g)?[0].to_f64() / valid as f64);
            cl.accumulate_acc(&dev2, |dl| Ok(dev2.grad_accumulate(dl, &holder.t().buf(), scale)?))
        })
    });
    out.set_exact(mean);
    Ok(out)
}

/// Logits one chunk of [`linear_cross_entropy`] holds at most on the CPU: `LCE_CHUNK_ELEMS / vocab`
/// rows (16 MiB of f32 logits), at least one (the CPU's [`tuna_kernels::Backend::chunk_elems`]).
pub const LCE_CHUNK_ELEMS: usize = tuna_kernels::backend::CPU_CHUNK_ELEMS;

/// The rows of one chunk of [`linear_cross_entropy`] at `vocab` on the CPU (its default chunking
/// there; what the memory plan counts).
pub fn lce_chunk_rows(vocab: usize) -> usize {
    lce_chunk_rows_on(&tuna_kernels::Cpu, vocab)
}

/// The rows of one chunk of [`linear_cross_entropy`] at `vocab` on `dev` by default:
/// [`Backend::chunk_elems`] / vocab, at least one ([`lce_chunk_rows`] on the CPU).
pub fn lce_chunk_rows_on<B: tuna_kernels::Backend + ?Sized>(dev: &B, vocab: usize) -> usize {
    (dev.chunk_elems() / vocab.max(1)).max(1)
}

/// `cross_entropy(linear(h, w), targets)` without the `[rows, vocab]` logits: the mean
/// cross-entropy of `h W^T` (`h` `[.., hidden]`, `w` `[vocab, hidden]`, an `nn.Linear` weight or a
/// tied embedding) against `targets` (one per row of `h`, on the host), over the rows whose target
/// is not `ignore_index` (0 if none).
///
/// Only the rows with a target are multiplied (a completion's prompt and a padded position cost
/// nothing), `chunk_rows` of them at a time (`None`: the device's default, [`lce_chunk_rows_on`]:
/// [`LCE_CHUNK_ELEMS`] / vocab on the CPU, 8x that on CUDA). When recorded,
/// each chunk's logits are made, turned into their gradient by the fused cross-entropy kernel,
/// multiplied back into the gradient of those rows of `h` (`dlogits W`) and, when `w` trains, of
/// `w` (`dlogits^T h`, added over the chunks), and dropped. The backward keeps `[targets, hidden]`
/// (plus `w`'s gradient when it trains) instead of `[rows, vocab]` logits: at a 49k vocabulary
/// about 85x less per token for a hidden size of 576. Value and gradients are the unfused ops'
/// up to summation order (tested). Kinds: `linear_cross_entropy` (forward) and its `.dh` / `.dw`
/// backward.
pub fn linear_cross_entropy<B: Kernels<E>, E: Float>(
    h: &Tensor<B, E>,
    w: &Tensor<B, E>,
    targets: &[i32],
    ignore_index: i32,
    chunk_rows: Option<usize>,
) -> Result<Tensor<B, E>> {
    let [vocab, hidden] = *w.shape() else {
        return Err(Error::Shape {
            op: "linear_cross_entropy",
            what: "w must be [vocab, hidden]",
            left: w.shape().to_vec(),
            right: vec![],
        });
    };
    let rows = h.numel().checked_div(hidden).unwrap_or(0);
    if h.shape().last() != Some(&hidden) || targets.len() != rows {
        return Err(Error::Shape {
            op: "linear_cross_entropy",
            what: "h [rows, hidden] and targets [rows] vs w [vocab, hidden]",
            left: vec![rows, *h.shape().last().unwrap_or(&0), targets.len()],
            right: vec![vocab, hidden],
        });
    }
    validate_targets(targets, vocab, ignore_index)?;
    let dev = h.device().clone();
    let active: Vec<u32> = (0..rows as u32).filter(|&r| targets[r as usize] != ignore_index).collect();
    let valid = active.len();
    let hr = reshape(h, &[rows, hidden])?;
    if valid == 0 {
        // Nothing to score: 0, and no gradient (as cross_entropy).
        let value = upload::<B, E>(&dev, &[E::c(0.0)])?;
        return Ok(output("linear_cross_entropy", &[&hr, w], &dev, vec![], value, |out, _| {
            Box::new(move || {
                out.take();
                Ok(())
            })
        }));
    }
    // The rows with a target, gathered (recorded: its backward scatters their gradient into h's).
    let idx = Ints::new(&dev, &[1, valid], &active)?;
    let x = reshape(&embedding(&hr, &idx, None)?, &[valid, hidden])?;
    let tg: Vec<i32> = active.iter().map(|&r| targets[r as usize]).collect();
    let chunk = chunk_rows.unwrap_or_else(|| lce_chunk_rows_on(&*dev, vocab)).max(1);
    let recording = crate::graph::recording(&[&x, w]);
    let (want_h, want_w) = (recording && x.requires_grad(), recording && w.requires_grad());
    let dh = if want_h { Some(Tensor::zeros(&dev, &[1, valid * hidden], false)?) } else { None };
    // w's gradient over the chunks: in E where E is its own accumulator (f32, f64), in E::Acc
    // otherwise (bf16: f32, as the unfused product's dW), never summed in bf16.
    let mut dw = if want_w && E::ACC_IS_SELF { Some(zeros::<B, E>(&dev, vocab * hidden)?) } else { None };
    let mut dw_acc = if want_w && !E::ACC_IS_SELF { Some(acc_zeros::<B, E>(&dev, vocab * hidden)?) } else { None };
    // Each chunk's per-row losses, read once all chunks are queued (a device waits once, not per
    // chunk), then summed in chunk order.
    let mut chunk_losses = Vec::with_capacity(valid.div_ceil(chunk));
    // Every product of the chunks (logits, dh, dw) is this op's: its time and FLOPs land on the
    // `linear_cross_entropy` row of a profile, not on the inner ops'.
    let mut flops = 0.0f64;
    // Every chunk's targets uploaded before the first product is queued: an upload from pageable
    // host memory waits for the device's queued work, so one inside the loop would wait per chunk.
    let chunk_targets = (0..valid)
        .step_by(chunk)
        .map(|r0| Ints::new(&dev, &[chunk.min(valid - r0)], &tg[r0..(r0 + chunk).min(valid)]))
        .collect::<Result<Vec<_>>>()?;
    crate::stats::composite(|| {
        crate::graph::no_grad(|| -> Result<()> {
            let flat = reshape(&x, &[1, valid * hidden])?;
            for r0 in (0..valid).step_by(chunk) {
                let c = chunk.min(valid - r0);
                let xc = if c == valid {
                    x.clone()
                } else {
                    reshape(&slice_cols(&flat, r0 * hidden, c * hidden)?, &[c, hidden])?
                };
                let logits = matmul(&xc, w, MatmulParams::linear(c, vocab, hidden))?;
                flops += MatmulParams::linear(c, vocab, hidden).flops();
                let p = CeParams::new(c, vocab).with_ignore_index(ignore_index);
                let t = &chunk_targets[r0 / chunk];
                let mut loss_rows = acc_zeros::<B, E>(&dev, c)?;
                match (&dh, want_w) {
                    (None, false) => {
                        dev.ce_fwd(&p, &logits.buf(), t.buf(), <B as Alloc<E::Acc>>::buf_mut(&mut loss_rows))?
                    }
                    (dh, _) => {
                        // The logits become their gradient (scale 1; the mean's 1/valid is the backward's).
                        dev.ce_fwd_bwd(
                            &p,
                            <B as Alloc<E>>::buf_mut(&mut *logits.data_mut()),
                            t.buf(),
                            <B as Alloc<E::Acc>>::buf_mut(&mut loss_rows),
                        )?;
                        if let Some(dh) = dh {
                            // dh rows r0.. = dlogits W ([c, vocab] x [vocab, hidden]).
                            let dhc = matmul(&logits, w, MatmulParams::new(c, hidden, vocab))?;
                            flops += MatmulParams::new(c, hidden, vocab).flops();
                            write_cols(dh, &reshape(&dhc, &[1, c * hidden])?, r0 * hidden)?;
                        }
                        if let Some(dw) = dw.as_mut() {
                            // dw += dlogits^T x ([vocab, c] x [c, hidden]).
                            let mp =
                                MatmulParams { trans_a: true, accumulate: true, ..MatmulParams::new(vocab, hidden, c) };
                            dev.matmul_fwd(&mp, &logits.buf(), &xc.buf(), <B as Alloc<E>>::buf_mut(dw))?;
                            flops += mp.flops();
                        }
                        if let Some(dw) = dw_acc.as_mut() {
                            // The same product as dW of the logits' product, written in E::Acc.
                            let mp = MatmulParams::linear(c, vocab, hidden);
                            let dl = logits.buf();
                            let db = <B as Alloc<E::Acc>>::buf_mut(dw);
                            dev.matmul_bwd(&mp, Some(&*xc.buf()), None, &dl, None, Some(db))?;
                            flops += mp.flops();
                        }
                    }
                }
                chunk_losses.push(loss_rows);
            }
            Ok(())
        })
    })?;
    let mut sum = 0.0f64;
    for loss_rows in &chunk_losses {
        sum += Alloc::<E::Acc>::to_host(&*dev, loss_rows)?.into_iter().map(Elem::to_f64).sum::<f64>();
    }
    drop(chunk_losses);
    crate::stats::flops("linear_cross_entropy", false, flops);
    let value = upload::<B, E>(&dev, &[E::c(sum / valid as f64)])?;
    let dh_bytes = valid * hidden * std::mem::size_of::<E>();
    let dw_bytes =
        vocab * hidden * if E::ACC_IS_SELF { std::mem::size_of::<E>() } else { std::mem::size_of::<E::Acc>() };
    let out = output("linear_cross_entropy", &[&x, w], &dev, vec![], value, |out, _| {
        // The gradients, computed in the forward; counted as saved until the backward used them.
        let dh = dh.map(|t| SavedBuf::new(t, dh_bytes));
        let dw = dw.map(|b| SavedBuf::new(b, dw_bytes));
        let dw_acc = dw_acc.map(|b| SavedBuf::new(b, dw_bytes));
        let (cx, cw, dev2) = (x.cell(), w.cell(), dev.clone());
        Box::new(move || {
            let Some(g) = out.take() else { return Ok(()) };
            let scale = <E::Acc as Elem>::from_f64(host::<B, E>(&dev2, &g)?[0].to_f64() / valid as f64);
            if let (Some(cx), Some(dh)) = (&cx, &dh) {
                launched("linear_cross_entropy.dh");
                cx.accumulate_acc(&dev2, |d| Ok(dev2.grad_accumulate(d, &dh.buf().buf(), scale)?))?;
            }
            if let (Some(cw), Some(dw)) = (&cw, &dw) {
                launched("linear_cross_entropy.dw");
                cw.accumulate_acc(&dev2, |d| Ok(dev2.grad_accumulate(d, <B as Alloc<E>>::buf(dw.buf()), scale)?))?;
            }
            if let (Some(cw), Some(dw)) = (&cw, &dw_acc) {
                launched("linear_cross_entropy.dw");
                let s = scale.to_f64();
                cw.accumulate_acc(&dev2, |d| {
                    Ok(ElementwiseKernel::<E::Acc>::scale_bwd(&*dev2, s, <B as Alloc<E::Acc>>::buf(dw.buf()), d)?)
                })?;
            }
            Ok(())
        })
    });
    out.set_exact(sum / valid as f64);
    Ok(out)
}
