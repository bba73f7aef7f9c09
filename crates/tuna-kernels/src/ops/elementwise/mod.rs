//! Elementwise glue ops of a transformer block, forward and backward: `add`, `mul`, `scale`,
//! `tanh`, `add_bias`, column slices and concatenation, and masked mean pooling over the sequence.
//!
//! Layouts (row-major):
//! - `add`, `mul`, `scale`, `tanh`: `a`, `b`, `y` and their gradients all of one length. `tanh`'s
//!   backward reads the forward's output `y` (`dx += dy * (1 - y^2)`), not `x`.
//! - `add_bias`: `x`, `y`, `dx`, `dy`: `[rows, cols]` (E); `bias`: `[cols]` (E); `dbias`: `[cols]`
//!   (`E::Acc`, a parameter gradient). `dbias += sum_rows dy` is reduced without atomics on both
//!   devices (fixed per-chunk partials, then the chunks in order), so it is bitwise reproducible.
//! - `slice_cols`: `y[r, 0..width] = x[r, off..off+width]`, `x: [rows, cols]`, `y: [rows, width]`
//!   (splits GPT-2's fused qkv without a transpose); backward `dx[r, off..off+width] += dy`.
//! - `concat_cols`: `y[r, off..off+width] = x[r, ..]` (the other columns of `y` are left as they
//!   are), backward `dx += dy[r, off..off+width]`.
//! - `sum_rows_masked_mean` (BERT mean pooling): `x: [batch, seq, hidden]`, `mask: [batch, seq]`
//!   u8 (0/1; the value is used as a weight), `y: [batch, hidden]` =
//!   `sum_t mask*x / max(1, sum_t mask)`; backward `dx[b,t,:] += mask[b,t] * dy[b,:] / count_b`.
//!
//! As everywhere in tuna, forwards overwrite their outputs and backwards accumulate (`+=`).

mod cpu;
mod cuda;
#[cfg(test)]
mod cuda_tests;
#[cfg(test)]
mod tests;

use crate::backend::{Backend, Elem};
use crate::error::{check_len, Error, Result};

/// Parameters of the flat ops (`add`, `mul`, `scale`), mirrored by `struct FlatParams` in
/// `kernels/elementwise.cu`. Built by the launchers from buffer lengths.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlatParams {
    pub n: u64,
    /// The factor of `scale` (1 elsewhere).
    pub s: f32,
    pub _pad: u32,
}

/// Shape of `add_bias`, mirrored by `struct BiasParams` in `kernels/elementwise.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BiasParams {
    pub rows: u64,
    pub cols: u64,
}

impl BiasParams {
    pub fn new(rows: usize, cols: usize) -> Self {
        BiasParams { rows: rows as u64, cols: cols as u64 }
    }
}

/// Shape of `slice_cols`/`concat_cols`: the wide tensor is `[rows, cols]`, the narrow one
/// `[rows, width]`, at column `off` of the wide one. Mirrored by `struct ColsParams`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColsParams {
    pub rows: u64,
    pub cols: u64,
    pub off: u64,
    pub width: u64,
}

impl ColsParams {
    pub fn new(rows: usize, cols: usize, off: usize, width: usize) -> Self {
        ColsParams { rows: rows as u64, cols: cols as u64, off: off as u64, width: width as u64 }
    }
    /// Elements of the wide tensor.
    pub fn wide(&self) -> usize {
        prod(&[self.rows, self.cols])
    }
    /// Elements of the narrow tensor.
    pub fn narrow(&self) -> usize {
        prod(&[self.rows, self.width])
    }
}

/// Shape of `sum_rows_masked_mean`, mirrored by `struct PoolParams` in `kernels/elementwise.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolParams {
    pub batch: u64,
    pub seq: u64,
    pub hidden: u64,
}

impl PoolParams {
    pub fn new(batch: usize, seq: usize, hidden: usize) -> Self {
        PoolParams { batch: batch as u64, seq: seq as u64, hidden: hidden as u64 }
    }
}

