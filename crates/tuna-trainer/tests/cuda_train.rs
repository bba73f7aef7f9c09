//! Training on CUDA against the CPU: every method, three steps on the tiny GPT-2 and Llama (lm)
//! and BERT (classify) fixtures, the same losses to a named tolerance. Runs on the emulated device
//! (`TUNA_CUDA_EMULATE=1`, the `emulator` feature) in CI; skips by name without any CUDA device.

use std::path::PathBuf;
use std::sync::Arc;
use tuna_kernels::testing::{cuda_or_skip, Tol};
use tuna_kernels::Cpu;
use tuna_models::adapt::{LoraConfig, Method, PromptInit};
use tuna_trainer::{Decay, Fields, Task, TrainConfig};

fn fixture(arch: &str) -> PathBuf {
    match std::env::var_os("TUNA_FIXTURES_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join(arch),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tuna-models/tests/fixtures").join(arch),
    }
}

fn config(arch: &str, method: Method, dir: &std::path::Path) -> TrainConfig {
    let classify = arch == "bert";
    let data = dir.join("train.jsonl");
    let lines: Vec<String> = ["The cat sat on the mat.", "A dog ran in the park.", "The bird sang a song."]
        .iter()
        .cycle()
        .take(8)
        .enumerate()
        .map(|(i, t)| format!("{{\"text\": \"{t}\", \"label\": \"{}\"}}", if i % 2 == 0 { "a" } else { "b" }))
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    TrainConfig {
        model: fixture(arch),
        model_name: None,
        method,
        task: if classify { Task::Classify } else { Task::Lm },
        fields: Fields::default(),
        train: data.clone(),
        eval: Some(data),
        labels: None,
        verbalizers: None,
        prompt_init_text: None,
        batch_size: 4,
        micro_batch: 2,
        max_len: Some(32),
        steps: 3,
        lr: 1e-2,
        warmup: 1,
        decay: Decay::Cosine,
        min_lr_ratio: 0.1,
        weight_decay: 0.0,
        optimizer_state: Default::default(),
        checkpoint_activations: Default::default(),
        update_in_backward: false,
        base_precision: Default::default(),
        tf32: false,
        precision: tuna_trainer::Precision::F32,
        memory_check: true,
        clip: Some(1.0),
        eval_every: 3,
        save_every: 3,
        patience: None,
        keep_last: 1,
        max_train_examples: None,
        max_eval_examples: None,
        holdout: None,
        seed: 3,
        out: dir.join("run"),
        out_mode: tuna_trainer::OutMode::New,
        progress: false,
    }
}

