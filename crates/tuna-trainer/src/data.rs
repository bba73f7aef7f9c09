//! Training data: JSONL and CSV files read into line-numbered examples for the `lm`, `completion` and
//! `classify` tasks, label sets, and errors that name the file, the line and the field.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::Value;

/// What the examples are for; it decides which fields are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Plain text (field `text`): loss on every token.
    Lm,
    /// Prompt and completion (fields `prompt`, `completion`): loss on the completion only.
    Completion,
    /// Text and label (fields `text`, `label`).
    Classify,
}

impl Task {
    /// The name the CLI and the files use (`lm`, `completion`, `classify`).
    pub fn name(self) -> &'static str {
        match self {
            Task::Lm => "lm",
            Task::Completion => "completion",
            Task::Classify => "classify",
        }
    }
}

impl FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lm" => Ok(Task::Lm),
            "completion" => Ok(Task::Completion),
            "classify" => Ok(Task::Classify),
            _ => Err(format!("unknown task {s:?}: expected lm, completion or classify")),
        }
    }
}

/// The field (JSON key or CSV column) names read for each role; the CLI sets them by flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fields {
    pub text: String,
    pub prompt: String,
    pub completion: String,
    pub label: String,
}

impl Default for Fields {
    fn default() -> Self {
        Fields { text: "text".into(), prompt: "prompt".into(), completion: "completion".into(), label: "label".into() }
    }
}

/// One example, shaped by its task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Example {
    Text(String),
    Completion { prompt: String, completion: String },
    Labeled { text: String, label: String },
}

/// An example with the 1-based line where it starts in its file, so later errors can name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub line: usize,
    pub ex: Example,
}

/// What is wrong with one field of one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldProblem {
    Missing,
    /// Present but of another JSON type (named).
    NotString(&'static str),
    /// A label that is the empty string.
    Empty,
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldProblem::Missing => write!(f, "missing"),
            FieldProblem::NotString(kind) => write!(f, "expected a string, found {kind}"),
            FieldProblem::Empty => write!(f, "empty"),
        }
    }
}

/// Errors reading data files or mapping labels; each names the file and, where there is one, the line.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("{}: cannot read: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// The extension is not one of .jsonl, .json, .csv.
    #[error("{}: unknown data format {ext:?}: expected .jsonl, .json or .csv", path.display())]
    UnknownFormat { path: PathBuf, ext: String },
    /// A JSONL line that does not parse, or is not valid UTF-8.
    #[error("{}:{line}: invalid JSON: {msg}", path.display())]
    BadJson { path: PathBuf, line: usize, msg: String },
    /// A JSONL line that parses to something other than an object.
    #[error("{}:{line}: expected a JSON object, found {found}", path.display())]
    NotObject { path: PathBuf, line: usize, found: &'static str },
    /// A CSV record that does not parse (bad quoting, wrong number of fields, bad UTF-8).
    #[error("{}:{line}: invalid CSV: {msg}", path.display())]
    BadCsv { path: PathBuf, line: usize, msg: String },
    /// A field that is missing or has the wrong type.
    #[error("{}:{line}: field {field:?}: {problem}", path.display())]
    Field { path: PathBuf, line: usize, field: String, problem: FieldProblem },
    /// The file holds no examples.
    #[error("{}: no examples", path.display())]
    Empty { path: PathBuf },
    /// A label that is not in the label set.
    #[error("{}:{line}: label {label:?} is not one of [{known}]", path.display())]
    UnknownLabel { path: PathBuf, line: usize, label: String, known: String },
    /// A label list (e.g. `--labels neg,pos`) that is empty or repeats a label.
    #[error("label list {list:?}: {msg}")]
    BadLabelList { list: String, msg: String },
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads the examples of `task` from a JSONL (`.jsonl`, `.json`) or CSV (`.csv`, header row naming the
/// fields) file, chosen by extension. Blank JSONL lines are skipped; extra fields are ignored.
pub fn load(path: &Path, task: Task, fields: &Fields) -> Result<Vec<Record>, DataError> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if !matches!(ext.as_str(), "jsonl" | "json" | "csv") {
        return Err(DataError::UnknownFormat { path: path.into(), ext });
    }
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.into(), source })?;
    let records =
        if ext == "csv" { parse_csv(path, &bytes, task, fields)? } else { parse_jsonl(path, &bytes, task, fields)? };
    if records.is_empty() {
        return Err(DataError::Empty { path: path.into() });
    }
    Ok(records)
}

/// Looks up one field of a record; `label` allows numbers and bools (converted to their JSON text).
fn field_value(
    get: &dyn Fn(&str) -> Option<Value>,
    name: &str,
    label: bool,
    path: &Path,
    line: usize,
) -> Result<String, DataError> {
    let err = |problem| DataError::Field { path: path.into(), line, field: name.into(), problem };
    match get(name) {
        None => Err(err(FieldProblem::Missing)),
        Some(Value::String(s)) if label && s.is_empty() => Err(err(FieldProblem::Empty)),
        Some(Value::String(s)) => Ok(s),
        Some(v @ (Value::Number(_) | Value::Bool(_))) if label => Ok(v.to_string()),
        Some(v) => Err(err(FieldProblem::NotString(kind(&v)))),
    }
}

