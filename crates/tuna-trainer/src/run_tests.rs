//! Tests of the loop's parts: micro-batches of unequal sizes give the full batch's gradient and
//! loss, and a step's outcome says when nothing was updated.

use super::*;
use crate::data::Fields;
use crate::schedule::Decay;
use tuna_kernels::Cpu;
use tuna_models::adapt::{LoraConfig, Method};

pub(crate) fn config(task: Task, dir: &Path) -> TrainConfig {
    let data = dir.join("train.jsonl");
    // Ragged rows (left-padded in a batch), two classes.
    let texts = ["The cat sat on the mat and the dog ran.", "A dog ran.", "The bird sang a song in the park.", "Hi."];
    let lines: Vec<String> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{{\"text\": \"{t}\", \"label\": \"{}\"}}", if i % 2 == 0 { "cat" } else { "other" }))
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tuna-models/tests/fixtures/llama");
    TrainConfig {
        model: fixture,
        model_name: None,
        method: Method::Lora(LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, targets: vec![] }),
        task,
        fields: Fields::default(),
        train: data,
        eval: None,
        labels: None,
        verbalizers: Some(vec!["cat".into(), "other".into()]),
        prompt_init_text: None,
        batch_size: 4,
        micro_batch: 4,
        max_len: Some(32),
        steps: 1,
        lr: 1e-2,
        warmup: 0,
        decay: Decay::Constant,
        min_lr_ratio: 0.1,
        weight_decay: 0.0,
        optimizer_state: Default::default(),
        checkpoint_activations: Default::default(),
        update_in_backward: false,
        base_precision: Default::default(),
        tf32: false,
        precision: crate::Precision::F32,
        memory_check: true,
        clip: None,
        eval_every: 1,
        save_every: 1,
        patience: None,
        keep_last: 1,
        max_train_examples: None,
        max_eval_examples: None,
        holdout: None,
        seed: 5,
        out: dir.join("run"),
        out_mode: OutMode::New,
        progress: false,
    }
}

/// The batch's loss and every trainable tensor's gradient with micro-batches of `micro` rows
/// (perturbed LoRA weights, so every gradient is non-zero).
fn grads(task: Task, micro: usize) -> (f64, Vec<Vec<f32>>) {
    let dir = std::env::temp_dir().join(format!("tuna-run-tests-{}-{task:?}-{micro}", std::process::id()));
    let cfg = config(task, &dir);
    let mut s = setup::<_, f32>(&Arc::new(Cpu), &cfg).unwrap();
    for (i, (_, t)) in s.params.iter().enumerate() {
        let v: Vec<f32> = (0..t.numel()).map(|j| ((i * 31 + j * 7) % 11) as f32 / 50.0 - 0.1).collect();
        *t.data_mut() = v;
    }
    let batch = s.batcher.next_batch(&mut Cursor::default());
    assert_eq!(batch.batch, 4);
    let loss = accumulate_grads(&s.model, &s.spec, &batch, micro, 0).unwrap().read().unwrap();
    let g = s.params.iter_mut().map(|(_, t)| t.grad().unwrap().expect("a gradient")).collect();
    let _ = std::fs::remove_dir_all(&dir);
    (loss, g)
}

#[test]
fn unequal_micro_batches_give_the_full_batchs_gradient() {
    // f32 on the CPU: the sums run in another order, so equal to rounding (named tolerance).
    const TOL: f32 = 2e-5;
    for task in [Task::Lm, Task::Classify] {
        let (loss, full) = grads(task, 4);
        for micro in [3, 1] {
            let (l, g) = grads(task, micro);
            assert!((l - loss).abs() <= 1e-5 * loss.abs().max(1.0), "{task:?} micro {micro}: loss {l} vs {loss}");
            for (a, b) in g.iter().zip(&full) {
                let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
                for (x, y) in a.iter().zip(b) {
                    assert!((x - y).abs() <= TOL * scale, "{task:?} micro {micro}: {x} vs {y}");
                }
            }
        }
    }
}

#[test]
fn a_step_is_applied_only_with_a_finite_loss_and_gradient_norm() {
    let out = |loss: f64, grad_norm: f64| StepOutcome { loss, grad_norm, forward_backward_s: 0.0 };
    assert!(out(1.0, 2.0).applied());
    assert!(!out(f64::NAN, 2.0).applied());
    assert!(!out(1.0, f64::INFINITY).applied());
    // A NaN gradient with a finite loss (e.g. overflow in the backward) is not applied, with or
    // without clipping: the norm is computed either way.
    assert!(!out(1.0, f64::NAN).applied());
}

