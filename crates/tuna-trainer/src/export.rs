//! What a run leaves: the final export (a PEFT adapter folder, or a Hugging Face folder of a fully
//! fine-tuned model), and the process's peak memory for the summary.

use crate::error::{Result, TrainError};
use crate::model::{Backend, Model, RunFloat};
use std::path::{Path, PathBuf};
use tuna_models::adapt::peft;

/// Write the final export: a PEFT adapter folder, or for full fine-tuning a Hugging Face folder of
/// the trained model. Returns its path and the bytes of its weights file. Written all or nothing
/// (see [`write_staged`]).
pub fn export<B: Backend<E>, E: RunFloat>(model: &Model<B, E>, out: &Path) -> Result<(PathBuf, u64)> {
    // Full fine-tuning: nothing but (perhaps) a task head in the adaptation.
    let (dir, file) = if model.adapt().is_empty() {
        let d = out.join("model");
        write_staged(&d, |stage| -> Result<()> { Ok(model.save_merged(stage)?) })?;
        (d.clone(), d.join("model.safetensors"))
    } else {
        let d = out.join("adapter");
        let base = model.name.clone().unwrap_or_else(|| model.source.display().to_string());
        write_staged(&d, |stage| -> Result<()> { Ok(model.save_adapter(stage, &base)?) })?;
        (d.clone(), d.join(peft::WEIGHTS))
    };
    let extra = std::fs::metadata(dir.join(peft::EXTRA)).map(|m| m.len()).unwrap_or(0);
    let bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) + extra;
    Ok((dir, bytes))
}

/// Every file name a tuna export writes: a PEFT adapter folder's, a merged model folder's
/// (`model.safetensors` and the Hugging Face files copied from the base) and the task file. What an
/// export into a folder replaces or removes, and the only names whose temporary files it removes.
pub const EXPORT_FILES: [&str; 10] = [
    peft::CONFIG,
    peft::WEIGHTS,
    peft::BASE,
    peft::EXTRA,
    crate::task::TASK_FILE,
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// A PEFT adapter folder's files (the other names of [`EXPORT_FILES`] are a merged model's, and the
/// task file).
const PEFT_FILES: [&str; 4] = [peft::CONFIG, peft::WEIGHTS, peft::BASE, peft::EXTRA];

/// The files that make a folder read as an export (PEFT's config, a model's config): removed first
/// and put in place last, so that an export stopped part way never looks like a whole one.
const MARKERS: [&str; 2] = [peft::CONFIG, "config.json"];

/// The name of an export's staging folder inside the export folder, before its PID.
const STAGE_PREFIX: &str = ".tmp-export-";

/// The PID in the name of a temporary file or folder a tuna export writes: `.<export file>.tmp-<pid>`
/// (a killed atomic write of one of [`EXPORT_FILES`]) or `.tmp-export-<pid>` (a killed export's
/// staging folder). `None` for every other name.
pub fn export_temp_pid(name: &str) -> Option<u32> {
    let pid = |s: &str| if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) { s.parse().ok() } else { None };
    if let Some(p) = name.strip_prefix(STAGE_PREFIX) {
        return pid(p);
    }
    let (file, p) = name.strip_prefix('.')?.rsplit_once(".tmp-")?;
    if EXPORT_FILES.contains(&file) {
        pid(p)
    } else {
        None
    }
}

/// Whether process `pid` may have written `path`, named by its PID: it is this process, or it is
/// running and started before `path` last changed (a process started since, one that was given a
/// dead export's PID again, cannot have written it). Where /proc is unavailable, no other process
/// is taken for running: the caller holds the folder's lock, so no other tuna writes there.
fn may_have_written(pid: u32, path: &Path) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if !Path::new("/proc/self").exists() || !Path::new("/proc").join(pid.to_string()).exists() {
        return false;
    }
    let changed = std::fs::symlink_metadata(path).and_then(|m| m.modified()).ok();
    match (process_start(pid), changed) {
        // (The start is known to a second: boot time is.)
        (Some(started), Some(changed)) => started <= changed + std::time::Duration::from_secs(2),
        // Running, its start unknown: taken for the writer.
        _ => true,
    }
}

/// When process `pid` started: field 22 of `/proc/<pid>/stat` (clock ticks since boot, at Linux's
/// fixed 100 a second for /proc) after `/proc/stat`'s boot time. `None` where it cannot be read.
fn process_start(pid: u32) -> Option<std::time::SystemTime> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (in parentheses, which may hold spaces and parentheses) come the
    // fields from the 3rd on: the 22nd is the 20th of those.
    let ticks: u64 = stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()?;
    let boot: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(boot) + std::time::Duration::from_millis(ticks * 10))
}

