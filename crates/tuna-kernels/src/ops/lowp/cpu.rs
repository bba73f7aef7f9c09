//! The low-precision products on the CPU. An int8 or q4 weight in f32 products takes the
//! dot-product path [`matrix_path`] picks ([`super::dot`]) where there is one; everything else the widen-to-f32
//! path: blocks of weight rows are widened (bf16) or dequantized (int8, q4) into a per-thread
//! scratch of `F`, then the `gemm` crate multiplies (its f32/f64 microkernels, dispatched at run
//! time, rayon across the threads).

use super::{bf16_path, check, dot, dot_bf16, matrix_path, BasePrecision, Bf16Isa, DotIsa, LowpKernel, PackedWeight};
use crate::backend::{Cpu, CpuFloat};
use crate::error::Result;
use rayon::prelude::*;
use std::any::Any;
use std::cell::RefCell;

/// A block of widened rows is at most this many bytes (it stays in the last-level cache while
/// every row of `x` passes over it), and at least [`MIN_ROWS`] rows.
const BLOCK_BYTES: usize = 4 << 20;
const MIN_ROWS: usize = 16;

thread_local! {
    /// The widened block, kept from call to call (a `Vec<F>` for whichever `F` last used it).
    static SCRATCH: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// Runs `f` on a scratch of `len` elements of `F`: this thread's kept buffer, or a fresh one if
/// that is in use (a nested call) or of another type.
fn with_scratch<F: CpuFloat, R>(len: usize, f: impl FnOnce(&mut [F]) -> R) -> R {
    SCRATCH.with(|cell| {
        let Ok(mut slot) = cell.try_borrow_mut() else {
            return f(&mut vec![F::zero(); len]);
        };
        if !slot.as_ref().is_some_and(|b| b.is::<Vec<F>>()) {
            *slot = Some(Box::new(Vec::<F>::new()));
        }
        let v = slot.as_mut().and_then(|b| b.downcast_mut::<Vec<F>>()).expect("set above");
        if v.len() < len {
            v.resize(len, F::zero());
        }
        f(&mut v[..len])
    })
}

/// Rows per widened block for a weight with `inp` columns of `F`.
fn block_rows<F>(w: &PackedWeight) -> usize {
    let per_row = w.in_features() * std::mem::size_of::<F>();
    (BLOCK_BYTES / per_row.max(1)).max(MIN_ROWS).min(w.out_features())
}

/// Widens rows `r0..r0 + rows` into `dst`, in parallel when the block is large.
fn widen<F: CpuFloat>(w: &PackedWeight, r0: usize, dst: &mut [F]) {
    let inp = w.in_features();
    let rows_per_task = (64 * 1024 / inp).max(1);
    if dst.len() >= 2 * rows_per_task * inp {
        dst.par_chunks_mut(rows_per_task * inp).enumerate().for_each(|(t, d)| w.widen_rows(r0 + t * rows_per_task, d));
    } else {
        w.widen_rows(r0, dst);
    }
}

fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    if m * n * k >= 64 * 64 * 64 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    }
}

/// Runs `f(r0, rows, block)` over the weight's blocks of rows in order, each widened into this
/// thread's scratch as `[rows, in]`.
fn each_block<F: CpuFloat>(w: &PackedWeight, mut f: impl FnMut(usize, usize, &[F])) {
    let (out, inp) = (w.out_features(), w.in_features());
    let nb = block_rows::<F>(w);
    with_scratch::<F, _>(nb * inp, |scratch| {
        let mut r0 = 0;
        while r0 < out {
            let rows = nb.min(out - r0);
            let s = &mut scratch[..rows * inp];
            widen(w, r0, s);
            f(r0, rows, s);
            r0 += rows;
        }
    })
}

/// The dot-product instructions for an int8 or q4 weight in `F` products on this CPU, if any (f32
/// only: f64 products stay exact against the stored weight).
fn dot_isa<F: 'static>(w: &PackedWeight) -> Option<DotIsa> {
    if !matches!(w.precision(), BasePrecision::Int8 | BasePrecision::Q4)
        || std::any::TypeId::of::<F>() != std::any::TypeId::of::<f32>()
    {
        return None;
    }
    matrix_path().dot_isa()
}