/// The elementwise glue ops on a device: each forward declared with its backward.
pub trait ElementwiseKernel<E: Elem>: Backend {
    /// `y = a + b`.
    fn add_fwd(&self, a: &Self::Buf<E>, b: &Self::Buf<E>, y: &mut Self::Buf<E>) -> Result<()>;
    /// `da += dy`, `db += dy`.
    fn add_bwd(&self, dy: &Self::Buf<E>, da: &mut Self::Buf<E>, db: &mut Self::Buf<E>) -> Result<()>;
    /// `y = a * b`.
    fn mul_fwd(&self, a: &Self::Buf<E>, b: &Self::Buf<E>, y: &mut Self::Buf<E>) -> Result<()>;
    /// `da += dy * b`, `db += dy * a`.
    fn mul_bwd(
        &self,
        a: &Self::Buf<E>,
        b: &Self::Buf<E>,
        dy: &Self::Buf<E>,
        da: &mut Self::Buf<E>,
        db: &mut Self::Buf<E>,
    ) -> Result<()>;
    /// `y = s * a` (`s` is rounded to the compute type: f32 on CUDA and for f32 on the CPU).
    fn scale_fwd(&self, s: f64, a: &Self::Buf<E>, y: &mut Self::Buf<E>) -> Result<()>;
    /// `da += s * dy`.
    fn scale_bwd(&self, s: f64, dy: &Self::Buf<E>, da: &mut Self::Buf<E>) -> Result<()>;
    /// `y = tanh(x)` (BERT's pooler).
    fn tanh_fwd(&self, x: &Self::Buf<E>, y: &mut Self::Buf<E>) -> Result<()>;
    /// `dx += dy * (1 - y^2)`, from the forward's output `y`.
    fn tanh_bwd(&self, y: &Self::Buf<E>, dy: &Self::Buf<E>, dx: &mut Self::Buf<E>) -> Result<()>;

    /// `y[r, c] = x[r, c] + bias[c]`.
    fn add_bias_fwd(&self, p: &BiasParams, x: &Self::Buf<E>, bias: &Self::Buf<E>, y: &mut Self::Buf<E>) -> Result<()>;
    /// `dx += dy`, `dbias += sum_rows dy` (deterministic reduction).
    fn add_bias_bwd(
        &self,
        p: &BiasParams,
        dy: &Self::Buf<E>,
        dx: &mut Self::Buf<E>,
        dbias: &mut Self::Buf<E::Acc>,
    ) -> Result<()>;

    /// `dbias += sum_rows dy`: `add_bias_bwd`'s bias half alone (the same deterministic reduction),
    /// for an op that adds the bias itself (`linear` with a bias) and passes `dy` on as it is.
    fn bias_grad(&self, p: &BiasParams, dy: &Self::Buf<E>, dbias: &mut Self::Buf<E::Acc>) -> Result<()>;
    /// `y[r, c] += bias[c]` in place: `add_bias_fwd` with `x = y` (the same bits), so a product's
    /// output takes its bias without a second buffer (one read and write of `y`, no allocation).
    fn add_bias_inplace(&self, p: &BiasParams, bias: &Self::Buf<E>, y: &mut Self::Buf<E>) -> Result<()>;

    /// `y[r, 0..width] = x[r, off..off+width]`; `x: [rows, cols]`, `y: [rows, width]`.
    fn slice_cols_fwd(&self, p: &ColsParams, x: &Self::Buf<E>, y: &mut Self::Buf<E>) -> Result<()>;
    /// `dx[r, off..off+width] += dy[r, ..]`; `dy: [rows, width]`, `dx: [rows, cols]`.
    fn slice_cols_bwd(&self, p: &ColsParams, dy: &Self::Buf<E>, dx: &mut Self::Buf<E>) -> Result<()>;
    /// `y[r, off..off+width] = x[r, ..]`; `x: [rows, width]`, `y: [rows, cols]` (other columns kept).
    fn concat_cols_fwd(&self, p: &ColsParams, x: &Self::Buf<E>, y: &mut Self::Buf<E>) -> Result<()>;
    /// `dx[r, ..] += dy[r, off..off+width]`; `dy: [rows, cols]`, `dx: [rows, width]`.
    fn concat_cols_bwd(&self, p: &ColsParams, dy: &Self::Buf<E>, dx: &mut Self::Buf<E>) -> Result<()>;

