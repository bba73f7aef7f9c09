//! GPT-2 on tiny random checkpoints: shapes under both name prefixes, the shifted causal LM loss,
//! a gradient check of the whole loss, causality, left padding, load errors naming tensors, and
//! the KV cache (incremental logits, greedy generation against repeated full forwards).

mod common;
use common::{cpu, gpt2_cfg, gpt2_weights, max_diff};
use tuna_autograd::gradcheck::{check, GRAD_TOL};
use tuna_autograd::{no_grad, Ints};
use tuna_kernels::Cpu;
use tuna_models::generate::{argmax, generate, CausalLm, KvCache, Sampling};
use tuna_models::gpt2::Gpt2;
use tuna_models::params::{Loader, MemWeights};
use tuna_models::Error;

const IDS: [u32; 10] = [3, 7, 1, 12, 0, 5, 5, 9, 2, 11];

fn frozen(w: &MemWeights) -> Gpt2<Cpu, f64> {
    Gpt2::load(&gpt2_cfg(), &mut Loader::frozen(w, &cpu())).unwrap()
}

fn ids(v: &[u32], b: usize) -> Ints<Cpu, u32> {
    Ints::new(&cpu(), &[b, v.len() / b], v).unwrap()
}

#[test]
fn logits_shape_and_prefixes_agree() {
    let cfg = gpt2_cfg();
    let (plain, prefixed) = (gpt2_weights(&cfg, 1, ""), gpt2_weights(&cfg, 1, "transformer."));
    let (m, mp) = (frozen(&plain), frozen(&prefixed));
    let x = ids(&IDS, 2);
    let pos = m.positions(2, 5).unwrap();
    let y = m.forward(&x, &pos).unwrap();
    assert_eq!(y.shape(), [2, 5, cfg.vocab_size]);
    let v = y.to_vec().unwrap();
    assert!(v.iter().all(|a| a.is_finite()));
    assert_eq!(v, mp.forward(&x, &pos).unwrap().to_vec().unwrap());
    // f32 loads the same checkpoint and agrees with f64
    let m32: Gpt2<Cpu, f32> = Gpt2::load(&cfg, &mut Loader::frozen(&plain, &cpu())).unwrap();
    let v32: Vec<f64> = m32.forward(&x, &pos).unwrap().to_vec().unwrap().into_iter().map(f64::from).collect();
    assert!(max_diff(&v, &v32) < 1e-4, "{}", max_diff(&v, &v32));
}

/// The loss is the mean over rows of -log softmax(logits[r, i])[labels[r, i+1]], -100 skipped.
#[test]
fn loss_is_shifted_mean_cross_entropy() {
    let cfg = gpt2_cfg();
    let m = frozen(&gpt2_weights(&cfg, 2, ""));
    let (b, t, v) = (2, 5, cfg.vocab_size);
    let x = ids(&IDS, b);
    let labels: Vec<i32> = vec![-100, 7, 1, -100, 0, 5, 5, 9, 2, 11];
    let loss = m.loss(&x, &labels).unwrap().to_vec().unwrap()[0];
    let logits = m.forward(&x, &m.positions(b, t).unwrap()).unwrap().to_vec().unwrap();
    let (mut sum, mut n) = (0.0, 0);
    for r in 0..b {
        for i in 0..t - 1 {
            let target = labels[r * t + i + 1];
            if target == -100 {
                continue;
            }
            let row = &logits[(r * t + i) * v..(r * t + i + 1) * v];
            let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = mx + row.iter().map(|a| (a - mx).exp()).sum::<f64>().ln();
            sum += lse - row[target as usize];
            n += 1;
        }
    }
    assert_eq!(n, 7);
    assert!((loss - sum / n as f64).abs() < 1e-12, "{loss} vs {}", sum / n as f64);
    assert!(m.loss(&x, &labels[..b * t - 1]).is_err(), "labels must be [batch, seq]");
}

