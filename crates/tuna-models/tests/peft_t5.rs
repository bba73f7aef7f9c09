//! tuna's T5 against Hugging Face PEFT 0.21.2 (SEQ_2_SEQ_LM): LoRA on every q and v (encoder
//! self-, decoder self- and cross-attention), prompt tuning (PEFT's table of 2n rows, the first n
//! before the encoder's input), P-tuning with the MLP encoder over 2n tokens, and prefix tuning
//! (which PEFT delivers to the decoder's self-attention only): adapters PEFT saved load into tuna
//! and give PEFT's logits, loss and adapter gradients (fixtures from
//! `scripts/golden/make_t5_golden.py`).

mod golden_common;

use golden_common::{assert_rel, fixture, Golden};
use std::sync::Arc;
use tuna_autograd::{Ints, Tensor};
use tuna_kernels::testing::Tol;
use tuna_kernels::Cpu;
use tuna_models::adapt::{EncoderKind, PromptEncoder, PromptParams, SoftPrompt};
use tuna_models::model::{AnyModel, Net};
use tuna_models::t5::T5;

type Model = AnyModel<Cpu, f32>;

fn t5(m: &Model) -> &T5<Cpu, f32> {
    match &m.net {
        Net::T5(t) => t,
        _ => panic!("not a T5"),
    }
}

fn load(case: &str, base: &str) -> Model {
    let mut m = Model::open(&Arc::new(Cpu), &fixture(base), |_| false).unwrap();
    m.load_adapter(&fixture("peft").join(case)).unwrap_or_else(|e| panic!("{case}: {e}"));
    m
}

/// Logits and loss of the golden inputs.
fn run(m: &Model, g: &Golden) -> (Vec<f32>, Tensor<Cpu, f32>) {
    let dev = Arc::new(Cpu);
    let ids: Vec<u32> = g.i64("input_ids").iter().map(|&v| v as u32).collect();
    let mask: Vec<u8> = g.i64("attention_mask").iter().map(|&v| v as u8).collect();
    let labels: Vec<i32> = g.i64("labels").iter().map(|&v| v as i32).collect();
    let shape = g.shape("input_ids");
    let (ids, mask) = (Ints::new(&dev, &shape, &ids).unwrap(), Ints::new(&dev, &shape, &mask).unwrap());
    let model = t5(m);
    let dec = Ints::new(&dev, &g.shape("labels"), &model.shift_right(&labels, shape[0])).unwrap();
    let logits = tuna_autograd::no_grad(|| model.forward(&ids, &mask, &dec)).unwrap().to_vec().unwrap();
    (logits, model.loss(&ids, &mask, &labels).unwrap())
}

/// The gradient PEFT's parameter `peft` holds, its first `rows` rows when given.
fn peft_grad(g: &Golden, peft: &str, rows: Option<usize>) -> Vec<f32> {
    let key = format!("grad.{peft}");
    let v = g.f32(&key);
    match rows {
        Some(r) => {
            let width = g.shape(&key)[1];
            // The rows PEFT's forward never reads get no gradient.
            assert!(v[r * width..].iter().all(|&x| x == 0.0), "{key}: rows past {r} have gradients");
            v[..r * width].to_vec()
        }
        None => v,
    }
}

fn close_grads(case: &str, pairs: &[(String, Vec<f32>, Vec<f32>)]) {
    assert!(!pairs.is_empty(), "{case}: no gradients compared");
    let global = pairs.iter().flat_map(|(_, _, w)| w.iter()).fold(0.0f64, |a, &v| a.max(v.abs() as f64));
    for (name, got, want) in pairs {
        let max = want.iter().fold(0.0f64, |a, &v| a.max(v.abs() as f64));
        Tol::new("PEFT adapter grads", (1e-4 * max).max(1e-6 * global), 1e-4).assert_close(
            &format!("{case} {name}"),
            got,
            want,
        );
    }
}

fn check_outputs(case: &str, m: &Model, g: &Golden) -> Tensor<Cpu, f32> {
    let (logits, loss) = run(m, g);
    assert_rel(&format!("{case} logits"), 1e-5, &logits, &g.f32("logits"));
    assert_rel(&format!("{case} loss"), 1e-5, &loss.to_vec().unwrap(), &g.f32("loss"));
    loss.backward().unwrap();
    loss
}

