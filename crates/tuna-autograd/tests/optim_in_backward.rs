//! AdamW inside the backward (`AdamW::backward_and_step`): each parameter updated as soon as its
//! gradient is complete gives bitwise the parameters of `backward()` then `step()`, holds fewer
//! gradients at once, and applies no non-finite gradient.

mod common;
use common::cpu;
use common::tiny::{Tiny, Train};
use tuna_autograd::ops::attention::{attention_biased, AttnOptions};
use tuna_autograd::ops::elem::scale;
use tuna_autograd::ops::linear::{linear, WeightLayout};
use tuna_autograd::ops::loss::cross_entropy;
use tuna_autograd::optim::{AdamW, AdamWParams, MomentStorage};
use tuna_autograd::{Ints, Tensor};
use tuna_kernels::Cpu;

const IDS: [u32; 10] = [1, 4, 2, 9, 3, 7, 7, 0, 10, 5];

fn values(m: &Tiny<Cpu, f32>) -> Vec<(String, Vec<f32>)> {
    m.trainable().iter().map(|p| (p.name().unwrap().to_string(), p.to_vec().unwrap())).collect()
}

#[test]
fn updating_in_the_backward_gives_the_parameters_of_backward_then_step() {
    for train in [Train::All, Train::PrefixOnly, Train::PromptOnly] {
        for storage in [MomentStorage::Master, MomentStorage::Bf16] {
            let (a, b) = (Tiny::<Cpu, f32>::new(&cpu(), 3, train), Tiny::<Cpu, f32>::new(&cpu(), 3, train));
            let hp = AdamWParams { weight_decay: 0.01, ..AdamWParams::new(0.02) };
            let mut oa = AdamW::with_storage(&a.trainable(), hp, storage).unwrap();
            let mut ob = AdamW::with_storage(&b.trainable(), hp, storage).unwrap();
            let total: usize = b.trainable().iter().map(|p| p.bytes()).sum();
            for step in 0..4 {
                a.loss(&IDS, 2).unwrap().backward().unwrap();
                oa.step().unwrap();
                let out = ob.backward_and_step(&b.loss(&IDS, 2).unwrap()).unwrap();
                let what = format!("{train:?}, {storage} moments, step {step}");
                assert_eq!(out.updated, b.trainable().len(), "{what}: {out:?}");
                assert!(out.non_finite.is_none() && out.grad_sq_norm.is_finite() && out.grad_sq_norm > 0.0, "{what}");
                assert_eq!(values(&a), values(&b), "{what}: parameters differ");
                assert!(b.trainable().iter().all(|p| p.grad().unwrap().is_none()), "{what}: gradients left");
                if train == Train::All {
                    // The head completes first and the embedding table last: never all at once.
                    assert!(
                        out.peak_grad_bytes < total * 3 / 4,
                        "{what}: {} of {total} bytes held",
                        out.peak_grad_bytes
                    );
                }
            }
        }
    }
}

#[test]
fn a_non_finite_gradient_is_not_applied_and_named() {
    let dev = cpu();
    // Tiny weights keep the loss finite; huge inputs and a huge loss scale overflow the gradient.
    let w = Tensor::<Cpu, f32>::param(&dev, "w", &[4, 8], &[1e-12; 32]).unwrap();
    let x = Tensor::constant(&dev, &[2, 8], &[1e10; 16]).unwrap();
    let loss = cross_entropy(
        linear(&x, &w, WeightLayout::OutIn, None).unwrap(),
        &Ints::new(&dev, &[2], &[0i32, 3]).unwrap(),
        -100,
    )
    .unwrap();
    let loss = scale(&loss, 1e30).unwrap();
    assert!(loss.to_vec().unwrap()[0].is_finite());
    let mut opt = AdamW::new(&[&w], AdamWParams::new(0.1)).unwrap();
    let out = opt.backward_and_step(&loss).unwrap();
    assert_eq!(out.non_finite.as_deref(), Some("w"), "{out:?}");
    assert_eq!(out.updated, 0);
    assert!(out.grad_sq_norm.is_nan());
    assert_eq!(w.to_vec().unwrap(), vec![1e-12; 32], "a non-finite gradient was applied");
    assert!(w.grad().unwrap().is_none(), "the bad gradient is dropped");
}

