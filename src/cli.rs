//! Checks and formatting the command line shares: error chains printed once, `tuna eval`'s labels
//! against the task file, the base precision an adapter runs on (`tuna eval`, `tuna generate`),
//! and where `tuna export` may write.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use tuna_models::model::BasePrecision;

/// An error and its causes as one line, each cause once: a message that already shows its source's
/// text (`path: No such file or directory (os error 2)`) is not followed by that text again.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// What `tuna eval` uses for `flag` (labels or verbalizers): the value given, the task file's
/// (saved by training in `dir`), or none. Both given and different is an error: scoring classes in
/// another order than training's silently swaps them.
pub fn agree(
    flag: &str,
    given: Option<Vec<String>>,
    saved: Option<Vec<String>>,
    dir: &Path,
) -> Result<Option<Vec<String>>> {
    match (given, saved) {
        (Some(g), Some(s)) if g != s => bail!(
            "{flag} {} disagrees with training's {} ({}): leave {flag} out, or give it in that order",
            g.join(","),
            s.join(","),
            dir.join(tuna_trainer::TASK_FILE).display()
        ),
        (g, s) => Ok(g.or(s)),
    }
}

/// The task `tuna eval` scores: `--task` when given (it must agree with the task file's), else the
/// task file's, else classify. An unknown task in the file is an error naming it.
pub fn eval_task(
    given: Option<&str>,
    saved: Option<&tuna_trainer::TaskFile>,
    dir: &Path,
) -> Result<tuna_trainer::Task> {
    let file = dir.join(tuna_trainer::TASK_FILE);
    let saved: Option<tuna_trainer::Task> = match saved {
        Some(t) => Some(t.task.parse().map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?),
        None => None,
    };
    let given: Option<tuna_trainer::Task> = match given {
        Some(g) => Some(g.parse().map_err(|e| anyhow::anyhow!("--task: {e}"))?),
        None => None,
    };
    match (given, saved) {
        (Some(g), Some(s)) if g != s => {
            bail!("--task {}: the adapter was trained for {} ({})", g.name(), s.name(), file.display())
        }
        (g, s) => Ok(g.or(s).unwrap_or(tuna_trainer::Task::Classify)),
    }
}

/// The base precision the task file `saved` (read from `dir`) records its adapter as trained on:
/// f32 when it records none (an f32 run, or one from before the field) or there is no task file.
/// An unknown value is an error naming the file.
pub fn recorded_base_precision(saved: Option<&tuna_trainer::TaskFile>, dir: &Path) -> Result<BasePrecision> {
    match saved.and_then(|t| t.base_precision.as_deref()) {
        Some(p) => p
            .parse()
            .map_err(|e| anyhow::anyhow!("{}: base_precision: {e}", dir.join(tuna_trainer::TASK_FILE).display())),
        None => Ok(BasePrecision::F32),
    }
}

/// The base precision `tuna eval` and `tuna generate` hold the frozen base in: `--base-precision`
/// when given, else the one the adapter's task file records as trained on (f32 when none does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseChoice {
    /// The precision to open the base in.
    pub precision: BasePrecision,
    /// The task file's (f32 when it records none, or there is none).
    pub trained_on: BasePrecision,
    /// `--base-precision` as given.
    pub given: Option<BasePrecision>,
    /// The task file: `<dir>/tuna_task.json`.
    file: PathBuf,
    note: Option<String>,
}

impl BaseChoice {
    /// The choice for `--base-precision` `given` and the task file `saved` read from `dir` (the
    /// adapter's folder, or the model's without one). `adapter`: whether an adapter is run (a
    /// given precision other than the one it trained on is then noted: allowed, an adapter may run
    /// on another base, but its numbers will not be the ones its run measured).
    pub fn new(
        given: Option<BasePrecision>,
        saved: Option<&tuna_trainer::TaskFile>,
        dir: &Path,
        adapter: bool,
    ) -> Result<BaseChoice> {
        let trained_on = recorded_base_precision(saved, dir)?;
        let file = dir.join(tuna_trainer::TASK_FILE);
        let note = given.filter(|&p| p != trained_on && saved.is_some() && adapter).map(|p| {
            format!(
                "note: --base-precision {p}: the adapter was trained with --base-precision {trained_on} ({})",
                file.display()
            )
        });
        Ok(BaseChoice { precision: given.unwrap_or(trained_on), trained_on, given, file, note })
    }

    /// The `note:` line to print on stderr when `--base-precision` differs from the adapter's.
    pub fn note(&self) -> Option<&str> {
        self.note.as_deref()
    }

    /// A failure to open the base: when its precision came from the task file (not the flag), the
    /// error says so and how to run on an f32 base instead (`runs`: what the command does there,
    /// e.g. "evaluates"); not when the model is not the adapter's (the precision is beside the
    /// point then).
    pub fn explain(&self, e: tuna_models::Error, runs: &str) -> anyhow::Error {
        if self.given.is_none()
            && self.trained_on != BasePrecision::F32
            && !e.to_string().contains(tuna_models::adapt::peft::OTHER_MODEL)
        {
            anyhow::anyhow!(
                "{e} (the base precision {} is the one {} records as trained on; --base-precision f32 {runs} on an \
                 f32 base)",
                self.trained_on,
                self.file.display()
            )
        } else {
            e.into()
        }
    }
}

/// The folder holding the base model: the model's own for a Hugging Face folder, the file's for a
/// `.gguf` (a bare `model.gguf`'s parent is "", the current folder).
fn model_folder(model: &Path) -> &Path {
    if model.extension().is_some_and(|e| e == "gguf") {
        match model.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    } else {
        model
    }
}

