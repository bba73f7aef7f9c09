//! Llama against Hugging Face transformers: logits, loss and every parameter gradient of a tiny
//! random model (GQA, tied embeddings, a left-padded row), in f32 on the CPU.

mod golden_common;
use golden_common::{assert_rel, check_grads, fixture, Golden};
use std::sync::Arc;
use tuna_autograd::Ints;
use tuna_kernels::Cpu;
use tuna_models::config::ModelConfig;
use tuna_models::hf::HfCheckpoint;
use tuna_models::llama::Llama;
use tuna_models::params::Loader;

#[test]
fn llama_matches_hugging_face() {
    let ck = HfCheckpoint::open(fixture("llama")).unwrap();
    let ModelConfig::Llama(cfg) = ck.config().clone() else { panic!("llama fixture is not llama") };
    assert_eq!(cfg.rope_theta, 1e5, "rope_theta from transformers 5's rope_parameters");
    let dev = Arc::new(Cpu);
    let mut loader = Loader::<Cpu, f32>::with_trainable(&ck, &dev, |_| true);
    let model = Llama::load(&cfg, &mut loader).unwrap();
    let g = Golden::open("llama");
    let [b, t] = g.shape("input_ids")[..] else { panic!() };
    let ids: Vec<u32> = g.i64("input_ids").iter().map(|&v| v as u32).collect();
    let mask: Vec<u8> = g.i64("attention_mask").iter().map(|&v| v as u8).collect();
    let pos: Vec<u32> = g.i64("position_ids").iter().map(|&v| v as u32).collect();
    let labels: Vec<i32> = g.i64("labels").iter().map(|&v| v as i32).collect();
    let (ids, mask_t, pos) = (
        Ints::new(&dev, &[b, t], &ids).unwrap(),
        Ints::new(&dev, &[b, t], &mask).unwrap(),
        Ints::new(&dev, &[b, t], &pos).unwrap(),
    );

    // logits where the mask is 1 (fully masked query rows are not meaningful in either)
    let logits = tuna_autograd::no_grad(|| model.forward(&ids, &pos, Some(&mask_t), None)).unwrap().to_vec().unwrap();
    let want = g.f32("logits");
    let v = cfg.vocab_size;
    let keep = |x: &[f32]| -> Vec<f32> {
        x.chunks(v).zip(&mask).filter(|(_, &m)| m == 1).flat_map(|(r, _)| r.to_vec()).collect()
    };
    assert_rel("llama logits", 1e-5, &keep(&logits), &keep(&want));

    let loss = model.loss_masked(&ids, &pos, Some(&mask_t), &labels).unwrap();
    assert_rel("llama loss", 1e-5, &loss.to_vec().unwrap(), &g.f32("loss"));
    loss.backward().unwrap();
    check_grads(&g, &loader.loaded);
}
