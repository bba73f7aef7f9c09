//! BERT on tiny random checkpoints: shapes under both name prefixes, a gradient check through the
//! encoder, pooler and mean pooling, padding invariance, the optional pooler, load errors, cosine.

mod common;
use common::{bert_cfg, bert_weights, cpu, max_diff};
use tuna_autograd::gradcheck::{check, GRAD_TOL};
use tuna_autograd::ops::elem::add;
use tuna_autograd::ops::loss::cross_entropy;
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::{Ints, Tensor};
use tuna_kernels::Cpu;
use tuna_models::bert::{cosine, Bert};
use tuna_models::params::{Loader, MemWeights};
use tuna_models::Error;

const IDS: [u32; 12] = [1, 5, 9, 16, 2, 0, 1, 7, 7, 3, 0, 0];
const MASK: [u8; 12] = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0];

fn frozen(w: &MemWeights) -> Bert<Cpu, f64> {
    Bert::load(&bert_cfg(), &mut Loader::frozen(w, &cpu())).unwrap()
}
fn ints<T: tuna_kernels::Elem>(v: &[T], b: usize) -> Ints<Cpu, T>
where
    Cpu: tuna_kernels::Alloc<T>,
{
    Ints::new(&cpu(), &[b, v.len() / b], v).unwrap()
}

#[test]
fn shapes_and_prefixes_agree() {
    let cfg = bert_cfg();
    let (m, mp) = (frozen(&bert_weights(&cfg, 1, "", true)), frozen(&bert_weights(&cfg, 1, "bert.", true)));
    let (x, mask) = (ints(&IDS, 2), ints(&MASK, 2));
    let h = m.forward(&x, &mask).unwrap();
    assert_eq!(h.shape(), [2, 6, cfg.hidden_size]);
    assert_eq!(h.to_vec().unwrap(), mp.forward(&x, &mask).unwrap().to_vec().unwrap());
    let p = m.pooler(&h).unwrap();
    assert_eq!(p.shape(), [2, cfg.hidden_size]);
    assert!(p.to_vec().unwrap().iter().all(|v| v.abs() < 1.0), "tanh output");
    let e = m.mean_pooled(&h, &mask).unwrap();
    assert_eq!(e.shape(), [2, cfg.hidden_size]);
    // mean pooling averages the real tokens' rows only
    let (hv, ev, hid) = (h.to_vec().unwrap(), e.to_vec().unwrap(), cfg.hidden_size);
    let want: Vec<f64> = (0..hid).map(|c| (0..4).map(|t| hv[(6 + t) * hid + c]).sum::<f64>() / 4.0).collect();
    assert!(max_diff(&ev[hid..], &want) < 1e-12);
    // each token's hidden state is LayerNorm output: mean ~ bias mean, so just check finite and varied
    assert!(hv.iter().all(|v| v.is_finite()));
}

/// Cross-entropy of `y` read as rows of its last dim against fixed targets: a scalar that depends
/// on every element.
fn reduce(y: Tensor<Cpu, f64>, seed: u32) -> tuna_autograd::Result<Tensor<Cpu, f64>> {
    let last = *y.shape().last().unwrap();
    let rows = y.numel() / last;
    let t: Vec<i32> = (0..rows as u32).map(|r| ((r * 7 + seed) % last as u32) as i32).collect();
    let y = reshape(&y, &[rows, last])?;
    cross_entropy(y, &Ints::new(&cpu(), &[rows], &t)?, -100)
}

#[test]
fn gradient_check_through_encoder_pooler_and_mean_pooling() {
    let cfg = bert_cfg();
    let w = bert_weights(&cfg, 2, "bert.", true);
    let mut loader = Loader::with_trainable(&w, &cpu(), |_| true);
    let m: Bert<Cpu, f64> = Bert::load(&cfg, &mut loader).unwrap();
    let params: Vec<_> = loader.loaded.iter().map(|(_, t)| t).collect();
    assert_eq!(params.len(), 5 + 16 * cfg.num_hidden_layers + 2);
    let (x, mask) = (ints(&IDS, 2), ints(&MASK, 2));
    let f = || {
        let h = m.forward(&x, &mask).map_err(to_ag)?;
        let a = add(&reduce(h.clone(), 1)?, &reduce(m.pooler(&h).map_err(to_ag)?, 2)?)?;
        add(&a, &reduce(m.mean_pooled(&h, &mask).map_err(to_ag)?, 3)?)
    };
    let r = check(&params, f, 1e-5, GRAD_TOL, 5).unwrap();
    assert!(r.checked > 100, "{r:?}");
    // the position rows past the sequence and token type 1 get no gradient
    let pos = loader.loaded.iter().find(|(n, _)| n.ends_with("position_embeddings.weight")).unwrap();
    let g = pos.1.grad().unwrap().unwrap();
    assert!(g[6 * cfg.hidden_size..].iter().all(|&v| v == 0.0));
}

