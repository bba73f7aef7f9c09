//! Behavior of the adaptation methods on the tiny fixtures (GPT-2, Llama with GQA, BERT): frozen
//! bases stay frozen, every method trains, gradients match central differences, the KV cache and
//! left padding see the same model, LoRA merges and unmerges, and every method survives a
//! save/load in PEFT's format.

mod adapt_common;
mod golden_common;

use adapt_common::{frozen, ids, load, peft_methods, perturb, CpuTape, Fixture, Model, Net, ARCHS};
use std::sync::Arc;
use tuna_autograd::optim::{AdamW, AdamWParams};
use tuna_autograd::{no_grad, Ints, Tensor};
use tuna_kernels::testing::Tol;
use tuna_kernels::Cpu;
use tuna_models::adapt::{peft, Adaptable, LoraConfig, Method, PrefixKind, PrefixParams, PrefixTuning, PromptInit};
use tuna_models::generate::{generate, Sampling};

/// `expr` with `$x` bound to the architecture inside a model's [`Net`], whatever it is.
macro_rules! on {
    ($m:expr, $x:ident => $body:expr) => {
        match $m {
            Net::Gpt2($x) => $body,
            Net::Llama($x) => $body,
            Net::Bert($x) => $body,
            Net::T5($x) => $body,
        }
    };
}

/// `|got - want| <= rel * (max |want| + |want|)`: relative to the output's scale, so entries
/// near zero do not demand more than rounding can give.
fn assert_rel(what: &str, rel: f64, got: &[f32], want: &[f32]) {
    let max = want.iter().fold(0.0f64, |m, &w| m.max((w as f64).abs()));
    Tol::new("relative to max |ref|", rel * max.max(1e-30), rel).assert_close(what, got, want);
}

fn host<E: CpuTape>(t: &Tensor<Cpu, E>) -> Vec<E> {
    t.to_vec().unwrap()
}

fn out_f32(m: &Model<f32>, x: &[u32], batch: usize, mask: Option<&[u8]>) -> Tensor<Cpu, f32> {
    no_grad(|| m.outputs(x, batch, mask))
}

fn with_method<E: CpuTape>(arch: &str, method: &Method, seed: u64) -> Model<E> {
    let mut m = frozen::<E>(arch);
    m.apply(method, seed);
    m
}

fn label(arch: &str, method: &Method) -> String {
    match method {
        Method::PTuning { encoder, .. } => format!("{arch}/{}-{}", method.name(), encoder.peft_name().to_lowercase()),
        _ => format!("{arch}/{}", method.name()),
    }
}

fn lora_of(arch: &str, dropout: f32) -> Method {
    match peft_methods(arch).pop() {
        Some(Method::Lora(c)) => Method::Lora(LoraConfig { dropout, ..c }),
        other => panic!("peft_methods({arch}) should end with LoRA, got {other:?}"),
    }
}

fn adamw(params: &[(String, Tensor<Cpu, f32>)], lr: f32) -> AdamW<Cpu, f32> {
    let refs: Vec<&Tensor<Cpu, f32>> = params.iter().map(|(_, t)| t).collect();
    AdamW::new(&refs, AdamWParams::new(lr)).unwrap()
}

/// 1. A frozen base is bit-identical after training an adapter on it, has no gradients, and
///    every adapter tensor moves.
#[test]
fn frozen_means_frozen() {
    for arch in ARCHS {
        for method in peft_methods(arch) {
            let what = label(arch, &method);
            let m = with_method::<f32>(arch, &method, 7);
            let base: Vec<(String, Vec<u32>)> = m
                .named_weights()
                .iter()
                .map(|(n, t)| (n.clone(), host(t).iter().map(|x| x.to_bits()).collect()))
                .collect();
            assert!(!base.is_empty(), "{what}: no base weights");
            let params = m.adapt().params();
            let before: Vec<Vec<f32>> = params.iter().map(|(_, t)| host(t)).collect();
            let mut opt = adamw(&params, 1e-2);
            let x = ids(16, m.shape().vocab, 1);
            for _ in 0..5 {
                m.loss(&x, 2).backward().unwrap();
                for (n, t) in m.named_weights() {
                    assert!(t.grad().unwrap().is_none(), "{what}: base weight {n} has a gradient");
                    assert!(!t.requires_grad(), "{what}: base weight {n} is trainable");
                }
                opt.step().unwrap();
            }
            for ((n, want), (_, t)) in base.iter().zip(m.named_weights()) {
                let got: Vec<u32> = host(&t).iter().map(|x| x.to_bits()).collect();
                assert!(&got == want, "{what}: base weight {n} changed while training the adapter");
            }
            for ((n, t), b) in params.iter().zip(&before) {
                assert!(host(t) != *b, "{what}: adapter tensor {n} did not change in 5 steps");
            }
        }
    }
}

