//! The metrics log (one JSON object per line, resumable so a resumed run's log equals an uninterrupted
//! one's) and the human formatting of durations, rates and sizes used by the progress line and the
//! final summary.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::checkpoint::{write_atomic, CheckpointError};

/// Which phase a metrics line belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Eval => "eval",
        }
    }
}

/// Errors of the metrics log.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Opening, reading or appending failed.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// Rewriting the log on resume failed.
    #[error(transparent)]
    Rewrite(#[from] CheckpointError),
    /// A line other than the last that is not a JSON object with a numeric "step".
    #[error("{}:{line}: not a metrics line: {msg}", path.display())]
    BadLine { path: PathBuf, line: usize, msg: String },
}

/// An append-only JSONL log: `{"step":N,"split":"train"|"eval",<values>}` per line, each written with a
/// single `write` (no buffering), so a killed run leaves at most one torn last line.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

/// Parses a log's lines; a torn last line (no newline after it, does not parse) is dropped.
pub fn read_log(path: &Path) -> Result<Vec<Map<String, Value>>, MetricsError> {
    Ok(read_lines(path)?.into_iter().map(|(_, obj)| obj).collect())
}

/// A line as written (without its newline) beside its parse.
type RawLine = (String, Map<String, Value>);

fn read_lines(path: &Path) -> Result<Vec<RawLine>, MetricsError> {
    let bytes = std::fs::read(path).map_err(|source| MetricsError::Io { path: path.into(), source })?;
    let segments: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    let mut out = Vec::new();
    for (i, seg) in segments.iter().enumerate() {
        if seg.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let torn_tail = i + 1 == segments.len();
        let bad = |msg: String| MetricsError::BadLine { path: path.into(), line: i + 1, msg };
        match serde_json::from_slice::<Value>(seg) {
            Ok(Value::Object(obj)) if obj.get("step").is_some_and(Value::is_u64) => {
                out.push((String::from_utf8_lossy(seg).into_owned(), obj))
            }
            Ok(_) if torn_tail => {}
            Ok(_) => return Err(bad("expected an object with a numeric \"step\"".into())),
            Err(_) if torn_tail => {}
            Err(e) => return Err(bad(e.to_string())),
        }
    }
    Ok(out)
}

impl MetricsLog {
    /// `None` starts a new log (an old file is replaced). `Some(step)` resumes: lines of later steps —
    /// written after the checkpoint being resumed from — and a torn last line are removed, and new lines
    /// are appended. So the trainer must log every line of a step before it saves that step's checkpoint.
    pub fn open(path: &Path, resume_from_step: Option<u64>) -> Result<MetricsLog, MetricsError> {
        let io = |source| MetricsError::Io { path: path.into(), source };
        match resume_from_step {
            None => write_atomic(path, b"")?,
            Some(step) if path.exists() => {
                let mut kept = String::new();
                for (raw, obj) in read_lines(path)? {
                    if obj.get("step").and_then(Value::as_u64).is_some_and(|s| s <= step) {
                        kept.push_str(&raw);
                        kept.push('\n');
                    }
                }
                write_atomic(path, kept.as_bytes())?;
            }
            Some(_) => {}
        }
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
        Ok(MetricsLog { path: path.into(), file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line. Keys `step` and `split` in `values` are ignored; non-finite numbers cannot be
    /// JSON and arrive here as `null` (serde_json's `Value::from(f64::NAN)`).
    pub fn log(&mut self, step: u64, split: Split, values: &Map<String, Value>) -> Result<(), MetricsError> {
        let mut line = format!("{{\"step\":{step},\"split\":\"{}\"", split.as_str());
        for (k, v) in values.iter().filter(|(k, _)| *k != "step" && *k != "split") {
            line.push(',');
            line.push_str(&Value::String(k.clone()).to_string());
            line.push(':');
            line.push_str(&v.to_string());
        }
        line.push_str("}\n");
        self.file.write_all(line.as_bytes()).map_err(|source| MetricsError::Io { path: self.path.clone(), source })
    }
}

/// `850ms`, `4.2s`, `42s`, `1m05s`, `2h03m09s`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{}ms", d.as_millis())
    } else if s < 10.0 {
        format!("{s:.1}s")
    } else {
        let t = s.round() as u64;
        match (t / 3600, t % 3600 / 60, t % 60) {
            (0, 0, sec) => format!("{sec}s"),
            (0, m, sec) => format!("{m}m{sec:02}s"),
            (h, m, sec) => format!("{h}h{m:02}m{sec:02}s"),
        }
    }
}

/// A count with an SI suffix: `7.5`, `532`, `1.2k`, `3.4M`, `5.6G`.
pub fn si(x: f64) -> String {
    let a = x.abs();
    if !x.is_finite() {
        format!("{x}")
    } else if a < 10.0 {
        format!("{x:.1}")
    } else if a < 999.5 {
        format!("{x:.0}")
    } else if a < 999.95e3 {
        format!("{:.1}k", x / 1e3)
    } else if a < 999.95e6 {
        format!("{:.1}M", x / 1e6)
    } else {
        format!("{:.1}G", x / 1e9)
    }
}

/// `1.2k tok/s`.
pub fn tokens_per_s(x: f64) -> String {
    format!("{} tok/s", si(x))
}

/// `512 B`, `1.5 KiB`, `12.0 MiB`, `1.20 GiB`.
pub fn human_bytes(n: u64) -> String {
    const K: f64 = 1024.0;
    let x = n as f64;
    if n < 1024 {
        format!("{n} B")
    } else if x < K * K {
        format!("{:.1} KiB", x / K)
    } else if x < K * K * K {
        format!("{:.1} MiB", x / (K * K))
    } else {
        format!("{:.2} GiB", x / (K * K * K))
    }
}

/// The final summary: labelled rows printed as an aligned two-column block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    rows: Vec<(String, String)>,
}

