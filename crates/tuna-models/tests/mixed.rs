//! Mixed-adapter batches on the CPU (f64) on the tiny fixtures (GPT-2, Llama with GQA, BERT):
//! every row of a batch mixing the base, prompts of two lengths, prefix, prefix MLP, P-tuning v2,
//! two LoRAs (different ranks and targets) and Houlsby equals that row alone (outputs, greedy
//! tokens, BERT class scores), and a mixed training batch's gradients of each adapter are the sum
//! over its rows of the rows' own gradients.

mod adapt_common;
mod golden_common;
mod mixed_common;

use golden_common::fixture;
use mixed_common::{bank_model, check_gradients, check_mixed, make_adapters, methods, row_ids, temp_dir};
use std::sync::Arc;
use tuna_kernels::testing::Tol;
use tuna_kernels::Cpu;

/// Mixed vs alone in f64: the same arithmetic up to summation order (blocked attention over more
/// masked keys, matmuls of other row counts).
const SAME: Tol = Tol::new("mixed batch vs each row alone (f64)", 1e-10, 1e-8);

#[test]
fn mixed_batch_equals_each_row_alone() {
    let dev = Arc::new(Cpu);
    for arch in adapt_common::ARCHS {
        check_mixed::<Cpu, f64>(&dev, &fixture(arch), arch, SAME, 4, "cpu");
    }
}

/// Multi-task training: the mixed batch's loss (the mean over all rows' targets) has, for each
/// adapter's tensors, the gradient `sum over its rows r of (targets_r / targets) * grad_r`, with
/// `grad_r` the gradient of row `r`'s own loss alone (decoders: the causal LM loss; BERT:
/// cross-entropy of each row's own head).
#[test]
fn mixed_batch_gradients_are_the_rows_gradients() {
    let dev = Arc::new(Cpu);
    for arch in adapt_common::ARCHS {
        check_gradients::<Cpu, f64>(&dev, &fixture(arch), arch, SAME, "cpu");
    }
}

#[test]
fn bad_routes_are_refused() {
    let dev = Arc::new(Cpu);
    let path = fixture("gpt2");
    let dirs = make_adapters::<Cpu, f32>(&dev, &path, &methods("gpt2")[..1], 0.1, &temp_dir("bad-gpt2"));
    let m = bank_model::<Cpu, f32>(&dev, &path, &dirs);
    let e = m.forward_mixed(&[5, 6, 7, 8], &[1; 4], 2, &[Some(0), Some(3)]).unwrap_err().to_string();
    assert!(e.contains("adapter index 3 but the bank holds 1"), "{e}");
    let e = m.forward_mixed(&[5, 6, 7, 8], &[1; 4], 2, &[Some(0)]).unwrap_err().to_string();
    assert!(e.contains("mixed batch") && e.contains("routing rows vs batch"), "{e}");
    let e = m.mixed_step(&[5, 6], &[1; 3], &[0, 0], 2, &[None, Some(0)], &mut m.new_cache().unwrap());
    let e = e.unwrap_err().to_string();
    assert!(e.contains("mixed_step") && e.contains("[2, 2, 3]"), "{e}");
    // The routing is cleared after a failed forward: the model's own path works again.
    assert!(m.adapt().routing().is_none());
    // ... and after a panic inside the routed forward that the caller catches (a server does).
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        m.adapt().with_routing(&[Some(0)], || -> tuna_models::error::Result<()> { panic!("in the forward") })
    }));
    assert!(panicked.is_err() && m.adapt().routing().is_none());
    let mut own = bank_model::<Cpu, f32>(&dev, &path, &dirs);
    own.load_adapter(&dirs[0]).unwrap();
    let e = own.adapt().set_routing(Some(vec![None])).unwrap_err().to_string();
    assert!(e.contains("own adapter installed"), "{e}");
}

/// A bank adapter saved back out is the adapter that went in (same outputs once loaded alone), and
/// the bank's tensors are listed under their adapter's name.
#[test]
fn bank_adapters_save_and_list_their_params() {
    let dev = Arc::new(Cpu);
    let path = fixture("llama");
    let methods = methods("llama");
    let dirs = make_adapters::<Cpu, f64>(&dev, &path, &methods, 0.3, &temp_dir("save-llama"));
    let mut m = bank_model::<Cpu, f64>(&dev, &path, &dirs);
    let names: Vec<String> = m.bank_params().into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().any(|n| n.starts_with("a5/") && n.ends_with("lora_A.weight")), "{names:?}");
    assert!(names.iter().any(|n| n == "a0/prompt_embeddings"), "{names:?}");
    let out = temp_dir("save-llama-out");
    m.save_bank_adapter("a5", &out, "tiny").unwrap();
    assert!(!m.adapt().bank[5].1.lora.is_empty() && m.adapt().lora.is_empty(), "the bank is as it was");
    let row = row_ids(1, m.shape().vocab);
    let want = mixed_common::alone_outputs(&mixed_common::alone_model::<Cpu, f64>(&dev, &path, Some(&dirs[5])), &row);
    let got = mixed_common::alone_outputs(&mixed_common::alone_model::<Cpu, f64>(&dev, &path, Some(&out)), &row);
    Tol::F64.assert_close("bank adapter saved and reloaded", &got, &want);
    assert!(m.save_bank_adapter("nope", &out, "tiny").unwrap_err().to_string().contains("no adapter \"nope\""));
}