/// Decoder task: each row cycles through a fixed 5-token pattern (so the next token is a
/// function of the current one), `[4, 8]`. BERT: the fixed-head 3-class task of
/// [`Model::loss`] on 6 sequences whose first tokens cover the 3 classes.
fn toy_task(arch: &str) -> (Vec<u32>, usize) {
    if arch == "bert" {
        let mut x = ids(6 * 8, 96, 3);
        for r in 0..6 {
            x[r * 8] = 10 + r as u32; // classes 1, 2, 0, 1, 2, 0
        }
        (x, 6)
    } else {
        let pat = [5u32, 23, 41, 59, 77];
        ((0..4).flat_map(|r| (0..8).map(move |i| pat[(r + i) % pat.len()])).collect(), 4)
    }
}

/// Train `params` on the toy task for `steps`; returns the loss before and after.
fn train(m: &Model<f32>, params: &[(String, Tensor<Cpu, f32>)], lr: f32, steps: usize) -> (f32, f32) {
    let (x, b) = toy_task(if m.is_decoder() { "gpt2" } else { "bert" });
    let mut opt = adamw(params, lr);
    let first = host(&m.loss(&x, b))[0];
    for _ in 0..steps {
        m.loss(&x, b).backward().unwrap();
        opt.step().unwrap();
    }
    (first, host(&no_grad(|| m.loss(&x, b)))[0])
}

/// Learning rate per method: the soft prompt and prefix need larger steps (a few vectors move
/// the whole model's output); the weight-space methods take AdamW's usual 1e-2.
fn lr_for(method: &Method) -> f32 {
    match method {
        Method::Prompt { .. } | Method::Prefix { projection: None, .. } | Method::PTuningV2 { .. } => 5e-2,
        _ => 1e-2,
    }
}

/// 2. Every method, and full fine-tuning, lowers the training loss of a small task.
#[test]
fn each_method_lowers_the_loss() {
    const STEPS: usize = 40;
    const FACTOR: f32 = 0.7;
    for arch in ARCHS {
        for method in peft_methods(arch) {
            let m = with_method::<f32>(arch, &method, 11);
            let (l0, l1) = train(&m, &m.adapt().params(), lr_for(&method), STEPS);
            eprintln!("{}: loss {l0:.4} -> {l1:.4}", label(arch, &method));
            assert!(l1 < FACTOR * l0, "{}: loss {l0} -> {l1} after {STEPS} steps", label(arch, &method));
        }
        let full = load::<f32>(arch, |_| true);
        let (l0, l1) = train(&full, &full.named_weights(), 1e-2, STEPS);
        eprintln!("{arch}/full: loss {l0:.4} -> {l1:.4}");
        assert!(l1 < FACTOR * l0, "{arch}/full: loss {l0} -> {l1} after {STEPS} steps");
    }
}

/// 3. The tape's adapter gradients agree with central differences in f64, for every method on
///    every architecture (BERT's prefix and the Houlsby adapters have no PEFT reference).
#[test]
fn gradients_match_finite_differences() {
    for arch in ARCHS {
        for method in peft_methods(arch) {
            let m = with_method::<f64>(arch, &method, 5);
            perturb(m.adapt(), 0.3);
            let x = ids(12, m.shape().vocab, 2);
            let params = m.adapt().params();
            let refs: Vec<&Tensor<Cpu, f64>> = params.iter().map(|(_, t)| t).collect();
            let r = tuna_autograd::gradcheck::check(
                &refs,
                || Ok(m.loss(&x, 2)),
                1e-5,
                tuna_autograd::gradcheck::GRAD_TOL,
                6,
            )
            .unwrap_or_else(|e| panic!("{}: {e}", label(arch, &method)));
            assert!(r.checked >= params.len(), "{}: checked {} elements", label(arch, &method), r.checked);
        }
    }
}