impl Summary {
    pub fn new() -> Summary {
        Summary::default()
    }
    /// Adds a row; chainable.
    pub fn row(&mut self, label: &str, value: impl fmt::Display) -> &mut Summary {
        self.rows.push((label.into(), value.to_string()));
        self
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self.rows.iter().map(|(l, _)| l.chars().count()).max().unwrap_or(0);
        for (l, v) in &self.rows {
            writeln!(f, "{l:<w$}  {v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(loss: f64) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("loss".into(), Value::from(loss));
        m
    }

    #[test]
    fn resumed_log_equals_an_uninterrupted_one() {
        let d = std::env::temp_dir().join(format!("tuna-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("mkdir");
        let (a, b) = (d.join("straight.jsonl"), d.join("resumed.jsonl"));
        let mut log = MetricsLog::open(&a, None).expect("open");
        for s in 1..=6 {
            log.log(s, Split::Train, &vals(s as f64)).expect("log");
        }
        log.log(6, Split::Eval, &vals(0.5)).expect("log");
        // The interrupted run got to step 5, saved a checkpoint at 4, and was killed mid-line.
        let mut log = MetricsLog::open(&b, None).expect("open");
        for s in 1..=5 {
            log.log(s, Split::Train, &vals(s as f64)).expect("log");
        }
        drop(log);
        let mut f = OpenOptions::new().append(true).open(&b).expect("reopen");
        f.write_all(b"{\"step\":6,\"spl").expect("torn write");
        let mut log = MetricsLog::open(&b, Some(4)).expect("resume");
        for s in 5..=6 {
            log.log(s, Split::Train, &vals(s as f64)).expect("log");
        }
        log.log(6, Split::Eval, &vals(0.5)).expect("log");
        let (ta, tb) = (std::fs::read_to_string(&a).expect("read"), std::fs::read_to_string(&b).expect("read"));
        assert_eq!(ta, tb);
        assert!(ta.starts_with("{\"step\":1,\"split\":\"train\",\"loss\":1.0}\n"), "{ta}");
        assert_eq!(read_log(&a).expect("read").len(), 7);
        // A fresh run replaces the old log.
        MetricsLog::open(&a, None).expect("open");
        assert_eq!(std::fs::read(&a).expect("read").len(), 0);
        // A garbled line that is not the last is an error naming it.
        std::fs::write(&a, "{\"step\":1}\nnot json\n{\"step\":2}\n").expect("write");
        let e = MetricsLog::open(&a, Some(1)).expect_err("bad line");
        assert!(e.to_string().contains("straight.jsonl:2: not a metrics line"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn formatting() {
        assert_eq!(human_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(human_duration(Duration::from_millis(4240)), "4.2s");
        assert_eq!(human_duration(Duration::from_secs(42)), "42s");
        assert_eq!(human_duration(Duration::from_secs(65)), "1m05s");
        assert_eq!(human_duration(Duration::from_secs(2 * 3600 + 189)), "2h03m09s");
        assert_eq!(tokens_per_s(1234.0), "1.2k tok/s");
        assert_eq!(si(532.0), "532");
        assert_eq!(si(7.46), "7.5");
        assert_eq!(si(999_960.0), "1.0M");
        assert_eq!(si(3.4e6), "3.4M");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(12 << 20), "12.0 MiB");
        assert_eq!(human_bytes(1_288_490_189), "1.20 GiB");
        let mut s = Summary::new();
        s.row("steps", 100).row("throughput", tokens_per_s(5.6e4));
        assert_eq!(s.to_string(), "steps       100\nthroughput  56.0k tok/s\n");
    }
}