/// A multi-task run in miniature: two tasks (two token patterns), each with its own adapter (a
/// LoRA and a soft prompt, both at PEFT's init), trained together by AdamW on batches mixing their
/// rows: each task's own loss falls, the base weights stay bit-identical, and a third adapter in
/// the bank that no row uses is untouched.
#[test]
fn multi_task_training_on_mixed_batches() {
    use tuna_autograd::optim::AdamW;
    use tuna_kernels::ops::adamw::AdamWParams;
    use tuna_models::adapt::{LoraConfig, Method, PromptInit};
    let dev = Arc::new(Cpu);
    let path = fixture("llama");
    let lora = |r| {
        Method::Lora(LoraConfig {
            r,
            alpha: 2.0 * r as f64,
            dropout: 0.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
        })
    };
    let methods = [lora(2), Method::Prompt { n: 2, init: PromptInit::Random }, lora(4)];
    let dirs = make_adapters::<Cpu, f32>(&dev, &path, &methods, 0.0, &temp_dir("train-llama"));
    let m = bank_model::<Cpu, f32>(&dev, &path, &dirs);
    let task = |t: usize, n: usize| -> Vec<u32> {
        (0..n).map(|i| if t == 0 { 5 + (i % 2) as u32 } else { 9 + (i % 3) as u32 }).collect()
    };
    let rows = [task(0, 8), task(1, 9), task(0, 6), task(1, 7)];
    let routes = [Some(0), Some(1), Some(0), Some(1)];
    let (ids, mask, _) = mixed_common::pad(&rows, true);
    let labels: Vec<i32> =
        ids.iter().zip(&mask).map(|(&t, &k)| if k == 1 { t as i32 } else { tuna_models::IGNORE_INDEX }).collect();
    // Each task's loss: its rows alone, through the same bank.
    let task_loss = |t: usize| -> f64 {
        let (r0, r1) = (t, t + 2);
        let (ids, mask, _) = mixed_common::pad(&[rows[r0].clone(), rows[r1].clone()], true);
        let l: Vec<i32> = ids.iter().zip(&mask).map(|(&x, &k)| if k == 1 { x as i32 } else { -100 }).collect();
        let loss = tuna_autograd::no_grad(|| m.lm_loss_mixed(&ids, &mask, &l, 2, &[routes[r0], routes[r1]])).unwrap();
        loss.to_vec().unwrap()[0] as f64
    };
    let before = [task_loss(0), task_loss(1)];
    let base: Vec<Vec<f32>> = m.named_weights().iter().map(|(_, t)| t.to_vec().unwrap()).collect();
    let unused: Vec<Vec<f32>> = m.adapt().bank[2].1.params().iter().map(|(_, t)| t.to_vec().unwrap()).collect();
    let params: Vec<_> = m.bank_params().into_iter().map(|(_, t)| t).collect();
    let mut opt = AdamW::new(&params.iter().collect::<Vec<_>>(), AdamWParams::new(2e-2)).unwrap();
    for _ in 0..40 {
        m.lm_loss_mixed(&ids, &mask, &labels, rows.len(), &routes).unwrap().backward().unwrap();
        opt.step().unwrap();
    }
    let after = [task_loss(0), task_loss(1)];
    for t in 0..2 {
        println!("task {t}: loss {:.4} -> {:.4}", before[t], after[t]);
        assert!(after[t] < 0.7 * before[t], "task {t}: loss {:.4} -> {:.4}", before[t], after[t]);
    }
    let base_after: Vec<Vec<f32>> = m.named_weights().iter().map(|(_, t)| t.to_vec().unwrap()).collect();
    assert!(base == base_after, "the base weights changed");
    let unused_after: Vec<Vec<f32>> = m.adapt().bank[2].1.params().iter().map(|(_, t)| t.to_vec().unwrap()).collect();
    assert!(unused == unused_after, "an adapter no row used changed");
}

/// A row without a soft prompt gets extra pads in front of it when another row has one; the pad
/// right before its first token must not predict that token (the row alone has nothing there to
/// predict it from). Rows of equal length, every label kept, so each row's target count alone is
/// exact: the prompt row predicts all 5 tokens, the LoRA row 4.
#[test]
fn extra_pads_add_no_targets_to_the_mixed_loss() {
    let dev = Arc::new(Cpu);
    let path = fixture("llama");
    let dirs = make_adapters::<Cpu, f64>(&dev, &path, &methods("llama"), 0.3, &temp_dir("extra-pads"));
    let mixed = bank_model::<Cpu, f64>(&dev, &path, &dirs);
    let rows: [Vec<u32>; 2] = [vec![3, 4, 5, 6, 7], vec![8, 9, 10, 11, 12]];
    let routes = [Some(0), Some(5)]; // prompt (3 virtual tokens), LoRA rank 2
    let ids: Vec<u32> = rows.concat();
    let labels: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
    let got: f64 = mixed.lm_loss_mixed(&ids, &[1; 10], &labels, 2, &routes).unwrap().to_vec().unwrap()[0];
    let mut want = 0.0;
    for (r, (row, targets)) in rows.iter().zip([5.0, 4.0]).enumerate() {
        let alone = mixed_common::alone_model::<Cpu, f64>(&dev, &path, Some(&dirs[routes[r].unwrap()]));
        let l: Vec<i32> = row.iter().map(|&t| t as i32).collect();
        want += targets / 9.0 * alone.lm_loss(row, &[1; 5], &l, 1).unwrap().to_vec().unwrap()[0];
    }
    SAME.assert_close("mixed loss vs the rows alone (first labels kept)", &[got], &[want]);
}
