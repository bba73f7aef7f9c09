//! Elementwise glue: add, mul, scale, tanh, bias, column slices and concatenation, in-place column
//! writes, masked mean pooling.

use super::{finish_slots, unfilled, AccSlot, GradSlot, Kernels};
use crate::error::{same_shape, Error, Result};
use crate::graph::{launched, output, Input, Saved};
use crate::ints::Ints;
use crate::tensor::{Float, Tensor};
use tuna_kernels::ops::elementwise::{BiasParams, ColsParams, ElementwiseKernel, PoolParams};
use tuna_kernels::Alloc;

/// `a + b` (same shapes).
pub fn add<B: Kernels<E>, E: Float>(a: &Tensor<B, E>, b: &Tensor<B, E>) -> Result<Tensor<B, E>> {
    same_shape("add", "a vs b", a.shape(), b.shape())?;
    let dev = a.device();
    let mut y = unfilled::<B, E>(dev, a.numel())?;
    dev.add_fwd(&a.buf(), &b.buf(), B::buf_mut(&mut y))?;
    Ok(add_output(a, b, y))
}

/// The output tensor of `a + b` whose data `y` is already computed (by `add` or a fused kernel),
/// with add's backward: the output's gradient passed on to each input's (moved into an empty one,
/// added to a full one; a copy for the first of two).
pub(crate) fn add_output<B: Kernels<E>, E: Float>(
    a: &Tensor<B, E>,
    b: &Tensor<B, E>,
    y: <B as Alloc<E>>::Owned,
) -> Tensor<B, E> {
    let dev = a.device();
    output("add", &[a, b], dev, a.shape().to_vec(), y, |out, _| {
        let (ca, cb, dev) = (a.cell(), b.cell(), dev.clone());
        let n = a.numel();
        Box::new(move || {
            let Some(g) = out.take() else { return Ok(()) };
            // Each input's gradient is g itself: the first of two gets a copy, the last g, each
            // moved into an empty gradient (no zeroed scratch and no accumulating pass over it) or
            // added to one already there (the same `+=` as before).
            let cells: Vec<_> = [ca, cb].into_iter().flatten().collect();
            let Some((last, rest)) = cells.split_last() else { return Ok(()) };
            for c in rest {
                launched("add.bwd");
                let mut copy = unfilled::<B, E>(&*dev, n)?;
                ElementwiseKernel::<E>::scale_fwd(
                    &*dev,
                    1.0,
                    <B as Alloc<E>>::buf(&g),
                    <B as Alloc<E>>::buf_mut(&mut copy),
                )?;
                c.add_owned(&dev, copy)?;
            }
            launched("add.bwd");
            last.add_owned(&dev, g)
        })
    })
}

/// `a * b` elementwise (same shapes).
pub fn mul<B: Kernels<E>, E: Float>(a: &Tensor<B, E>, b: &Tensor<B, E>) -> Result<Tensor<B, E>> {
    same_shape("mul", "a vs b", a.shape(), b.shape())?;
    let dev = a.device();
    let mut y = unfilled::<B, E>(dev, a.numel())?;
    dev.mul_fwd(&a.buf(), &b.buf(), B::buf_mut(&mut y))?;
    Ok(output("mul", &[a, b], dev, a.shape().to_vec(), y, |out, _| {
        let (ca, cb, dev) = (a.cell(), b.cell(), dev.clone());
        // da needs b, db needs a: save only what a wanted gradient reads.
        let a_s = cb.is_some().then(|| Saved::new(a));
        let b_s = ca.is_some().then(|| Saved::new(b));
        let n = a.numel();
        Box::new(move || {
            let Some(g) = out.take() else { return Ok(()) };
            if let (Some(ca), Some(bs)) = (&ca, &b_s) {
                launched("mul.bwd");
                ca.accumulate(&dev, |da| {
                    let mut tmp = unfilled::<B, E>(&dev, n)?;
                    dev.mul_fwd(B::buf(&g), &bs.t().buf(), B::buf_mut(&mut tmp))?;
                    Ok(dev.scale_bwd(1.0, B::buf(&tmp), da)?)
                })?;
            }
            if let (Some(cb), Some(as_)) = (&cb, &a_s) {
                launched("mul.bwd");
                cb.accumulate(&dev, |db| {
                    let mut tmp = unfilled::<B, E>(&dev, n)?;
                    dev.mul_fwd(B::buf(&g), &as_.t().buf(), B::buf_mut(&mut tmp))?;
                    Ok(dev.scale_bwd(1.0, B::buf(&tmp), db)?)
                })?;
            }
            Ok(())
        })
    }))
}

