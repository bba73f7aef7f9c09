//! A run's output folder: an exclusive lock held for the whole run (a second process is refused,
//! naming the holder's PID), and the rule that a folder already holding a run is continued
//! (`--resume`) or replaced (`--overwrite`, only after the new run's inputs have loaded), never
//! silently mixed with a new one.

use crate::error::{Result, TrainError};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file inside an output folder: a run's stays after the run (it marks the folder as a
/// run's); a run refused before writing anything, and an export, leave none. Only the lock on it
/// matters (see [`lock`]).
pub const LOCK_FILE: &str = ".tuna.lock";

/// What the files of a run are called in its folder (everything `tuna train` writes there).
/// (`tuna_prompt.json`: the prompt-engineered baseline's template and examples; `adapters`: a
/// multi-task run's adapter per task.)
pub const RUN_OUTPUTS: [&str; 7] =
    ["metrics.jsonl", "summary.json", "checkpoints", "adapter", "model", "tuna_prompt.json", "adapters"];

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
/// Dropped while the folder holds nothing it did not hold when the lock was taken (a run refused
/// before it wrote anything), the lock leaves no trace: its lock file is removed (if it made it),
/// and the folders it created too.
/// An export's lock ([`lock_export`]) removes its lock file in any case.
#[derive(Debug)]
pub struct FolderLock {
    _file: File,
    /// The lock file.
    pub path: PathBuf,
    dir: PathBuf,
    /// The outermost folder this lock created (`dir` or an ancestor), if any.
    made_dir: Option<PathBuf>,
    made_file: bool,
    /// Remove the lock file on drop whatever else the folder holds (an export's).
    remove_file: bool,
    /// What the folder held when the lock was taken: a drop finding nothing else (but the lock
    /// file) knows the holder wrote nothing.
    before: Vec<std::ffi::OsString>,
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        // Still holding the lock: nobody else can be writing here. Removing the lock file is safe
        // for a process waiting on it: `lock` checks, once it holds a lock, that its file is still
        // the one at the path, and starts over if not.
        let wrote_nothing = std::fs::read_dir(&self.dir)
            .map(|d| d.flatten().all(|e| e.file_name() == LOCK_FILE || self.before.contains(&e.file_name())))
            .unwrap_or(false);
        if (self.made_file && wrote_nothing) || self.remove_file {
            let _ = std::fs::remove_file(&self.path);
        }
        if let (true, Some(top)) = (wrote_nothing, &self.made_dir) {
            // Innermost first; stops at the first folder that is not empty (anything that appeared
            // meanwhile stays).
            for d in self.dir.ancestors() {
                if std::fs::remove_dir(d).is_err() || d == top {
                    break;
                }
            }
        }
    }
}

/// Create `dir` and any missing ancestors, refusing a path that is not a folder: the outermost
/// folder this call created, if any.
fn make_dir(dir: &Path) -> Result<Option<PathBuf>> {
    if dir.exists() && !dir.is_dir() {
        return Err(TrainError::Invalid(format!("{}: not a folder", dir.display())));
    }
    let top = dir.ancestors().take_while(|a| !a.as_os_str().is_empty() && !a.exists()).last().map(Path::to_path_buf);
    std::fs::create_dir_all(dir).map_err(|source| TrainError::Io { path: dir.to_path_buf(), source })?;
    Ok(top)
}

/// Lock `dir` (created if needed) for this process. Another holder (another `tuna` writing the same
/// folder: `train`, `compare` or `export`) is an error naming its PID; the lock is released by the
/// OS when the holder exits, so a killed run never leaves a stale lock.
pub fn lock(dir: &Path) -> Result<FolderLock> {
    take(dir, false)
}

/// [`lock`] for `tuna export`: the same lock (an export and a run exclude each other), whose lock
/// file is removed when it is dropped, so the export folder carries none.
pub fn lock_export(dir: &Path) -> Result<FolderLock> {
    take(dir, true)
}

/// Whether `file` is still the file at `path` (not unlinked or replaced since it was opened).
fn still_at(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::symlink_metadata(path)) {
            (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        path.is_file()
    }
}