    /// `y[b, :] = sum_t mask[b,t] * x[b,t,:] / max(1, sum_t mask[b,t])`.
    fn sum_rows_masked_mean_fwd(
        &self,
        p: &PoolParams,
        x: &Self::Buf<E>,
        mask: &Self::Buf<u8>,
        y: &mut Self::Buf<E>,
    ) -> Result<()>;
    /// `dx[b,t,:] += mask[b,t] * dy[b,:] / max(1, sum_t mask[b,t])`.
    fn sum_rows_masked_mean_bwd(
        &self,
        p: &PoolParams,
        mask: &Self::Buf<u8>,
        dy: &Self::Buf<E>,
        dx: &mut Self::Buf<E>,
    ) -> Result<()>;
}

/// Every tensor of a flat op has the length of the first; returns that length.
fn check_flat(op: &'static str, first: (&'static str, usize), others: &[(&'static str, usize)]) -> Result<usize> {
    let (name0, n) = first;
    for &(name, len) in others {
        check_len(op, name, len, n, || format!("same length as {name0} ({n})"))?;
    }
    Ok(n)
}

/// `add_bias` tensors: `(name, len, is_bias)`; full tensors are `rows*cols`, bias ones `cols`.
fn check_bias(p: &BiasParams, tensors: &[(&'static str, usize, bool)]) -> Result<()> {
    for &(name, len, is_bias) in tensors {
        let (want, what) =
            if is_bias { (p.cols as usize, "[cols]") } else { (prod(&[p.rows, p.cols]), "[rows, cols]") };
        check_len("add_bias", name, len, want, || format!("{what} with rows {}, cols {}", p.rows, p.cols))?;
    }
    Ok(())
}

/// `slice_cols`/`concat_cols`: validates `off + width <= cols`, then the wide and narrow tensors.
fn check_cols(
    op: &'static str,
    p: &ColsParams,
    wide: (&'static str, usize),
    narrow: (&'static str, usize),
) -> Result<()> {
    if p.off.checked_add(p.width).is_none_or(|end| end > p.cols) {
        let msg = format!("columns {}..{}+{} outside a tensor of {} columns", p.off, p.off, p.width, p.cols);
        return Err(Error::Invalid { op, msg });
    }
    let detail = || format!("rows {}, cols {}, off {}, width {}", p.rows, p.cols, p.off, p.width);
    check_len(op, wide.0, wide.1, p.wide(), || format!("[rows, cols]: {}", detail()))?;
    check_len(op, narrow.0, narrow.1, p.narrow(), || format!("[rows, width]: {}", detail()))
}

/// `sum_rows_masked_mean` tensors: `x`/`dx` `[batch, seq, hidden]`, `y`/`dy` `[batch, hidden]`, `mask`.
fn check_pool(p: &PoolParams, full: (&'static str, usize), pooled: (&'static str, usize), mask: usize) -> Result<()> {
    let op = "sum_rows_masked_mean";
    let detail = || format!("batch {}, seq {}, hidden {}", p.batch, p.seq, p.hidden);
    check_len(op, full.0, full.1, prod(&[p.batch, p.seq, p.hidden]), || format!("[batch, seq, hidden]: {}", detail()))?;
    check_len(op, pooled.0, pooled.1, prod(&[p.batch, p.hidden]), || format!("[batch, hidden]: {}", detail()))?;
    check_len(op, "mask", mask, prod(&[p.batch, p.seq]), || format!("[batch, seq]: {}", detail()))
}

/// Product of dims, saturating (a saturated product never matches a real buffer length).
fn prod(dims: &[u64]) -> usize {
    dims.iter().fold(1u64, |a, &d| a.saturating_mul(d)).try_into().unwrap_or(usize::MAX)
}