#[test]
fn gradient_check_of_the_whole_loss() {
    let cfg = gpt2_cfg();
    let w = gpt2_weights(&cfg, 3, "transformer.");
    let mut loader = Loader::with_trainable(&w, &cpu(), |_| true);
    let m: Gpt2<Cpu, f64> = Gpt2::load(&cfg, &mut loader).unwrap();
    let params: Vec<_> = loader.loaded.iter().map(|(_, t)| t).collect();
    assert_eq!(params.len(), 2 + 12 * cfg.n_layer + 2);
    assert!(params.iter().all(|p| p.requires_grad()));
    let x = ids(&IDS, 2);
    let labels = [3, 7, 1, 12, -100, 5, 5, 9, 2, 11];
    let r = check(&params, || m.loss(&x, &labels).map_err(to_ag), 1e-5, GRAD_TOL, 5).unwrap();
    assert!(r.checked > 100, "{r:?}");
}

fn to_ag(e: Error) -> tuna_autograd::Error {
    match e {
        Error::Autograd(e) => e,
        other => panic!("{other}"),
    }
}

#[test]
fn later_tokens_do_not_change_earlier_logits() {
    let m = frozen(&gpt2_weights(&gpt2_cfg(), 4, ""));
    let pos = m.positions(1, 5).unwrap();
    let a = m.forward(&ids(&[3, 7, 1, 12, 0], 1), &pos).unwrap().to_vec().unwrap();
    let b = m.forward(&ids(&[3, 7, 1, 4, 9], 1), &pos).unwrap().to_vec().unwrap();
    let v = gpt2_cfg().vocab_size;
    assert!(max_diff(&a[..3 * v], &b[..3 * v]) < 1e-12);
    assert!(max_diff(&a[3 * v..], &b[3 * v..]) > 1e-3, "the changed tokens must matter");
}

/// A left-padded row, with the padding masked and positions from the mask, gives the real tokens
/// the logits of the unpadded sequence; with default positions it does not.
#[test]
fn left_padding_with_mask_positions_matches_unpadded() {
    let m = frozen(&gpt2_weights(&gpt2_cfg(), 5, ""));
    let v = gpt2_cfg().vocab_size;
    let alone = m.forward(&ids(&[3, 7, 1], 1), &m.positions(1, 3).unwrap()).unwrap().to_vec().unwrap();
    let padded = ids(&[0, 0, 3, 7, 1, 4, 4, 3, 7, 1], 2);
    let mask = Ints::new(&cpu(), &[2, 5], &[0u8, 0, 1, 1, 1, 1, 1, 1, 1, 1]).unwrap();
    let pos = m.positions_from_mask(&mask).unwrap();
    assert_eq!(pos.host(), [1, 1, 0, 1, 2, 0, 1, 2, 3, 4]);
    let y = m.forward_masked(&padded, &pos, Some(&mask)).unwrap().to_vec().unwrap();
    assert!(y.iter().all(|a| a.is_finite()), "fully masked pad queries must not give NaN");
    assert!(max_diff(&y[2 * v..5 * v], &alone) < 1e-10);
    let naive = m.forward_masked(&padded, &m.positions(2, 5).unwrap(), Some(&mask)).unwrap().to_vec().unwrap();
    assert!(max_diff(&naive[2 * v..5 * v], &alone) > 1e-3);
}

#[test]
fn missing_or_misshaped_tensors_are_named() {
    let cfg = gpt2_cfg();
    let mut w = gpt2_weights(&cfg, 6, "transformer.");
    w.tensors.remove("transformer.h.1.mlp.c_fc.bias");
    let e = Gpt2::<Cpu, f64>::load(&cfg, &mut Loader::frozen(&w, &cpu())).err().unwrap();
    assert!(matches!(&e, Error::MissingTensor { name, .. } if name == "h.1.mlp.c_fc.bias"), "{e}");
    assert!(e.to_string().contains("tiny/model.safetensors"), "{e}");

    let mut w = gpt2_weights(&cfg, 6, "");
    let c = cfg.n_embd;
    w.tensors.insert("h.0.attn.c_attn.weight".into(), (vec![3 * c, c], vec![0.0; 3 * c * c]));
    let e = Gpt2::<Cpu, f64>::load(&cfg, &mut Loader::frozen(&w, &cpu())).err().unwrap();
    let want = (vec![c, 3 * c], vec![3 * c, c]);
    assert!(
        matches!(&e, Error::TensorShape { name, expected, found, .. }
            if name == "h.0.attn.c_attn.weight" && (expected.clone(), found.clone()) == want),
        "{e}"
    );
}

