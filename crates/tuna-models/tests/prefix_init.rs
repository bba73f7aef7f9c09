//! Activation-based prefix inits on the tiny fixtures (GPT-2, Llama with GQA, BERT): a prefix
//! initialized from tokens `t1..tn` is those tokens' own keys and values, so the model's outputs on
//! content with the prefix equal its outputs with `t1..tn` in the context (content at positions
//! `n..`, as PEFT places it): checked against the KV-cache path (the tokens fed first, then the
//! content through the cache) and, for decoders, against one forward over `[t1..tn, content]`.
//! For prefix tuning, P-tuning v2 and the MLP variant (whose last layer is fitted).

mod adapt_common;
mod golden_common;

use adapt_common::{frozen, ids, Fixture, Model, Net, ARCHS};
use std::sync::Arc;
use tuna_autograd::{no_grad, Ints, Tensor};
use tuna_kernels::testing::Tol;
use tuna_kernels::Cpu;
use tuna_models::adapt::{Adaptable, Method, PromptInit};
use tuna_models::generate::KvCache;

/// Prefix path against context path in f64: the same keys and values reach the same attention by
/// two routes (the kernel's prefix input, or concatenated keys), so only summation order differs;
/// the MLP variant adds its fitted table's rounding (an f64 solve of a small Gram system).
const SAME: Tol = Tol::new("prefix of real tokens vs those tokens in context (f64)", 1e-9, 1e-7);

/// Virtual tokens (the MLP variant's hidden size, 8, must be at least this).
const N: usize = 4;

fn methods(tokens: &[u32]) -> Vec<Method> {
    let init = PromptInit::Text(tokens.to_vec());
    vec![
        Method::Prefix { n: N, projection: None, init: init.clone() },
        Method::PTuningV2 { n: N, init: init.clone() },
        Method::Prefix { n: N, projection: Some(8), init },
    ]
}

/// Two content rows of length 5; decoders left-pad row 1 by 2, BERT right-pads it.
fn content(arch: &str, vocab: usize) -> (Vec<u32>, Vec<u8>) {
    let ids = ids(10, vocab, 7);
    let mask: Vec<u8> =
        if arch == "bert" { vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0] } else { vec![1, 1, 1, 1, 1, 0, 0, 1, 1, 1] };
    (ids, mask)
}

/// The entries of `out` (`[2, 5, width]`) at real content positions, row by row.
fn real(out: &[f64], mask: &[u8], width: usize) -> Vec<f64> {
    mask.iter()
        .enumerate()
        .filter(|(_, &m)| m == 1)
        .flat_map(|(i, _)| out[i * width..(i + 1) * width].to_vec())
        .collect()
}

/// The base model's outputs on the content after `tokens` went through a KV cache (both rows).
fn through_cache(m: &Model<f64>, tokens: &[u32], ids: &[u32], mask: &[u8]) -> Tensor<Cpu, f64> {
    let dev = Arc::new(Cpu);
    let n = tokens.len();
    let both: Vec<u32> = tokens.iter().chain(tokens).copied().collect();
    let t = Ints::new(&dev, &[2, n], &both).unwrap();
    let tpos = Ints::new(&dev, &[2, n], &tuna_models::positions::positions(2, n, 0)).unwrap();
    let c = Ints::new(&dev, &[2, 5], ids).unwrap();
    // Content positions continue after the cached tokens: n + (its own count of real tokens).
    let pos: Vec<u32> = tuna_models::positions::positions_from_mask(mask, 2, 5).iter().map(|&p| p + n as u32).collect();
    let pos = Ints::new(&dev, &[2, 5], &pos).unwrap();
    let wide: Vec<u8> = mask.chunks(5).flat_map(|r| std::iter::repeat_n(1u8, n).chain(r.iter().copied())).collect();
    let wide = Ints::new(&dev, &[2, n + 5], &wide).unwrap();
    let cmask = Ints::new(&dev, &[2, 5], mask).unwrap();
    no_grad(|| match &m.net {
        Net::Llama(l) => {
            let mut cache = KvCache::new(l.layers.len());
            l.forward(&t, &tpos, None, Some(&mut cache)).unwrap();
            l.forward(&c, &pos, Some(&wide), Some(&mut cache)).unwrap()
        }
        Net::Gpt2(g) => {
            let mut cache = KvCache::new(g.blocks.len());
            g.forward_cached(&t, &tpos, None, Some(&mut cache)).unwrap();
            g.forward_cached(&c, &pos, Some(&wide), Some(&mut cache)).unwrap()
        }
        Net::Bert(b) => {
            let mut cache = KvCache::new(b.layers.len());
            let ones = Ints::new(&dev, &[2, n], &vec![1u8; 2 * n]).unwrap();
            b.encode_cached(&t, &ones, Some(&mut cache)).unwrap();
            b.encode_cached(&c, &cmask, Some(&mut cache)).unwrap().0
        }
        Net::T5(_) => unreachable!("T5 has its own tests (golden_t5, peft_t5)"),
    })
}

