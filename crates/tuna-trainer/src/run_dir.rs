//! A run's output folder: an exclusive lock held for the whole run (a second process is refused,
//! naming the holder's PID), and the rule that a folder already holding a run is continued
//! (`--resume`) or replaced (`--overwrite`), never silently mixed with a new one.

use crate::error::{Result, TrainError};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file inside an output folder (it stays after the run; only the lock on it matters).
pub const LOCK_FILE: &str = ".tuna.lock";

/// What the files of a run are called in its folder (everything `tuna train` writes there).
pub const RUN_OUTPUTS: [&str; 5] = ["metrics.jsonl", "summary.json", "checkpoints", "adapter", "model"];

/// What to do with an output folder that already holds a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutMode {
    /// A new run; a folder holding another run is an error.
    New,
    /// Delete the old run's outputs (only the files tuna writes) and start anew.
    Overwrite,
    /// Continue from the newest valid checkpoint; none is an error.
    Resume,
    /// Continue from the newest valid checkpoint, or start anew where the folder holds no run.
    ResumeOrStart,
}

/// An exclusive advisory lock on a folder, held until dropped (or the process ends, however it ends).
#[derive(Debug)]
pub struct FolderLock {
    _file: File,
    pub path: PathBuf,
}

impl FolderLock {
    /// Release the lock and delete the lock file, for a folder that is handed on (an export).
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Lock `dir` (created if needed) for this process. Another holder (another `tuna` writing the same
/// folder) is an error naming its PID; the lock is released by the OS when the holder exits, so a
/// killed run never leaves a stale lock.
pub fn lock(dir: &Path) -> Result<FolderLock> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| TrainError::Io { path: p, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(LOCK_FILE);
    let mut file =
        OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io(&path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() { "another process".to_string() } else { format!("process {holder}") };
            return Err(TrainError::Locked { dir: dir.to_path_buf(), holder: who });
        }
        Err(TryLockError::Error(e)) => return Err(io(&path)(e)),
    }
    // The holder's PID, for the message a second run prints (best effort: the lock is what counts).
    let _ = file.set_len(0).and_then(|()| file.seek(SeekFrom::Start(0))).and_then(|_| {
        file.write_all(format!("{}\n", std::process::id()).as_bytes())?;
        file.flush()
    });
    Ok(FolderLock { _file: file, path })
}

/// The outputs of an earlier run that `dir` holds (names from [`RUN_OUTPUTS`]), empty for a fresh
/// folder. An empty `checkpoints/` or an empty `metrics.jsonl` does not count.
pub fn existing_run(dir: &Path) -> Vec<&'static str> {
    RUN_OUTPUTS
        .iter()
        .copied()
        .filter(|name| {
            let p = dir.join(name);
            match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() => std::fs::read_dir(&p).is_ok_and(|mut d| d.next().is_some()),
                Ok(m) => m.len() > 0,
                Err(_) => false,
            }
        })
        .collect()
}

/// Apply `mode` to `dir` (which this process has locked): refuse a new run over an old one, or
/// delete the old run's outputs for `Overwrite`. Files tuna does not write are never touched.
pub fn prepare(dir: &Path, mode: OutMode) -> Result<()> {
    let found = existing_run(dir);
    match mode {
        OutMode::New if !found.is_empty() => Err(TrainError::Invalid(format!(
            "{} already holds a run ({}): pass --resume to continue it, --overwrite to replace it, or choose another --out",
            dir.display(),
            found.join(", ")
        ))),
        OutMode::Overwrite => {
            for name in found {
                let p = dir.join(name);
                let r = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
                r.map_err(|source| TrainError::Io { path: p, source })?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tuna-run-dir-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_second_lock_on_a_folder_is_refused_naming_the_holder_and_freed_on_drop() {
        let d = tmp("lock");
        let first = lock(&d).unwrap();
        let err = lock(&d).unwrap_err().to_string();
        assert!(err.contains(&format!("process {}", std::process::id())), "{err}");
        assert!(err.contains(&d.display().to_string()), "{err}");
        drop(first);
        lock(&d).unwrap();
    }

    #[test]
    fn a_new_run_over_an_old_one_is_refused_and_overwrite_removes_only_run_outputs() {
        let d = tmp("prepare");
        prepare(&d, OutMode::New).unwrap();
        std::fs::create_dir_all(d.join("checkpoints")).unwrap();
        std::fs::write(d.join("metrics.jsonl"), b"").unwrap();
        // An empty checkpoints/ and an empty log are no run.
        assert!(existing_run(&d).is_empty());
        prepare(&d, OutMode::New).unwrap();
        std::fs::create_dir_all(d.join("checkpoints/step-000001")).unwrap();
        std::fs::write(d.join("metrics.jsonl"), b"{}\n").unwrap();
        std::fs::write(d.join("notes.txt"), b"mine").unwrap();
        let err = prepare(&d, OutMode::New).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl, checkpoints") && err.contains("--overwrite"), "{err}");
        prepare(&d, OutMode::Resume).unwrap();
        prepare(&d, OutMode::Overwrite).unwrap();
        assert!(existing_run(&d).is_empty());
        assert_eq!(std::fs::read(d.join("notes.txt")).unwrap(), b"mine");
    }
}