/// 4. With every method, the KV cache (prefill, then one token) gives the last logits of the
///    full forward, and greedy generation runs and starts with that argmax.
#[test]
fn generation_through_the_kv_cache() {
    for arch in ["gpt2", "llama"] {
        for method in peft_methods(arch) {
            let what = label(arch, &method);
            let m = with_method::<f32>(arch, &method, 13);
            perturb(m.adapt(), 0.3);
            let vocab = m.shape().vocab;
            let x = ids(7, vocab, 4);
            let full = host(&out_f32(&m, &x, 1, None));
            let last = &full[full.len() - vocab..];
            let cached = no_grad(|| m.cached_last_logits(&x));
            assert_rel(&format!("{what}: cached vs full last logits"), 1e-5, &cached, last);
            let argmax = (0..vocab).fold(0, |b, i| if last[i] > last[b] { i } else { b }) as u32;
            let out = match &m.net {
                Net::Gpt2(g) => gen(g, &x),
                Net::Llama(l) => gen(l, &x),
                Net::Bert(_) | Net::T5(_) => unreachable!(),
            };
            assert_eq!(out.len(), 4, "{what}: generated {out:?}");
            assert!(out.iter().all(|&t| (t as usize) < vocab), "{what}: generated {out:?}");
            assert_eq!(out[0], argmax, "{what}: the first greedy token is the full forward's argmax");
        }
    }
}

fn gen<M: tuna_models::generate::CausalLm<Cpu, f32>>(m: &M, prompt: &[u32]) -> Vec<u32> {
    generate(m, prompt, 4, &Sampling::Greedy, None).unwrap()
}

/// 5. Under padding, the soft prompt (or prefix) sits next to each row's content: every real
///    output of a padded row (and the prompt's virtual rows) equals that sequence run alone.
///    Decoders pad on the left (positions from the mask). BERT's positions are absolute `0..t`
///    whatever the mask (as in Hugging Face), so a left-padded BERT row is another input even
///    without an adapter: BERT pads on the right for the equality, and for left padding the
///    test checks that the prompt's columns of the widened mask come right after the pads.
#[test]
fn left_padding_keeps_the_soft_prompt_next_to_the_content() {
    for arch in ARCHS {
        for method in [
            Method::Prompt { n: 3, init: PromptInit::SampleVocab },
            Method::Prefix { n: 3, projection: None, init: PromptInit::Random },
        ] {
            let what = label(arch, &method);
            let m = with_method::<f32>(arch, &method, 17);
            perturb(m.adapt(), 0.3);
            let np = m.adapt().prompt_len();
            let vocab = m.shape().vocab;
            let (s0, s1) = (ids(6, vocab, 5), ids(4, vocab, 6));
            let left = !matches!(m.net, Net::Bert(_));
            let (row1, mask1): (Vec<u32>, Vec<u8>) = if left {
                ([0, 0].iter().chain(&s1).copied().collect(), vec![0, 0, 1, 1, 1, 1])
            } else {
                (s1.iter().chain(&[0, 0]).copied().collect(), vec![1, 1, 1, 1, 0, 0])
            };
            let batch: Vec<u32> = s0.iter().chain(&row1).copied().collect();
            let mask: Vec<u8> = [1u8; 6].iter().chain(&mask1).copied().collect();
            let out = out_f32(&m, &batch, 2, Some(&mask));
            let w = out.shape()[2];
            let t = 6 + np;
            assert_eq!(out.shape(), [2, t, w], "{what}: output shape");
            let v = host(&out);
            let alone0 = host(&out_f32(&m, &s0, 1, None));
            assert_rel(&format!("{what}: unpadded row 0 vs alone"), 1e-5, &v[..t * w], &alone0);
            let alone1 = host(&out_f32(&m, &s1, 1, None));
            let real = if left { &v[(t + 2) * w..2 * t * w] } else { &v[t * w..(2 * t - 2) * w] };
            assert_rel(&format!("{what}: padded row 1 (prompt rows and content) vs alone"), 1e-5, real, &alone1);
            if let Net::Bert(b) = &m.net {
                let dev = Arc::new(Cpu);
                let x = Ints::new(&dev, &[1, 6], &[0, 0, s1[0], s1[1], s1[2], s1[3]]).unwrap();
                let mk = Ints::new(&dev, &[1, 6], &[0, 0, 1, 1, 1, 1]).unwrap();
                let (_, wide) = no_grad(|| b.encode(&x, &mk)).unwrap();
                let want: Vec<u8> = [0, 0].into_iter().chain(std::iter::repeat_n(1, np + 4)).collect();
                assert_eq!(wide.host(), want, "{what}: widened mask of a left-padded BERT row");
            }
        }
    }
}

/// The base weights of a model as host vectors, by name.
fn weights(m: &Model<f32>) -> Vec<(String, Vec<f32>)> {
    m.named_weights().iter().map(|(n, t)| (n.clone(), host(t))).collect()
}

/// Merging `W + (alpha/r) B A` into the f32 weight rounds it once per element; the logits then
/// differ from the unmerged `xW + (alpha/r) B A x` by a few f32 ulps of the activations.
const MERGED: Tol = Tol::new("merged LoRA: W + BA rounded to f32", 1e-5, 1e-5);

