//! Checkpoints: atomic `step-NNNNNN/` directories with a checksummed manifest, pruning to the newest
//! few plus the best, and finding the newest one that is intact; also `write_atomic` for single files.
//!
//! Layout of `dir/step-000123/`: the caller's files plus `manifest.json`
//! (`{"format":1,"step":123,"files":[{"name","size","fnv1a64"}],"metrics":{..}}`). A save writes
//! everything into `dir/.tmp-step-000123/`, fsyncs each file and the manifest, renames the directory
//! into place and fsyncs `dir`; a killed save leaves only a `.tmp-*` directory, which readers ignore
//! and the next save deletes. One run writes to a directory at a time.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The manifest format written by this version.
pub const FORMAT: u32 = 1;
const MANIFEST: &str = "manifest.json";

/// FNV-1a 64: a small non-cryptographic checksum, enough to catch torn or garbled files.
#[derive(Clone, Debug)]
pub struct Fnv64(u64);

impl Fnv64 {
    pub fn new() -> Fnv64 {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    pub fn finish(&self) -> u64 {
        self.0
    }
}

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64::new()
    }
}

/// FNV-1a 64 of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = Fnv64::new();
    h.write(bytes);
    h.finish()
}

/// Errors saving or loading checkpoints; each names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A filesystem operation failed.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// A file name that is empty, has a path separator, starts with '.', is repeated or is `manifest.json`.
    #[error("checkpoint file name {name:?} is not allowed (empty, a path, hidden, repeated or {MANIFEST:?})")]
    BadName { name: String },
    /// A checkpoint that fails verification (bad manifest, missing, short or altered file).
    #[error("{}: {msg}", path.display())]
    Corrupt { path: PathBuf, msg: String },
    /// A file asked of a loaded checkpoint that it does not hold.
    #[error("{}: no file {name:?} in this checkpoint", path.display())]
    NoFile { path: PathBuf, name: String },
}

/// A checkpoint file's content, written out in pieces: a file of large tensors need not exist in
/// memory whole (see [`Checkpoints::save_streamed`]).
pub trait Payload {
    fn write_to(&self, w: &mut dyn Write) -> std::io::Result<()>;
}

impl Payload for &[u8] {
    fn write_to(&self, w: &mut dyn Write) -> std::io::Result<()> {
        w.write_all(self)
    }
}

impl Payload for Vec<u8> {
    fn write_to(&self, w: &mut dyn Write) -> std::io::Result<()> {
        w.write_all(self)
    }
}

/// A writer that counts and checksums what passes through it.
struct Summing<W: Write> {
    inner: W,
    fnv: Fnv64,
    len: u64,
}

impl<W: Write> Write for Summing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.fnv.write(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.into(), source }
}

/// Whether a larger or a smaller metric is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Min,
    Max,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    /// 16 lowercase hex digits.
    pub fnv1a64: String,
}

/// The contents of `manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub step: u64,
    pub files: Vec<FileEntry>,
    pub metrics: Map<String, Value>,
}

/// A checkpoint whose files verified (sizes and checksums) when it was loaded. Their bytes are not
/// held: each is read again as it is used ([`Loaded::file`] whole, [`Loaded::reader`] in pieces),
/// and that read is checked against the manifest again, so a file changed since it verified reads
/// as an error naming it, never as other data.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Loaded {
    pub fn step(&self) -> u64 {
        self.manifest.step
    }
    /// The bytes of file `name`, whole (for a small file; read a large one with [`Loaded::reader`]).
    pub fn file(&self, name: &str) -> Result<Vec<u8>, CheckpointError> {
        let mut r = self.reader(name)?;
        let size = usize::try_from(r.size())
            .map_err(|_| CheckpointError::Corrupt { path: r.path.clone(), msg: "too large to read whole".into() })?;
        let mut bytes = vec![0; size];
        r.read_exact(&mut bytes)?;
        r.finish()?;
        Ok(bytes)
    }
    /// File `name`, to read from start to end in pieces (see [`FileReader`]).
    pub fn reader(&self, name: &str) -> Result<FileReader, CheckpointError> {
        let entry = self
            .manifest
            .files
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| CheckpointError::NoFile { path: self.dir.clone(), name: name.into() })?;
        FileReader::open(self.dir.join(name), entry)
    }
}

