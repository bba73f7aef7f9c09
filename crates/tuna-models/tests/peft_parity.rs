//! tuna against Hugging Face PEFT 0.21.2: adapters PEFT saved (prompt tuning, P-tuning with the
//! MLP and the LSTM encoder, prefix tuning with and without the projection, LoRA on Conv1D and
//! nn.Linear, on GPT-2, Llama with GQA and BERT)
//! load into tuna and give PEFT's outputs, loss and adapter gradients; and adapters tuna saves
//! load in PEFT (checked by `make_peft_golden.py --check-tuna`, whose verdict is committed).

mod adapt_common;
mod golden_common;

use adapt_common::{frozen, perturb, Fixture, Model, Net};
use golden_common::{assert_rel, fixture, Golden};
use std::sync::Arc;
use tuna_autograd::ops::linear::{linear, WeightLayout};
use tuna_autograd::ops::shape::reshape;
use tuna_autograd::{Ints, Tensor};
use tuna_kernels::Cpu;
use tuna_models::adapt::{
    peft, Adaptable, EncoderKind, LoraConfig, Method, PrefixParams, PromptEncoder, PromptInit, PromptParams,
};
use tuna_models::io;

const CASES: [(&str, &str); 15] = [
    ("gpt2_prompt", "gpt2"),
    ("llama_prompt", "llama"),
    ("bert_prompt", "bert"),
    ("gpt2_prefix", "gpt2"),
    ("llama_prefix", "llama"),
    ("bert_prefix", "bert"),
    ("gpt2_prefix_proj", "gpt2"),
    ("llama_prefix_proj", "llama"),
    ("gpt2_ptuning", "gpt2"),
    ("llama_ptuning", "llama"),
    ("bert_ptuning", "bert"),
    ("llama_ptuning_lstm", "llama"),
    ("gpt2_lora", "gpt2"),
    ("llama_lora", "llama"),
    ("bert_lora", "bert"),
];

fn case_dir(case: &str) -> std::path::PathBuf {
    fixture("peft").join(case)
}

fn load_case(case: &str, arch: &str) -> Model<f32> {
    let mut m = frozen::<f32>(arch);
    let dir = case_dir(case);
    m.load_adapter(&dir).unwrap_or_else(|e| panic!("{case}: {e}"));
    m
}

fn ids_of(g: &Golden) -> (Vec<u32>, usize) {
    let b = g.shape("input_ids")[0];
    (g.i64("input_ids").iter().map(|&v| v as u32).collect(), b)
}

/// PEFT's loss: the causal LM loss with labels = input_ids, or BERT's `sum(hidden * probe)`.
fn loss(m: &Model<f32>, g: &Golden) -> Tensor<Cpu, f32> {
    let (ids, b) = ids_of(g);
    match &m.net {
        Net::Bert(_) => {
            let h = m.outputs(&ids, b, None);
            let probe = Tensor::constant(&Arc::new(Cpu), &[1, h.numel()], &g.f32("probe")).unwrap();
            let flat = reshape(&h, &[1, h.numel()]).unwrap();
            linear(&flat, &probe, WeightLayout::OutIn, None).unwrap()
        }
        _ => m.loss(&ids, b),
    }
}

/// PEFT's parameter name for a tuna adapter tensor name.
fn peft_grad_name(tuna: &str) -> String {
    match tuna {
        "prompt_embeddings" => "grad.prompt_encoder.default.embedding.weight".into(),
        n if n.starts_with("prompt_encoder.") => {
            format!("grad.{}", n.replacen("prompt_encoder.", "prompt_encoder.default.", 1))
        }
        n => format!(
            "grad.{}",
            n.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        ),
    }
}

fn check_grads(case: &str, m: &Model<f32>, g: &Golden) {
    let params = m.adapt().params();
    assert!(!params.is_empty(), "{case}: no adapter parameters");
    let global = params.iter().flat_map(|(n, _)| g.f32(&peft_grad_name(n))).fold(0.0f64, |a, v| a.max(v.abs() as f64));
    for (name, t) in &params {
        let key = peft_grad_name(name);
        let want = g.f32(&key);
        let got = t.grad().unwrap().unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
        // 1e-4 relative, with a floor of 1e-6 of the case's largest gradient (rounding noise near zero).
        let max = want.iter().fold(0.0f64, |a, &v| a.max(v.abs() as f64));
        tuna_kernels::testing::Tol::new("PEFT adapter grads", (1e-4 * max).max(1e-6 * global), 1e-4).assert_close(
            &format!("{case} {key}"),
            &got,
            &want,
        );
    }
}

