//! GPT-2 and BERT against Hugging Face transformers: outputs, loss and every parameter gradient
//! of tiny random models, in f32 on the CPU (BERT with a left-padded row).

mod golden_common;
use golden_common::{assert_rel, check_grads, fixture, Golden};
use std::sync::Arc;
use tuna_autograd::ops::linear::{matmul, MatmulParams};
use tuna_autograd::{Ints, Tensor};
use tuna_kernels::Cpu;
use tuna_models::bert::Bert;
use tuna_models::config::ModelConfig;
use tuna_models::gpt2::Gpt2;
use tuna_models::hf::HfCheckpoint;
use tuna_models::params::Loader;

fn ints<T: tuna_kernels::Elem>(dev: &Arc<Cpu>, g: &Golden, name: &str, f: impl Fn(i64) -> T) -> Ints<Cpu, T> {
    let v: Vec<T> = g.i64(name).into_iter().map(f).collect();
    Ints::new(dev, &g.shape(name), &v).unwrap()
}

#[test]
fn gpt2_matches_hugging_face() {
    let ck = HfCheckpoint::open(fixture("gpt2")).unwrap();
    let ModelConfig::Gpt2(cfg) = ck.config().clone() else { panic!("gpt2 fixture is not gpt2") };
    let dev = Arc::new(Cpu);
    let mut loader = Loader::<Cpu, f32>::with_trainable(&ck, &dev, |_| true);
    let model = Gpt2::load(&cfg, &mut loader).unwrap();
    let g = Golden::open("gpt2");
    let ids = ints(&dev, &g, "input_ids", |v| v as u32);
    let pos = ints(&dev, &g, "position_ids", |v| v as u32);
    let labels = ints(&dev, &g, "labels", |v| v as i32);
    let logits = tuna_autograd::no_grad(|| model.forward(&ids, &pos)).unwrap().to_vec().unwrap();
    assert_rel("gpt2 logits", 1e-5, &logits, &g.f32("logits"));
    let loss = model.loss_masked(&ids, &pos, None, labels.host()).unwrap();
    assert_rel("gpt2 loss", 1e-5, &loss.to_vec().unwrap(), &g.f32("loss"));
    loss.backward().unwrap();
    check_grads(&g, &loader.loaded);
}

#[test]
fn bert_matches_hugging_face() {
    let ck = HfCheckpoint::open(fixture("bert")).unwrap();
    let ModelConfig::Bert(cfg) = ck.config().clone() else { panic!("bert fixture is not bert") };
    let dev = Arc::new(Cpu);
    let mut loader = Loader::<Cpu, f32>::with_trainable(&ck, &dev, |_| true);
    let model = Bert::load(&cfg, &mut loader).unwrap();
    let g = Golden::open("bert");
    let ids = ints(&dev, &g, "input_ids", |v| v as u32);
    let mask = ints(&dev, &g, "attention_mask", |v| v as u8);
    let h = model.forward(&ids, &mask).unwrap();
    let want_h = g.f32("last_hidden_state");
    let hidden = cfg.hidden_size;
    let keep = |x: &[f32]| -> Vec<f32> {
        x.chunks(hidden).zip(mask.host()).filter(|(_, &m)| m == 1).flat_map(|(r, _)| r.to_vec()).collect()
    };
    assert_rel("bert last_hidden_state", 1e-5, &keep(&h.to_vec().unwrap()), &keep(&want_h));
    let pooled = tuna_autograd::no_grad(|| model.mean_pooled(&h, &mask)).unwrap();
    assert_rel("bert pooled_mean", 1e-5, &pooled.to_vec().unwrap(), &g.f32("pooled_mean"));
    // loss = sum(h * probe * mask): a dot product with the masked probe
    let probe: Vec<f32> = g
        .f32("probe")
        .chunks(hidden)
        .zip(mask.host())
        .flat_map(|(r, &m)| r.iter().map(move |&p| p * m as f32))
        .collect();
    let probe = Tensor::constant(&dev, &[probe.len()], &probe).unwrap();
    let loss = matmul(&h, &probe, MatmulParams::new(1, 1, h.numel())).unwrap();
    assert_rel("bert loss", 1e-5, &loss.to_vec().unwrap(), &g.f32("loss"));
    loss.backward().unwrap();
    check_grads(&g, &loader.loaded);
}