fn to_ag(e: Error) -> tuna_autograd::Error {
    match e {
        Error::Autograd(e) => e,
        other => panic!("{other}"),
    }
}

#[test]
fn padding_ids_do_not_change_real_tokens() {
    let cfg = bert_cfg();
    let m = frozen(&bert_weights(&cfg, 3, "", true));
    let hid = cfg.hidden_size;
    let mask = ints(&MASK, 2);
    let mut other = IDS;
    other[10] = 13;
    other[11] = 4;
    let a = m.forward(&ints(&IDS, 2), &mask).unwrap().to_vec().unwrap();
    let b = m.forward(&ints(&other, 2), &mask).unwrap().to_vec().unwrap();
    assert!(max_diff(&a[..10 * hid], &b[..10 * hid]) < 1e-12, "real tokens changed");
    assert!(max_diff(&a[10 * hid..], &b[10 * hid..]) > 1e-3, "pad tokens' own states do change");
    // and the real tokens equal the unpadded sequence run alone
    let alone = m.forward(&ints(&IDS[6..10], 1), &ints(&[1u8; 4], 1)).unwrap().to_vec().unwrap();
    assert!(max_diff(&a[6 * hid..10 * hid], &alone) < 1e-10);
    // without the mask, padding leaks into real tokens
    let open = m.forward(&ints(&IDS, 2), &ints(&[1u8; 12], 2)).unwrap().to_vec().unwrap();
    assert!(max_diff(&open[6 * hid..10 * hid], &alone) > 1e-3);
}

#[test]
fn pooler_is_optional_and_errors_name_tensors() {
    let cfg = bert_cfg();
    let m = frozen(&bert_weights(&cfg, 4, "", false));
    let (x, mask) = (ints(&IDS, 2), ints(&MASK, 2));
    let h = m.forward(&x, &mask).unwrap();
    let e = m.pooler(&h).unwrap_err();
    assert!(matches!(&e, Error::MissingTensor { name, .. } if name == "pooler.dense.weight"), "{e}");
    assert!(e.to_string().contains("tiny/model.safetensors"), "{e}");
    assert_eq!(m.mean_pooled(&h, &mask).unwrap().shape(), [2, cfg.hidden_size]);

    let mut w = bert_weights(&cfg, 4, "bert.", true);
    w.tensors.remove("bert.encoder.layer.1.attention.self.value.bias");
    let e = Bert::<Cpu, f64>::load(&cfg, &mut Loader::frozen(&w, &cpu())).err().unwrap();
    assert!(
        matches!(&e, Error::MissingTensor { name, expected, .. }
            if name == "encoder.layer.1.attention.self.value.bias" && *expected == [cfg.hidden_size]),
        "{e}"
    );
    let mut w = bert_weights(&cfg, 4, "", true);
    let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
    w.tensors.insert("encoder.layer.0.intermediate.dense.weight".into(), (vec![h, ff], vec![0.0; h * ff]));
    let e = Bert::<Cpu, f64>::load(&cfg, &mut Loader::frozen(&w, &cpu())).err().unwrap();
    assert!(
        matches!(&e, Error::TensorShape { name, expected, found, .. }
            if name == "encoder.layer.0.intermediate.dense.weight" && *expected == [ff, h] && *found == [h, ff]),
        "{e}"
    );
}

#[test]
fn cosine_of_host_vectors() {
    assert!((cosine(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]) - 1.0).abs() < 1e-6);
    assert!((cosine(&[1.0, 0.0], &[-3.0, 0.0]) + 1.0).abs() < 1e-6);
    assert_eq!(cosine(&[1.0, 0.0], &[0.0, 5.0]), 0.0);
    assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    let c = cosine(&[1.0, 1.0], &[1.0, 0.0]);
    assert!((c - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6, "{c}");
}
