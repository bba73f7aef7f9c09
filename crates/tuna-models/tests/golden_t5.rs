//! T5 against Hugging Face transformers: logits, loss and every parameter gradient of tiny random
//! T5 (ReLU, tied and scaled head) and T5 v1.1 (gated GELU, own head, more decoder than encoder
//! layers, d_kv * heads != d_model) models, the relative-position buckets, greedy generation, and
//! the seq2seq split of a decoder-style batch through `AnyModel` (fixtures from
//! `scripts/golden/make_t5_golden.py`).

mod golden_common;
use golden_common::{assert_rel, check_grads, fixture, Golden};
use std::sync::Arc;
use tuna_autograd::Ints;
use tuna_kernels::Cpu;
use tuna_models::config::ModelConfig;
use tuna_models::generate::Sampling;
use tuna_models::hf::HfCheckpoint;
use tuna_models::model::{AnyModel, Net};
use tuna_models::params::Loader;
use tuna_models::t5::{relative_bucket, T5};

fn ints<T: tuna_kernels::Elem>(dev: &Arc<Cpu>, g: &Golden, name: &str, f: impl Fn(i64) -> T) -> Ints<Cpu, T> {
    let v: Vec<T> = g.i64(name).into_iter().map(f).collect();
    Ints::new(dev, &g.shape(name), &v).unwrap()
}

fn check_arch(arch: &str) {
    let ck = HfCheckpoint::open(fixture(arch)).unwrap();
    let ModelConfig::T5(cfg) = ck.config().clone() else { panic!("{arch} fixture is not t5") };
    let dev = Arc::new(Cpu);
    let mut loader = Loader::<Cpu, f32>::with_trainable(&ck, &dev, |_| true);
    let model = T5::load(&cfg, &mut loader).unwrap();
    assert_eq!(model.lm_head.id() == model.shared.id(), arch == "t5", "{arch}: head tied iff original T5");
    let g = Golden::open(arch);
    let ids = ints(&dev, &g, "input_ids", |v| v as u32);
    let mask = ints(&dev, &g, "attention_mask", |v| v as u8);
    let dec = ints(&dev, &g, "decoder_input_ids", |v| v as u32);
    let labels: Vec<i32> = g.i64("labels").into_iter().map(|v| v as i32).collect();
    assert_eq!(model.shift_right(&labels, 2), dec.host().to_vec(), "{arch}: decoder input");
    let logits = tuna_autograd::no_grad(|| model.forward(&ids, &mask, &dec)).unwrap().to_vec().unwrap();
    assert_rel(&format!("{arch} logits"), 1e-5, &logits, &g.f32("logits"));
    let loss = model.loss(&ids, &mask, &labels).unwrap();
    assert_rel(&format!("{arch} loss"), 1e-5, &loss.to_vec().unwrap(), &g.f32("loss"));
    loss.backward().unwrap();
    check_grads(&g, &loader.loaded);
}

#[test]
fn t5_matches_hugging_face() {
    check_arch("t5");
}

#[test]
fn t5_v1_1_matches_hugging_face() {
    check_arch("t5v11");
}