/// `s * a`.
pub fn scale<B: Kernels<E>, E: Float>(a: &Tensor<B, E>, s: f64) -> Result<Tensor<B, E>> {
    let dev = a.device();
    let mut y = unfilled::<B, E>(dev, a.numel())?;
    dev.scale_fwd(s, &a.buf(), B::buf_mut(&mut y))?;
    Ok(output("scale", &[a], dev, a.shape().to_vec(), y, |out, _| {
        let (ca, dev) = (a.cell().expect("recorded"), dev.clone());
        Box::new(move || {
            let Some(g) = out.take() else { return Ok(()) };
            launched("scale.bwd");
            ca.accumulate(&dev, |d| Ok(dev.scale_bwd(s, B::buf(&g), d)?))
        })
    }))
}

/// `tanh(x)`, elementwise (BERT's pooler). The backward reads the output, not `x`.
pub fn tanh<B: Kernels<E>, E: Float>(x: &Tensor<B, E>) -> Result<Tensor<B, E>> {
    let dev = x.device();
    let mut y = unfilled::<B, E>(dev, x.numel())?;
    dev.tanh_fwd(&x.buf(), B::buf_mut(&mut y))?;
    Ok(output("tanh", &[x], dev, x.shape().to_vec(), y, |out, y_data| {
        let (cx, dev, ys) = (x.cell().expect("recorded"), dev.clone(), y_data.save());
        Box::new(move || {
            let Some(g) = out.take() else { return Ok(()) };
            launched("tanh.bwd");
            let y = ys.data();
            cx.accumulate(&dev, |dx| Ok(dev.tanh_bwd(B::buf(&*y), B::buf(&g), dx)?))
        })
    }))
}

/// `x + bias` with `bias` (`[cols]`) added to every row of `x` (`[.., cols]`).
pub fn add_bias<B: Kernels<E>, E: Float>(x: &Tensor<B, E>, bias: &Tensor<B, E>) -> Result<Tensor<B, E>> {
    let cols = *x.shape().last().unwrap_or(&0);
    same_shape("add_bias", "bias vs x's last dim", bias.shape(), &[cols])?;
    let p = BiasParams::new(x.numel() / cols.max(1), cols);
    let dev = x.device();
    let mut y = unfilled::<B, E>(dev, x.numel())?;
    dev.add_bias_fwd(&p, &x.buf(), &bias.buf(), B::buf_mut(&mut y))?;
    Ok(output("add_bias", &[x, bias], dev, x.shape().to_vec(), y, |out, _| {
        let (cx, cb, dev) = (x.cell(), bias.cell(), dev.clone());
        let n = x.numel();
        Box::new(move || {
            let Some(g) = out.take() else { return Ok(()) };
            match &cb {
                Some(_) => {
                    launched("add_bias.bwd_bias");
                    let mut sx = GradSlot::new(&*dev, &cx, n)?;
                    let mut sb = AccSlot::new(&*dev, &cb, cols)?;
                    dev.add_bias_bwd(&p, B::buf(&g), sx.buf(), sb.buf())?;
                    finish_slots(&*dev, [Some(sx)], [Some(sb)])
                }
                None => {
                    let cx = cx.as_ref().expect("recorded: x or bias needs a gradient");
                    launched("add_bias.bwd_x");
                    cx.accumulate(&dev, |dx| Ok(dev.scale_bwd(1.0, B::buf(&g), dx)?))
                }
            }
        })
    }))
}

/// Columns `off..off + width` of `x` (`[rows, cols]`, any leading dims) as `[.., width]`.
pub fn slice_cols<B: Kernels<E>, E: Float>(x: &Tensor<B, E>, off: usize, width: usize) -> Result<Tensor<B, E>> {
    let cols = *x.shape().last().unwrap_or(&0);
    let rows = x.numel() / cols.max(1);
    let p = ColsParams::new(rows, cols, off, width);
    let dev = x.device();
    let mut y = unfilled::<B, E>(dev, rows * width)?;
    dev.slice_cols_fwd(&p, &x.buf(), B::buf_mut(&mut y))?;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().ok_or_else(|| Error::Shape {
        op: "slice_cols",
        what: "x has no dims",
        left: vec![],
        right: vec![],
    })? = width;
    Ok(output("slice_cols", &[x], dev, shape, y, |out, _| {
        let (cx, dev) = (x.cell().expect("recorded"), dev.clone());
        Box::new(move || {
            let Some(g) = out.take() else { return Ok(()) };
            launched("slice_cols.bwd");
            cx.accumulate(&dev, |dx| Ok(dev.slice_cols_bwd(&p, B::buf(&g), dx)?))
        })
    }))
}

