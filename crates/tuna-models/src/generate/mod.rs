//! Text generation for decoders: greedy and sampled (temperature, top-k, top-p) decoding of one
//! sequence, prefilling the prompt once and then feeding one token per step through a KV cache.

mod cache;

pub use cache::KvCache;
use tuna_kernels::rng::SplitMix64;

use crate::error::{Error, Result};
use tuna_autograd::ops::Kernels;
use tuna_autograd::{no_grad, Float};

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// The most likely token (the first of equals).
    Greedy,
    /// A draw from `softmax(logits / temperature)`, restricted (in this order, as Hugging Face's
    /// logits processors do) to the `top_k` most likely tokens and to the smallest most-likely set
    /// whose probability reaches `top_p`. `seed` makes the draws reproducible.
    Sample { temperature: f32, top_k: Option<usize>, top_p: Option<f32>, seed: u64 },
}

/// A decoder generation can drive (Llama; GPT-2).
pub trait CausalLm<B: Kernels<E>, E: Float> {
    /// An empty cache for this model.
    fn new_cache(&self) -> KvCache<B, E>;
    /// Run `ids` (one sequence; the tokens after those already in `cache`) at `positions`,
    /// appending their keys and values to `cache`, and return the logits of the last position
    /// (`[vocab]`).
    fn logits_step(&self, ids: &[u32], positions: &[u32], cache: &mut KvCache<B, E>) -> Result<Vec<E>>;
}

/// Generate up to `max_new_tokens` tokens after `prompt` (positions from 0), stopping after `eos`
/// when it is produced. Returns the new tokens only (ending with `eos` if it was produced). Runs
/// under `no_grad`.
pub fn generate<B, E, M>(
    model: &M,
    prompt: &[u32],
    max_new_tokens: usize,
    sampling: &Sampling,
    eos: Option<u32>,
) -> Result<Vec<u32>>
where
    B: Kernels<E>,
    E: Float,
    M: CausalLm<B, E> + ?Sized,
{
    if prompt.is_empty() {
        return Err(Error::InvalidArgument("generate: the prompt must hold at least one token".into()));
    }
    validate(sampling)?;
    let mut rng = match sampling {
        Sampling::Sample { seed, .. } => Some(SplitMix64::new(*seed)),
        Sampling::Greedy => None,
    };
    no_grad(|| {
        let mut cache = model.new_cache();
        // Room for every token up front: the cache's buffers never regrow.
        cache.reserve(prompt.len() + max_new_tokens);
        let mut out = Vec::with_capacity(max_new_tokens);
        if max_new_tokens == 0 {
            return Ok(out);
        }
        let positions: Vec<u32> = (0..prompt.len() as u32).collect();
        let mut logits = model.logits_step(prompt, &positions, &mut cache)?;
        loop {
            let scores: Vec<f64> = logits.iter().map(|&x| x.to_f64()).collect();
            let next = match (sampling, rng.as_mut()) {
                (Sampling::Sample { temperature, top_k, top_p, .. }, Some(r)) => {
                    sample(&scores, *temperature, *top_k, *top_p, r)
                }
                _ => argmax(&scores),
            } as u32;
            out.push(next);
            if out.len() == max_new_tokens || eos == Some(next) {
                return Ok(out);
            }
            let pos = (prompt.len() + out.len() - 1) as u32;
            logits = model.logits_step(&[next], &[pos], &mut cache)?;
        }
    })
}

impl Sampling {
    /// Checks the settings: a positive finite temperature, `top_k` at least 1, `top_p` in (0, 1].
    pub fn validate(&self) -> Result<()> {
        validate(self)
    }
}

fn validate(s: &Sampling) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidArgument(format!("sampling: {m}")));
    if let Sampling::Sample { temperature, top_k, top_p, .. } = *s {
        if !(temperature > 0.0 && temperature.is_finite()) {
            return bad(format!("temperature must be positive and finite, got {temperature}"));
        }
        if top_k == Some(0) {
            return bad("top_k must be at least 1".into());
        }
        if let Some(p) = top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad(format!("top_p must be in (0, 1], got {p}"));
            }
        }
    }
    Ok(())
}

/// Index of the largest score (the first of equals; NaN never wins).
pub fn argmax(scores: &[f64]) -> usize {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] || scores[best].is_nan() {
            best = i;
        }
    }
    best
}