/// A decoder's outputs on `[tokens, content]` in one forward without a cache (content rows keep
/// their left padding after the tokens, masked out).
fn in_one_forward(m: &Model<f64>, tokens: &[u32], ids: &[u32], mask: &[u8]) -> Vec<f64> {
    let dev = Arc::new(Cpu);
    let n = tokens.len();
    let w = n + 5;
    let all: Vec<u32> = ids.chunks(5).flat_map(|r| tokens.iter().chain(r).copied().collect::<Vec<_>>()).collect();
    let wide: Vec<u8> = mask.chunks(5).flat_map(|r| std::iter::repeat_n(1u8, n).chain(r.iter().copied())).collect();
    let pos = tuna_models::positions::positions_from_mask(&wide, 2, w);
    let (t, p, mk) = (
        Ints::new(&dev, &[2, w], &all).unwrap(),
        Ints::new(&dev, &[2, w], &pos).unwrap(),
        Ints::new(&dev, &[2, w], &wide).unwrap(),
    );
    let out = no_grad(|| match &m.net {
        Net::Llama(l) => l.forward(&t, &p, Some(&mk), None).unwrap(),
        Net::Gpt2(g) => g.forward_masked(&t, &p, Some(&mk)).unwrap(),
        Net::Bert(_) => unreachable!("BERT's tokens would see the content"),
        Net::T5(_) => unreachable!("T5 has its own tests (golden_t5, peft_t5)"),
    });
    // Drop the token columns: [2, w, vocab] -> [2, 5, vocab].
    let v = out.to_vec().unwrap();
    let width = out.shape()[2];
    (0..2).flat_map(|r| v[(r * w + n) * width..(r + 1) * w * width].to_vec()).collect()
}

#[test]
fn a_prefix_of_real_tokens_equals_those_tokens_in_the_context() {
    for arch in ARCHS {
        let base: Model<f64> = frozen(arch);
        let vocab = base.shape().vocab;
        let tokens = ids(N, vocab, 3);
        let (c, mask) = content(arch, vocab);
        let cached = through_cache(&base, &tokens, &c, &mask);
        let width = cached.shape()[2];
        let want = real(&cached.to_vec().unwrap(), &mask, width);
        // Without a prefix the outputs differ, so the comparisons below can fail.
        let plain = real(&base.outputs(&c, 2, Some(&mask)).to_vec().unwrap(), &mask, width);
        let moved = plain.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(moved > 1e-3, "{arch}: the tokens in context change nothing ({moved:e})");
        if arch != "bert" {
            let one = real(&in_one_forward(&base, &tokens, &c, &mask), &mask, width);
            SAME.assert_close(&format!("{arch}: KV-cache path vs one forward"), &want, &one);
        }
        for method in methods(&tokens) {
            let mut m: Model<f64> = frozen(arch);
            m.apply(&method, 11);
            // The prefix holds the model's own keys and values of the tokens, per layer.
            let own = base.net_token_kv(&tokens);
            let kv = m.adapt().prefix_kv().unwrap();
            for (i, ((k, v), (ok, ov))) in kv.iter().zip(&own).enumerate() {
                let what = format!("{arch} {}: layer {i}", method.name());
                SAME.assert_close(&format!("{what} keys"), &k.to_vec().unwrap(), &ok.to_vec().unwrap());
                SAME.assert_close(&format!("{what} values"), &v.to_vec().unwrap(), &ov.to_vec().unwrap());
            }
            let got = real(&m.outputs(&c, 2, Some(&mask)).to_vec().unwrap(), &mask, width);
            SAME.assert_close(&format!("{arch} {}: prefix vs KV-cache path", method.name()), &got, &want);
        }
    }
}

#[test]
fn vocab_and_label_inits_start_from_real_tokens_and_random_does_not() {
    let base: Model<f64> = frozen("llama");
    let vocab = base.shape().vocab;
    let kv_of = |init: PromptInit, seed: u64| {
        let mut m: Model<f64> = frozen("llama");
        m.apply(&Method::Prefix { n: N, projection: None, init }, seed);
        m.adapt().prefix_kv().unwrap()[0].0.to_vec().unwrap()
    };
    // Labels: the words' tokens repeated to n, run as one sequence.
    let words = ids(2, vocab, 5);
    let repeated: Vec<u32> = (0..N).map(|i| words[i % 2]).collect();
    let own = base.net_token_kv(&repeated)[0].0.to_vec().unwrap();
    SAME.assert_close("labels init, layer 0 keys", &kv_of(PromptInit::ClassLabels(words), 1), &own);
    // Vocab: seeded (the same seed gives the same prefix, another seed another).
    let (a, b) = (kv_of(PromptInit::SampleVocab, 1), kv_of(PromptInit::SampleVocab, 2));
    assert_eq!(a, kv_of(PromptInit::SampleVocab, 1));
    assert_ne!(a, b);
    // Random is PEFT's N(0, 1) table: no token's keys.
    assert_ne!(kv_of(PromptInit::Random, 1), own);
    // An empty text and an MLP narrower than the prefix are refused by name.
    let mut m: Model<f64> = frozen("llama");
    let e =
        m.install(&Method::Prefix { n: N, projection: None, init: PromptInit::Text(vec![]) }, 0, Some("")).unwrap_err();
    assert!(e.to_string().contains("no tokens"), "{e}");
    let e = m
        .install(&Method::Prefix { n: N, projection: Some(N - 1), init: PromptInit::SampleVocab }, 0, None)
        .unwrap_err();
    assert!(e.to_string().contains("--prefix-hidden"), "{e}");
}

/// The model's own keys and values of `ids` (no adaptation installed on `self`).
trait OwnKv {
    fn net_token_kv(&self, ids: &[u32]) -> Vec<(Tensor<Cpu, f64>, Tensor<Cpu, f64>)>;
}

impl OwnKv for Model<f64> {
    fn net_token_kv(&self, ids: &[u32]) -> Vec<(Tensor<Cpu, f64>, Tensor<Cpu, f64>)> {
        match &self.net {
            Net::Gpt2(n) => n.token_kv(ids).unwrap(),
            Net::Llama(n) => n.token_kv(ids).unwrap(),
            Net::Bert(n) => n.token_kv(ids).unwrap(),
            Net::T5(n) => n.token_kv(ids).unwrap(),
        }
    }
}
