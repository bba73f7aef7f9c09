//! Token positions as Hugging Face computes them, for every architecture: `start..` in each row,
//! or from a padding mask (`cumsum(mask) - 1`, padding at 1); and the causal LM's next-token
//! targets.

use crate::IGNORE_INDEX;

/// Positions `start..start + seq` for each of `batch` rows, row-major.
pub fn positions(batch: usize, seq: usize, start: u32) -> Vec<u32> {
    (0..batch).flat_map(|_| start..start + seq as u32).collect()
}

/// Hugging Face's positions under a padding mask (`[batch, len]`, 1 = token): each token's count of
/// tokens before it in its row (`cumsum(mask) - 1`), and 1 at padding (as transformers fills it).
pub fn positions_from_mask(mask: &[u8], batch: usize, len: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(batch * len);
    for row in mask.chunks(len.max(1)).take(batch) {
        let mut n = 0u32;
        for &m in row {
            n += (m != 0) as u32;
            out.push(if m != 0 { n - 1 } else { 1 });
        }
    }
    out
}

/// Targets for the logits at each position: the next label in the row, [`IGNORE_INDEX`] at each
/// row's last position (HF shifts logits and labels; the mean over the kept rows is the same).
pub fn next_token_targets(labels: &[i32], batch: usize, seq: usize) -> Vec<i32> {
    let mut t = vec![IGNORE_INDEX; batch * seq];
    for r in 0..batch {
        for i in 0..seq.saturating_sub(1) {
            t[r * seq + i] = labels[r * seq + i + 1];
        }
    }
    t
}