fn losses(dir: &std::path::Path) -> Vec<f32> {
    std::fs::read_to_string(dir.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn every_method_trains_on_cuda_like_on_the_cpu() {
    let Some(cuda) = cuda_or_skip("tuna-trainer::every_method_trains_on_cuda_like_on_the_cpu") else { return };
    let methods = |arch: &str| {
        let t: &[&str] = match arch {
            "bert" => &["query", "value"],
            "gpt2" => &["c_attn"],
            _ => &["q_proj", "v_proj"],
        };
        vec![
            Method::Full { patterns: vec![] },
            Method::Prompt { n: 3, init: PromptInit::SampleVocab },
            Method::Prefix { n: 3, projection: None, init: PromptInit::Random },
            Method::Prefix { n: 2, projection: Some(8), init: PromptInit::Random },
            Method::Houlsby { bottleneck: 4 },
            Method::Lora(LoraConfig {
                r: 2,
                alpha: 4.0,
                dropout: 0.0,
                targets: t.iter().map(|s| s.to_string()).collect(),
            }),
        ]
    };
    // f32 on both; summation orders differ (cuBLAS vs gemm, block reductions), and three optimizer
    // steps amplify that a little.
    let tol = Tol::new("CUDA vs CPU training losses, 3 steps", 1e-4, 1e-3);
    for arch in ["gpt2", "llama", "bert"] {
        for m in methods(arch) {
            let base = std::env::temp_dir().join(format!("tuna-cuda-train-{}-{arch}-{}", std::process::id(), m.name()));
            let (c, g) = (base.join("cpu"), base.join("cuda"));
            for d in [&c, &g] {
                std::fs::create_dir_all(d).unwrap();
            }
            tuna_trainer::train(&Arc::new(Cpu), &config(arch, m.clone(), &c)).unwrap();
            tuna_trainer::train(&cuda, &config(arch, m.clone(), &g)).unwrap();
            tol.assert_close(&format!("{arch} {}", m.name()), &losses(&g), &losses(&c));
            std::fs::remove_dir_all(&base).ok();
        }
    }
}

/// `--tf32` (`Cuda::set_tf32`): full fine-tuning and LoRA on the tiny Llama with f32 products in
/// TF32 follow the f32 CUDA run's losses to TF32's precision (operands rounded to 2^-11 relative:
/// products off by ~1e-3 relative at worst, the loss by far less after averaging), and are not
/// f32's bit for bit on the emulated device (the flag took effect; a GPU's cuBLAS may keep these
/// tiny shapes on f32 kernels).
#[test]
fn tf32_training_on_cuda_follows_f32_to_its_precision() {
    let Some(shared) = cuda_or_skip("tuna-trainer::tf32_training_on_cuda_follows_f32_to_its_precision") else {
        return;
    };
    let tol = Tol::new("TF32 vs f32 CUDA training losses, 3 steps", 2e-3, 2e-3);
    let lora =
        Method::Lora(LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, targets: vec!["q_proj".into(), "v_proj".into()] });
    for m in [Method::Full { patterns: vec![] }, lora] {
        let base = std::env::temp_dir().join(format!("tuna-cuda-tf32-{}-{}", std::process::id(), m.name()));
        let run = |tf32: bool| {
            // A device of its own per run: the flag belongs to the device.
            let dev = tuna_kernels::Cuda::new(0).unwrap();
            dev.set_tf32(tf32);
            let d = base.join(if tf32 { "tf32" } else { "f32" });
            std::fs::create_dir_all(&d).unwrap();
            tuna_trainer::train(&Arc::new(dev), &config("llama", m.clone(), &d)).unwrap();
            losses(&d)
        };
        let (f, t) = (run(false), run(true));
        tol.assert_close(&format!("llama {}", m.name()), &t, &f);
        assert!(t != f || !shared.is_emulated(), "llama {}: TF32 gave f32's losses exactly", m.name());
        std::fs::remove_dir_all(&base).ok();
    }
}

/// A multi-task run (a soft prompt and a LoRA on the tiny Llama, lm; a LoRA and Houlsby adapters
/// on BERT, classify) on CUDA: the mixed batches' per-task training and eval losses as on the CPU.
#[test]
fn multi_task_training_on_cuda_matches_the_cpu() {
    let Some(cuda) = cuda_or_skip("tuna-trainer::multi_task_training_on_cuda_matches_the_cpu") else { return };
    let lora = |t: &[&str]| {
        Method::Lora(LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, targets: t.iter().map(|s| s.to_string()).collect() })
    };
    let tol = Tol::new("CUDA vs CPU multi-task losses, 3 steps", 1e-4, 1e-3);
    for (arch, methods) in [
        ("llama", vec![Method::Prompt { n: 3, init: PromptInit::Random }, lora(&["q_proj", "v_proj"])]),
        ("bert", vec![lora(&["query", "value"]), Method::Houlsby { bottleneck: 4 }]),
    ] {
        let base = std::env::temp_dir().join(format!("tuna-cuda-multi-{}-{arch}", std::process::id()));
        let mut got = Vec::new();
        for side in ["cpu", "cuda"] {
            let d = base.join(side);
            std::fs::create_dir_all(&d).unwrap();
            let tasks: Vec<(String, TrainConfig)> =
                methods.iter().enumerate().map(|(k, m)| (format!("t{k}"), config(arch, m.clone(), &d))).collect();
            let cfg = tuna_trainer::MultiConfig { tasks_file: d.join("tasks.json"), tasks };
            let s = match side {
                "cpu" => tuna_trainer::train_multi(&Arc::new(Cpu), &cfg).unwrap(),
                _ => tuna_trainer::train_multi(&cuda, &cfg).unwrap(),
            };
            let v: Vec<f32> = s
                .tasks
                .iter()
                .flat_map(|t| [t.final_train_loss.unwrap(), t.eval_loss.unwrap()])
                .map(|x| x as f32)
                .collect();
            got.push(v);
        }
        tol.assert_close(arch, &got[1], &got[0]);
        std::fs::remove_dir_all(&base).ok();
    }
}
