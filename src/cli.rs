//! Checks and formatting the command line shares: error chains printed once, `tuna eval`'s labels
//! against the task file, and where `tuna export` may write.

use anyhow::{bail, Result};
use std::path::Path;

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
