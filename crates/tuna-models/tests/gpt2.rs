//! GPT-2 on tiny random checkpoints: shapes under both name prefixes, the shifted causal LM loss,
//! a gradient check of the whole loss, causality, left padding, and load errors naming tensors.

mod common;
use common::{cpu, gpt2_cfg, gpt2_weights, max_diff};
use tuna_autograd::gradcheck::{check, GRAD_TOL};
use tuna_autograd::Ints;
use tuna_kernels::Cpu;
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
    let loss = m.loss(&x, &Ints::new(&cpu(), &[b, t], &labels).unwrap()).unwrap().to_vec().unwrap()[0];
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
    let bad = Ints::new(&cpu(), &[b * t], &labels).unwrap();
    assert!(m.loss(&x, &bad).is_err(), "labels must be [batch, seq]");
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
    let labels = Ints::new(&cpu(), &[2, 5], &[3, 7, 1, 12, -100, 5, 5, 9, 2, 11]).unwrap();
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
