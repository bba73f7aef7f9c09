//! Compiles in what `tuna info` says about the build (read by `src/info.rs` through `env!`):
//!
//! - `TUNA_GIT_REV`: `git rev-parse --short HEAD`, with `-dirty` when `git status --porcelain`
//!   lists anything; in a packaged crate (no `.git`) the commit `cargo package` recorded in
//!   `.cargo_vcs_info.json`; else `unknown`. Git is asked only when this package's folder holds
//!   the repository's `.git`, so a crate unpacked inside some other repository reports `unknown`.
//! - `TUNA_BUILD_PROFILE`: cargo's profile (`debug` or `release`; custom profiles name their
//!   base), with the optimization level and debuginfo setting.
//! - `TUNA_TARGET` and `TUNA_TARGET_FEATURES`: the target triple and the CPU features enabled at
//!   compile time (`CARGO_CFG_TARGET_FEATURE`: `-C target-cpu` / `-C target-feature`).
//! - `TUNA_CUDA_ARCHS`: the archs the kernel crate precompiles PTX for where nvcc is found (the
//!   same variable and default, "80,90", as `crates/tuna-kernels/build.rs`).
//! - `TUNA_RUSTC`: `rustc --version`.
//!
//! Reruns when HEAD moves (`.git/HEAD`, the branch ref it points to, `packed-refs`) and when the
//! sources that make the binary change (`src/`, `crates/`, `kernels/`, the manifests), so the
//! `-dirty` mark follows edits to them; an edit elsewhere only (tests/, scripts/, README.md)
//! shows once something else reruns this script. The index is not watched: `git status` run by
//! anything rewrites it, and each rewrite would rebuild the binary. Every path is checked before
//! use: builds outside git, or from a packaged crate, work.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=TUNA_CUDA_ARCHS");

    let rev = match git_dir(&root) {
        Some(git) => {
            watch_git(&git);
            for p in ["src", "crates", "kernels", "Cargo.toml", "Cargo.lock"] {
                if root.join(p).exists() {
                    println!("cargo:rerun-if-changed={p}");
                }
            }
            git_rev(&root).unwrap_or_else(|| "unknown".into())
        }
        None => {
            println!("cargo:rerun-if-changed=.cargo_vcs_info.json");
            vcs_info_rev(&root.join(".cargo_vcs_info.json")).unwrap_or_else(|| "unknown".into())
        }
    };
    env("TUNA_GIT_REV", &rev);

    let var = |k: &str| std::env::var(k).unwrap_or_default();
    // (debug assertions are not in a build script's cfgs: src/info.rs adds them, by `cfg!`)
    env(
        "TUNA_BUILD_PROFILE",
        &format!("{}, opt-level {}, debuginfo {}", var("PROFILE"), var("OPT_LEVEL"), var("DEBUG")),
    );
    env("TUNA_TARGET", &var("TARGET"));
    let mut features: Vec<String> =
        var("CARGO_CFG_TARGET_FEATURE").split(',').filter(|f| !f.is_empty()).map(str::to_string).collect();
    features.sort();
    env("TUNA_TARGET_FEATURES", &if features.is_empty() { "none".into() } else { features.join(",") });
    // As crates/tuna-kernels/build.rs reads it.
    let archs: Vec<String> = std::env::var("TUNA_CUDA_ARCHS")
        .unwrap_or_else(|_| "80,90".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    env("TUNA_CUDA_ARCHS", &archs.join(","));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    env("TUNA_RUSTC", &run(Command::new(rustc).arg("--version")).unwrap_or_else(|| "unknown".into()));
}

fn env(key: &str, value: &str) {
    // one line per variable: keep values on one line
    println!("cargo:rustc-env={key}={}", value.replace(['\n', '\r'], " "));
}

/// The trimmed stdout of a command that ran and succeeded.
fn run(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok().filter(|o| o.status.success())?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The git directory of a repository whose work tree is `root`: `root/.git`, or the folder a
/// `.git` file names (`gitdir: ...`, a worktree or submodule).
fn git_dir(root: &Path) -> Option<PathBuf> {
    let dot = root.join(".git");
    if dot.is_dir() {
        return Some(dot);
    }
    let text = std::fs::read_to_string(&dot).ok()?;
    let dir = root.join(text.strip_prefix("gitdir:")?.trim());
    dir.is_dir().then_some(dir)
}

/// Rerun when HEAD or the branch it points to moves. Refs live in the common directory (the main
/// `.git` for a worktree).
fn watch_git(git: &Path) {
    let common = std::fs::read_to_string(git.join("commondir"))
        .ok()
        .map(|c| git.join(c.trim()))
        .filter(|c| c.is_dir())
        .unwrap_or_else(|| git.to_path_buf());
    let head = git.join("HEAD");
    let mut watch = vec![head.clone(), common.join("packed-refs")];
    if let Some(r) = std::fs::read_to_string(&head).ok().as_deref().and_then(|h| h.strip_prefix("ref:")) {
        watch.push(common.join(r.trim()));
    }
    for p in watch.into_iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}

/// `abc1234` or `abc1234-dirty`; `None` when git is missing or fails.
fn git_rev(root: &Path) -> Option<String> {
    let git = || {
        let mut c = Command::new("git");
        // no index refresh: a build only reads the repository
        c.arg("--no-optional-locks").arg("-C").arg(root);
        c
    };
    let rev = run(git().args(["rev-parse", "--short", "HEAD"])).filter(|r| !r.is_empty())?;
    let dirty = run(git().args(["status", "--porcelain"])).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{rev}-dirty") } else { rev })
}

/// The commit `cargo package` recorded (`{"git": {"sha1": "...", "dirty": true}, ...}`), short.
fn vcs_info_rev(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let after = &text[text.find("\"sha1\"")? + "\"sha1\"".len()..];
    let sha: String = after
        .trim_start_matches(|c: char| c == ':' || c == '"' || c.is_whitespace())
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .take(7)
        .collect();
    if sha.is_empty() {
        return None;
    }
    let dirty = text.replace(char::is_whitespace, "").contains("\"dirty\":true");
    Some(if dirty { format!("{sha}-dirty") } else { sha })
}
