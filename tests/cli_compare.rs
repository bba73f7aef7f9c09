//! `tuna compare --sweep-lr` and the summary's "hurting" warning end to end on the tiny Llama
//! fixture: the sweep tries each factor of a method's learning rate on a slice held out from the
//! training data, the full run takes the best, the table shows the rate and the sweep's cost; a run
//! whose training loss stays above the untrained model's is warned about and marked.

mod common;

use common::*;

#[test]
fn sweep_lr_tries_each_rate_on_held_out_training_data_and_runs_the_best() {
    let d = tmp("sweep");
    let train = data(&d, "train.jsonl", 16, true);
    // The eval data's second line holds a label training lacks: the full runs read only the first
    // (--max-eval-examples 1); a sweep run reading the eval file without that limit would fail.
    let eval = d.join("eval.jsonl");
    std::fs::write(
        &eval,
        "{\"text\": \"The cat sat.\", \"label\": \"cat\"}\n{\"text\": \"A zebra.\", \"label\": \"zebra\"}\n",
    )
    .unwrap();
    let out = d.join("cmp");
    let mut args: Vec<String> = [
        "compare",
        "--model",
        &fixture("llama"),
        "--task",
        "classify",
        "--train",
        &train,
        "--eval",
        &eval.display().to_string(),
        "--max-eval-examples",
        "1",
        "--methods",
        "prefix,lora",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--sweep-lr",
        "--sweep-factors",
        "0.1,1",
        "--sweep-steps",
        "2",
        "--sweep-holdout",
        "4",
        "--quiet",
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(out.display().to_string());
    let o = tuna(&args);
    ok(&o);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("| lr |") && table.contains("lr sweep"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    // The decoders' defaults (the fixture is a Llama).
    for (row, (m, default)) in json.as_array().unwrap().iter().zip([("prefix", 9e-3), ("lora", 3e-3)]) {
        let sweep = &row["sweep"];
        let lrs: Vec<f64> = sweep["points"].as_array().unwrap().iter().map(|p| p["lr"].as_f64().unwrap()).collect();
        let want = [0.1 * default, default];
        assert!(lrs.len() == 2 && lrs.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-12 * b), "{m}: {lrs:?}");
        let chosen = sweep["chosen_lr"].as_f64().unwrap();
        assert!(lrs.contains(&chosen), "{m}: {chosen} not among {lrs:?}");
        // The full run used the chosen rate, its own step count and the eval data.
        assert_eq!(row["lr"].as_f64(), Some(chosen), "{m}");
        assert_eq!(row["steps"].as_u64(), Some(4), "{m}");
        assert!(sweep["seconds"].as_f64().unwrap() > 0.0);
        for p in sweep["points"].as_array().unwrap() {
            let lr = p["lr"].as_f64().unwrap();
            let run = out.join("sweep").join(m).join(format!("lr-{lr:.3e}"));
            let s: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
            assert_eq!(s["steps"].as_u64(), Some(2), "{m} {lr}");
            // Scored on the 4 held-out training examples: a multiple of 1/4, the sweep's score.
            let acc = s["eval_accuracy"].as_f64().unwrap();
            assert_eq!((acc * 4.0).fract(), 0.0, "{m} {lr}: {acc}");
            assert_eq!(p["score"].as_f64(), Some(acc), "{m} {lr}");
        }
    }
}

#[test]
fn a_run_worse_than_the_untrained_model_is_warned_about_and_marked() {
    let d = tmp("hurting");
    let train = data(&d, "train.jsonl", 16, true);
    let out = d.join("cmp");
    // An absurd learning rate for a random prefix: the loss ends far above the untrained model's.
    let args: Vec<String> = [
        "compare",
        "--model",
        &fixture("llama"),
        "--task",
        "classify",
        "--train",
        &train,
        "--methods",
        "prefix",
        "--prefix-init",
        "random",
        "--steps",
        "12",
        "--warmup",
        "0",
        "--batch-size",
        "4",
        "--lr",
        "30",
        "--quiet",
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()
    .into_iter()
    .chain([out.display().to_string()])
    .collect();
    let o = tuna(&args);
    ok(&o);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("| prefix (hurting:"), "{table}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("prefix/summary.json")).unwrap()).unwrap();
    let h = &s["hurting"];
    assert!(h["train_loss"].as_f64().unwrap() > h["untrained_loss"].as_f64().unwrap(), "{s}");
    assert_eq!(h["steps"].as_u64(), Some(10));
    // Resuming the finished run trains nothing and keeps the verdict its run wrote.
    let mut resume: Vec<String> = ["train", "--method", "prefix"].iter().map(|s| s.to_string()).collect();
    resume.extend(args[1..].iter().filter(|a| *a != "--methods" && *a != "prefix").cloned());
    let i = resume.iter().position(|a| a == "--out").unwrap();
    resume[i + 1] = out.join("prefix").display().to_string();
    resume.push("--resume".into());
    ok(&tuna(&resume));
    let again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("prefix/summary.json")).unwrap()).unwrap();
    assert_eq!(again["hurting"], s["hurting"], "{again}");
    // The same run at a sane rate with LoRA (the identity at init) is not marked.
    let mut sane = set(set(args.clone(), "--methods", "lora"), "--lr", "1e-2");
    // --prefix-init would now be refused: LoRA does not use it.
    let i = sane.iter().position(|x| x == "--prefix-init").unwrap();
    sane.drain(i..i + 2);
    sane.push("--overwrite".into());
    let o = tuna(&sane);
    ok(&o);
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("lora/summary.json")).unwrap()).unwrap();
    assert!(s["hurting"].is_null(), "{s}");
    assert!(!String::from_utf8_lossy(&o.stdout).contains("(hurting"));
}
