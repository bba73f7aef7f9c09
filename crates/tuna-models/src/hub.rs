//! Model ids (`org/name`, optionally `@revision`) resolved from the local Hugging Face cache, so a
//! model someone already downloaded with `transformers` or `huggingface-cli` loads offline.
//!
//! The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
//! `~/.cache/huggingface/hub`, in the hub's layout: `models--<org>--<name>/refs/<revision>` holds the
//! commit hash of a branch or tag (`main` by default) and `snapshots/<commit>/` the files (links into
//! `blobs/`). A snapshot with `config.json` is a Hugging Face folder; one without it and with a
//! single `.gguf` file is that file. tuna does not download: an id not in the cache is an error that
//! says where it looked.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The hub cache folder the environment names (see the module doc), if one can be named.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/huggingface/hub")))
}

/// `org/name[@revision]` split, when `spec` has that shape (two non-empty parts of id characters).
pub fn parse_id(spec: &str) -> Option<(&str, &str, &str)> {
    let (id, rev) = spec.split_once('@').unwrap_or((spec, "main"));
    let (org, name) = id.split_once('/')?;
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (ok(org) && ok(name) && !rev.is_empty() && !rev.contains(['/', '\\'])).then_some((org, name, rev))
}

/// `spec` as given when it exists (a folder or a file); otherwise, when it has the shape of a hub id,
/// the cached snapshot it names (see the module doc); otherwise `spec` unchanged (its load reports
/// what is missing).
pub fn resolve(spec: &Path) -> Result<PathBuf> {
    if spec.exists() {
        return Ok(spec.to_path_buf());
    }
    let Some((org, name, rev)) = spec.to_str().and_then(parse_id) else { return Ok(spec.to_path_buf()) };
    let cache = cache_dir().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{}: no such file or folder, and no Hugging Face cache to look in (set HF_HOME or HF_HUB_CACHE)",
            spec.display()
        ))
    })?;
    resolve_in(&cache, org, name, rev).map_err(|why| {
        Error::InvalidArgument(format!(
            "{}: no such file or folder, and not in the Hugging Face cache: {why} (tuna does not download; \
             `huggingface-cli download {org}/{name}` or transformers' from_pretrained fills that cache)",
            spec.display()
        ))
    })
}

/// The snapshot of `org/name` at `rev` (a branch or tag under `refs/`, or a commit) in `cache`;
/// `Err` says what was missing.
pub fn resolve_in(cache: &Path, org: &str, name: &str, rev: &str) -> std::result::Result<PathBuf, String> {
    let repo = cache.join(format!("models--{org}--{name}"));
    if !repo.is_dir() {
        return Err(format!("{} does not exist", repo.display()));
    }
    let refs = repo.join("refs").join(rev);
    let commit = match std::fs::read_to_string(&refs) {
        Ok(c) => c.trim().to_string(),
        // A commit hash given directly.
        Err(_) if rev.len() >= 7 && rev.chars().all(|c| c.is_ascii_hexdigit()) => rev.to_string(),
        Err(_) => return Err(format!("{} does not exist (revision `{rev}` was never downloaded)", refs.display())),
    };
    if commit.is_empty() || commit.contains(['/', '\\']) || commit.starts_with('.') {
        return Err(format!("{} holds {commit:?}, not a commit", refs.display()));
    }
    let snap = repo.join("snapshots").join(&commit);
    if !snap.is_dir() {
        return Err(format!("{} does not exist", snap.display()));
    }
    if snap.join("config.json").exists() {
        return Ok(snap);
    }
    let mut ggufs: Vec<PathBuf> = std::fs::read_dir(&snap)
        .map_err(|e| format!("{}: {e}", snap.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    ggufs.sort();
    match ggufs.len() {
        1 => Ok(ggufs.remove(0)),
        0 => Err(format!("{} holds neither config.json nor a .gguf file", snap.display())),
        _ => Err(format!(
            "{} holds several .gguf files ({}): give the one to load as its path",
            snap.display(),
            ggufs.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy()).collect::<Vec<_>>().join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_an_org_a_name_and_maybe_a_revision() {
        assert_eq!(parse_id("HuggingFaceTB/SmolLM2-135M"), Some(("HuggingFaceTB", "SmolLM2-135M", "main")));
        assert_eq!(parse_id("a/b@v1.0"), Some(("a", "b", "v1.0")));
        for bad in ["gpt2", "a/b/c", "/abs", "./x", "a/", "../b", "a/b@", "a/b@x/y", "a b/c"] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_snapshot_resolves_by_ref_or_commit_and_a_missing_one_says_where() {
        let root = std::env::temp_dir().join(format!("tuna-hub-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let repo = root.join("models--org--tiny");
        let snap = repo.join("snapshots/0123abcd");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "0123abcd\n").unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        assert_eq!(resolve_in(&root, "org", "tiny", "main").unwrap(), snap);
        assert_eq!(resolve_in(&root, "org", "tiny", "0123abcd").unwrap(), snap);
        let e = resolve_in(&root, "org", "tiny", "v2").unwrap_err();
        assert!(e.contains("refs/v2 does not exist"), "{e}");
        let e = resolve_in(&root, "org", "other", "main").unwrap_err();
        assert!(e.contains("models--org--other does not exist"), "{e}");
        // A GGUF repository: its one .gguf file; two are ambiguous.
        std::fs::remove_file(snap.join("config.json")).unwrap();
        std::fs::write(snap.join("m.Q4_1.gguf"), "").unwrap();
        assert_eq!(resolve_in(&root, "org", "tiny", "main").unwrap(), snap.join("m.Q4_1.gguf"));
        std::fs::write(snap.join("m.Q8_0.gguf"), "").unwrap();
        let e = resolve_in(&root, "org", "tiny", "main").unwrap_err();
        assert!(e.contains("several .gguf files (m.Q4_1.gguf, m.Q8_0.gguf)"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