/// Remove from `dir` the temporary files and staging folders of tuna exports (their names only,
/// see [`export_temp_pid`]) whose process is no longer running (or is another process given its
/// PID again, started after the name last changed): what a killed export left. Of a
/// staging folder only the export's files (and their temporary files) are removed, then the folder
/// if that leaves it empty. For the holder of `dir`'s lock.
pub fn remove_stale_export_temps(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = export_temp_pid(&name) else { continue };
        let p = e.path();
        if may_have_written(pid, &p) {
            continue;
        }
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
            for f in EXPORT_FILES {
                let _ = std::fs::remove_file(p.join(f));
            }
            remove_stale_export_temps(&p);
            let _ = std::fs::remove_dir(&p);
        } else {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// Write an export into `out` (created if needed) all or nothing: `write` writes every file into a
/// staging folder inside `out`; only once it has succeeded are the files renamed into place, and the
/// files of an earlier export of the other kind removed (a PEFT adapter's files before a merged
/// model; a merged model's files before an adapter only where a tuna export's task file is, since a
/// user's own model folder holds none; never a name of this export's kind it does not write), so
/// that `out` holds one export. A folder at a name the export writes is refused before anything
/// is removed. An error from `write` (a full
/// disk) leaves `out` as it was, without the staging folder. A killed export's temporary files are
/// removed first. Returns the names written. The caller holds `out`'s lock.
pub fn write_staged<E: From<TrainError>>(
    out: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<Vec<String>, E> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| TrainError::Io { path: p, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    remove_stale_export_temps(out);
    let stage = out.join(format!("{STAGE_PREFIX}{}", std::process::id()));
    // Only this process (holding the lock) can have made it: an earlier export of this process.
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir(&stage).map_err(io(&stage))?;
    let staged = write(&stage).and_then(|()| {
        let mut names = Vec::new();
        for e in std::fs::read_dir(&stage).map_err(io(&stage))? {
            let name = e.map_err(io(&stage))?.file_name().to_string_lossy().into_owned();
            if !EXPORT_FILES.contains(&name.as_str()) {
                return Err(TrainError::Invalid(format!(
                    "{}: not a file an export writes",
                    stage.join(name).display()
                ))
                .into());
            }
            names.push(name);
        }
        Ok(names)
    });
    let names = match staged {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&stage);
            return Err(e);
        }
    };
    let commit = || -> Result<()> {
        // A folder where this export writes a file: refused before anything is removed.
        for n in &names {
            let p = out.join(n);
            if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
                return Err(TrainError::Invalid(format!("{}: a folder where the export writes a file", p.display())));
            }
        }
        // What goes besides the files replaced: the other kind of export's files only, never a
        // name of this kind this export does not write (a user's own tokenizer file stays). A
        // model's files go only where a tuna export's task file says an export put them there (a
        // user's model folder holds none).
        let peft_kind = names.iter().any(|n| n == peft::CONFIG);
        let tuna_export_here = out.join(crate::task::TASK_FILE).is_file();
        let other: Vec<&str> = EXPORT_FILES
            .iter()
            .copied()
            .filter(|f| !names.iter().any(|n| n == f))
            .filter(|f| {
                let is_peft = PEFT_FILES.contains(f);
                if peft_kind {
                    !is_peft && tuna_export_here
                } else {
                    is_peft
                }
            })
            .collect();
        // The old export's markers first (a stop from here on leaves no whole-looking export),
        // then the other kind's files, then the new files, the markers last.
        let replaced_markers = MARKERS.iter().copied().filter(|m| names.iter().any(|n| n == m) || other.contains(m));
        for f in replaced_markers.chain(other.iter().copied()) {
            let p = out.join(f);
            if std::fs::symlink_metadata(&p).is_ok_and(|m| !m.is_dir()) {
                std::fs::remove_file(&p).map_err(io(&p))?;
            }
        }
        let (markers, rest): (Vec<&String>, Vec<&String>) = names.iter().partition(|n| MARKERS.contains(&n.as_str()));
        for n in rest.into_iter().chain(markers) {
            std::fs::rename(stage.join(n), out.join(n)).map_err(io(&out.join(n)))?;
        }
        if cfg!(unix) {
            std::fs::File::open(out).and_then(|d| d.sync_all()).map_err(io(out))?;
        }
        Ok(())
    };
    let committed = commit();
    let _ = std::fs::remove_dir_all(&stage);
    committed?;
    Ok(names)
}

/// This process's peak resident set (VmHWM), 0 where /proc is unavailable.
pub fn peak_rss_bytes() -> u64 {
    status_bytes("VmHWM:")
}

/// This process's resident set now (VmRSS), 0 where /proc is unavailable.
pub fn rss_bytes() -> u64 {
    status_bytes("VmRSS:")
}