/// Bytes read at a time by [`FileReader::read_chunks`] (a multiple of 8: a chunk of a tensor of
/// 4- or 8-byte values holds whole values).
pub(crate) const READ_CHUNK: usize = 64 << 10;

/// A checkpoint file read from its start to its end with plain reads (no memory map: a file
/// truncated or rewritten meanwhile cannot fault the process), checked against its manifest entry
/// as it goes: reading past the listed size, or a file that ends early, is an error naming it, and
/// [`FileReader::finish`] checks that nothing follows and that the checksum of everything read
/// agrees. What it gave before a failed check was read from a file that has changed since it
/// verified: the caller must treat it as unusable (an error, never a resumed run).
pub struct FileReader {
    path: PathBuf,
    file: File,
    fnv: Fnv64,
    pos: u64,
    size: u64,
    fnv1a64: String,
}

impl FileReader {
    fn open(path: PathBuf, entry: &FileEntry) -> Result<FileReader, CheckpointError> {
        let file =
            File::open(&path).map_err(|e| CheckpointError::Corrupt { path: path.clone(), msg: e.to_string() })?;
        Ok(FileReader { path, file, fnv: Fnv64::new(), pos: 0, size: entry.size, fnv1a64: entry.fnv1a64.clone() })
    }
    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The file's size as the manifest lists it.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.pos
    }
    fn corrupt(&self, msg: String) -> CheckpointError {
        CheckpointError::Corrupt { path: self.path.clone(), msg }
    }
    /// Fills `buf` with the file's next bytes.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), CheckpointError> {
        let end = self.pos.saturating_add(buf.len() as u64);
        if end > self.size {
            return Err(self.corrupt(format!("reading to byte {end}, past the {} bytes the manifest lists", self.size)));
        }
        self.file.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => self.corrupt(format!(
                "ends before byte {end}, though the manifest lists {} bytes: it changed after it verified",
                self.size
            )),
            _ => self.corrupt(e.to_string()),
        })?;
        self.fnv.write(buf);
        self.pos = end;
        Ok(())
    }
    /// Reads the next `n` bytes, handing them to `f` in pieces of at most 64 KiB (the pieces of a
    /// read that starts at a multiple of 8 start at multiples of 8).
    pub fn read_chunks(&mut self, n: u64, mut f: impl FnMut(&[u8])) -> Result<(), CheckpointError> {
        let mut buf = vec![0u8; n.min(READ_CHUNK as u64) as usize];
        let mut left = n;
        while left > 0 {
            let k = left.min(READ_CHUNK as u64) as usize;
            self.read_exact(&mut buf[..k])?;
            f(&buf[..k]);
            left -= k as u64;
        }
        Ok(())
    }
    /// Checks the file read whole: every byte the manifest lists read, nothing after them, and
    /// their checksum the manifest's.
    pub fn finish(mut self) -> Result<(), CheckpointError> {
        if self.pos != self.size {
            return Err(self.corrupt(format!("{} of its {} bytes read", self.pos, self.size)));
        }
        let mut more = [0u8; 1];
        match self.file.read(&mut more) {
            Ok(0) => {}
            Ok(_) => {
                return Err(self.corrupt(format!(
                    "longer than the {} bytes the manifest lists: it changed after it verified",
                    self.size
                )))
            }
            Err(e) => return Err(self.corrupt(e.to_string())),
        }
        let sum = format!("{:016x}", self.fnv.finish());
        if sum != self.fnv1a64 {
            return Err(self.corrupt(format!("checksum {sum}, manifest says {}", self.fnv1a64)));
        }
        Ok(())
    }
}

/// The newest intact checkpoint, and a warning for each newer one that was skipped.
#[derive(Debug)]
pub struct LatestValid {
    pub checkpoint: Option<Loaded>,
    pub warnings: Vec<String>,
}