/// 6. Merged LoRA gives the unmerged outputs; merging twice is a no-op; unmerging gives back the
///    base weights and outputs.
#[test]
fn lora_merge_equals_unmerged() {
    for arch in ARCHS {
        let m = with_method::<f32>(arch, &lora_of(arch, 0.0), 19);
        perturb(m.adapt(), 0.3);
        let x = ids(12, m.shape().vocab, 7);
        let w0 = weights(&m);
        let o0 = host(&out_f32(&m, &x, 2, None));
        let loras = &m.adapt().lora;
        assert!(loras.values().all(|l| host(&l.b).iter().any(|&b| b != 0.0)), "{arch}: B is zero");
        for l in loras.values() {
            l.merge().unwrap();
            assert!(l.is_merged());
        }
        let w1 = weights(&m);
        let changed = w0.iter().zip(&w1).filter(|(a, b)| a.1 != b.1).count();
        assert_eq!(changed, loras.len(), "{arch}: merging changes exactly the adapted weights");
        let o1 = host(&out_f32(&m, &x, 2, None));
        MERGED.assert_close(&format!("{arch}: merged vs unmerged outputs"), &o1, &o0);
        for l in loras.values() {
            l.merge().unwrap();
        }
        assert!(weights(&m) == w1, "{arch}: a second merge changed the weights");
        assert!(host(&out_f32(&m, &x, 2, None)) == o1, "{arch}: a second merge changed the outputs");
        for l in loras.values() {
            l.unmerge().unwrap();
            assert!(!l.is_merged());
        }
        for ((n, want), (_, got)) in w0.iter().zip(weights(&m)) {
            assert_rel(&format!("{arch}: {n} after unmerge"), 1e-6, &got, want);
        }
        let o2 = host(&out_f32(&m, &x, 2, None));
        assert_rel(&format!("{arch}: outputs after unmerge"), 1e-5, &o2, &o0);
    }
}

/// 7. A prefix of zero positions is no prefix: the outputs and loss equal the base model's. (Such a
///    prefix has no elements to train: a backward from it alone is the autograd's "does not depend
///    on any tensor that needs a gradient" error, as for any constant loss.)
#[test]
fn zero_length_prefix_equals_no_prefix() {
    for arch in ARCHS {
        let mut m = frozen::<f32>(arch);
        let x = ids(12, m.shape().vocab, 8);
        let base = host(&out_f32(&m, &x, 2, None));
        let base_loss = host(&no_grad(|| m.loss(&x, 2)));
        let s = m.shape();
        let width = s.layers * 2 * s.kv_heads * s.head_dim;
        let table = Tensor::param(&Arc::new(Cpu), "prompt_embeddings", &[0, width], &[]).unwrap();
        on!(&mut m.net, inner => {
            inner.adapt_mut().prefix = Some(PrefixTuning {
                n: 0,
                layers: s.layers,
                kv_heads: s.kv_heads,
                head_dim: s.head_dim,
                kind: PrefixKind::Prefix,
                params: PrefixParams::Direct(table),
            })
        });
        let got = host(&out_f32(&m, &x, 2, None));
        assert_rel(&format!("{arch}: zero-length prefix vs none"), 1e-6, &got, &base);
        let got = host(&no_grad(|| m.loss(&x, 2)));
        assert_rel(&format!("{arch}: loss with a zero-length prefix vs none"), 1e-6, &got, &base_loss);
    }
}

/// Houlsby adapters start at weights N(0, 1e-2): each adds `up(gelu(down(y)))`, about
/// `std^2 * sqrt(bottleneck * hidden) / 2` ≈ 6e-4 of `|y|` on the 32-wide fixtures, and four sit in
/// series (two per layer), so the outputs move by ~1e-3 of their scale (measured: 1.1e-3 GPT-2,
/// 2.2e-3 Llama, 2.0e-3 BERT, as a fraction of max |base|): "near identity" is 3e-3, not 1e-3.
const HOULSBY_INIT_REL: f32 = 3e-3;

/// 8. At their initializations LoRA is exactly the base model (B = 0) and Houlsby adapters are
///    near the identity.
#[test]
fn lora_at_init_is_the_base_model() {
    for arch in ARCHS {
        let x = ids(12, 96, 9);
        let base = host(&out_f32(&frozen::<f32>(arch), &x, 2, None));
        let lora = host(&out_f32(&with_method::<f32>(arch, &lora_of(arch, 0.0), 23), &x, 2, None));
        assert!(lora == base, "{arch}: LoRA at init (B = 0) changed the outputs");
        let h = with_method::<f32>(arch, &Method::Houlsby { bottleneck: 4 }, 23);
        let got = host(&out_f32(&h, &x, 2, None));
        let max = base.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
        let dev = got.iter().zip(&base).fold(0.0f32, |m, (g, b)| m.max((g - b).abs())) / max;
        assert!(dev > 0.0, "{arch}: Houlsby adapters at init do nothing (no gradient would reach `down`)");
        assert!(dev <= HOULSBY_INIT_REL, "{arch}: Houlsby at init moves the outputs by {dev:.2e} of max |base|");
    }
}