#[test]
fn the_untrained_baseline_sets_the_method_aside_on_the_windows_batches() {
    let dir = std::env::temp_dir().join(format!("tuna-run-tests-{}-baseline", std::process::id()));
    let mut cfg = config(Task::Classify, &dir);
    (cfg.steps, cfg.warmup, cfg.batch_size, cfg.micro_batch) = (14, 2, 2, 1);
    // LoRA starts as the identity (B = 0): its loss at init is the untrained model's.
    let mut lora = setup::<_, f32>(&Arc::new(Cpu), &cfg).unwrap();
    let want = untrained_losses(&mut lora, &cfg).unwrap();
    // The last HURT_WINDOW steps, all after warmup.
    assert_eq!(want.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (5..=14).collect::<Vec<u64>>());
    let mut cursor = Cursor::default();
    let batches: Vec<Batch> = (0..14).map(|_| lora.batcher.next_batch(&mut cursor)).collect();
    for (step, l) in &want {
        let b = &batches[*step as usize - 1];
        let got = tuna_autograd::no_grad(|| lora.spec.loss(&lora.model, b).unwrap().0.to_vec().unwrap()[0]) as f64;
        // f32: the baseline sums its micro-batches (1 row each), this the whole batch at once.
        const F32_SUM: f64 = 1e-5;
        assert!((got - l).abs() <= F32_SUM * l.abs(), "step {step}: {got} vs {l}");
    }
    // A random prefix changes the model's loss, but not its untrained baseline.
    cfg.method = Method::Prefix { n: 2, projection: None, init: tuna_models::adapt::PromptInit::Random };
    let mut prefix = setup::<_, f32>(&Arc::new(Cpu), &cfg).unwrap();
    assert_eq!(untrained_losses(&mut prefix, &cfg).unwrap(), want);
    let b = &batches[13];
    let with = tuna_autograd::no_grad(|| prefix.spec.loss(&prefix.model, b).unwrap().0.to_vec().unwrap()[0]) as f64;
    assert!((with - want[9].1).abs() > 1e-4, "the prefix changed nothing: {with}");
    // A run too short to leave warmup has no window.
    cfg.warmup = 14;
    assert!(untrained_losses(&mut prefix, &cfg).unwrap().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hurting_compares_means_over_the_steps_trained() {
    let base: Vec<(u64, f64)> = (11..=20).map(|s| (s, 0.5)).collect();
    let at = |steps: std::ops::RangeInclusive<u64>, l: f64| steps.map(|s| (s, l)).collect::<Vec<_>>();
    assert_eq!(hurting(&base, &at(11..=20, 0.4)), None);
    let h = hurting(&base, &at(11..=20, 0.6)).unwrap();
    assert_eq!((h.steps, h.untrained_loss), (10, 0.5));
    assert!((h.train_loss - 0.6).abs() < 1e-12, "{}", h.train_loss);
    // A resumed run trained only the window's last steps: compared on those alone (against the
    // whole window's baseline mean, 0.65, 1.0 would be hurting).
    let mut tail = base.clone();
    tail[9].1 = 2.0;
    assert_eq!(hurting(&tail, &[(20, 1.0)]), None);
    assert_eq!(hurting(&tail, &[(20, 2.5)]).map(|h| (h.steps, h.untrained_loss)), Some((1, 2.0)));
    // An early stop trained only the window's first steps: compared on those (step 11's
    // baseline, 3.0), not on the window's last.
    let mut head = base.clone();
    head[0].1 = 3.0;
    assert_eq!(hurting(&head, &[(11, 2.5)]), None);
    assert_eq!(hurting(&head, &[(11, 3.5)]).map(|h| (h.steps, h.untrained_loss)), Some((1, 3.0)));
    assert_eq!(hurting(&base, &[]), None);
}

#[test]
fn a_holdout_trains_on_the_rest_and_evaluates_on_it() {
    let dir = std::env::temp_dir().join(format!("tuna-run-tests-{}-holdout", std::process::id()));
    let mut cfg = config(Task::Classify, &dir);
    cfg.holdout = Some(1);
    let s = setup::<_, f32>(&Arc::new(Cpu), &cfg).unwrap();
    assert_eq!(s.batcher.examples().len(), 3);
    assert_eq!(s.eval_batcher.as_ref().map(|b| b.examples().len()), Some(1));
    // The held-out example is the file's last ("Hi.", 2 tokens or so), not one trained on.
    let held = &s.eval_batcher.as_ref().unwrap().examples()[0].ids;
    assert!(s.batcher.examples().iter().all(|e| &e.ids != held));
    for k in [0, 4] {
        cfg.holdout = Some(k);
        let e = setup::<_, f32>(&Arc::new(Cpu), &cfg).err().expect("refused").to_string();
        assert!(e.contains("--holdout"), "{e}");
    }
    // A label found only in the held-out tail is still a class (the classes come from the whole
    // training file, as without a hold-out), not a data error.
    let mut text = std::fs::read_to_string(&cfg.train).unwrap();
    text.push_str("\n{\"text\": \"A fish swam.\", \"label\": \"fish\"}");
    std::fs::write(&cfg.train, text).unwrap();
    cfg.holdout = Some(1);
    cfg.verbalizers = Some(vec!["cat".into(), "fish".into(), "other".into()]);
    let s = setup::<_, f32>(&Arc::new(Cpu), &cfg).expect("the tail's label is one of the classes");
    let labels = s.spec.labels.as_ref().map(|l| l.labels().to_vec());
    assert_eq!(labels, Some(vec!["cat".to_string(), "fish".into(), "other".into()]));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A non-finite loss says what is on disk to resume from: the newest checkpoint's step, or that
/// none was saved yet (a NaN at step 1, or before the first --save-every), never "the last good
/// checkpoint is kept" when there is none.
#[test]
fn a_non_finite_loss_says_which_checkpoint_is_kept_or_that_none_is() {
    let dir = std::env::temp_dir().join(format!("tuna-run-tests-{}-non-finite", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ckpts = Checkpoints::open(&dir.join("checkpoints"), 0, None).unwrap();
    let none = non_finite(1, ("training loss", f64::NAN), &ckpts, false).to_string();
    assert!(none.contains("step 1: the training loss is NaN"), "{none}");
    assert!(!none.contains("--update-in-backward"), "a run without it: {none}");
    let inside = non_finite(1, ("training loss", f64::NAN), &ckpts, true).to_string();
    assert!(inside.contains("with --update-in-backward, the tensors whose gradients completed"), "{inside}");
    assert!(none.contains("No checkpoint has been saved yet") && !none.contains("is kept"), "{none}");
    std::fs::create_dir_all(dir.join("checkpoints/step-000003")).unwrap();
    std::fs::create_dir_all(dir.join("checkpoints/step-000006")).unwrap();
    let kept = non_finite(7, ("gradient norm", f64::INFINITY), &ckpts, false).to_string();
    assert!(kept.contains("The newest checkpoint, step 6, is kept"), "{kept}");
    assert!(kept.contains(&dir.join("checkpoints/step-000006").display().to_string()), "{kept}");
    // Through a run: an absurd learning rate makes step 2's loss non-finite, before the first save.
    let mut cfg = config(Task::Classify, &dir.join("run-dir"));
    cfg.method = Method::Full { patterns: vec![] };
    (cfg.lr, cfg.steps, cfg.save_every, cfg.eval_every) = (1e30, 20, 100, 100);
    let e = train(&Arc::new(Cpu), &cfg).expect_err("a non-finite loss").to_string();
    assert!(e.contains("not finite") && e.contains("No checkpoint has been saved yet"), "{e}");
    // Run again there: a new run is told there is no checkpoint to resume (not to pass --resume),
    // and --resume says the same, both advising what starts anew.
    let again = train(&Arc::new(Cpu), &cfg).expect_err("a run is there").to_string();
    assert!(
        again.contains(
            "holds a run that saved no checkpoint (metrics.jsonl), so there is nothing to resume: \
             --overwrite (or --resume-or-start) starts a new run there"
        ) && !again.contains("pass --resume"),
        "{again}"
    );
    cfg.out_mode = OutMode::Resume;
    let resume = train(&Arc::new(Cpu), &cfg).expect_err("nothing to resume").to_string();
    assert!(
        resume.ends_with(
            "nothing to resume (no checkpoint was saved): --overwrite (or --resume-or-start) starts a new run there"
        ),
        "{resume}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