#[test]
fn relative_buckets_match_hugging_face() {
    let p = fixture("t5_buckets.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let list = |k: &str| -> Vec<u32> { v[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    for (key, bi, nb, maxd) in
        [("bidirectional", true, 32, 128), ("causal", false, 32, 128), ("bidirectional_8_20", true, 8, 20)]
    {
        let got: Vec<u32> = (-300i64..=300).map(|r| relative_bucket(r, bi, nb, maxd)).collect();
        assert_eq!(got, list(key), "{key}");
    }
}

/// `AnyModel`'s completion loss splits each left-padded `[prompt, target]` row into the encoder's
/// input and the decoder's targets: the same loss as Hugging Face's on the separate tensors.
#[test]
fn a_completion_batch_splits_into_encoder_and_decoder() {
    for arch in ["t5", "t5v11"] {
        let dev = Arc::new(Cpu);
        let model = AnyModel::<Cpu, f32>::open(&dev, &fixture(arch), |_| false).unwrap();
        assert!(model.is_encoder_decoder() && model.is_decoder());
        let g = Golden::open(arch);
        let (ids, mask, labels) = (g.i64("input_ids"), g.i64("attention_mask"), g.i64("labels"));
        let (s, t) = (7, 5);
        let mut rows: Vec<(Vec<u32>, Vec<i32>)> = Vec::new();
        for r in 0..2 {
            let enc: Vec<u32> = (0..s).filter(|&c| mask[r * s + c] == 1).map(|c| ids[r * s + c] as u32).collect();
            let tgt: Vec<i32> = (0..t).map(|c| labels[r * t + c] as i32).filter(|&l| l >= 0).collect();
            let mut row_ids = enc.clone();
            row_ids.extend(tgt.iter().map(|&l| l as u32));
            let mut row_labels = vec![-100; enc.len()];
            row_labels.extend(&tgt);
            rows.push((row_ids, row_labels));
        }
        let width = rows.iter().map(|(i, _)| i.len()).max().unwrap();
        let (mut bi, mut bm, mut bl) = (Vec::new(), Vec::new(), Vec::new());
        for (i, l) in &rows {
            let pad = width - i.len();
            bi.extend(std::iter::repeat_n(0u32, pad).chain(i.iter().copied()));
            bm.extend(std::iter::repeat_n(0u8, pad).chain(std::iter::repeat_n(1u8, i.len())));
            bl.extend(std::iter::repeat_n(-100, pad).chain(l.iter().copied()));
        }
        let loss = model.lm_loss(&bi, &bm, &bl, 2).unwrap().to_vec().unwrap();
        assert_rel(&format!("{arch} split loss"), 1e-5, &loss, &g.f32("loss"));
        // A row with no prompt (the lm task) is refused by name.
        let e = model.lm_loss(&bi[..width], &bm[..width], &vec![1; width], 1).unwrap_err().to_string();
        assert!(e.contains("no prompt tokens"), "{e}");
    }
}

/// Greedy generation (the encoder once, the decoder through its KV cache) gives Hugging Face's
/// tokens.
#[test]
fn greedy_generation_matches_hugging_face() {
    for arch in ["t5", "t5v11"] {
        let dev = Arc::new(Cpu);
        let model = AnyModel::<Cpu, f32>::open(&dev, &fixture(arch), |_| false).unwrap();
        let g = Golden::open(arch);
        let prompt: Vec<u32> = g.i64("input_ids")[..7].iter().map(|&v| v as u32).collect();
        let want: Vec<u32> = g.i64("generated").into_iter().map(|v| v as u32).collect();
        // No eos stop in the reference: compare up to and including the first eos tuna stops at.
        let got = model.generate(&prompt, want.len(), &Sampling::Greedy).unwrap();
        assert!(!got.is_empty() && got.len() <= want.len(), "{arch}: {got:?}");
        assert_eq!(got, want[..got.len()], "{arch}: generated tokens");
        if got.len() < want.len() {
            assert_eq!(Some(*got.last().unwrap()), model.eos_id(), "{arch}: stopped early only at eos");
        }
    }
}

/// Activation checkpointing of T5's blocks (encoder and decoder) gives the plain run's gradients
/// bit for bit, with LoRA and with every base weight training.
#[test]
fn checkpointed_blocks_give_the_same_gradients() {
    use tuna_models::adapt::{LoraConfig, Method};
    use tuna_models::checkpointing::Checkpointing;
    for (arch, full) in [("t5", true), ("t5v11", false)] {
        let grads = |policy: Checkpointing| -> Vec<Vec<f32>> {
            let dev = Arc::new(Cpu);
            let mut m = AnyModel::<Cpu, f32>::open(&dev, &fixture(arch), move |_| full).unwrap();
            if !full {
                let c = LoraConfig { r: 2, alpha: 4.0, dropout: 0.1, targets: vec!["q".into(), "wo".into()] };
                m.install(&Method::Lora(c), 3, None).unwrap();
                // LoRA's B starts at zero: move it so that every gradient is non-trivial.
                for (_, t) in m.adapt().params() {
                    let v: Vec<f32> = (0..t.numel()).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.05).collect();
                    *t.data_mut() = v;
                }
                m.adapt().set_training(true);
                m.adapt().seed_dropout(9);
            }
            m.set_checkpointing(policy);
            let g = Golden::open(arch);
            let dev2 = Arc::new(Cpu);
            let ids = ints(&dev2, &g, "input_ids", |v| v as u32);
            let mask = ints(&dev2, &g, "attention_mask", |v| v as u8);
            let labels: Vec<i32> = g.i64("labels").into_iter().map(|v| v as i32).collect();
            let Net::T5(t) = &m.net else { panic!() };
            t.loss(&ids, &mask, &labels).unwrap().backward().unwrap();
            m.trainable().iter().map(|(_, p)| p.grad().unwrap().unwrap()).collect()
        };
        let plain = grads(Checkpointing::Off);
        assert!(!plain.is_empty());
        assert_eq!(grads(Checkpointing::Every(1)), plain, "{arch}: every block");
        assert_eq!(grads(Checkpointing::Every(2)), plain, "{arch}: every 2nd block");
    }
}