#[test]
fn peft_adapters_give_peft_outputs_loss_and_gradients() {
    for (case, arch) in CASES {
        let g = Golden::open(&format!("peft/{case}"));
        let m = load_case(case, arch);
        let (ids, b) = ids_of(&g);
        let out = tuna_autograd::no_grad(|| m.outputs(&ids, b, None));
        let key = if arch == "bert" { "last_hidden_state" } else { "logits" };
        assert_eq!(out.shape(), g.shape(key), "{case}: output shape (prompt tuning includes the virtual rows)");
        assert_rel(&format!("{case} {key}"), 1e-5, &out.to_vec().unwrap(), &g.f32(key));
        let l = loss(&m, &g);
        assert_rel(&format!("{case} loss"), 1e-5, &l.to_vec().unwrap(), &g.f32("loss"));
        l.backward().unwrap();
        if case.ends_with("_proj") || case.contains("_ptuning") {
            // The saved table is the projection's (or the prompt encoder's) output: its gradient
            // is PEFT's `grad_saved`.
            let (_, t) = &m.adapt().params()[0];
            assert_rel(
                &format!("{case} table grad"),
                1e-4,
                &t.grad().unwrap().unwrap(),
                &g.f32("grad_saved.prompt_embeddings"),
            );
        } else {
            check_grads(case, &m, &g);
        }
    }
}

/// The reparameterized prefix, rebuilt from PEFT's MLP weights: outputs and every MLP gradient.
#[test]
fn prefix_projection_mlp_matches_peft() {
    for (case, arch) in [("gpt2_prefix_proj", "gpt2"), ("llama_prefix_proj", "llama")] {
        let g = Golden::open(&format!("peft/{case}"));
        let mut m = load_case(case, arch);
        let dev = Arc::new(Cpu);
        let p = |n: &str| {
            let key = format!("param.prompt_encoder.default.{n}");
            Tensor::param(&dev, n, &g.shape(&key), &g.f32(&key)).unwrap()
        };
        let mlp = PrefixParams::Mlp {
            emb: p("embedding.weight"),
            w1: p("transform.0.weight"),
            b1: p("transform.0.bias"),
            w2: p("transform.2.weight"),
            b2: p("transform.2.bias"),
        };
        match &mut m.net {
            Net::Gpt2(x) => x.adapt_mut().prefix.as_mut().unwrap().params = mlp,
            Net::Llama(x) => x.adapt_mut().prefix.as_mut().unwrap().params = mlp,
            Net::Bert(_) | Net::T5(_) => unreachable!(),
        }
        let (ids, b) = ids_of(&g);
        let out = tuna_autograd::no_grad(|| m.outputs(&ids, b, None));
        assert_rel(&format!("{case} logits via MLP"), 1e-5, &out.to_vec().unwrap(), &g.f32("logits"));
        let l = loss(&m, &g);
        l.backward().unwrap();
        check_grads(case, &m, &g);
    }
}

/// P-tuning's prompt encoder (MLP and LSTM), rebuilt from PEFT's parameters: outputs, loss and
/// every encoder gradient. (The adapter file holds only the encoder's output.)
#[test]
fn ptuning_encoder_matches_peft() {
    let cases = [
        ("gpt2_ptuning", "gpt2", EncoderKind::Mlp),
        ("llama_ptuning", "llama", EncoderKind::Mlp),
        ("bert_ptuning", "bert", EncoderKind::Mlp),
        ("llama_ptuning_lstm", "llama", EncoderKind::Lstm),
    ];
    for (case, arch, kind) in cases {
        let g = Golden::open(&format!("peft/{case}"));
        let mut m = load_case(case, arch);
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(case_dir(case).join(peft::CONFIG)).unwrap()).unwrap();
        let (n, hidden) = (cfg["num_virtual_tokens"].as_u64().unwrap(), cfg["encoder_hidden_size"].as_u64().unwrap());
        let enc = PromptEncoder::new(&Arc::new(Cpu), kind, n as usize, m.shape().hidden, hidden as usize, 1).unwrap();
        let names: Vec<String> = enc.params().into_iter().map(|(n, _)| n).collect();
        let peft_names: Vec<String> =
            g.names().iter().filter_map(|k| k.strip_prefix("param.").map(String::from)).collect();
        assert_eq!(names.len(), peft_names.len(), "{case}: tuna's encoder tensors {names:?} vs PEFT's {peft_names:?}");
        for (name, t) in enc.params() {
            let key = format!("param.{}", name.replacen("prompt_encoder.", "prompt_encoder.default.", 1));
            assert_eq!(t.shape(), g.shape(&key), "{case}: {name} shape");
            *t.data_mut() = g.f32(&key);
        }
        m.adapt_mut().prompt.as_mut().unwrap().params = PromptParams::Encoder(enc);
        let (ids, b) = ids_of(&g);
        let out = tuna_autograd::no_grad(|| m.outputs(&ids, b, None));
        let key = if arch == "bert" { "last_hidden_state" } else { "logits" };
        assert_rel(&format!("{case} {key} via the encoder"), 1e-5, &out.to_vec().unwrap(), &g.f32(key));
        let l = loss(&m, &g);
        assert_rel(&format!("{case} loss via the encoder"), 1e-5, &l.to_vec().unwrap(), &g.f32("loss"));
        l.backward().unwrap();
        check_grads(case, &m, &g);
    }
}