fn fsync_dir(dir: &Path) -> Result<(), CheckpointError> {
    // Directory fsync makes a rename durable on Unix; other systems cannot open a directory as a file.
    if cfg!(unix) {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    }
    Ok(())
}

/// Writes `payload` to `path` and syncs it; returns its size and checksum.
fn write_synced(path: &Path, payload: &dyn Payload) -> Result<(u64, u64), CheckpointError> {
    let f = File::create(path).map_err(io(path))?;
    let mut w = Summing { inner: std::io::BufWriter::with_capacity(1 << 20, f), fnv: Fnv64::new(), len: 0 };
    payload.write_to(&mut w).and_then(|()| w.flush()).map_err(io(path))?;
    let f = w.inner.into_inner().map_err(|e| CheckpointError::Io { path: path.into(), source: e.into_error() })?;
    f.sync_all().map_err(io(path))?;
    Ok((w.len, w.fnv.finish()))
}

/// Replaces `path` with `bytes` atomically: a temporary file in the same directory, fsync, rename,
/// fsync of the directory. Readers see the old file or the new one, never a torn one. (The
/// implementation is `tuna_models::io::write_atomic`, which adapter exports use too.)
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    if path.file_name().is_none() {
        return Err(CheckpointError::BadName { name: path.display().to_string() });
    }
    tuna_models::io::write_atomic(path, bytes).map_err(|e| match e {
        tuna_models::Error::Io { path, source } => CheckpointError::Io { path, source },
        other => CheckpointError::Corrupt { path: path.to_path_buf(), msg: other.to_string() },
    })
}

/// The checkpoint directory of one run.
#[derive(Clone, Debug)]
pub struct Checkpoints {
    dir: PathBuf,
    keep_last: usize,
    best: Option<(String, Direction)>,
}