/// The bf16 dot-product instructions for a bf16 weight in `F` products on this CPU, if any (f32
/// only).
fn bf16_isa<F: 'static>(w: &PackedWeight) -> Option<Bf16Isa> {
    if w.precision() != BasePrecision::Bf16 || std::any::TypeId::of::<F>() != std::any::TypeId::of::<f32>() {
        return None;
    }
    bf16_path()
}

/// `s` as f32 (`F` is f32: checked by [`dot_isa`]).
fn as_f32<F: 'static>(s: &[F]) -> &[f32] {
    assert_eq!(std::any::TypeId::of::<F>(), std::any::TypeId::of::<f32>());
    // SAFETY: F is f32 (asserted): same layout, same length.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), s.len()) }
}

fn as_f32_mut<F: 'static>(s: &mut [F]) -> &mut [f32] {
    assert_eq!(std::any::TypeId::of::<F>(), std::any::TypeId::of::<f32>());
    // SAFETY: as in `as_f32`, and the borrow is `s`'s.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), s.len()) }
}

impl<F: CpuFloat<Acc = F>> LowpKernel<F> for Cpu {
    fn lowp_linear_fwd(&self, w: &PackedWeight, m: usize, x: &[F], y: &mut [F]) -> Result<()> {
        check(w, m, ("x", x.len()), ("y", y.len()), true)?;
        if let Some(isa) = dot_isa::<F>(w) {
            dot::linear_fwd(isa, w, m, as_f32(x), as_f32_mut(y));
            return Ok(());
        }
        if let Some(isa) = bf16_isa::<F>(w) {
            dot_bf16::linear_fwd(isa, w, m, as_f32(x), as_f32_mut(y));
            return Ok(());
        }
        let (out, inp) = (w.out_features(), w.in_features());
        each_block::<F>(w, |r0, rows, s| {
            // y[:, r0..r0+rows] = x[m, inp] s^T, s stored [rows, inp].
            // SAFETY: y holds m * out elements (checked) and the block's columns r0..r0+rows lie
            // inside each row (row stride `out`); x holds m * inp (checked), s rows * inp; y is a
            // distinct &mut, aliasing neither.
            unsafe {
                gemm::gemm(
                    m,
                    rows,
                    inp,
                    y.as_mut_ptr().add(r0),
                    1,
                    out as isize,
                    false,
                    x.as_ptr(),
                    1,
                    inp as isize,
                    s.as_ptr(),
                    inp as isize,
                    1,
                    F::zero(),
                    F::one(),
                    false,
                    false,
                    false,
                    parallelism(m, rows, inp),
                )
            }
        });
        Ok(())
    }

    fn lowp_linear_bwd(&self, w: &PackedWeight, m: usize, dy: &[F], dx: &mut [F]) -> Result<()> {
        check(w, m, ("dy", dy.len()), ("dx", dx.len()), false)?;
        if let Some(isa) = dot_isa::<F>(w) {
            dot::linear_bwd(isa, w, m, as_f32(dy), as_f32_mut(dx));
            return Ok(());
        }
        if let Some(isa) = bf16_isa::<F>(w) {
            dot_bf16::linear_bwd(isa, w, m, as_f32(dy), as_f32_mut(dx));
            return Ok(());
        }
        let (out, inp) = (w.out_features(), w.in_features());
        each_block::<F>(w, |r0, rows, s| {
            // dx[m, inp] += dy[:, r0..r0+rows] s, s stored [rows, inp].
            // SAFETY: dy holds m * out elements (checked): columns r0..r0+rows of each row (row
            // stride `out`) are inside it; dx holds m * inp, s rows * inp; dx aliases neither.
            unsafe {
                gemm::gemm(
                    m,
                    inp,
                    rows,
                    dx.as_mut_ptr(),
                    1,
                    inp as isize,
                    true,
                    dy.as_ptr().add(r0),
                    1,
                    out as isize,
                    s.as_ptr(),
                    1,
                    inp as isize,
                    F::one(),
                    F::one(),
                    false,
                    false,
                    false,
                    parallelism(m, inp, rows),
                )
            }
        });
        Ok(())
    }
}