fn take(dir: &Path, remove_file: bool) -> Result<FolderLock> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| TrainError::Io { path: p, source }
    };
    let path = dir.join(LOCK_FILE);
    let mut made_dir = None;
    // A holder drops its lock file while holding the lock (a refused run, an export): a process
    // that opened that file meanwhile gets the lock on a file no longer in the folder, and starts
    // over (a few times at most: each round needs another process to finish in between).
    for _ in 0..16 {
        made_dir = made_dir.or(make_dir(dir)?);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_file()) {
            // Never write a PID through a link into someone else's file.
            return Err(TrainError::Invalid(format!("{}: not a plain file (a link?): remove it", path.display())));
        }
        let open = |create_new: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(true);
            if create_new {
                o.create_new(true);
            } else {
                o.create(true).truncate(false);
            }
            o.open(&path)
        };
        let (mut file, made_file) = match open(true) {
            Ok(f) => (f, true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match open(false) {
                Ok(f) => (f, false),
                // The folder went with its holder's lock file: make it again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&path)(e)),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&path)(e)),
        };
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
        if !still_at(&file, &path) {
            continue;
        }
        // The holder's PID, for the message a second run prints (best effort: the lock is what counts).
        let _ = file.set_len(0).and_then(|()| file.seek(SeekFrom::Start(0))).and_then(|_| {
            file.write_all(format!("{}\n", std::process::id()).as_bytes())?;
            file.flush()
        });
        let before = std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.file_name()).filter(|n| n != LOCK_FILE).collect())
            .unwrap_or_default();
        return Ok(FolderLock { _file: file, path, dir: dir.to_path_buf(), made_dir, made_file, remove_file, before });
    }
    Err(TrainError::Invalid(format!(
        "{}: its lock file kept being replaced while this process took it: try again",
        path.display()
    )))
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
                // A killed save's `.tmp-*` folder holds nothing a run could resume from.
                Ok(m) if m.is_dir() => std::fs::read_dir(&p)
                    .is_ok_and(|d| d.flatten().any(|e| !e.file_name().to_string_lossy().starts_with(".tmp-"))),
                Ok(m) => m.len() > 0,
                Err(_) => false,
            }
        })
        .collect()
}

/// Check `mode` against `dir` before any work: a new run over an old one is refused, and so is a
/// run whose `inputs` (model, data) lie inside the outputs an `--overwrite` would delete (or a
/// new run would replace). Nothing is deleted here: see [`clear`].
pub fn check(dir: &Path, mode: OutMode, inputs: &[&Path]) -> Result<()> {
    // A linked `checkpoints/` (or export folder) would make this run write into, or delete from,
    // wherever it leads: another run's folder.
    for name in RUN_OUTPUTS {
        let p = dir.join(name);
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(TrainError::Invalid(format!(
                "{}: a link; a run writes only into its own folder: remove the link or choose another --out",
                p.display()
            )));
        }
    }
    let found = existing_run(dir);
    let outputs: Vec<PathBuf> = RUN_OUTPUTS.iter().filter_map(|n| std::fs::canonicalize(dir.join(n)).ok()).collect();
    for input in inputs {
        let Ok(input) = std::fs::canonicalize(input) else { continue };
        if let Some(o) = outputs.iter().find(|o| input.starts_with(o)) {
            return Err(TrainError::Invalid(format!(
                "{} is inside {}, which this run writes: choose another --out",
                input.display(),
                o.display()
            )));
        }
    }
    match mode {
        // A run stopped (a non-finite loss, a kill) before its first checkpoint: --resume would
        // find nothing to resume, so it is not the advice.
        OutMode::New if !found.is_empty() && !found.contains(&"checkpoints") => {
            let anew = if found == ["metrics.jsonl"] { "--overwrite (or --resume-or-start)" } else { "--overwrite" };
            Err(TrainError::Invalid(format!(
                "{} holds a run that saved no checkpoint ({}), so there is nothing to resume: {anew} starts a new \
                 run there, or choose another --out",
                dir.display(),
                found.join(", ")
            )))
        }
        OutMode::New if !found.is_empty() => Err(TrainError::Invalid(format!(
            "{} already holds a run ({}): pass --resume to continue it, --overwrite to replace it, or choose another --out",
            dir.display(),
            found.join(", ")
        ))),
        _ => Ok(()),
    }
}

