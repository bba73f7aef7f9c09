//! Embedding on the CPU: rayon over output rows (forward), over table rows after grouping the
//! tokens by id (backward, deterministic: each table row is summed by one task in token order),
//! and over prompt rows (prompt gradient). Generic over the float ([`CpuFloat`]): f32, or f64 for
//! gradient checks.

use super::{
    check_bwd, check_fwd, source, token_position, validate_at, validate_ids, EmbedParams, EmbeddingKernel, SoftPrompt,
    Source,
};
use crate::backend::{Cpu, CpuFloat};
use crate::error::Result;
use rayon::prelude::*;

/// Insertion point of row `b` (0 without a prompt).
fn at_of(at: Option<&[u32]>, b: usize) -> usize {
    at.map_or(0, |a| a[b] as usize)
}

impl<F: CpuFloat> EmbeddingKernel<F> for Cpu {
    fn embed_fwd(
        &self,
        p: &EmbedParams,
        table: &[F],
        ids: &[u32],
        prompt: Option<SoftPrompt<'_, Self, F>>,
        out: &mut [F],
    ) -> Result<()> {
        check_fwd::<Cpu, F>(p, table, ids, prompt.as_ref(), out)?;
        validate_ids(ids, p.vocab as usize)?;
        if let Some(sp) = &prompt {
            validate_at(sp.at, p.seq as usize)?;
        }
        let (h, seq, n, len) = (p.hidden as usize, p.seq as usize, p.n_prompt as usize, p.out_len());
        let at = prompt.map(|sp| sp.at);
        let vectors = prompt.map_or(&[][..], |sp| sp.vectors);
        out.par_chunks_mut(h).enumerate().for_each(|(r, row)| {
            let (b, t) = (r / len, r % len);
            let src = match source(t, at_of(at, b), n) {
                Source::Token(j) => &table[ids[b * seq + j] as usize * h..][..h],
                Source::Prompt(k) => &vectors[k * h..][..h],
            };
            row.copy_from_slice(src);
        });
        Ok(())
    }

    fn embed_bwd(
        &self,
        p: &EmbedParams,
        ids: &[u32],
        at: Option<&[u32]>,
        d_out: &[F],
        d_table: Option<&mut [F]>,
        d_prompt: Option<&mut [F]>,
    ) -> Result<()> {
        check_bwd::<Cpu, F>(p, ids, at, d_out, d_table.as_deref(), d_prompt.as_deref())?;
        validate_ids(ids, p.vocab as usize)?;
        if let Some(at) = at {
            validate_at(at, p.seq as usize)?;
        }
        if let Some(d_table) = d_table {
            table_grad(p, ids, at, d_out, d_table);
        }
        if let Some(d_prompt) = d_prompt {
            let (h, len) = (p.hidden as usize, p.out_len());
            d_prompt.par_chunks_mut(h).enumerate().for_each(|(k, row)| {
                for b in 0..p.batch as usize {
                    let g = &d_out[(b * len + at_of(at, b) + k) * h..][..h];
                    row.iter_mut().zip(g).for_each(|(d, &g)| *d += g);
                }
            });
        }
        Ok(())
    }
}

/// `d_table[ids[i]] += d_out[position of token i]`, grouping tokens by id with a counting sort so
/// that each table row is owned by one task (no data race, same order every run).
fn table_grad<F: CpuFloat>(p: &EmbedParams, ids: &[u32], at: Option<&[u32]>, d_out: &[F], d_table: &mut [F]) {
    let (h, seq, n, len, vocab) =
        (p.hidden as usize, p.seq as usize, p.n_prompt as usize, p.out_len(), p.vocab as usize);
    let mut start = vec![0usize; vocab + 1];
    for &id in ids {
        start[id as usize + 1] += 1;
    }
    for v in 0..vocab {
        start[v + 1] += start[v];
    }
    let mut fill = start.clone();
    let mut order = vec![0usize; ids.len()];
    for (i, &id) in ids.iter().enumerate() {
        order[fill[id as usize]] = i;
        fill[id as usize] += 1;
    }
    d_table.par_chunks_mut(h).enumerate().for_each(|(v, row)| {
        for &i in &order[start[v]..start[v + 1]] {
            let (b, j) = (i / seq, i % seq);
            let t = token_position(j, at_of(at, b), n);
            let g = &d_out[(b * len + t) * h..][..h];
            row.iter_mut().zip(g).for_each(|(d, &g)| *d += g);
        }
    });
}
