//! Prefix initializations from real tokens: the frozen model runs over the tokens (sampled
//! vocabulary, a text or the label words) as one sequence at positions `0..n`, and each layer's
//! own keys (after RoPE where the model applies it, as the attention kernel expects a prefix) and
//! values at those positions become the prefix. With such a prefix the content sees exactly what it
//! would see with those tokens in its context (the tokens' own keys and values, the content at
//! positions `n..`), which is where training starts from instead of an `N(0, 1)` table.
//!
//! The MLP variant (`prefix-mlp`) computes its table as `w2 tanh(w1 E + b1) + b2`, so no single
//! weight holds it: tuna keeps `E`, `w1` and `b1` at their random init and fits the last layer.
//! `b2` takes the mean of the target rows and `w2` the minimum-norm solution of
//! `H w2^T = T - b2` (`H = tanh(w1 E + b1)`, `[n, hidden]`), solved in f64 through the `n x n`
//! Gram matrix `H H^T`; this needs `n <= hidden` (the rows of `H` independent). The table then
//! equals the target up to rounding, and every MLP weight keeps a gradient (zeroing `w2` and putting
//! the target in `b2` would give all `n` positions the same bias row).

use super::{LayerKv, PrefixParams, PrefixTuning, PromptInit};
use crate::error::{Error, Result};
use tuna_autograd::ops::elem::tanh;
use tuna_autograd::ops::linear::{linear, WeightLayout};
use tuna_autograd::ops::Kernels;
use tuna_autograd::{Float, Tensor};
use tuna_kernels::rng::SplitMix64;
use tuna_kernels::Elem;

/// The `n` token ids a non-random init runs the model over: `None` for [`PromptInit::Random`];
/// sampled uniformly from the vocabulary (seeded), or the given ids repeated or cut to `n`.
pub(crate) fn init_tokens(init: &PromptInit, n: usize, vocab: usize, seed: u64) -> Result<Option<Vec<u32>>> {
    let (ids, what) = match init {
        PromptInit::Random => return Ok(None),
        PromptInit::SampleVocab => {
            // Its own stream: the random MLP init draws from `seed` too.
            let mut rng = SplitMix64::new(seed ^ 0x70ce_b0ca_5eed);
            return Ok(Some((0..n).map(|_| (rng.next_u64() % vocab as u64) as u32).collect()));
        }
        PromptInit::Text(ids) => (ids, "TEXT"),
        PromptInit::ClassLabels(ids) => (ids, "CLASS_LABELS"),
    };
    if ids.is_empty() {
        return Err(Error::InvalidArgument(format!("prefix init {what}: no tokens to initialize from")));
    }
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(Error::InvalidArgument(format!("prefix init {what}: token {bad} >= vocab {vocab}")));
    }
    Ok(Some((0..n).map(|i| ids[i % ids.len()]).collect()))
}

/// The `[n, layers * 2 * kv_heads * head_dim]` table (row-major, PEFT's layout: per layer its keys'
/// block, then its values') of per-layer keys and values `[n, kv_heads, head_dim]`.
pub(crate) fn table_of<B: Kernels<E>, E: Float>(kv: &[LayerKv<B, E>], n: usize, w: usize) -> Result<Vec<E>> {
    let layers: Vec<(Vec<E>, Vec<E>)> =
        kv.iter().map(|(k, v)| Ok((k.to_vec()?, v.to_vec()?))).collect::<Result<_>>()?;
    for (i, (k, v)) in layers.iter().enumerate() {
        if k.len() != n * w || v.len() != n * w {
            return Err(Error::InvalidArgument(format!(
                "prefix init: layer {i} gave {} keys and {} values, expected {n} x {w}",
                k.len(),
                v.len()
            )));
        }
    }
    let mut t = Vec::with_capacity(n * w * 2 * layers.len());
    for j in 0..n {
        for (k, v) in &layers {
            t.extend_from_slice(&k[j * w..(j + 1) * w]);
            t.extend_from_slice(&v[j * w..(j + 1) * w]);
        }
    }
    Ok(t)
}