#[test]
fn lora_on_every_q_and_v_matches_peft() {
    let g = Golden::open("peft/t5_lora");
    let m = load("t5_lora", "t5v11");
    assert_eq!(m.adapt().lora.len(), 2 * (2 + 3 + 3), "encoder self, decoder self and cross q/v");
    check_outputs("t5_lora", &m, &g);
    let pairs: Vec<_> = m
        .adapt()
        .params()
        .into_iter()
        .map(|(n, t)| {
            let peft = n
                .replace(".lora_A.weight", ".lora_A.default.weight")
                .replace(".lora_B.weight", ".lora_B.default.weight");
            (n, t.grad().unwrap().unwrap(), peft_grad(&g, &peft, None))
        })
        .collect();
    close_grads("t5_lora", &pairs);
}

#[test]
fn prompt_tuning_matches_peft() {
    let g = Golden::open("peft/t5_prompt");
    let m = load("t5_prompt", "t5v11");
    assert_eq!(m.adapt().prompt_len(), 4);
    check_outputs("t5_prompt", &m, &g);
    let (_, t) = &m.adapt().params()[0];
    let pairs = vec![(
        "prompt_embeddings".to_string(),
        t.grad().unwrap().unwrap(),
        peft_grad(&g, "prompt_encoder.default.embedding.weight", Some(4)),
    )];
    close_grads("t5_prompt", &pairs);
}

/// P-tuning's saved table (the encoder's 2n outputs) loads as a prompt of its first n; the MLP
/// encoder rebuilt from PEFT's parameters over 2n tokens gives the same loss and PEFT's encoder
/// gradients.
#[test]
fn ptuning_matches_peft() {
    let g = Golden::open("peft/t5_ptuning");
    let mut m = load("t5_ptuning", "t5v11");
    assert_eq!(m.adapt().prompt_len(), 3);
    let (logits, _) = run(&m, &g);
    assert_rel("t5_ptuning logits (saved table)", 1e-5, &logits, &g.f32("logits"));
    let enc = PromptEncoder::new(&Arc::new(Cpu), EncoderKind::Mlp, 6, 32, 8, 1).unwrap();
    for (name, t) in enc.params() {
        let key = format!("param.{}", name.replacen("prompt_encoder.", "prompt_encoder.default.", 1));
        assert_eq!(t.shape(), g.shape(&key), "{name} shape");
        *t.data_mut() = g.f32(&key);
    }
    let spec = m.adapt().prompt.as_ref().unwrap().ptuning;
    let mut p = SoftPrompt::encoded(enc).first(3);
    p.ptuning = spec;
    m.adapt_mut().prompt = Some(p);
    assert!(matches!(m.adapt().prompt.as_ref().unwrap().params, PromptParams::Encoder(_)));
    check_outputs("t5_ptuning (encoder)", &m, &g);
    let pairs: Vec<_> = m
        .adapt()
        .params()
        .into_iter()
        .map(|(n, t)| {
            let peft = n.replacen("prompt_encoder.", "prompt_encoder.default.", 1);
            (n, t.grad().unwrap().unwrap(), peft_grad(&g, &peft, None))
        })
        .collect();
    close_grads("t5_ptuning", &pairs);
}

/// PEFT's seq2seq prefix reaches the decoder's self-attention only (layer j reading prefix layer
/// 2j mod num_layers), the queries' relative positions counted after the virtual tokens.
#[test]
fn prefix_tuning_matches_peft() {
    let g = Golden::open("peft/t5_prefix");
    let m = load("t5_prefix", "t5");
    assert_eq!(m.adapt().prefix_len(), 3);
    check_outputs("t5_prefix", &m, &g);
    let (_, t) = &m.adapt().params()[0];
    let pairs = vec![(
        "prompt_embeddings".to_string(),
        t.grad().unwrap().unwrap(),
        peft_grad(&g, "prompt_encoder.default.embedding.weight", None),
    )];
    close_grads("t5_prefix", &pairs);
}

/// A saved T5 prompt adapter is PEFT's layout (2n rows, two submodules, SEQ_2_SEQ_LM) and loads
/// back to the same outputs.
#[test]
fn saved_t5_adapters_round_trip_in_peft_layout() {
    let g = Golden::open("peft/t5_prompt");
    let m = load("t5_prompt", "t5v11");
    let dir = std::env::temp_dir().join(format!("tuna-t5-prompt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    m.save_adapter(&dir, "t5v11").unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["task_type"], "SEQ_2_SEQ_LM");
    assert_eq!(cfg["num_transformer_submodules"], 2);
    let t = tuna_models::io::read_tensors(&dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(t["prompt_embeddings"].0, vec![8, 32]);
    let mut back = Model::open(&Arc::new(Cpu), &fixture("t5v11"), |_| false).unwrap();
    back.load_adapter(&dir).unwrap();
    let (a, _) = run(&m, &g);
    let (b, _) = run(&back, &g);
    assert_eq!(a, b);
    std::fs::remove_dir_all(&dir).unwrap();
}