/// The adapters tuna writes for the PEFT check: every kind PEFT has, on each base, from tuna's
/// own initializations (perturbed so none is an identity).
fn tuna_adapters() -> Vec<(&'static str, &'static str, Method)> {
    let lora = |t: &[&str]| {
        Method::Lora(LoraConfig { r: 3, alpha: 6.0, dropout: 0.0, targets: t.iter().map(|s| s.to_string()).collect() })
    };
    vec![
        ("gpt2_prompt", "gpt2", Method::Prompt { n: 3, init: PromptInit::SampleVocab }),
        ("llama_prompt", "llama", Method::Prompt { n: 3, init: PromptInit::Random }),
        ("bert_prompt", "bert", Method::Prompt { n: 2, init: PromptInit::SampleVocab }),
        ("gpt2_prefix_proj", "gpt2", Method::Prefix { n: 2, projection: Some(8), init: PromptInit::Random }),
        ("llama_prefix_proj", "llama", Method::Prefix { n: 2, projection: Some(8), init: PromptInit::Random }),
        ("llama_ptuning_v2", "llama", Method::PTuningV2 { n: 3, init: PromptInit::Random }),
        ("gpt2_ptuning", "gpt2", Method::PTuning { n: 3, encoder: EncoderKind::Mlp, hidden: Some(8) }),
        ("bert_ptuning_lstm", "bert", Method::PTuning { n: 2, encoder: EncoderKind::Lstm, hidden: Some(4) }),
        ("bert_prefix", "bert", Method::Prefix { n: 2, projection: None, init: PromptInit::Random }),
        ("gpt2_lora", "gpt2", lora(&["c_attn", "c_proj"])),
        ("llama_lora", "llama", lora(&["q_proj", "k_proj", "o_proj", "up_proj"])),
        ("bert_lora", "bert", lora(&["query", "output.dense"])),
    ]
}

fn saved_dir() -> std::path::PathBuf {
    fixture("peft").join("tuna_saved")
}

/// Writes each adapter with tuna into `dir/<case>/` with its outputs, in the layout
/// `make_peft_golden.py --check-tuna` reads.
fn write_tuna_adapters(dir: &std::path::Path) {
    for (case, arch, method) in tuna_adapters() {
        let mut m = frozen::<f32>(arch);
        let seed = case.len() as u64 * 1009;
        m.install(&method, seed, None).unwrap();
        perturb(m.adapt(), 0.4);
        let d = dir.join(case);
        m.save_adapter(&d, arch).unwrap();
        let g = Golden::open(&format!("peft/{arch}_lora"));
        let (ids, b) = ids_of(&g);
        let out = tuna_autograd::no_grad(|| m.outputs(&ids, b, None));
        let key = if arch == "bert" { "last_hidden_state" } else { "logits" };
        let ids64: Vec<u8> = g.i64("input_ids").iter().flat_map(|v| v.to_le_bytes()).collect();
        let outb: Vec<u8> = out.to_vec().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = vec![
            (
                "input_ids".to_string(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![b, ids.len() / b], &ids64).unwrap(),
            ),
            (
                key.to_string(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, out.shape().to_vec(), &outb).unwrap(),
            ),
        ];
        std::fs::write(d.join("tuna_outputs.safetensors"), safetensors::tensor::serialize(views, None).unwrap())
            .unwrap();
        std::fs::write(d.join("base"), arch).unwrap();
    }
}

