//! Elementwise ops on the CPU, generic over f32/f64: rayon over fixed-size chunks or rows.
//! `dbias` is reduced in fixed row chunks (independent of the thread count) added in order.

use super::{check_bias, check_cols, check_flat, check_pool, BiasParams, ColsParams, ElementwiseKernel, PoolParams};
use crate::backend::{Cpu, CpuFloat};
use crate::error::Result;
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 16 * 1024;

/// `out[i] = f(a[i], b[i])` in parallel chunks.
fn map2<F: CpuFloat>(a: &[F], b: &[F], out: &mut [F], f: impl Fn(F, F) -> F + Sync) {
    out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(o, (a, b))| {
        for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
            *o = f(a, b);
        }
    });
}

/// `g[i] += s * dy[i]` in parallel chunks.
fn acc_scaled<F: CpuFloat>(s: F, dy: &[F], g: &mut [F]) {
    g.par_chunks_mut(CHUNK).zip(dy.par_chunks(CHUNK)).for_each(|(g, dy)| {
        for (g, &d) in g.iter_mut().zip(dy) {
            *g += s * d;
        }
    });
}

/// Copies (or accumulates, `ACC`) `width` columns per row from `src` at `src_off` (rows of
/// `src_cols`) into `dst` at `dst_off` (rows of `dst_cols`), one rayon task per row.
fn cols_copy<F: CpuFloat, const ACC: bool>(
    width: usize,
    src: &[F],
    (src_cols, src_off): (usize, usize),
    dst: &mut [F],
    (dst_cols, dst_off): (usize, usize),
) {
    if width == 0 {
        return;
    }
    dst.par_chunks_mut(dst_cols).zip(src.par_chunks(src_cols)).for_each(|(d, s)| {
        let (d, s) = (&mut d[dst_off..dst_off + width], &s[src_off..src_off + width]);
        if ACC {
            d.iter_mut().zip(s).for_each(|(d, &s)| *d += s);
        } else {
            d.copy_from_slice(s);
        }
    });
}

/// `sum_t mask[t]`, at least 1: the divisor of one batch row.
fn mask_count<F: CpuFloat>(mask: &[u8]) -> F {
    let n: F = mask.iter().map(|&m| F::c(m as f64)).sum();
    n.max(F::one())
}

// `Acc = F` restates CpuFloat's own supertrait bound, which rustc does not use to normalize
// `F::Acc` in the trait's signature.
impl<F: CpuFloat<Acc = F>> ElementwiseKernel<F> for Cpu {
    fn add_fwd(&self, a: &[F], b: &[F], y: &mut [F]) -> Result<()> {
        check_flat("add", ("a", a.len()), &[("b", b.len()), ("y", y.len())])?;
        map2(a, b, y, |a, b| a + b);
        Ok(())
    }

    fn add_bwd(&self, dy: &[F], da: &mut [F], db: &mut [F]) -> Result<()> {
        check_flat("add", ("dy", dy.len()), &[("da", da.len()), ("db", db.len())])?;
        acc_scaled(F::one(), dy, da);
        acc_scaled(F::one(), dy, db);
        Ok(())
    }

    fn mul_fwd(&self, a: &[F], b: &[F], y: &mut [F]) -> Result<()> {
        check_flat("mul", ("a", a.len()), &[("b", b.len()), ("y", y.len())])?;
        map2(a, b, y, |a, b| a * b);
        Ok(())
    }