impl<B: Kernels<E>, E: Float> PrefixTuning<B, E> {
    /// Start the prefix at `kv` (each layer's `[n, kv_heads, head_dim]` keys and values, e.g. a
    /// model's own for real tokens): the table itself, or for the MLP variant the fit described in
    /// the module docs. The trainable tensors are replaced by new ones (same names and shapes).
    pub fn start_from(&mut self, kv: &[LayerKv<B, E>]) -> Result<()> {
        if kv.len() != self.layers {
            return Err(Error::InvalidArgument(format!(
                "prefix init: {} layers of keys/values for a {}-layer prefix",
                kv.len(),
                self.layers
            )));
        }
        let (n, width) = (self.n, self.width());
        let target = table_of(kv, n, self.kv_heads * self.head_dim)?;
        match &mut self.params {
            PrefixParams::Direct(t) => {
                *t = Tensor::param(t.device(), "prompt_embeddings", &[n, width], &target)?;
            }
            PrefixParams::Mlp { emb, w1, b1, w2, b2 } => {
                let enc = w1.shape()[0];
                if n > enc {
                    return Err(Error::InvalidArgument(format!(
                        "prefix init from tokens: the MLP's hidden size ({enc}, --prefix-hidden) must be at least the \
                         {n} virtual tokens to reproduce them"
                    )));
                }
                let h = tanh(&linear(emb, w1, WeightLayout::OutIn, Some(b1))?)?;
                let f64s = |v: Vec<E>| v.into_iter().map(Elem::to_f64).collect::<Vec<f64>>();
                let target = f64s(target);
                let (w, b) = fit_last_layer(&f64s(h.to_vec()?), &target, n, enc, width)?;
                let dev = w2.device().clone();
                // In the masters' float (a bf16 model's f32 masters keep the fit unrounded).
                let to_m = |v: &[f64]| v.iter().map(|&x| <E::Acc as Elem>::from_f64(x)).collect::<Vec<_>>();
                *w2 = Tensor::param_from_master(&dev, "prompt_encoder.transform.2.weight", &[width, enc], &to_m(&w))?;
                *b2 = Tensor::param_from_master(&dev, "prompt_encoder.transform.2.bias", &[width], &to_m(&b))?;
            }
        }
        Ok(())
    }
}

/// `(w [width, enc], b [width])` with `h w^T + b = target` for `h` `[n, enc]` (rows independent)
/// and `target` `[n, width]`: `b` the mean target row, `w` the minimum-norm solution
/// `(G^-1 R)^T h` with `G = h h^T` and `R = target - b` (Cholesky of `G`).
fn fit_last_layer(h: &[f64], target: &[f64], n: usize, enc: usize, width: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut b = vec![0.0; width];
    for row in target.chunks(width) {
        b.iter_mut().zip(row).for_each(|(s, &x)| *s += x / n as f64);
    }
    // G = h h^T, then its Cholesky factor L (lower, in place).
    let mut g = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let d: f64 = (0..enc).map(|e| h[i * enc + e] * h[j * enc + e]).sum();
            g[i * n + j] = d;
        }
    }
    for j in 0..n {
        let d = g[j * n + j] - (0..j).map(|k| g[j * n + k] * g[j * n + k]).sum::<f64>();
        if d.partial_cmp(&(1e-10 * enc as f64)) != Some(std::cmp::Ordering::Greater) {
            return Err(Error::InvalidArgument(
                "prefix init: the MLP's hidden activations of the virtual tokens are linearly dependent; \
                 another --seed or a larger --prefix-hidden avoids it"
                    .into(),
            ));
        }
        let d = d.sqrt();
        g[j * n + j] = d;
        for i in j + 1..n {
            let s = g[i * n + j] - (0..j).map(|k| g[i * n + k] * g[j * n + k]).sum::<f64>();
            g[i * n + j] = s / d;
        }
    }
    // X = G^-1 R, column by column of R: forward then back substitution.
    let mut x = vec![0.0; n * width];
    let mut col = vec![0.0; n];
    for c in 0..width {
        for i in 0..n {
            let s = target[i * width + c] - b[c] - (0..i).map(|k| g[i * n + k] * col[k]).sum::<f64>();
            col[i] = s / g[i * n + i];
        }
        for i in (0..n).rev() {
            let s = col[i] - (i + 1..n).map(|k| g[k * n + i] * col[k]).sum::<f64>();
            col[i] = s / g[i * n + i];
        }
        for i in 0..n {
            x[i * width + c] = col[i];
        }
    }
    // w[c, e] = sum_i X[i, c] h[i, e].
    let mut w = vec![0.0; width * enc];
    for i in 0..n {
        for c in 0..width {
            let xc = x[i * width + c];
            let row = &mut w[c * enc..(c + 1) * enc];
            row.iter_mut().zip(&h[i * enc..(i + 1) * enc]).for_each(|(o, &he)| *o += xc * he);
        }
    }
    Ok((w, b))
}

#[cfg(test)]
mod tests {
    use super::fit_last_layer;

    #[test]
    fn the_last_layer_fit_reproduces_its_target() {
        let (n, enc, width) = (4, 7, 5);
        let h: Vec<f64> = (0..n * enc).map(|i| ((i * 37 % 11) as f64 / 11.0 - 0.5).tanh()).collect();
        let t: Vec<f64> = (0..n * width).map(|i| (i * 13 % 17) as f64 - 8.0).collect();
        let (w, b) = fit_last_layer(&h, &t, n, enc, width).unwrap();
        for i in 0..n {
            for c in 0..width {
                let y: f64 = (0..enc).map(|e| h[i * enc + e] * w[c * enc + e]).sum::<f64>() + b[c];
                assert!((y - t[i * width + c]).abs() < 1e-9, "row {i} col {c}: {y} vs {}", t[i * width + c]);
            }
        }
        // Dependent rows are refused, not solved badly.
        let mut dup = h.clone();
        dup.copy_within(0..enc, enc);
        assert!(fit_last_layer(&dup, &t, n, enc, width).is_err());
    }
}