/// Full-forward logits of the last token of `seq` (positions from 0).
fn last_logits(m: &Gpt2<Cpu, f64>, seq: &[u32]) -> Vec<f64> {
    let t = seq.len();
    let l = no_grad(|| m.forward(&ids(seq, 1), &m.positions(1, t).unwrap())).unwrap().to_vec().unwrap();
    l[(t - 1) * gpt2_cfg().vocab_size..].to_vec()
}

/// Two rows (row 1 left-padded by two, the mask growing with the cache) fed through the cache in
/// steps of 3, 1, 2, 1 and 1 tokens give the full forward's logits at every real token.
#[test]
fn kv_cache_steps_match_full_forward() {
    let m = frozen(&gpt2_weights(&gpt2_cfg(), 7, ""));
    let v = gpt2_cfg().vocab_size;
    let (b, t) = (2, 8);
    let x = [4u32, 8, 1, 12, 3, 3, 7, 0, 0, 0, 2, 9, 11, 5, 6, 1];
    let mask = [1u8, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1];
    let mask_t = Ints::new(&cpu(), &[b, t], &mask).unwrap();
    let pos = m.positions_from_mask(&mask_t).unwrap().host().to_vec();
    let full = no_grad(|| m.forward_masked(&ids(&x, b), &Ints::new(&cpu(), &[b, t], &pos).unwrap(), Some(&mask_t)))
        .unwrap()
        .to_vec()
        .unwrap();
    let mut cache = m.new_cache();
    let mut start = 0;
    for chunk in [3, 1, 2, 1, 1] {
        let cols = |v: &[u32]| -> Vec<u32> { (0..b).flat_map(|r| v[r * t + start..][..chunk].to_vec()).collect() };
        let seen: Vec<u8> = (0..b).flat_map(|r| mask[r * t..r * t + start + chunk].to_vec()).collect();
        let step = no_grad(|| {
            m.forward_cached(
                &ids(&cols(&x), b),
                &Ints::new(&cpu(), &[b, chunk], &cols(&pos)).unwrap(),
                Some(&Ints::new(&cpu(), &[b, start + chunk], &seen).unwrap()),
                Some(&mut cache),
            )
        })
        .unwrap();
        assert_eq!(step.shape(), [b, chunk, v]);
        let step = step.to_vec().unwrap();
        for r in 0..b {
            for i in (0..chunk).filter(|&i| mask[r * t + start + i] == 1) {
                let (a, f) = (&step[(r * chunk + i) * v..][..v], &full[(r * t + start + i) * v..][..v]);
                assert!(max_diff(a, f) < 1e-10, "row {r} token {}: {}", start + i, max_diff(a, f));
            }
        }
        start += chunk;
        assert_eq!(cache.len(), start);
    }
    // Without the cache the last step alone would see no context: the cache must matter.
    let alone = m.forward(&ids(&x[t - 1..t], 1), &Ints::new(&cpu(), &[1, 1], &[7]).unwrap()).unwrap();
    assert!(max_diff(&alone.to_vec().unwrap(), &full[(t - 1) * v..t * v]) > 1e-3);

    // A cache of the wrong batch, or for another layer count, is refused.
    let one = |p: u32| (ids(&[1], 1), Ints::new(&cpu(), &[1, 1], &[p]).unwrap());
    let (i1, p1) = one(8);
    let e = m.forward_cached(&i1, &p1, None, Some(&mut cache)).unwrap_err().to_string();
    assert!(e.contains("cache"), "{e}");
    let mut wrong = KvCache::new(3);
    let e = m.forward_cached(&i1, &p1, None, Some(&mut wrong)).unwrap_err().to_string();
    assert!(e.contains("cache"), "{e}");
    assert!(wrong.is_empty() && cache.len() == t, "a refused step must leave the caches alone");
}