fn status_bytes(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PID no process has (beyond Linux's largest pid_max).
    const DEAD: u32 = 999_999_999;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tuna-export-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The folder's entries, sorted, with their contents (folders as `<dir>`).
    fn listing(d: &Path) -> Vec<(String, String)> {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| {
                let body = if e.path().is_dir() { "<dir>".into() } else { std::fs::read_to_string(e.path()).unwrap() };
                (e.file_name().into_string().unwrap(), body)
            })
            .collect();
        v.sort();
        v
    }

    fn put(d: &Path, files: &[(&str, &str)]) {
        for (f, body) in files {
            std::fs::write(d.join(f), body).unwrap();
        }
    }

    #[test]
    fn only_an_exports_own_temporary_names_are_its_temps() {
        assert_eq!(export_temp_pid(".model.safetensors.tmp-1234"), Some(1234));
        assert_eq!(export_temp_pid(".adapter_config.json.tmp-7"), Some(7));
        assert_eq!(export_temp_pid(".tmp-export-42"), Some(42));
        for other in [
            ".notes.txt.tmp-1234",
            "model.safetensors.tmp-1234",
            ".model.safetensors.tmp-",
            ".model.safetensors.tmp-12x",
            ".tmp-export-",
            ".tmp-export-4x",
            "model.safetensors",
        ] {
            assert_eq!(export_temp_pid(other), None, "{other}");
        }
        // Every Hugging Face file a merged export copies is an export file.
        for f in tuna_models::model::HF_FILES {
            assert!(EXPORT_FILES.contains(&f), "{f}");
        }
    }

    #[test]
    fn a_killed_exports_temporary_files_are_removed_by_the_next_export_and_nothing_else() {
        let d = tmp("stale");
        let dead = |f: &str| format!(".{f}.tmp-{DEAD}");
        put(
            &d,
            &[
                (&dead("model.safetensors"), "half a model"),
                (&dead("tokenizer.json"), "half"),
                // A live process's (PID 1 always runs), the user's own names: kept.
                (".model.safetensors.tmp-1", "live"),
                (&dead("notes.txt"), "mine"),
                ("model.safetensors.tmp-5", "mine"),
                ("keep.txt", "mine"),
            ],
        );
        // A killed export's staging folder, with one of the user's files dropped into it.
        let stage = d.join(format!(".tmp-export-{DEAD}"));
        std::fs::create_dir_all(&stage).unwrap();
        put(&stage, &[("adapter_config.json", "{}"), (&dead("adapter_model.safetensors"), "half")]);
        let stage2 = d.join(format!(".tmp-export-{}", DEAD - 1));
        std::fs::create_dir_all(&stage2).unwrap();
        put(&stage2, &[("model.safetensors", "x"), ("mine.txt", "mine")]);
        write_staged(&d, |s| -> Result<()> {
            put(s, &[(peft::CONFIG, "new"), (peft::WEIGHTS, "new")]);
            Ok(())
        })
        .unwrap();
        let names: Vec<String> = listing(&d).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                ".model.safetensors.tmp-1",
                &dead("notes.txt"),
                &format!(".tmp-export-{}", DEAD - 1),
                "adapter_config.json",
                "adapter_model.safetensors",
                "keep.txt",
                "model.safetensors.tmp-5",
            ]
        );
        assert_eq!(listing(&stage2), [("mine.txt".to_string(), "mine".to_string())]);
    }

    /// A killed export's staging folder whose PID now belongs to another live process, one started
    /// after the folder last changed, is stale all the same (it blocked a plain export); one whose
    /// process started before it (it may be the writer) is kept.
    #[test]
    fn a_staging_folder_whose_pid_was_given_to_a_later_process_is_stale() {
        let d = tmp("reused");
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let reused = d.join(format!(".tmp-export-{}", child.id()));
        std::fs::create_dir_all(&reused).unwrap();
        put(&reused, &[(peft::CONFIG, "{}")]);
        std::fs::File::open(&reused).unwrap().set_modified(hour_ago).unwrap();
        // PID 1 started before this folder was made: it could be the writer.
        let kept = d.join(".tmp-export-1");
        std::fs::create_dir_all(&kept).unwrap();
        assert!(process_start(child.id()).is_some_and(|t| t > hour_ago), "the child's start time");
        assert!(!may_have_written(child.id(), &reused) && may_have_written(1, &kept));
        remove_stale_export_temps(&d);
        let _ = child.kill();
        let _ = child.wait();
        let names: Vec<String> = listing(&d).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, [".tmp-export-1"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_export_that_fails_part_way_leaves_the_folder_as_it_was() {
        let d = tmp("fail");
        let old = [(peft::CONFIG, "old config"), (peft::WEIGHTS, "old weights"), ("keep.txt", "mine")];
        put(&d, &old);
        let before = listing(&d);
        // The second file's write fails (its temporary path is taken by a folder: as a full disk
        // fails a write), after the first was written.
        let err = write_staged(&d, |s| -> Result<()> {
            tuna_models::io::write_atomic(&s.join(peft::CONFIG), b"new config")?;
            std::fs::create_dir_all(s.join(format!(".{}.tmp-{}", peft::WEIGHTS, std::process::id()))).unwrap();
            tuna_models::io::write_atomic(&s.join(peft::WEIGHTS), b"new weights")?;
            Ok(())
        })
        .unwrap_err();
        assert!(err.to_string().contains(peft::WEIGHTS), "{err}");
        assert_eq!(listing(&d), before);
        // A fresh folder stays empty: no config without its weights.
        let e = tmp("fail-fresh");
        write_staged(&e, |s| -> Result<()> {
            put(s, &[(peft::CONFIG, "new")]);
            Err(TrainError::Invalid("no space left".into()))
        })
        .unwrap_err();
        assert!(listing(&e).is_empty(), "{:?}", listing(&e));
    }

    #[test]
    fn an_export_over_one_of_the_other_kind_leaves_exactly_one_export() {
        let d = tmp("switch");
        let merged = [
            ("model.safetensors", "m"),
            ("config.json", "c"),
            ("tokenizer.json", "t"),
            ("special_tokens_map.json", "s"),
            (crate::task::TASK_FILE, "task"),
        ];
        let adapter = [(peft::CONFIG, "a"), (peft::WEIGHTS, "w"), (peft::BASE, "b"), (peft::EXTRA, "e")];
        write_staged(&d, |s| -> Result<()> {
            put(s, &merged);
            Ok(())
        })
        .unwrap();
        put(&d, &[("README.md", "mine"), ("vocab.txt", "mine")]);
        let with_mine = |files: &[(&str, &str)]| {
            let mut v: Vec<(String, String)> = files.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
            v.extend([("README.md".into(), "mine".into()), ("vocab.txt".into(), "mine".into())]);
            v.sort();
            v
        };
        assert_eq!(listing(&d), with_mine(&merged));
        // Merged to PEFT: the model's weights, config, tokenizer files and task file go (this
        // export writes no task file); the user's files stay.
        write_staged(&d, |s| -> Result<()> {
            put(s, &adapter);
            Ok(())
        })
        .unwrap();
        assert_eq!(listing(&d), with_mine(&adapter));
        // And back.
        write_staged(&d, |s| -> Result<()> {
            put(s, &merged[..2]);
            Ok(())
        })
        .unwrap();
        assert_eq!(listing(&d), with_mine(&merged[..2]));
    }

    /// The probe's data-loss cases: an adapter exported over a user's own model folder (no tuna task
    /// file) leaves the model's files; a merged export over a tuna merged export leaves a file of its
    /// kind it does not write (the user's); a folder at a name the export writes is refused with the
    /// folder as it was.
    #[test]
    fn an_export_removes_no_file_it_cannot_know_an_export_wrote() {
        let d = tmp("users-model");
        let model = [("model.safetensors", "m"), ("config.json", "c"), ("tokenizer.json", "t")];
        put(&d, &model);
        let adapter = [(peft::CONFIG, "a"), (peft::WEIGHTS, "w")];
        write_staged(&d, |s| -> Result<()> {
            put(s, &adapter);
            Ok(())
        })
        .unwrap();
        let mut want: Vec<(String, String)> =
            model.iter().chain(&adapter).map(|(a, b)| (a.to_string(), b.to_string())).collect();
        want.sort();
        assert_eq!(listing(&d), want, "a user's model folder lost files to an adapter export");

        let d = tmp("users-tokenizer");
        let merged = [("model.safetensors", "m"), ("config.json", "c"), (crate::task::TASK_FILE, "task")];
        write_staged(&d, |s| -> Result<()> {
            put(s, &merged);
            Ok(())
        })
        .unwrap();
        put(&d, &[("tokenizer_config.json", "mine")]);
        write_staged(&d, |s| -> Result<()> {
            put(s, &merged);
            Ok(())
        })
        .unwrap();
        assert!(d.join("tokenizer_config.json").is_file(), "a merged export removed the user's tokenizer file");

        let d = tmp("dir-at-name");
        write_staged(&d, |s| -> Result<()> {
            put(s, &adapter);
            Ok(())
        })
        .unwrap();
        std::fs::create_dir(d.join("config.json")).unwrap();
        let before = listing(&d);
        let e = write_staged(&d, |s| -> Result<()> {
            put(s, &merged);
            Ok(())
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("a folder where the export writes a file"), "{e}");
        assert_eq!(listing(&d), before, "a refused export changed the folder");
        assert!(d.join("config.json").is_dir());
    }
}
