//! Files both higher crates write: atomic replacement (temporary file, fsync, rename, folder
//! fsync), safetensors of f32 tensors with PEFT's metadata, and JSON with sorted keys as PEFT and
//! transformers write it.

use crate::error::{Error, Result};
use crate::hf::st_file::StFile;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// A tensor on the host: shape and f32 values.
pub type HostTensor = (Vec<usize>, Vec<f32>);

/// Every float tensor of a safetensors file as f32 host values.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let f = StFile::open(path)?;
    let mut out = BTreeMap::new();
    for (name, e) in &f.tensors {
        out.insert(name.clone(), (e.shape.clone(), f.read(name, e)?.into_owned()));
    }
    Ok(out)
}

/// A safetensors file of f32 tensors with PEFT's metadata (`{"format": "pt"}`).
pub fn safetensors_bytes(tensors: &[(String, HostTensor)]) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, (s, v))| (n.clone(), s.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).map(|v| (n.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::InvalidArgument(format!("safetensors: {e}")))?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize(views, Some(meta)).map_err(|e| Error::InvalidArgument(format!("safetensors: {e}")))
}

/// `path` replaced atomically: written to a temporary file in the same folder, synced, renamed,
/// and the folder synced (so the rename is durable). Readers see the old file or the new one,
/// never a torn one. The one implementation tuna's crates use.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| Error::Io { path: p, source: e }
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .map_err(io(&tmp))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(io(path)));
    if written.is_err() {
        // A full disk or a read-only folder leaves no temporary file behind.
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // Directory fsync makes the rename durable on Unix; other systems cannot open a folder as a file.
    if cfg!(unix) {
        std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(io(parent))?;
    }
    Ok(())
}

/// JSON with sorted keys and two-space indentation, no trailing newline (as PEFT writes it).
pub fn pretty_sorted(v: &Value) -> String {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let sorted: BTreeMap<&String, Value> = m.iter().map(|(k, v)| (k, sort(v))).collect();
                Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_string_pretty(&sort(v)).unwrap_or_default()
}