/// The committed `tuna_saved/` adapters are what tuna writes today (byte for byte), and PEFT
/// loaded each and reproduced tuna's outputs (`peft_check.json`, by `make_peft_golden.py
/// --check-tuna`). Regenerate with `TUNA_WRITE_PEFT_CHECK=1` and rerun the script.
#[test]
fn adapters_tuna_saves_load_in_peft() {
    if std::env::var_os("TUNA_WRITE_PEFT_CHECK").is_some() {
        write_tuna_adapters(&saved_dir());
    }
    let tmp = std::env::temp_dir().join(format!("tuna-peft-saved-{}", std::process::id()));
    write_tuna_adapters(&tmp);
    let verdict: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(saved_dir().join("peft_check.json")).expect("peft_check.json"))
            .unwrap();
    for (case, _, _) in tuna_adapters() {
        let now = std::fs::read(tmp.join(case).join(peft::CONFIG)).unwrap();
        let committed = std::fs::read(saved_dir().join(case).join(peft::CONFIG)).unwrap_or_default();
        assert!(now == committed, "{case}: tuna now writes another adapter_config.json than PEFT checked (regenerate)");
        // The weights: the same names, shapes and values. Byte for byte where nothing is computed;
        // a saved value that tuna computes (the prefix MLP's output) may differ in its last bits
        // between CPUs (the GEMM's AVX-512 and AVX2 microkernels sum in other orders).
        let (now, committed) = (
            io::read_tensors(&tmp.join(case).join(peft::WEIGHTS)).unwrap(),
            io::read_tensors(&saved_dir().join(case).join(peft::WEIGHTS)).unwrap(),
        );
        assert_eq!(now.keys().collect::<Vec<_>>(), committed.keys().collect::<Vec<_>>(), "{case}: tensor names");
        for (name, (shape, v)) in &now {
            let (cs, cv) = &committed[name];
            assert_eq!(shape, cs, "{case}/{name}: shape");
            let scale = cv.iter().fold(1f32, |a, x| a.max(x.abs()));
            for (i, (a, b)) in v.iter().zip(cv).enumerate() {
                assert!(
                    (a - b).abs() <= 4.0 * f32::EPSILON * scale,
                    "{case}/{name}[{i}]: tuna now writes {a}, PEFT checked {b} (regenerate)"
                );
            }
        }
        // The outputs PEFT was compared with are tuna's of today (to rounding: the thread count
        // may change the summation order).
        let outs = |d: &std::path::Path| io::read_tensors(&d.join(case).join("tuna_outputs.safetensors")).unwrap();
        for (name, (_, want)) in outs(&saved_dir()) {
            assert_rel(&format!("{case} {name}"), 1e-5, &outs(&tmp)[&name].1, &want);
        }
        let v = &verdict[case];
        assert_eq!(v["ok"], serde_json::Value::Bool(true), "{case}: PEFT's check says {v}");
    }
    std::fs::remove_dir_all(&tmp).ok();
}

/// An adapter for another base model is refused with the file and the disagreeing dimension.
#[test]
fn adapter_for_another_base_is_a_clear_error() {
    let mut gpt2 = frozen::<f32>("gpt2");
    let Net::Gpt2(m) = &mut gpt2.net else { unreachable!() };
    // A Llama prefix (2 layers, token_dim 16) on GPT-2 (token_dim 32).
    let e = peft::load(m, &case_dir("llama_prefix")).unwrap_err().to_string();
    assert!(e.contains("adapter_config.json") && e.contains("token_dim"), "{e}");
    // Llama LoRA module names do not exist in GPT-2.
    let e = peft::load(m, &case_dir("llama_lora")).unwrap_err().to_string();
    assert!(e.contains("this model has no linear `model.layers.0.") && e.contains("adapter_model.safetensors"), "{e}");
    // tuna_base.json names the vocabulary: a tuna adapter saved for another vocabulary.
    let tmp = std::env::temp_dir().join(format!("tuna-peft-vocab-{}", std::process::id()));
    let mut llama = frozen::<f32>("llama");
    let Net::Llama(l) = &mut llama.net else { unreachable!() };
    Method::Prompt { n: 2, init: PromptInit::Random }.apply(l, 1).unwrap();
    peft::save(l, &tmp, "llama").unwrap();
    let base =
        std::fs::read_to_string(tmp.join(peft::BASE)).unwrap().replace("\"vocab_size\": 96", "\"vocab_size\": 50257");
    std::fs::write(tmp.join(peft::BASE), base).unwrap();
    let e = peft::load(l, &tmp).unwrap_err().to_string();
    assert!(e.contains("tuna_base.json") && e.contains("vocab_size 50257"), "{e}");
    // A missing folder names the config file.
    let e = peft::load(l, &tmp.join("nope")).unwrap_err().to_string();
    assert!(e.contains("nope/adapter_config.json"), "{e}");
    std::fs::remove_dir_all(&tmp).ok();
    let _ = Ints::<Cpu, u32>::new(&Arc::new(Cpu), &[1], &[0]);
}
