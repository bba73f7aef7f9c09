//! Model ids (`org/name`, optionally `@revision`) resolved from the local Hugging Face cache, so a
//! model someone already downloaded with `transformers` or `huggingface-cli` loads offline.
//!
//! The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
//! `~/.cache/huggingface/hub`, in the hub's layout: `models--<org>--<name>/refs/<revision>` holds the
//! commit hash of a branch or tag (`main` by default) and `snapshots/<commit>/` the files (links into
//! `blobs/`). A snapshot with `config.json` is a Hugging Face folder; one without it and with a
//! single `.gguf` file is that file (among several, `org/name:Q4_1` picks the one whose name ends
//! with `Q4_1.gguf`).
//!
//! An id not in the cache is downloaded into it from the hub ([`download`]; `$HF_ENDPOINT`, default
//! `https://huggingface.co`, with `$HF_TOKEN`) unless `HF_HUB_OFFLINE` is set; a cached id is used
//! as it is, without asking the hub for a newer commit. Where neither works, the error names the
//! cache folder looked in and the endpoint tried.

pub mod download;

use crate::error::{Error, Result};
use download::Hub;
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

/// `org/name[@revision][:pick]` split, when `spec` has that shape: [`parse_id`]'s, and `pick` (id
/// characters) choosing among a GGUF repository's files.
pub fn parse_spec(spec: &str) -> Option<(&str, &str, &str, Option<&str>)> {
    let (id, pick) = match spec.rsplit_once(':') {
        Some((id, pick)) => (id, Some(pick)),
        None => (spec, None),
    };
    let pick_ok = pick
        .is_none_or(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')));
    let (org, name, rev) = parse_id(id)?;
    pick_ok.then_some((org, name, rev, pick))
}

/// `spec` as given when it exists (a folder or a file); otherwise, when it has the shape of a hub id,
/// the snapshot it names, from the cache or downloaded into it (see the module doc); otherwise `spec`
/// unchanged (its load reports what is missing). The environment is read here, and only here.
pub fn resolve(spec: &Path) -> Result<PathBuf> {
    if spec.exists() {
        return Ok(spec.to_path_buf());
    }
    let Some(id) = spec.to_str().filter(|s| parse_spec(s).is_some()) else { return Ok(spec.to_path_buf()) };
    let cache = cache_dir().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{id}: no such file or folder, and no Hugging Face cache to look in (set HF_HOME or HF_HUB_CACHE)"
        ))
    })?;
    let hub = (!download::offline()).then(Hub::from_env);
    resolve_with(id, &cache, hub.as_ref())
}

/// The hub id `spec` (see [`parse_spec`]) from the hub cache folder `cache`; where it is not there,
/// downloaded into it through `hub` (`None`: offline). The error names the folder looked in and the
/// endpoint tried.
pub fn resolve_with(spec: &str, cache: &Path, hub: Option<&Hub>) -> Result<PathBuf> {
    let (org, name, rev, pick) = parse_spec(spec)
        .ok_or_else(|| Error::InvalidArgument(format!("{spec}: not a Hugging Face id (org/name[@revision])")))?;
    let why = match resolve_in(cache, org, name, rev, pick) {
        Ok(p) => return Ok(p),
        Err(why) => why,
    };
    let Some(hub) = hub else {
        return Err(Error::InvalidArgument(format!(
            "{spec}: no such file or folder, and not in the Hugging Face cache: {why} (HF_HUB_OFFLINE is set, \
             so tuna does not download; `huggingface-cli download {org}/{name}` fills that cache)"
        )));
    };
    let failed = |e: String| {
        Error::InvalidArgument(format!(
            "{spec}: no such file or folder, not in the Hugging Face cache ({why}), and not downloaded: {e} \
             (HF_ENDPOINT names another hub; HF_HUB_OFFLINE=1 stays offline)"
        ))
    };
    hub.download(cache, org, name, rev, pick).map_err(failed)?;
    resolve_in(cache, org, name, rev, pick).map_err(failed)
}

/// The snapshot of `org/name` at `rev` (a branch or tag under `refs/`, or a commit) in `cache`, or
/// for a GGUF repository its `.gguf` file (`pick`: the one whose name ends with `{pick}.gguf`);
/// `Err` says what was missing.
pub fn resolve_in(
    cache: &Path,
    org: &str,
    name: &str,
    rev: &str,
    pick: Option<&str>,
) -> std::result::Result<PathBuf, String> {
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
    if pick.is_none() && snap.join("config.json").exists() {
        return Ok(snap);
    }
    let mut names: Vec<String> = std::fs::read_dir(&snap)
        .map_err(|e| format!("{}: {e}", snap.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".gguf") && snap.join(n).exists())
        .collect();
    names.sort();
    // The same choice as a download's.
    download::wanted(&names, pick)
        .map(|mut f| snap.join(f.remove(0)))
        .map_err(|e| format!("{} {}", snap.display(), e.replacen("has ", "holds ", 1)))
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
        assert_eq!(parse_spec("a/b@v1:Q4_1"), Some(("a", "b", "v1", Some("Q4_1"))));
        assert_eq!(parse_spec("a/b"), Some(("a", "b", "main", None)));
        for bad in ["a/b:", "a/b:x/y", "a:b", "a/b@:Q4"] {
            assert_eq!(parse_spec(bad), None, "{bad}");
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
        assert_eq!(resolve_in(&root, "org", "tiny", "main", None).unwrap(), snap);
        assert_eq!(resolve_in(&root, "org", "tiny", "0123abcd", None).unwrap(), snap);
        let e = resolve_in(&root, "org", "tiny", "v2", None).unwrap_err();
        assert!(e.contains("refs/v2 does not exist"), "{e}");
        let e = resolve_in(&root, "org", "other", "main", None).unwrap_err();
        assert!(e.contains("models--org--other does not exist"), "{e}");
        // A GGUF repository: its one .gguf file; two are ambiguous.
        std::fs::remove_file(snap.join("config.json")).unwrap();
        std::fs::write(snap.join("m.Q4_1.gguf"), "").unwrap();
        assert_eq!(resolve_in(&root, "org", "tiny", "main", None).unwrap(), snap.join("m.Q4_1.gguf"));
        std::fs::write(snap.join("m.Q8_0.gguf"), "").unwrap();
        let e = resolve_in(&root, "org", "tiny", "main", None).unwrap_err();
        assert!(e.contains("several .gguf files (m.Q4_1.gguf, m.Q8_0.gguf): pick one"), "{e}");
        // `:pick` chooses by the end of the name, case aside.
        assert_eq!(resolve_in(&root, "org", "tiny", "main", Some("q8_0")).unwrap(), snap.join("m.Q8_0.gguf"));
        let e = resolve_in(&root, "org", "tiny", "main", Some("Q5_K")).unwrap_err();
        assert!(e.contains("no .gguf file ends with `Q5_K.gguf`"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