fn example(
    get: &dyn Fn(&str) -> Option<Value>,
    task: Task,
    f: &Fields,
    path: &Path,
    line: usize,
) -> Result<Example, DataError> {
    Ok(match task {
        Task::Lm => Example::Text(field_value(get, &f.text, false, path, line)?),
        Task::Completion => Example::Completion {
            prompt: field_value(get, &f.prompt, false, path, line)?,
            completion: field_value(get, &f.completion, false, path, line)?,
        },
        Task::Classify => Example::Labeled {
            text: field_value(get, &f.text, false, path, line)?,
            label: field_value(get, &f.label, true, path, line)?,
        },
    })
}

fn parse_jsonl(path: &Path, bytes: &[u8], task: Task, fields: &Fields) -> Result<Vec<Record>, DataError> {
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let bad = |msg: String| DataError::BadJson { path: path.into(), line, msg };
        let text = std::str::from_utf8(raw).map_err(|e| bad(format!("not UTF-8 ({e})")))?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(text).map_err(|e| {
            if out.is_empty() && text.starts_with('[') {
                bad("a JSON array; write one JSON object per line (JSONL)".into())
            } else {
                bad(e.to_string())
            }
        })?;
        let Value::Object(obj) = value else {
            return Err(DataError::NotObject { path: path.into(), line, found: kind(&value) });
        };
        let get = |name: &str| obj.get(name).cloned();
        out.push(Record { line, ex: example(&get, task, fields, path, line)? });
    }
    Ok(out)
}

fn parse_csv(path: &Path, bytes: &[u8], task: Task, fields: &Fields) -> Result<Vec<Record>, DataError> {
    let bad = |e: csv::Error| {
        let line = e.position().map_or(1, |p| p.line() as usize);
        DataError::BadCsv { path: path.into(), line, msg: e.to_string() }
    };
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(bytes);
    let header: Vec<String> = reader.headers().map_err(bad)?.iter().map(|h| h.trim().to_string()).collect();
    let mut out = Vec::new();
    for rec in reader.records() {
        let rec = rec.map_err(bad)?;
        let line = rec.position().map_or(1, |p| p.line() as usize);
        let get = |name: &str| {
            let col = header.iter().position(|h| h == name)?;
            rec.get(col).map(|s| Value::String(s.to_string()))
        };
        out.push(Record { line, ex: example(&get, task, fields, path, line)? });
    }
    Ok(out)
}

/// The class labels of a classification task, in index order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelSet {
    labels: Vec<String>,
}

impl LabelSet {
    /// The sorted unique labels of the `Labeled` examples.
    pub fn from_examples(records: &[Record]) -> LabelSet {
        let set: BTreeSet<&str> = records
            .iter()
            .filter_map(|r| match &r.ex {
                Example::Labeled { label, .. } => Some(label.as_str()),
                _ => None,
            })
            .collect();
        LabelSet { labels: set.into_iter().map(String::from).collect() }
    }

    /// Labels in the order given (index 0 first), kept exactly as they are (commas and spaces
    /// included: `tuna_task.json` stores them as a list); an empty label or a repeated one is an error.
    pub fn from_list(list: Vec<String>) -> Result<LabelSet, DataError> {
        let err = |msg: String| DataError::BadLabelList { list: list.join(","), msg };
        for (i, l) in list.iter().enumerate() {
            if l.is_empty() {
                return Err(err("empty label".into()));
            }
            if list[..i].contains(l) {
                return Err(err(format!("label {l:?} given twice")));
            }
        }
        Ok(LabelSet { labels: list })
    }

    /// The index of `label`; an unknown label is an error naming the file and line it came from.
    pub fn index(&self, label: &str, path: &Path, line: usize) -> Result<u32, DataError> {
        match self.labels.iter().position(|l| l == label) {
            Some(i) => Ok(i as u32),
            None => Err(DataError::UnknownLabel {
                path: path.into(),
                line,
                label: label.into(),
                known: self.labels.join(", "),
            }),
        }
    }