    fn mul_bwd(&self, a: &[F], b: &[F], dy: &[F], da: &mut [F], db: &mut [F]) -> Result<()> {
        let others = [("b", b.len()), ("dy", dy.len()), ("da", da.len()), ("db", db.len())];
        check_flat("mul", ("a", a.len()), &others)?;
        let inputs = a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK));
        let grads = da.par_chunks_mut(CHUNK).zip(db.par_chunks_mut(CHUNK));
        grads.zip(inputs).for_each(|((da, db), ((a, b), dy))| {
            for i in 0..dy.len() {
                da[i] += dy[i] * b[i];
                db[i] += dy[i] * a[i];
            }
        });
        Ok(())
    }

    fn scale_fwd(&self, s: f64, a: &[F], y: &mut [F]) -> Result<()> {
        check_flat("scale", ("a", a.len()), &[("y", y.len())])?;
        let s = F::c(s);
        y.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).for_each(|(y, a)| {
            y.iter_mut().zip(a).for_each(|(y, &a)| *y = s * a);
        });
        Ok(())
    }

    fn scale_bwd(&self, s: f64, dy: &[F], da: &mut [F]) -> Result<()> {
        check_flat("scale", ("dy", dy.len()), &[("da", da.len())])?;
        acc_scaled(F::c(s), dy, da);
        Ok(())
    }

    fn tanh_fwd(&self, x: &[F], y: &mut [F]) -> Result<()> {
        check_flat("tanh", ("x", x.len()), &[("y", y.len())])?;
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
            y.iter_mut().zip(x).for_each(|(y, &x)| *y = x.tanh());
        });
        Ok(())
    }

    fn tanh_bwd(&self, y: &[F], dy: &[F], dx: &mut [F]) -> Result<()> {
        check_flat("tanh", ("y", y.len()), &[("dy", dy.len()), ("dx", dx.len())])?;
        dx.par_chunks_mut(CHUNK).zip(y.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK))).for_each(|(dx, (y, dy))| {
            for ((dx, &y), &d) in dx.iter_mut().zip(y).zip(dy) {
                *dx += d * (F::one() - y * y);
            }
        });
        Ok(())
    }

    fn add_bias_fwd(&self, p: &BiasParams, x: &[F], bias: &[F], y: &mut [F]) -> Result<()> {
        check_bias(p, &[("x", x.len(), false), ("bias", bias.len(), true), ("y", y.len(), false)])?;
        if y.is_empty() {
            return Ok(());
        }
        let cols = p.cols as usize;
        y.par_chunks_mut(cols).zip(x.par_chunks(cols)).for_each(|(y, x)| {
            for ((y, &x), &b) in y.iter_mut().zip(x).zip(bias) {
                *y = x + b;
            }
        });
        Ok(())
    }

    fn add_bias_bwd(&self, p: &BiasParams, dy: &[F], dx: &mut [F], dbias: &mut [F]) -> Result<()> {
        check_bias(p, &[("dy", dy.len(), false), ("dx", dx.len(), false), ("dbias", dbias.len(), true)])?;
        if dy.is_empty() {
            return Ok(());
        }
        acc_scaled(F::one(), dy, dx);
        self.bias_grad(p, dy, dbias)
    }

    fn bias_grad(&self, p: &BiasParams, dy: &[F], dbias: &mut [F]) -> Result<()> {
        check_bias(p, &[("dy", dy.len(), false), ("dbias", dbias.len(), true)])?;
        if dy.is_empty() {
            return Ok(());
        }
        let cols = p.cols as usize;
        // Fixed chunks of whole rows: the partials, and so the sum, do not depend on the threads.
        let rows_per_chunk = (CHUNK / cols).max(1);
        let partials: Vec<Vec<F>> = dy
            .par_chunks(rows_per_chunk * cols)
            .map(|block| {
                let mut s = vec![F::zero(); cols];
                for row in block.chunks(cols) {
                    s.iter_mut().zip(row).for_each(|(s, &d)| *s += d);
                }
                s
            })
            .collect();
        for part in partials {
            dbias.iter_mut().zip(part).for_each(|(g, s)| *g += s);
        }
        Ok(())
    }

    fn add_bias_inplace(&self, p: &BiasParams, bias: &[F], y: &mut [F]) -> Result<()> {
        check_bias(p, &[("bias", bias.len(), true), ("y", y.len(), false)])?;
        if y.is_empty() {
            return Ok(());
        }
        let cols = p.cols as usize;
        let rows_per_chunk = (CHUNK / cols).max(1);
        y.par_chunks_mut(rows_per_chunk * cols).for_each(|block| {
            for row in block.chunks_mut(cols) {
                for (y, &b) in row.iter_mut().zip(bias) {
                    *y += b;
                }
            }
        });
        Ok(())
    }

    fn slice_cols_fwd(&self, p: &ColsParams, x: &[F], y: &mut [F]) -> Result<()> {
        check_cols("slice_cols", p, ("x", x.len()), ("y", y.len()))?;
        let (cols, off, w) = (p.cols as usize, p.off as usize, p.width as usize);
        cols_copy::<F, false>(w, x, (cols, off), y, (w, 0));
        Ok(())
    }

    fn slice_cols_bwd(&self, p: &ColsParams, dy: &[F], dx: &mut [F]) -> Result<()> {
        check_cols("slice_cols", p, ("dx", dx.len()), ("dy", dy.len()))?;
        let (cols, off, w) = (p.cols as usize, p.off as usize, p.width as usize);
        cols_copy::<F, true>(w, dy, (w, 0), dx, (cols, off));
        Ok(())
    }

    fn concat_cols_fwd(&self, p: &ColsParams, x: &[F], y: &mut [F]) -> Result<()> {
        check_cols("concat_cols", p, ("y", y.len()), ("x", x.len()))?;
        let (cols, off, w) = (p.cols as usize, p.off as usize, p.width as usize);
        cols_copy::<F, false>(w, x, (w, 0), y, (cols, off));
        Ok(())
    }

    fn concat_cols_bwd(&self, p: &ColsParams, dy: &[F], dx: &mut [F]) -> Result<()> {
        check_cols("concat_cols", p, ("dy", dy.len()), ("dx", dx.len()))?;
        let (cols, off, w) = (p.cols as usize, p.off as usize, p.width as usize);
        cols_copy::<F, true>(w, dy, (cols, off), dx, (w, 0));
        Ok(())
    }

    fn sum_rows_masked_mean_fwd(&self, p: &PoolParams, x: &[F], mask: &[u8], y: &mut [F]) -> Result<()> {
        check_pool(p, ("x", x.len()), ("y", y.len()), mask.len())?;
        let (seq, hidden) = (p.seq as usize, p.hidden as usize);
        if y.is_empty() {
            return Ok(());
        }
        y.par_chunks_mut(hidden).enumerate().for_each(|(b, y)| {
            let mask = &mask[b * seq..(b + 1) * seq];
            y.fill(F::zero());
            for (t, &m) in mask.iter().enumerate() {
                if m != 0 {
                    let (w, row) = (F::c(m as f64), &x[(b * seq + t) * hidden..(b * seq + t + 1) * hidden]);
                    y.iter_mut().zip(row).for_each(|(y, &x)| *y += w * x);
                }
            }
            let n = mask_count::<F>(mask);
            y.iter_mut().for_each(|y| *y /= n);
        });
        Ok(())
    }

    fn sum_rows_masked_mean_bwd(&self, p: &PoolParams, mask: &[u8], dy: &[F], dx: &mut [F]) -> Result<()> {
        check_pool(p, ("dx", dx.len()), ("dy", dy.len()), mask.len())?;
        let (seq, hidden) = (p.seq as usize, p.hidden as usize);
        if dx.is_empty() {
            return Ok(());
        }
        dx.par_chunks_mut(seq * hidden).enumerate().for_each(|(b, dx)| {
            let (mask, dy) = (&mask[b * seq..(b + 1) * seq], &dy[b * hidden..(b + 1) * hidden]);
            let n = mask_count::<F>(mask);
            for (dx, &m) in dx.chunks_mut(hidden).zip(mask) {
                if m != 0 {
                    let w = F::c(m as f64) / n;
                    dx.iter_mut().zip(dy).for_each(|(dx, &d)| *dx += w * d);
                }
            }
        });
        Ok(())
    }
}
