//! Softmax cross-entropy, fused with its backward.

use super::{host, upload, zeros, Kernels};
use crate::error::{Error, Result};
use crate::graph::{launched, output, Saved};
use crate::ints::Ints;
use crate::tensor::{Float, Tensor};
use tuna_kernels::ops::cross_entropy::{count_valid, validate_targets, CeParams};

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
    let mut loss_rows = zeros::<B, E>(&dev, rows)?;
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
        dev.ce_fwd_bwd(&p, B::buf_mut(&mut *holder.data_mut()), targets.buf(), B::buf_mut(&mut loss_rows))?;
        Some(holder)
    } else {
        dev.ce_fwd(&p, &logits.buf(), targets.buf(), B::buf_mut(&mut loss_rows))?;
        None
    };
    let sum: f64 = host::<B, E>(&dev, &loss_rows)?.into_iter().map(Into::<f64>::into).sum();
    let mean = if valid == 0 { 0.0 } else { sum / valid as f64 };
    let value = upload::<B, E>(&dev, &[E::c(mean)])?;
    Ok(output("cross_entropy", &[&logits], &dev, vec![], value, |out, _| {
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
            let upstream = host::<B, E>(&dev2, &g)?[0];
            let scale = upstream / E::c(valid as f64);
            cl.accumulate(&dev2, |dl| Ok(dev2.grad_accumulate(dl, &holder.t().buf(), scale)?))
        })
    }))
}
