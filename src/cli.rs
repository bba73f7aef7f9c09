//! Checks and formatting the command line shares: error chains printed once, sampling flags in
//! range, `tuna eval`'s labels against the task file, and where `tuna export` may write.

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

/// `tuna generate`'s sampling flags in range.
pub fn check_sampling(temperature: Option<f32>, top_k: Option<usize>, top_p: Option<f32>) -> Result<()> {
    if let Some(t) = temperature.filter(|t| !(t.is_finite() && *t > 0.0)) {
        bail!("--temperature {t}: expected a positive number (leave it out for greedy decoding)");
    }
    if top_k == Some(0) {
        bail!("--top-k 0: expected at least 1");
    }
    if let Some(p) = top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
        bail!("--top-p {p}: expected 0 < p <= 1");
    }
    Ok(())
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

/// Where `tuna export` may write: not the base model's folder nor the adapter's, and a non-empty
/// folder only with `overwrite`.
pub fn check_export_target(out: &Path, model: &Path, adapter: &Path, overwrite: bool) -> Result<()> {
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    let out_c = canon(out);
    // A .gguf's folder holds the base model too.
    let model_dir = if model.is_file() { model.parent().unwrap_or(Path::new(".")) } else { model };
    if out_c.is_some() && out_c == canon(model_dir) {
        bail!("--out {}: that is the base model's folder; export into another folder", out.display());
    }
    if out_c.is_some() && out_c == canon(adapter) {
        bail!("--out {}: that is the adapter's own folder; export into another folder", out.display());
    }
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
    fn eval_labels_must_agree_with_the_task_file() {
        let v = |s: &[&str]| Some(s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        let d = Path::new("run/adapter");
        assert_eq!(agree("--labels", None, v(&["cat", "other"]), d).unwrap(), v(&["cat", "other"]));
        assert_eq!(agree("--labels", v(&["a", "b"]), None, d).unwrap(), v(&["a", "b"]));
        assert_eq!(agree("--labels", v(&["cat", "other"]), v(&["cat", "other"]), d).unwrap(), v(&["cat", "other"]));
        let e = agree("--labels", v(&["other", "cat"]), v(&["cat", "other"]), d).unwrap_err().to_string();
        assert!(e.contains("--labels other,cat disagrees with training's cat,other"), "{e}");
    }

    #[test]
    fn sampling_flags_out_of_range_are_refused() {
        assert!(check_sampling(None, None, None).is_ok());
        assert!(check_sampling(Some(0.7), Some(5), Some(0.9)).is_ok());
        for (t, k, p) in
            [(Some(0.0), None, None), (Some(f32::NAN), None, None), (None, Some(0), None), (None, None, Some(1.5))]
        {
            assert!(check_sampling(t, k, p).is_err(), "{t:?} {k:?} {p:?}");
        }
    }
}
