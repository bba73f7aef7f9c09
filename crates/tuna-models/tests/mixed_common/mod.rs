//! Mixed-adapter batches against each row alone, on any backend: adapters of every method
//! (two prompt lengths, prefix, P-tuning v2 or the prefix MLP, two LoRAs of different ranks and
//! targets, Houlsby; for BERT each with its own classification head) are made, perturbed (so each
//! measurably changes the outputs) and saved; one model loads them all into its bank, and a batch
//! routing its rows to them (and to the base) must give every row what a model with only that
//! adapter installed gives the row alone: outputs per position, greedy tokens (decoders) or class
//! scores (BERT).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tuna_autograd::ops::loss::cross_entropy;
use tuna_autograd::ops::Kernels;
use tuna_autograd::{no_grad, Float, Ints};
use tuna_kernels::testing::Tol;

/// The floats these checks run on (f32, f64): their own accumulators.
pub trait CpuTape: Float + tuna_kernels::CpuFloat {}
impl<T: Float + tuna_kernels::CpuFloat> CpuTape for T {}
use tuna_models::adapt::{Adapt, EncoderKind, LoraConfig, Method, PromptInit};
use tuna_models::generate::Sampling;
use tuna_models::model::{AnyModel, Net};
use tuna_models::IGNORE_INDEX;

/// The adapters of the mixed batch on `arch` (a fixture name, or "llama" for SmolLM2 too).
pub fn methods(arch: &str) -> Vec<Method> {
    let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (a, b) = match arch {
        "gpt2" => (t(&["c_attn"]), t(&["c_fc", "c_proj"])),
        "llama" => (t(&["q_proj", "v_proj"]), t(&["o_proj", "gate_proj", "down_proj"])),
        _ => (t(&["query", "value"]), t(&["key", "dense"])),
    };
    vec![
        Method::Prompt { n: 3, init: PromptInit::Random },
        Method::Prompt { n: 1, init: PromptInit::Random },
        Method::Prefix { n: 3, projection: None, init: PromptInit::Random },
        Method::Prefix { n: 2, projection: Some(8), init: PromptInit::Random },
        Method::PTuningV2 { n: 2, init: PromptInit::Random },
        Method::Lora(LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, targets: a }),
        Method::Lora(LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: b }),
        Method::Houlsby { bottleneck: 4 },
        Method::PTuning { n: 2, encoder: EncoderKind::Mlp, hidden: Some(8) },
    ]
}

/// The rows of the test batch: the base, every adapter, and three adapters again (rows sharing one).
pub fn routes(n_adapters: usize) -> Vec<Option<usize>> {
    let mut r = vec![None];
    r.extend((0..n_adapters).map(Some));
    r.extend([Some(2), Some(5), Some(0)]);
    r
}

/// Add seeded noise of `std` to every adapter tensor (LoRA's B starts at zero).
pub fn perturb<B: Kernels<E>, E: CpuTape>(a: &Adapt<B, E>, std: f64, seed: u64) {
    for (k, (_, t)) in a.params().iter().enumerate() {
        let mut v = t.to_vec().unwrap();
        for (i, x) in v.iter_mut().enumerate() {
            let r = ((i as u64 * 2654435761 + k as u64 * 97 + seed * 7919) % 1000) as f64 / 1000.0 - 0.5;
            *x = <E as Float>::c((*x).into() + 2.0 * std * r);
        }
        *t.data_mut() = t.device().from_host(&v).unwrap();
    }
}

/// A fresh folder under the system's temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tuna-mixed-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Install each of `methods` on a fresh model from `path`, perturb it, give BERT a head, and save
/// it under `dir/<k>`.
pub fn make_adapters<B: Kernels<E>, E: CpuTape>(
    dev: &Arc<B>,
    path: &Path,
    methods: &[Method],
    std: f64,
    dir: &Path,
) -> Vec<PathBuf> {
    let mut m = AnyModel::<B, E>::open(dev, path, |_| false).unwrap();
    methods
        .iter()
        .enumerate()
        .map(|(k, method)| {
            *m.adapt_mut() = Adapt::default();
            m.install(method, 100 + k as u64, None).unwrap();
            if !m.is_decoder() {
                m.add_head(3, 200 + k as u64).unwrap();
            }
            perturb(m.adapt(), std, k as u64);
            let d = dir.join(k.to_string());
            m.save_adapter(&d, "tiny").unwrap();
            d
        })
        .collect()
}