/// `logits_step` in pieces of 3, 2 and 1 tokens gives the full forward's last logits each time.
#[test]
fn logits_step_matches_full_forward_last_token() {
    let m = frozen(&gpt2_weights(&gpt2_cfg(), 8, "transformer."));
    let seq = [2u32, 9, 11, 5, 6, 0];
    let mut cache = m.new_cache();
    let mut start = 0;
    for n in [3, 2, 1] {
        let pos: Vec<u32> = (start as u32..(start + n) as u32).collect();
        let got = no_grad(|| m.logits_step(&seq[start..start + n], &pos, &mut cache)).unwrap();
        start += n;
        let want = last_logits(&m, &seq[..start]);
        assert!(max_diff(&got, &want) < 1e-10, "after {start}: {}", max_diff(&got, &want));
    }
    assert!(m.logits_step(&[1, 2], &[6], &mut cache).unwrap_err().to_string().contains("positions"));
    assert!(m.logits_step(&[], &[], &mut cache).is_err());
}

#[test]
fn greedy_generation_equals_repeated_full_forwards() {
    let m = frozen(&gpt2_weights(&gpt2_cfg(), 9, ""));
    let prompt = [1u32, 5, 2];
    // n_positions is 10: the 7th new token is the last that fits (it is never fed back).
    let got = generate(&m, &prompt, 7, &Sampling::Greedy, None).unwrap();
    let mut seq = prompt.to_vec();
    for _ in 0..7 {
        seq.push(argmax(&last_logits(&m, &seq)) as u32);
    }
    assert_eq!(got, seq[3..]);
    // eos stops generation after emitting it.
    let eos = got[2];
    let first = got.iter().position(|&x| x == eos).unwrap();
    assert_eq!(generate(&m, &prompt, 7, &Sampling::Greedy, Some(eos)).unwrap(), got[..=first]);
    // Going past the learned positions is an error, not a panic.
    let e = generate(&m, &prompt, 9, &Sampling::Greedy, None).unwrap_err().to_string();
    assert!(e.contains("n_positions"), "{e}");
}

#[test]
fn a_failed_cached_forward_leaves_the_cache_as_it_was() {
    let m = frozen(&gpt2_weights(&gpt2_cfg(), 21, ""));
    let mut cache: KvCache<Cpu, f64> = m.new_cache();
    no_grad(|| m.forward_cached(&ids(&[3, 4], 1), &m.positions(1, 2).unwrap(), None, Some(&mut cache))).unwrap();
    // The mask must cover the 2 cached tokens plus the new one: [1, 3], not [1, 1].
    let mask = Ints::new(&cpu(), &[1, 1], &[1u8]).unwrap();
    let pos = Ints::new(&cpu(), &[1, 1], &[2u32]).unwrap();
    assert!(no_grad(|| m.forward_cached(&ids(&[5], 1), &pos, Some(&mask), Some(&mut cache))).is_err());
    for i in 0..cache.n_layers() {
        assert_eq!(cache.layer_len(i), 2, "layer {i} was appended to by a failed forward");
    }
}

#[test]
fn the_loss_computes_its_gradient_in_the_logits_buffer() {
    let w = gpt2_weights(&gpt2_cfg(), 22, "");
    let m: Gpt2<Cpu, f64> = Gpt2::load(&gpt2_cfg(), &mut Loader::with_trainable(&w, &cpu(), |_| true)).unwrap();
    tuna_autograd::stats::reset();
    let labels = [1i32, 2, 3, 4];
    let loss = m.loss(&ids(&[1, 2, 3, 4], 1), &labels).unwrap();
    assert_eq!(tuna_autograd::stats::snapshot().launches("cross_entropy.copy"), 0, "the logits were copied");
    loss.backward().unwrap();
}