/// The attention node lists its score bias among its trainable inputs, so the bias is updated in
/// the backward like the queries, keys and values (and bitwise as backward-then-step updates it).
#[test]
fn an_attention_score_bias_is_updated_in_the_backward() {
    let dev = cpu();
    let (b, t, s, h, d) = (2, 5, 3, 2, 4);
    let make = || {
        let mut rng = tuna_kernels::testing::Rng::new(3);
        let mut p = |name: &str, shape: &[usize]| {
            let n = shape.iter().product();
            Tensor::<Cpu, f32>::param(&dev, name, shape, &rng.normal_vec(n, 0.5)).unwrap()
        };
        [p("q", &[b, t, h, d]), p("k", &[b, s, h, d]), p("v", &[b, s, h, d]), p("bias", &[h, t, s])]
    };
    let targets = Ints::new(&dev, &[b * t * h], &(0..b * t * h).map(|i| (i % d) as i32).collect::<Vec<_>>()).unwrap();
    let loss = |[q, k, v, bias]: &[Tensor<Cpu, f32>; 4]| {
        let opt = AttnOptions { causal: false, scale: None, kv_len: None };
        cross_entropy(attention_biased(q, k, v, None, None, Some(bias), opt).unwrap(), &targets, -100).unwrap()
    };
    let (a, c) = (make(), make());
    let hp = AdamWParams::new(0.05);
    let mut oa = AdamW::new(&a.iter().collect::<Vec<_>>(), hp).unwrap();
    let mut oc = AdamW::new(&c.iter().collect::<Vec<_>>(), hp).unwrap();
    for step in 0..3 {
        loss(&a).backward().unwrap();
        oa.step().unwrap();
        let out = oc.backward_and_step(&loss(&c)).unwrap();
        assert_eq!(out.updated, 4, "step {step}: {out:?}");
        for (x, y) in a.iter().zip(&c) {
            assert_eq!(x.to_vec().unwrap(), y.to_vec().unwrap(), "step {step}: {} differs", x.name().unwrap());
        }
    }
    let first = make();
    assert_ne!(c[3].to_vec().unwrap(), first[3].to_vec().unwrap(), "the bias was not trained");
}

/// One moment at a time (as a resume restores them): each lands where `moment` reads it, bf16
/// moments rounded to bf16, and a length that disagrees is an error naming the parameter.
#[test]
fn moments_load_one_at_a_time() {
    let dev = cpu();
    let a = Tensor::<Cpu, f32>::param(&dev, "a", &[2, 3], &[0.0; 6]).unwrap();
    let b = Tensor::<Cpu, f32>::param(&dev, "b", &[4], &[0.0; 4]).unwrap();
    for storage in [MomentStorage::Master, MomentStorage::Bf16] {
        let mut opt = AdamW::with_storage(&[&a, &b], AdamWParams::new(0.1), storage).unwrap();
        let m: Vec<f32> = (0..4).map(|i| 0.25 * i as f32).collect();
        opt.load_moment(1, false, &m).unwrap();
        opt.load_moment(0, true, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        assert_eq!(opt.moment(1, false).unwrap(), m, "{storage}");
        assert_eq!(opt.moment(0, true).unwrap(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "{storage}");
        assert_eq!(opt.moment(0, false).unwrap(), [0.0; 6], "{storage}: the others untouched");
        let err = opt.load_moment(1, true, &[1.0; 3]).unwrap_err().to_string();
        assert!(err.contains("second moment") && err.contains("\"b\"") && err.contains("3 values"), "{err}");
        assert!(opt.load_moment(2, false, &[]).is_err(), "no parameter #2");
        // bf16 storage keeps 8 significant bits: 1 + 2^-9 rounds to 1.
        opt.load_moment(1, true, &[1.0 + 1.0 / 512.0; 4]).unwrap();
        let want = if storage == MomentStorage::Bf16 { 1.0 } else { 1.0 + 1.0 / 512.0 };
        assert_eq!(opt.moment(1, true).unwrap(), [want; 4], "{storage}");
    }
}