/// Concatenate tensors `[.., w_i]` along the last dim (equal leading dims).
pub fn concat_cols<B: Kernels<E>, E: Float>(xs: &[&Tensor<B, E>]) -> Result<Tensor<B, E>> {
    let first =
        xs.first().ok_or_else(|| Error::Shape { op: "concat_cols", what: "no inputs", left: vec![], right: vec![] })?;
    let lead = &first.shape()[..first.shape().len().saturating_sub(1)];
    let rows: usize = lead.iter().product();
    let mut cols = 0;
    for x in xs {
        let s = x.shape();
        same_shape("concat_cols", "leading dims", &s[..s.len().saturating_sub(1)], lead)?;
        cols += s.last().copied().unwrap_or(0);
    }
    let dev = first.device();
    let mut y = unfilled::<B, E>(dev, rows * cols)?;
    let mut params = Vec::with_capacity(xs.len());
    let mut off = 0;
    for x in xs {
        let w = *x.shape().last().unwrap_or(&0);
        let p = ColsParams::new(rows, cols, off, w);
        dev.concat_cols_fwd(&p, &x.buf(), B::buf_mut(&mut y))?;
        params.push(p);
        off += w;
    }
    let mut shape = lead.to_vec();
    shape.push(cols);
    let inputs: Vec<&dyn Input> = xs.iter().map(|x| *x as &dyn Input).collect();
    Ok(output("concat_cols", &inputs, dev, shape, y, |out, _| {
        let cells: Vec<_> = xs.iter().map(|x| x.cell()).collect();
        let dev = dev.clone();
        Box::new(move || {
            let Some(g) = out.take() else { return Ok(()) };
            for (c, p) in cells.iter().zip(&params) {
                if let Some(c) = c {
                    launched("concat_cols.bwd");
                    c.accumulate(&dev, |dx| Ok(dev.concat_cols_bwd(p, B::buf(&g), dx)?))?;
                }
            }
            Ok(())
        })
    }))
}

/// `dst[r, off..off + w] = x[r, ..]` in place, `dst` and `x` viewed as `[n, rest]` by their
/// first dim (equal): writes into a preallocated buffer instead of building a new one, as a KV
/// cache appends its new keys without copying the old ones. Not recorded: no gradient flows from
/// `dst` to `x`, and a recorded op that saved `dst` sees the new columns in its backward (so use
/// it on buffers no recorded op reads, such as a cache under [`crate::no_grad`]).
pub fn write_cols<B: Kernels<E>, E: Float>(dst: &Tensor<B, E>, x: &Tensor<B, E>, off: usize) -> Result<()> {
    let (ds, xs) = (dst.shape(), x.shape());
    let n = ds.first().copied().unwrap_or(0);
    let bad = |what: &'static str| Error::Shape { op: "write_cols", what, left: xs.to_vec(), right: ds.to_vec() };
    if n == 0 || xs.first() != Some(&n) {
        return Err(bad("x vs dst: equal first dims, not empty"));
    }
    let (cols, w) = (dst.numel() / n, x.numel() / n);
    if off.checked_add(w).is_none_or(|end| end > cols) {
        return Err(bad("x's columns at the offset run past dst's"));
    }
    if std::rc::Rc::ptr_eq(&dst.inner.data, &x.inner.data) {
        return Err(bad("x shares dst's storage"));
    }
    let dev = dst.device();
    let mut data = dst.data_mut();
    dev.concat_cols_fwd(&ColsParams::new(n, cols, off, w), &x.buf(), B::buf_mut(&mut *data))?;
    Ok(())
}

/// Masked mean over the sequence (sentence-transformers' pooling): `x` `[batch, seq, hidden]`,
/// `mask` `[batch, seq]` (1 = token) -> `[batch, hidden]`.
pub fn mean_pool<B: Kernels<E>, E: Float>(x: &Tensor<B, E>, mask: &Ints<B, u8>) -> Result<Tensor<B, E>> {
    let [b, s, h] = *x.shape() else {
        return Err(Error::Shape {
            op: "mean_pool",
            what: "x must be [batch, seq, hidden]",
            left: x.shape().to_vec(),
            right: vec![],
        });
    };
    same_shape("mean_pool", "mask vs [batch, seq]", mask.shape(), &[b, s])?;
    let p = PoolParams::new(b, s, h);
    let dev = x.device();
    let mut y = unfilled::<B, E>(dev, b * h)?;
    dev.sum_rows_masked_mean_fwd(&p, &x.buf(), mask.buf(), B::buf_mut(&mut y))?;
    Ok(output("mean_pool", &[x], dev, vec![b, h], y, |out, _| {
        let (cx, dev, mask) = (x.cell().expect("recorded"), dev.clone(), mask.clone());
        Box::new(move || {
            let Some(g) = out.take() else { return Ok(()) };
            launched("mean_pool.bwd");
            cx.accumulate(&dev, |dx| Ok(dev.sum_rows_masked_mean_bwd(&p, mask.buf(), B::buf(&g), dx)?))
        })
    }))
}