/// Where `tuna export` may never write: the base model's folder or the adapter's own (checked
/// before the folder is locked, so no lock file lands there either).
pub fn check_export_target(out: &Path, model: &Path, adapter: &Path) -> Result<()> {
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    let out_c = canon(out);
    if out_c.is_some() && out_c == canon(model_folder(model)) {
        bail!("--out {}: that is the base model's folder; export into another folder", out.display());
    }
    if out_c.is_some() && out_c == canon(adapter) {
        bail!("--out {}: that is the adapter's own folder; export into another folder", out.display());
    }
    Ok(())
}

/// A non-empty export folder needs `overwrite` (checked under the folder's lock, which it ignores).
pub fn check_export_empty(out: &Path, overwrite: bool) -> Result<()> {
    let non_empty = std::fs::read_dir(out)
        .map(|d| d.filter_map(|e| e.ok()).any(|e| e.file_name() != tuna_trainer::run_dir::LOCK_FILE))
        .unwrap_or(false);
    if non_empty && !overwrite {
        bail!(
            "--out {}: the folder is not empty; pass --overwrite to replace the files the export writes",
            out.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_os_error_is_printed_once() {
        let io = std::io::Error::from_raw_os_error(2);
        let e = tuna_trainer::TrainError::Io { path: "/nope".into(), source: io };
        let line = error_chain(&anyhow::Error::new(e));
        assert_eq!(line.matches("os error 2").count(), 1, "{line}");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&e), "outer: inner");
    }

    #[test]
    fn a_gguf_models_folder_is_its_parent_even_when_bare() {
        assert_eq!(model_folder(Path::new("model.gguf")), Path::new("."));
        assert_eq!(model_folder(Path::new("a/b/model.gguf")), Path::new("a/b"));
        assert_eq!(model_folder(Path::new("a/llama")), Path::new("a/llama"));
    }

    #[test]
    fn the_base_precision_follows_the_task_file_unless_given_and_a_given_other_one_is_noted() {
        use BasePrecision::*;
        let task = |p: Option<&str>| tuna_trainer::TaskFile {
            task: "lm".into(),
            labels: None,
            verbalizers: None,
            base_precision: p.map(String::from),
        };
        let dir = Path::new("run/adapter");
        let int8 = task(Some("int8"));
        let c = BaseChoice::new(None, Some(&int8), dir, true).unwrap();
        assert_eq!((c.precision, c.trained_on, c.note()), (Int8, Int8, None));
        let c = BaseChoice::new(Some(Int8), Some(&int8), dir, true).unwrap();
        assert_eq!((c.precision, c.note()), (Int8, None));
        let c = BaseChoice::new(Some(F32), Some(&int8), dir, true).unwrap();
        assert_eq!(c.precision, F32);
        assert_eq!(
            c.note(),
            Some("note: --base-precision f32: the adapter was trained with --base-precision int8 (run/adapter/tuna_task.json)")
        );
        // No adapter (a merged model's task file), or no task file: nothing to note.
        assert_eq!(BaseChoice::new(Some(F32), Some(&int8), dir, false).unwrap().note(), None);
        let c = BaseChoice::new(Some(Bf16), None, dir, true).unwrap();
        assert_eq!((c.precision, c.trained_on, c.note()), (Bf16, F32, None));
        assert_eq!(BaseChoice::new(None, Some(&task(None)), dir, true).unwrap().precision, F32);
        let e = BaseChoice::new(None, Some(&task(Some("fp8"))), dir, true).unwrap_err().to_string();
        assert!(e.starts_with("run/adapter/tuna_task.json: base_precision: unknown base precision `fp8`"), "{e}");
        // A failure explained by the recorded precision, unless given or the model is not the adapter's.
        let fail = || tuna_models::Error::InvalidArgument("cannot hold it".into());
        let e = BaseChoice::new(None, Some(&int8), dir, true).unwrap().explain(fail(), "generates").to_string();
        assert_eq!(
            e,
            "invalid argument: cannot hold it (the base precision int8 is the one run/adapter/tuna_task.json records \
             as trained on; --base-precision f32 generates on an f32 base)"
        );
        let e = BaseChoice::new(Some(Int8), Some(&int8), dir, true).unwrap().explain(fail(), "generates").to_string();
        assert!(!e.contains("records as trained on"), "{e}");
        let other = tuna_models::Error::InvalidArgument(format!("{}gpt2 model", tuna_models::adapt::peft::OTHER_MODEL));
        let e = BaseChoice::new(None, Some(&int8), dir, true).unwrap().explain(other, "generates").to_string();
        assert!(!e.contains("records as trained on"), "{e}");
    }

    #[test]
    fn eval_labels_must_agree_with_the_task_file() {
        let v = |s: &[&str]| Some(s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        let d = Path::new("run/adapter");
        assert_eq!(agree("--labels", None, v(&["cat", "other"]), d).unwrap(), v(&["cat", "other"]));
        assert_eq!(agree("--labels", v(&["a", "b"]), None, d).unwrap(), v(&["a", "b"]));
        assert_eq!(agree("--labels", v(&["cat", "other"]), v(&["cat", "other"]), d).unwrap(), v(&["cat", "other"]));
        let e = agree("--labels", v(&["other", "cat"]), v(&["cat", "other"]), d).unwrap_err().to_string();
        assert!(e.contains("--labels other,cat disagrees with training's cat,other"), "{e}");
    }
}