/// 9. Each method saved in PEFT's format and loaded into a fresh frozen model gives the same
///    outputs (a projected prefix loads as its table); two methods do not fit one folder.
#[test]
fn peft_roundtrip_for_every_method() {
    let root = std::env::temp_dir().join(format!("tuna-adapt-roundtrip-{}", std::process::id()));
    for arch in ARCHS {
        for method in peft_methods(arch) {
            let what = label(arch, &method);
            let m = with_method::<f32>(arch, &method, 29);
            perturb(m.adapt(), 0.3);
            let x = ids(12, m.shape().vocab, 10);
            let want = host(&out_f32(&m, &x, 2, None));
            let dir = root.join(what.replace('/', "_"));
            on!(&m.net, inner => peft::save(inner, &dir, arch)).unwrap_or_else(|e| panic!("{what}: save: {e}"));
            let mut fresh = frozen::<f32>(arch);
            on!(&mut fresh.net, inner => peft::load(inner, &dir)).unwrap_or_else(|e| panic!("{what}: load: {e}"));
            if matches!(method, Method::Prefix { projection: Some(_), .. } | Method::PTuning { .. }) {
                let names: Vec<String> = fresh.adapt().params().into_iter().map(|(n, _)| n).collect();
                assert_eq!(
                    names,
                    ["prompt_embeddings"],
                    "{what}: a projected prefix or encoded prompt loads as its table"
                );
            }
            if let Method::PTuning { encoder, hidden, .. } = &method {
                let spec = fresh.adapt().prompt.as_ref().and_then(|p| p.ptuning);
                let want = hidden.unwrap_or(m.shape().hidden);
                assert_eq!(spec.map(|s| (s.kind, s.hidden)), Some((*encoder, want)), "{what}: encoder settings kept");
                let again = root.join(format!("{}_again", what.replace('/', "_")));
                on!(&fresh.net, inner => peft::save(inner, &again, arch)).unwrap();
                let cfg = |d: &std::path::Path| std::fs::read_to_string(d.join(peft::CONFIG)).unwrap();
                assert_eq!(cfg(&again), cfg(&dir), "{what}: a loaded P-tuning adapter saves the same config");
            }
            assert_rel(&format!("{what}: outputs after save/load"), 1e-6, &host(&out_f32(&fresh, &x, 2, None)), &want);
        }
        let mut both = with_method::<f32>(arch, &Method::Prompt { n: 2, init: PromptInit::SampleVocab }, 1);
        both.apply(&lora_of(arch, 0.0), 2);
        let e = on!(&both.net, inner => peft::save(inner, &root.join("both"), arch)).unwrap_err().to_string();
        assert!(e.contains("exactly one method"), "{arch}: {e}");
    }
    std::fs::remove_dir_all(&root).ok();
}

/// 10. LoRA dropout acts in training mode only, and a reseed reproduces its masks.
#[test]
fn lora_dropout() {
    for arch in ARCHS {
        let m = with_method::<f32>(arch, &lora_of(arch, 0.5), 31);
        perturb(m.adapt(), 0.3);
        let x = ids(12, m.shape().vocab, 11);
        let run = || host(&out_f32(&m, &x, 2, None));
        m.adapt().set_training(true);
        let (t1, t2) = (run(), run());
        assert!(t1 != t2, "{arch}: two training-mode forwards with dropout 0.5 are equal");
        m.adapt().seed_dropout(42);
        let s1 = run();
        m.adapt().seed_dropout(42);
        assert!(run() == s1, "{arch}: the same dropout seed gave another output");
        m.adapt().set_training(false);
        let (e1, e2) = (run(), run());
        assert!(e1 == e2, "{arch}: evaluation-mode forwards differ");
        assert!(e1 != s1, "{arch}: evaluation mode still drops");
        // Evaluation mode is the dropout-free model.
        let plain = with_method::<f32>(arch, &lora_of(arch, 0.0), 31);
        perturb(plain.adapt(), 0.3);
        assert!(host(&out_f32(&plain, &x, 2, None)) == e1, "{arch}: evaluation mode is not LoRA without dropout");
    }
}