/// The files of a checkpoint folder: what the trainer saves and the manifest.
const CHECKPOINT_FILES: [&str; 4] = ["trainable.safetensors", "optimizer.safetensors", "state.json", "manifest.json"];

/// The files of an adapter export.
const ADAPTER_FILES: [&str; 5] = [
    tuna_models::adapt::peft::CONFIG,
    tuna_models::adapt::peft::WEIGHTS,
    tuna_models::adapt::peft::BASE,
    tuna_models::adapt::peft::EXTRA,
    crate::task::TASK_FILE,
];

/// Whether `name` inside the run output `output` is something tuna writes there.
fn written_by_tuna(output: &str, name: &str) -> bool {
    use tuna_models::adapt::peft;
    match output {
        // (And a killed export's temporary files and staging folder.)
        "adapter" => ADAPTER_FILES.contains(&name) || crate::export::export_temp_pid(name).is_some(),
        // A multi-task run's `adapters/<task>/` folders (their files: [`ADAPTER_FILES`]).
        "adapters" => !name.starts_with('.'),
        "model" => {
            tuna_models::model::HF_FILES.contains(&name)
                || ["model.safetensors", peft::EXTRA, crate::task::TASK_FILE].contains(&name)
                || crate::export::export_temp_pid(name).is_some()
        }
        "checkpoints" => {
            // `step-NNNNNN` exactly as the checkpoint module names them, its temporary and
            // set-aside folders.
            let step = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok());
            step.is_some_and(|s| name == format!("step-{s:06}"))
                || name.starts_with(".tmp-")
                || name.starts_with("corrupt-step-")
        }
        _ => false,
    }
}

/// Output folders no run may use: the filesystem's root, a model's folder (a `config.json` at its
/// top), and a folder inside another run's `checkpoints/`. Checked before the folder is locked, so
/// not even a lock file lands there.
pub fn refuse_unsafe_out(dir: &Path) -> Result<()> {
    let Some(canon) = canonical_to_be(dir) else { return Ok(()) };
    let bad = |why: &str| Err(TrainError::Invalid(format!("--out {}: {why}; choose another folder", dir.display())));
    if canon.parent().is_none() {
        return bad("the filesystem's root");
    }
    if canon.join("config.json").is_file() {
        return bad("a model's folder (it holds config.json)");
    }
    if inside_checkpoints(&canon) {
        return bad("inside another run's checkpoints/");
    }
    Ok(())
}

/// Whether the absolute `dir` is (or lies inside) a run's `checkpoints/` folder.
pub fn inside_checkpoints(dir: &Path) -> bool {
    dir.ancestors().any(|a| {
        a.file_name().is_some_and(|n| n == "checkpoints") && a.parent().is_some_and(|p| p.join(LOCK_FILE).exists())
    })
}

/// Where an export may not go: a run's folder or its `checkpoints/` (resolving links; a folder
/// that does not exist yet is judged by where it will be).
pub fn refuse_export_into_run(dir: &Path) -> Result<()> {
    let Some(canon) = canonical_to_be(dir) else { return Ok(()) };
    if inside_checkpoints(&canon) {
        return Err(TrainError::Invalid(format!("--out {}: inside a run's checkpoints/", dir.display())));
    }
    let run = existing_run(dir);
    if !run.is_empty() {
        return Err(TrainError::Invalid(format!(
            "--out {}: it holds a training run ({}); export into another folder",
            dir.display(),
            run.join(", ")
        )));
    }
    Ok(())
}