impl Checkpoints {
    /// Creates `dir` if needed. `keep_last` = 0 keeps every checkpoint; `best` also keeps the one with
    /// the best value of that metric (checkpoints without it, or with a non-finite value, never win).
    pub fn open(dir: &Path, keep_last: usize, best: Option<(&str, Direction)>) -> Result<Checkpoints, CheckpointError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(Checkpoints { dir: dir.into(), keep_last, best: best.map(|(m, d)| (m.to_string(), d)) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory a checkpoint of `step` has.
    pub fn step_dir(&self, step: u64) -> PathBuf {
        self.dir.join(format!("step-{step:06}"))
    }

    /// Saves `files` and `metrics` as checkpoint `step` (replacing one of the same step), then prunes.
    /// Returns the checkpoint's directory.
    pub fn save(
        &self,
        step: u64,
        files: &[(&str, &[u8])],
        metrics: &Map<String, Value>,
    ) -> Result<PathBuf, CheckpointError> {
        let files: Vec<(&str, &dyn Payload)> = files.iter().map(|(n, b)| (*n, b as &dyn Payload)).collect();
        self.save_streamed(step, &files, metrics)
    }

    /// [`Checkpoints::save`] with each file's content written out in pieces by its [`Payload`].
    pub fn save_streamed(
        &self,
        step: u64,
        files: &[(&str, &dyn Payload)],
        metrics: &Map<String, Value>,
    ) -> Result<PathBuf, CheckpointError> {
        let mut names: Vec<&str> = Vec::new();
        for &(name, _) in files {
            let bad = name.is_empty() || name.starts_with('.') || name.contains(['/', '\\']) || name == MANIFEST;
            if bad || names.contains(&name) {
                return Err(CheckpointError::BadName { name: name.into() });
            }
            names.push(name);
        }
        self.clean_tmp()?;
        let tmp = self.dir.join(format!(".tmp-step-{step:06}"));
        fs::create_dir(&tmp).map_err(io(&tmp))?;
        // A failed save (a full disk, a file-size limit) leaves nothing behind to fill the disk.
        let written = self.write_tmp(&tmp, step, files, metrics);
        if written.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        written?;
        let target = self.step_dir(step);
        if target.exists() {
            // A directory cannot be renamed over a non-empty one: move the old one aside, as a tmp dir
            // (deleted below) when intact, else as `corrupt-step-N-<secs>` for the user to inspect.
            let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let old = match self.load(step) {
                Ok(_) => self.dir.join(format!(".tmp-replaced-step-{step:06}")),
                Err(_) => self.dir.join(format!("corrupt-step-{step:06}-{secs}")),
            };
            fs::rename(&target, &old).map_err(io(&target))?;
        }
        fs::rename(&tmp, &target).map_err(io(&target))?;
        fsync_dir(&self.dir)?;
        self.clean_tmp()?;
        self.prune(step)?;
        Ok(target)
    }

    /// Writes `files` and the manifest into `tmp`, each synced, then syncs `tmp`.
    fn write_tmp(
        &self,
        tmp: &Path,
        step: u64,
        files: &[(&str, &dyn Payload)],
        metrics: &Map<String, Value>,
    ) -> Result<(), CheckpointError> {
        let mut entries = Vec::new();
        for &(name, payload) in files {
            let (size, fnv) = write_synced(&tmp.join(name), payload)?;
            entries.push(FileEntry { name: name.into(), size, fnv1a64: format!("{fnv:016x}") });
        }
        let manifest = Manifest { format: FORMAT, step, files: entries, metrics: metrics.clone() };
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| CheckpointError::Corrupt { path: tmp.to_path_buf(), msg: e.to_string() })?;
        write_synced(&tmp.join(MANIFEST), &json)?;
        fsync_dir(tmp)
    }

    fn clean_tmp(&self) -> Result<(), CheckpointError> {
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let path = entry.map_err(io(&self.dir))?.path();
            if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(".tmp-")) && path.is_dir() {
                fs::remove_dir_all(&path).map_err(io(&path))?;
            }
        }
        Ok(())
    }

    /// The steps that have a `step-N` directory, ascending (intact or not).
    pub fn steps(&self) -> Result<Vec<u64>, CheckpointError> {
        let mut steps = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let entry = entry.map_err(io(&self.dir))?;
            let name = entry.file_name();
            // Only names this module writes (`step-000007`, not `step-7` or `step-0000007`).
            let step = name.to_str().and_then(|n| n.strip_prefix("step-")).and_then(|s| s.parse::<u64>().ok());
            let step = step.filter(|s| name.to_str() == Some(&format!("step-{s:06}")));
            if let (Some(step), true) = (step, entry.path().is_dir()) {
                steps.push(step);
            }
        }
        steps.sort_unstable();
        Ok(steps)
    }

    fn read_manifest(&self, step: u64) -> Result<Manifest, CheckpointError> {
        let dir = self.step_dir(step);
        let path = dir.join(MANIFEST);
        let bytes = fs::read(&path).map_err(|e| CheckpointError::Corrupt { path: path.clone(), msg: e.to_string() })?;
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| CheckpointError::Corrupt { path: path.clone(), msg: format!("bad manifest: {e}") })?;
        if m.format != FORMAT || m.step != step {
            let msg =
                format!("manifest says format {} step {}, expected format {FORMAT} step {step}", m.format, m.step);
            return Err(CheckpointError::Corrupt { path, msg });
        }
        Ok(m)
    }

    /// Loads checkpoint `step`, checking every file's size and checksum against the manifest (each
    /// file read in pieces: none is held whole).
    pub fn load(&self, step: u64) -> Result<Loaded, CheckpointError> {
        let manifest = self.read_manifest(step)?;
        let dir = self.step_dir(step);
        for f in &manifest.files {
            let path = dir.join(&f.name);
            let len = fs::metadata(&path)
                .map_err(|e| CheckpointError::Corrupt { path: path.clone(), msg: e.to_string() })?
                .len();
            if len != f.size {
                return Err(CheckpointError::Corrupt { path, msg: format!("{len} bytes, manifest says {}", f.size) });
            }
            let mut r = FileReader::open(path, f)?;
            r.read_chunks(f.size, |_| ())?;
            r.finish()?;
        }
        Ok(Loaded { dir, manifest })
    }

    /// The newest checkpoint that verifies; newer ones that do not are skipped with a warning each and
    /// left on disk for the user to inspect.
    pub fn latest_valid(&self) -> Result<LatestValid, CheckpointError> {
        let mut warnings = Vec::new();
        for step in self.steps()?.into_iter().rev() {
            match self.load(step) {
                Ok(c) => return Ok(LatestValid { checkpoint: Some(c), warnings }),
                Err(e) => warnings.push(format!("skipping checkpoint step {step}: {e}")),
            }
        }
        Ok(LatestValid { checkpoint: None, warnings })
    }

    /// The step whose manifest holds the best value of the `best` metric, if any does (among
    /// the checkpoints that look valid).
    pub fn best_step(&self) -> Result<Option<u64>, CheckpointError> {
        Ok(self.best_of(&self.valid_manifests(|_| true)?))
    }

    /// The checkpoints that [look valid](Checkpoints::looks_valid) among the steps `keep` accepts,
    /// ascending, with their manifests (each read once).
    fn valid_manifests(&self, keep: impl Fn(u64) -> bool) -> Result<Vec<(u64, Manifest)>, CheckpointError> {
        Ok(self
            .steps()?
            .into_iter()
            .filter(|&s| keep(s))
            .filter_map(|s| Some((s, self.manifest_if_valid(s)?)))
            .collect())
    }

    /// The best of `checkpoints` by the `best` metric (a missing or non-finite value never wins).
    fn best_of(&self, checkpoints: &[(u64, Manifest)]) -> Option<u64> {
        let (metric, dir) = self.best.as_ref()?;
        let mut best: Option<(u64, f64)> = None;
        for (step, m) in checkpoints {
            let Some(v) = m.metrics.get(metric).and_then(Value::as_f64).filter(|v| v.is_finite()) else { continue };
            let better = best.is_none_or(|(_, b)| if *dir == Direction::Min { v < b } else { v > b });
            if better {
                best = Some((*step, v));
            }
        }
        best.map(|(s, _)| s)
    }

    /// Whether checkpoint `step` looks whole without reading its data: its manifest parses, names
    /// this step, and every file it lists exists with the listed size. (Resuming verifies the
    /// checksums too; this is what pruning trusts.)
    pub fn looks_valid(&self, step: u64) -> bool {
        self.manifest_if_valid(step).is_some()
    }

    /// The manifest of checkpoint `step` when it [looks valid](Checkpoints::looks_valid).
    fn manifest_if_valid(&self, step: u64) -> Option<Manifest> {
        let m = self.read_manifest(step).ok()?;
        let dir = self.step_dir(step);
        let whole =
            m.files.iter().all(|f| fs::metadata(dir.join(&f.name)).is_ok_and(|md| md.is_file() && md.len() == f.size));
        whole.then_some(m)
    }

    /// After saving `saved`: deletes every checkpoint up to it but the newest `keep_last` and the
    /// best. Only checkpoints that look valid count and are deleted, and none above `saved` (left
    /// from before a resume, which passed them over as corrupt): a stray or broken `step-N` folder
    /// never displaces a good one, and the checkpoint just saved is always kept.
    fn prune(&self, saved: u64) -> Result<(), CheckpointError> {
        if self.keep_last == 0 {
            return Ok(());
        }
        let valid = self.valid_manifests(|s| s <= saved)?;
        let best = self.best_of(&valid);
        for (step, m) in &valid[..valid.len().saturating_sub(self.keep_last)] {
            if Some(*step) != best {
                let names: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
                self.delete(*step, &names)?;
            }
        }
        Ok(())
    }

    /// Deletes checkpoint `step`'s `files` and its manifest, then its folder if nothing else is in
    /// it (a file of yours keeps the folder).
    pub fn delete(&self, step: u64, files: &[&str]) -> Result<(), CheckpointError> {
        let d = self.step_dir(step);
        for name in files.iter().copied().chain([MANIFEST]) {
            let p = d.join(name);
            match fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&p)(e)),
                _ => {}
            }
        }
        let _ = fs::remove_dir(&d);
        Ok(())
    }
}

#[cfg(test)]
#[path = "checkpoint_tests.rs"]
mod tests;