/// The model from `path` with `adapter` installed the ordinary way (BERT's base: a fixed head).
pub fn alone_model<B: Kernels<E>, E: CpuTape>(dev: &Arc<B>, path: &Path, adapter: Option<&Path>) -> AnyModel<B, E> {
    let mut m = AnyModel::open(dev, path, |_| false).unwrap();
    match adapter {
        Some(a) => m.load_adapter(a).unwrap(),
        None if !m.is_decoder() => m.add_head(3, 999).unwrap(),
        None => {}
    }
    m
}

/// The model from `path` with every adapter of `dirs` in its bank (BERT's base: the same head).
pub fn bank_model<B: Kernels<E>, E: CpuTape>(dev: &Arc<B>, path: &Path, dirs: &[PathBuf]) -> AnyModel<B, E> {
    let mut m = alone_model(dev, path, None);
    for (k, d) in dirs.iter().enumerate() {
        assert_eq!(m.load_bank_adapter(&format!("a{k}"), d).unwrap(), k);
    }
    m
}

/// Outputs per position of one unpadded row through the single-adapter path.
pub fn alone_outputs<B: Kernels<E>, E: CpuTape>(m: &AnyModel<B, E>, ids: &[u32]) -> Vec<f64> {
    let n = ids.len();
    let t = Ints::new(&m.dev, &[1, n], ids).unwrap();
    let pos = Ints::new(&m.dev, &[1, n], &(0..n as u32).collect::<Vec<_>>()).unwrap();
    let out = no_grad(|| match &m.net {
        Net::Gpt2(g) => g.forward(&t, &pos).unwrap(),
        Net::Llama(l) => l.forward(&t, &pos, None, None).unwrap(),
        Net::Bert(b) => b.forward(&t, &Ints::new(&m.dev, &[1, n], &vec![1u8; n]).unwrap()).unwrap(),
        Net::T5(_) => unreachable!("T5 has its own tests (golden_t5, peft_t5)"),
    });
    out.to_vec().unwrap().into_iter().map(|x| x.into()).collect()
}

/// Token ids of row `r` (length 3 to 6) in `3..vocab`.
pub fn row_ids(r: usize, vocab: usize) -> Vec<u32> {
    let n = 3 + (r * 5) % 4;
    (0..n).map(|i| (3 + (i * 31 + r * 17 + (i * i) % 7) % (vocab - 3)) as u32).collect()
}

/// `rows` padded to one length: left for decoders, right for BERT. Returns `(ids, mask, seq)`.
pub fn pad(rows: &[Vec<u32>], left: bool) -> (Vec<u32>, Vec<u8>, usize) {
    let seq = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for r in rows {
        let p = seq - r.len();
        let (pi, pm) = (std::iter::repeat_n(0u32, p), std::iter::repeat_n(0u8, p));
        let (ri, rm) = (r.iter().copied(), std::iter::repeat_n(1u8, r.len()));
        if left {
            ids.extend(pi.chain(ri));
            mask.extend(pm.chain(rm));
        } else {
            ids.extend(ri.chain(pi));
            mask.extend(rm.chain(pm));
        }
    }
    (ids, mask, seq)
}