    pub fn labels(&self) -> &[String] {
        &self.labels
    }
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).expect("write test file");
        p
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tuna-data-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn jsonl_each_task_skips_blank_lines_and_keeps_line_numbers() {
        let d = tmpdir("jsonl");
        let p = write(&d, "t.jsonl", "{\"text\":\"a\",\"label\":1}\n\n{\"text\":\"b\",\"label\":\"neg\",\"x\":2}\n");
        let r = load(&p, Task::Classify, &Fields::default()).expect("load");
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], Record { line: 1, ex: Example::Labeled { text: "a".into(), label: "1".into() } });
        assert_eq!(r[1].line, 3);
        let p = write(&d, "c.json", "{\"q\":\"2+2=\",\"a\":\"4\"}\r\n");
        let f = Fields { prompt: "q".into(), completion: "a".into(), ..Fields::default() };
        let r = load(&p, Task::Completion, &f).expect("load");
        assert_eq!(r[0].ex, Example::Completion { prompt: "2+2=".into(), completion: "4".into() });
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let d = tmpdir("err");
        let p = write(&d, "train.jsonl", "{\"text\":\"a\",\"label\":\"x\"}\n\n{\"text\":\"b\"}\n");
        let e = load(&p, Task::Classify, &Fields::default()).expect_err("missing label");
        assert_eq!(e.to_string(), format!("{}:3: field \"label\": missing", p.display()));
        let p = write(&d, "t2.jsonl", "{\"text\":5}\n");
        let e = load(&p, Task::Lm, &Fields::default()).expect_err("number text");
        assert!(e.to_string().ends_with(":1: field \"text\": expected a string, found a number"), "{e}");
        let p = write(&d, "t3.jsonl", "{\"text\":\"a\"}\n[1]\n");
        let e = load(&p, Task::Lm, &Fields::default()).expect_err("array line");
        assert!(e.to_string().ends_with(":2: expected a JSON object, found an array"), "{e}");
        let p = write(&d, "t4.jsonl", "{\"text\":\"a\"}\n{\"text\": oops}\n");
        assert!(matches!(load(&p, Task::Lm, &Fields::default()), Err(DataError::BadJson { line: 2, .. })));
        let p = write(&d, "t5.jsonl", "\n  \n");
        assert!(matches!(load(&p, Task::Lm, &Fields::default()), Err(DataError::Empty { .. })));
        let p = write(&d, "t.txt", "x");
        let e = load(&p, Task::Lm, &Fields::default()).expect_err("ext");
        assert!(e.to_string().contains("unknown data format \"txt\""), "{e}");
        let e = load(&d.join("nope.csv"), Task::Lm, &Fields::default()).expect_err("absent");
        assert!(matches!(e, DataError::Io { .. }));
    }

    #[test]
    fn csv_quoted_multiline_fields_report_the_starting_line() {
        let d = tmpdir("csv");
        let body = "label,text\npos,\"good, very\ngood\"\nneg,\"said \"\"bad\"\"\"\n,empty\n";
        let p = write(&d, "t.csv", body);
        let e = load(&p, Task::Classify, &Fields::default()).expect_err("empty label");
        assert_eq!(e.to_string(), format!("{}:5: field \"label\": empty", p.display()));
        let p = write(&d, "ok.csv", "\u{feff}label,text\npos,\"good, very\ngood\"\nneg,\"said \"\"bad\"\"\"\n");
        let r = load(&p, Task::Classify, &Fields::default()).expect("load");
        assert_eq!(
            r[0],
            Record { line: 2, ex: Example::Labeled { text: "good, very\ngood".into(), label: "pos".into() } }
        );
        assert_eq!(r[1], Record { line: 4, ex: Example::Labeled { text: "said \"bad\"".into(), label: "neg".into() } });
        let e = load(&p, Task::Lm, &Fields { text: "body".into(), ..Fields::default() }).expect_err("no column");
        assert!(e.to_string().ends_with(":2: field \"body\": missing"), "{e}");
        let p = write(&d, "ragged.csv", "text,label\na,b\nc\n");
        assert!(matches!(load(&p, Task::Classify, &Fields::default()), Err(DataError::BadCsv { line: 3, .. })));
    }

    /// A UTF-8 byte-order mark (some editors write one) before the first line is skipped.
    #[test]
    fn a_jsonl_file_with_a_byte_order_mark_loads() {
        let d = tmpdir("bom");
        let p = write(&d, "bom.jsonl", "\u{feff}{\"text\": \"a\"}\n{\"text\": \"b\"}\n");
        let r = load(&p, Task::Lm, &Fields::default()).expect("load");
        assert_eq!(r[0], Record { line: 1, ex: Example::Text("a".into()) });
    }

    #[test]
    fn label_sets() {
        let recs: Vec<Record> = ["pos", "neg", "pos"]
            .iter()
            .enumerate()
            .map(|(i, l)| Record { line: i + 1, ex: Example::Labeled { text: "t".into(), label: l.to_string() } })
            .collect();
        let s = LabelSet::from_examples(&recs);
        assert_eq!(s.labels(), ["neg", "pos"]);
        let p = Path::new("eval.csv");
        assert_eq!(s.index("pos", p, 1).expect("known"), 1);
        let e = s.index("meh", p, 7).expect_err("unknown");
        assert_eq!(e.to_string(), "eval.csv:7: label \"meh\" is not one of [neg, pos]");
        let s = LabelSet::from_list(vec!["pos".into(), "neg".into()]).expect("list");
        assert_eq!(s.index("neg", p, 1).expect("known"), 1);
        assert!(LabelSet::from_list(vec!["a".into(), String::new()]).is_err());
        assert!(LabelSet::from_list(vec!["a".into(), "b".into(), "a".into()]).is_err());
        assert_eq!("classify".parse::<Task>(), Ok(Task::Classify));
        assert!("cls".parse::<Task>().is_err());
    }
}