/// The tokens that survive temperature, top-k and top-p, most likely first, with their
/// probabilities (renormalized to sum to one).
pub fn candidates(scores: &[f64], temperature: f32, top_k: Option<usize>, top_p: Option<f32>) -> Vec<(usize, f64)> {
    let t = temperature as f64;
    let mut c: Vec<(usize, f64)> = scores.iter().map(|&s| s / t).enumerate().filter(|(_, s)| !s.is_nan()).collect();
    // Stable: among equal scores the lower index comes first, as in `argmax`.
    c.sort_by(|a, b| b.1.total_cmp(&a.1));
    if let Some(k) = top_k {
        c.truncate(k.max(1));
    }
    let max = c.first().map_or(0.0, |x| x.1);
    let mut sum = 0.0;
    for x in c.iter_mut() {
        x.1 = (x.1 - max).exp();
        sum += x.1;
    }
    c.iter_mut().for_each(|x| x.1 /= sum);
    if let Some(p) = top_p {
        // Keep the smallest prefix whose mass reaches p (at least one token).
        let mut mass = 0.0;
        let keep = c.iter().position(|x| {
            mass += x.1;
            mass >= p as f64
        });
        c.truncate(keep.map_or(c.len(), |i| i + 1));
        let sum: f64 = c.iter().map(|x| x.1).sum();
        c.iter_mut().for_each(|x| x.1 /= sum);
    }
    c
}

/// One draw from the distribution [`candidates`] describes.
pub fn sample(
    scores: &[f64],
    temperature: f32,
    top_k: Option<usize>,
    top_p: Option<f32>,
    rng: &mut SplitMix64,
) -> usize {
    let c = candidates(scores, temperature, top_k, top_p);
    let u = rng.next_f64();
    let mut acc = 0.0;
    for &(i, p) in &c {
        acc += p;
        if u < acc {
            return i;
        }
    }
    // Rounding left `acc` just below one: the last candidate.
    c.last().map_or(0, |x| x.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_apply_temperature_top_k_top_p() {
        let s = [1.0, 3.0, 2.0, 3.0, -1.0];
        let all = candidates(&s, 1.0, None, None);
        assert_eq!(all.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 3, 2, 0, 4]);
        let z: f64 = s.iter().map(|x| x.exp()).sum();
        for &(i, p) in &all {
            assert!((p - s[i].exp() / z).abs() < 1e-15);
        }
        assert_eq!(candidates(&s, 1.0, Some(1), None), [(1, 1.0)]);
        let k2 = candidates(&s, 1.0, Some(3), None);
        assert_eq!(k2.len(), 3);
        assert!((k2.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-15);
        // top-p: tokens 1 and 3 hold 2 e^3 / z ~ 0.793 of the mass, with token 2 ~ 0.939.
        assert_eq!(candidates(&s, 1.0, None, Some(0.75)).len(), 2);
        assert_eq!(candidates(&s, 1.0, None, Some(0.8)).len(), 3);
        assert_eq!(candidates(&s, 1.0, None, Some(0.95)).len(), 4);
        assert_eq!(candidates(&s, 1.0, None, Some(1e-9)), [(1, 1.0)]);
        // A high temperature flattens: the ratio of the top two probabilities is e^((3-2)/T).
        let hot = candidates(&s, 4.0, None, None);
        assert!((hot[0].1 / hot[2].1 - 0.25f64.exp()).abs() < 1e-12);
        assert_eq!(argmax(&s), 1);
    }

    #[test]
    fn draws_follow_the_distribution() {
        let s = [0.0, 1.0, 2.0];
        let p = candidates(&s, 1.0, None, None);
        let mut r = SplitMix64::new(3);
        let n = 60_000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[sample(&s, 1.0, None, None, &mut r)] += 1;
        }
        for &(i, pi) in &p {
            let f = counts[i] as f64 / n as f64;
            assert!((f - pi).abs() < 0.01, "token {i}: {f} vs {pi}");
        }
    }

    #[test]
    fn bad_settings_are_errors() {
        let s = |temperature, top_k, top_p| Sampling::Sample { temperature, top_k, top_p, seed: 0 };
        assert!(validate(&s(0.0, None, None)).unwrap_err().to_string().contains("temperature"));
        assert!(validate(&s(1.0, Some(0), None)).unwrap_err().to_string().contains("top_k"));
        assert!(validate(&s(1.0, None, Some(1.5))).unwrap_err().to_string().contains("top_p"));
        assert!(validate(&s(0.7, Some(5), Some(0.9))).is_ok());
    }
}