/// The largest absolute difference of the last `n` entries of two vectors.
pub fn tail_diff(a: &[f64], b: &[f64], n: usize) -> f64 {
    a[a.len() - n..].iter().zip(&b[b.len() - n..]).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// The whole check on `path` (architecture `arch`) on `dev`: outputs per position, greedy tokens
/// (`new_tokens` of them) or class scores, each row of the mixed batch against the row alone.
pub fn check_mixed<B: Kernels<E>, E: CpuTape>(
    dev: &Arc<B>,
    path: &Path,
    arch: &str,
    tol: Tol,
    new_tokens: usize,
    tag: &str,
) {
    let methods = methods(arch);
    let dirs = make_adapters::<B, E>(dev, path, &methods, 0.3, &temp_dir(&format!("{tag}-{arch}")));
    let mixed = bank_model::<B, E>(dev, path, &dirs);
    let routes = routes(methods.len());
    let vocab = mixed.shape().vocab;
    let rows: Vec<Vec<u32>> = (0..routes.len()).map(|r| row_ids(r, vocab)).collect();
    let decoder = mixed.is_decoder();
    let (ids, mask, _) = pad(&rows, decoder);
    let batch = rows.len();
    // Timed after one warm-up run (thread pool, first allocations).
    no_grad(|| mixed.forward_mixed(&ids, &mask, batch, &routes)).unwrap();
    let t0 = std::time::Instant::now();
    let (out, out_mask) = no_grad(|| mixed.forward_mixed(&ids, &mask, batch, &routes)).unwrap();
    let t_mixed = t0.elapsed();
    let out: Vec<f64> = out.to_vec().unwrap().into_iter().map(|x| x.into()).collect();
    let width = out_mask.len() / batch;
    let feat = out.len() / (batch * width);
    let base = alone_model::<B, E>(dev, path, None);
    let alone: Vec<AnyModel<B, E>> = dirs.iter().map(|d| alone_model(dev, path, Some(d))).collect();
    let model_of = |r: usize| routes[r].map_or(&base, |i| &alone[i]);
    let t0 = std::time::Instant::now();
    let wants: Vec<Vec<f64>> = rows.iter().enumerate().map(|(r, row)| alone_outputs(model_of(r), row)).collect();
    println!(
        "{tag} {arch}: forward of the mixed batch ({batch} rows) {:.1} ms; the rows alone, one by one, {:.1} ms",
        t_mixed.as_secs_f64() * 1e3,
        t0.elapsed().as_secs_f64() * 1e3
    );
    for (r, row) in rows.iter().enumerate() {
        let want = wants[r].clone();
        let got: Vec<f64> = (0..width)
            .filter(|&c| out_mask[r * width + c] == 1)
            .flat_map(|c| out[(r * width + c) * feat..][..feat].to_vec())
            .collect();
        let what = format!("{tag} {arch} row {r} ({:?}) outputs, mixed vs alone", routes[r].map(|i| &methods[i]));
        tol.assert_close(&what, &got, &want);
        if routes[r].is_some() {
            // The adapter must matter: its row differs from the base model's on the same tokens.
            let d = tail_diff(&want, &alone_outputs(&base, row), row.len() * feat);
            assert!(d > 1e-3, "{what}: the adapter barely changes the outputs ({d:.2e})");
        }
    }
    if decoder {
        let eos = mixed.eos_id();
        let got = mixed.generate_mixed(&rows, &routes, new_tokens, eos).unwrap();
        for (r, row) in rows.iter().enumerate() {
            let want = model_of(r).generate(row, new_tokens, &Sampling::Greedy).unwrap();
            assert_eq!(got[r], want, "{tag} {arch} row {r}: greedy tokens, mixed vs alone");
        }
    } else {
        let scores = no_grad(|| mixed.class_scores_mixed(&ids, &mask, batch, &[], &routes)).unwrap();
        let scores: Vec<f64> = scores.to_vec().unwrap().into_iter().map(|x| x.into()).collect();
        for (r, row) in rows.iter().enumerate() {
            let n = row.len();
            let want = no_grad(|| model_of(r).class_scores(row, &vec![1; n], 1, &[])).unwrap();
            let want: Vec<f64> = want.to_vec().unwrap().into_iter().map(|x| x.into()).collect();
            tol.assert_close(&format!("{tag} bert row {r} class scores"), &scores[r * 3..][..3], &want);
        }
    }
}

/// Labels of a row: its tokens, the first ignored (so the padded batch and the row alone predict
/// the same targets), padding ignored.
fn labels(ids: &[u32], mask: &[u8], seq: usize) -> Vec<i32> {
    let mut l: Vec<i32> = ids.iter().zip(mask).map(|(&t, &m)| if m == 1 { t as i32 } else { IGNORE_INDEX }).collect();
    for row in l.chunks_mut(seq) {
        if let Some(first) = row.iter_mut().find(|x| **x != IGNORE_INDEX) {
            *first = IGNORE_INDEX;
        }
    }
    l
}

/// Multi-task training: the mixed batch's loss (the mean over all rows' targets) has, for each
/// adapter's tensors, the gradient `sum over its rows r of (targets_r / targets) * grad_r`, with
/// `grad_r` the gradient of row `r`'s own loss alone (decoders: the causal LM loss; BERT:
/// cross-entropy of each row's own head).
pub fn check_gradients<B: Kernels<E>, E: CpuTape>(dev: &Arc<B>, path: &Path, arch: &str, tol: Tol, tag: &str) {
    let methods = methods(arch);
    let dirs = make_adapters::<B, E>(dev, path, &methods, 0.3, &temp_dir(&format!("grad-{tag}-{arch}")));
    let mixed = bank_model::<B, E>(dev, path, &dirs);
    let routes = routes(methods.len());
    let vocab = mixed.shape().vocab;
    let rows: Vec<Vec<u32>> = (0..routes.len()).map(|r| row_ids(r, vocab)).collect();
    let batch = rows.len();
    let decoder = mixed.is_decoder();
    let (ids, mask, seq) = pad(&rows, decoder);
    let classes: Vec<i32> = (0..batch).map(|r| (r % 3) as i32).collect();
    let loss = |m: &AnyModel<B, E>, ids: &[u32], mask: &[u8], b: usize, seq: usize, cls: &[i32], mixed: bool| {
        if m.is_decoder() {
            let l = labels(ids, mask, seq);
            let r = routes.clone();
            if mixed { m.lm_loss_mixed(ids, mask, &l, b, &r) } else { m.lm_loss(ids, mask, &l, b) }.unwrap()
        } else {
            let s = if mixed {
                m.class_scores_mixed(ids, mask, b, &[], &routes)
            } else {
                m.class_scores(ids, mask, b, &[])
            };
            cross_entropy(s.unwrap(), &Ints::new(&m.dev, &[b], cls).unwrap(), IGNORE_INDEX).unwrap()
        }
    };
    loss(&mixed, &ids, &mask, batch, seq, &classes, true).backward().unwrap();
    // Each row alone, on a model with only its adapter, weighted by its share of the targets.
    let targets = |r: usize| if decoder { rows[r].len() - 1 } else { 1 };
    let total: usize = (0..batch).map(targets).sum();
    let mut want: BTreeMap<(usize, String), Vec<f64>> = BTreeMap::new();
    for (r, row) in rows.iter().enumerate() {
        let Some(a) = routes[r] else { continue };
        let m = alone_model::<B, E>(dev, path, Some(&dirs[a]));
        let n = row.len();
        loss(&m, row, &vec![1; n], 1, n, &classes[r..r + 1], false).backward().unwrap();
        let w = targets(r) as f64 / total as f64;
        for (name, t) in m.adapt().params() {
            let g: Vec<f64> =
                t.grad().unwrap().map_or_else(|| vec![0.0; t.numel()], |g| g.into_iter().map(|x| x.into()).collect());
            let acc = want.entry((a, name)).or_insert_with(|| vec![0.0; g.len()]);
            acc.iter_mut().zip(&g).for_each(|(x, y)| *x += w * y);
        }
    }
    let mut checked = 0;
    for ((a, name), w) in &want {
        let bank = &mixed.adapt().bank[*a].1;
        let t = bank.params().into_iter().find(|(n, _)| n == name).unwrap().1;
        let g: Vec<f64> =
            t.grad().unwrap().map_or_else(|| vec![0.0; t.numel()], |g| g.into_iter().map(|x| x.into()).collect());
        tol.assert_close(&format!("{tag} {arch} adapter {a} {name}: mixed-batch gradient vs rows alone"), &g, w);
        checked += w.iter().any(|x| x.abs() > 1e-9) as usize;
    }
    assert!(checked >= methods.len(), "{arch}: only {checked} adapter tensors got a nonzero gradient");
}