/// For an export into a folder inside a run's folder (its own `adapter/`, a task's
/// `adapters/<name>/`): that run's lock too, taken before the export's, so an export and the run
/// that would rewrite the folder when it ends exclude each other (refused while it trains, naming
/// its process). `None` where no enclosing folder holds a run's lock file.
pub fn lock_enclosing_run(dir: &Path) -> Result<Option<FolderLock>> {
    let Some(canon) = canonical_to_be(dir) else { return Ok(None) };
    match canon.ancestors().skip(1).find(|a| a.join(LOCK_FILE).is_file()) {
        Some(run) => Ok(Some(take(run, false)?)),
        None => Ok(None),
    }
}

/// `dir` made absolute with its links resolved, through its nearest existing ancestor when it does
/// not exist yet (the folder a run is about to create).
fn canonical_to_be(dir: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(dir).ok()?;
    let mut missing = Vec::new();
    let mut at = abs.as_path();
    loop {
        if let Ok(c) = std::fs::canonicalize(at) {
            return Some(missing.iter().rev().fold(c, |p: PathBuf, m| p.join(m)));
        }
        missing.push(at.file_name()?.to_owned());
        at = at.parent()?;
    }
}

/// Delete the outputs of the run `dir` holds, and only what tuna writes: the log and summary, and
/// inside `adapter/`, `model/` and `checkpoints/` the files and checkpoint folders tuna names (the
/// folders themselves only when nothing else is left in them). For `--overwrite`, once the new
/// run's model and data have loaded.
pub fn clear(dir: &Path) -> Result<()> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| TrainError::Io { path: p, source }
    };
    for name in existing_run(dir) {
        let p = dir.join(name);
        if !p.is_dir() {
            std::fs::remove_file(&p).map_err(io(&p))?;
            continue;
        }
        for entry in std::fs::read_dir(&p).map_err(io(&p))? {
            let e = entry.map_err(io(&p))?.path();
            let file = e.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if !written_by_tuna(name, file) {
                continue;
            }
            let is_dir = std::fs::symlink_metadata(&e).map(|m| m.is_dir()).unwrap_or(false);
            if name == "adapters" {
                // A task's adapter folder (never a link or a loose file): the export's files,
                // then the folder when nothing else is left in it.
                if is_dir {
                    for f in ADAPTER_FILES {
                        let _ = std::fs::remove_file(e.join(f));
                    }
                    let _ = std::fs::remove_dir(&e);
                }
            } else if is_dir {
                // A checkpoint's (or a temporary) folder: its files as the checkpoint module
                // writes them, then the folder when nothing of yours is left in it.
                for f in CHECKPOINT_FILES {
                    let _ = std::fs::remove_file(e.join(f));
                }
                if e.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(".tmp-")) {
                    std::fs::remove_dir_all(&e).map_err(io(&e))?;
                }
                let _ = std::fs::remove_dir(&e);
            } else {
                std::fs::remove_file(&e).map_err(io(&e))?;
            }
        }
        // Left in place when it still holds files of yours.
        let _ = std::fs::remove_dir(&p);
    }
    Ok(())
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
    fn a_lock_dropped_before_anything_was_written_leaves_no_trace() {
        let parent = tmp("trace");
        // A folder the lock made: gone again.
        let d = parent.join("new");
        drop(lock(&d).unwrap());
        assert!(!d.exists());
        // A folder that was there (empty): left as it was, without the lock file.
        std::fs::create_dir_all(&d).unwrap();
        drop(lock(&d).unwrap());
        assert!(d.is_dir() && std::fs::read_dir(&d).unwrap().next().is_none());
        // Once a run wrote something, the folder and its lock file stay.
        let l = lock(&d).unwrap();
        std::fs::write(d.join("metrics.jsonl"), b"{}\n").unwrap();
        drop(l);
        assert!(d.join(LOCK_FILE).is_file());
        // A folder holding the user's own files: the lock file this lock made goes again, the
        // files stay.
        let u = parent.join("user");
        std::fs::create_dir_all(&u).unwrap();
        std::fs::write(u.join("notes.txt"), b"mine").unwrap();
        drop(lock(&u).unwrap());
        let names: Vec<_> = std::fs::read_dir(&u).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, ["notes.txt"]);
        // A lock file from an earlier run stays too.
        std::fs::remove_file(d.join("metrics.jsonl")).unwrap();
        drop(lock(&d).unwrap());
        assert!(d.join(LOCK_FILE).is_file());
    }

    #[test]
    fn an_export_lock_excludes_a_run_and_leaves_no_lock_file() {
        let parent = tmp("export-lock");
        let d = parent.join("export");
        let first = lock_export(&d).unwrap();
        // A run (or a second export) on the same folder is refused while the export holds it.
        let err = lock(&d).unwrap_err().to_string();
        assert!(err.contains(&format!("process {}", std::process::id())), "{err}");
        assert!(lock_export(&d).is_err());
        std::fs::write(d.join("adapter_config.json"), b"{}").unwrap();
        drop(first);
        let names: Vec<_> = std::fs::read_dir(&d).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, ["adapter_config.json"]);
        // And an export waits for a run's lock the same way.
        let run = lock(&d).unwrap();
        assert!(lock_export(&d).is_err());
        drop(run);
    }

    /// A process that opened the lock file before its holder removed it (a refused run) gets the
    /// lock on a file no longer in the folder: it must notice and take the lock on the folder's
    /// current file, so that it and a third process cannot both hold "the" lock.
    #[test]
    fn a_lock_on_a_removed_lock_file_is_taken_again() {
        let parent = tmp("stale-file");
        let d = parent.join("run");
        std::fs::create_dir_all(&d).unwrap();
        let path = d.join(LOCK_FILE);
        // The state the race leaves: this process holds a lock on an unlinked file.
        let old = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).unwrap();
        old.try_lock().unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(!still_at(&old, &path));
        drop(old);
        // What `take` does next: a lock on the folder's own (new) file, which excludes a third.
        let l = lock(&d).unwrap();
        assert!(still_at(&l._file, &path));
        assert!(lock(&d).is_err());
        drop(l);
    }

    #[test]
    fn a_refused_run_removes_the_folders_it_made_and_only_those() {
        let parent = tmp("nested");
        let d = parent.join("a/b/c");
        drop(lock(&d).unwrap());
        assert!(!parent.join("a").exists(), "left {}", parent.join("a").display());
        assert!(parent.is_dir());
        // A sibling appearing in a made folder stops the removal there.
        let l = lock(&d).unwrap();
        std::fs::write(parent.join("a/keep.txt"), b"x").unwrap();
        drop(l);
        assert!(!parent.join("a/b").exists() && parent.join("a/keep.txt").is_file());
    }

    #[test]
    fn a_new_run_over_an_old_one_is_refused_and_overwrite_removes_only_run_outputs() {
        let d = tmp("prepare");
        check(&d, OutMode::New, &[]).unwrap();
        std::fs::create_dir_all(d.join("checkpoints")).unwrap();
        std::fs::write(d.join("metrics.jsonl"), b"").unwrap();
        // An empty checkpoints/ and an empty log are no run.
        assert!(existing_run(&d).is_empty());
        check(&d, OutMode::New, &[]).unwrap();
        std::fs::create_dir_all(d.join("checkpoints/step-000001")).unwrap();
        std::fs::write(d.join("metrics.jsonl"), b"{}\n").unwrap();
        std::fs::write(d.join("notes.txt"), b"mine").unwrap();
        let err = check(&d, OutMode::New, &[]).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl, checkpoints") && err.contains("--overwrite"), "{err}");
        check(&d, OutMode::Resume, &[]).unwrap();
        check(&d, OutMode::Overwrite, &[]).unwrap();
        // An input inside what the run writes (a model exported into `model/`) is refused.
        std::fs::create_dir_all(d.join("model")).unwrap();
        std::fs::write(d.join("model/config.json"), b"{}").unwrap();
        let err = check(&d, OutMode::Overwrite, &[&d.join("model")]).unwrap_err().to_string();
        assert!(err.contains("which this run writes"), "{err}");
        clear(&d).unwrap();
        assert!(existing_run(&d).is_empty());
        assert_eq!(std::fs::read(d.join("notes.txt")).unwrap(), b"mine");
    }
}
