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

/// f32 tensors written as a safetensors file to `w` one at a time: `tensors` names each tensor and
/// its shape up front (the header), and `data(i)` gives tensor `i`'s values when its turn comes,
/// so no more than one tensor's host copy (and 64 KiB of bytes) exists at once. The same file
/// [`safetensors_bytes`] makes in memory, up to the order of the header's keys and the data.
pub fn write_safetensors_f32(
    w: &mut dyn std::io::Write,
    tensors: &[(String, Vec<usize>)],
    mut data: impl FnMut(usize) -> Result<Vec<f32>>,
) -> Result<()> {
    let io = |e: std::io::Error| Error::InvalidArgument(format!("safetensors: writing: {e}"));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0usize;
    for (name, shape) in tensors {
        if name == "__metadata__" || header.contains_key(name) {
            return Err(Error::InvalidArgument(format!("safetensors: tensor name `{name}` twice or reserved")));
        }
        let end = offset + shape.iter().product::<usize>() * 4;
        header
            .insert(name.clone(), serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, end] }));
        offset = end;
    }
    let mut h = serde_json::to_vec(&header).map_err(|e| Error::InvalidArgument(format!("safetensors: {e}")))?;
    // The data starts 8-aligned (as the format's own writer pads, with spaces).
    h.resize(h.len().next_multiple_of(8), b' ');
    w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&h).map_err(io)?;
    let mut chunk: Vec<u8> = Vec::with_capacity(1 << 16);
    for (i, (name, shape)) in tensors.iter().enumerate() {
        let v = data(i)?;
        let want: usize = shape.iter().product();
        if v.len() != want {
            return Err(Error::InvalidArgument(format!(
                "safetensors: `{name}` has {} values for shape {shape:?} ({want})",
                v.len()
            )));
        }
        for part in v.chunks(1 << 14) {
            chunk.clear();
            chunk.extend(part.iter().flat_map(|x| x.to_le_bytes()));
            w.write_all(&chunk).map_err(io)?;
        }
    }
    Ok(())
}

/// `path` replaced atomically: written to a temporary file in the same folder, synced, renamed,
/// and the folder synced (so the rename is durable). Readers see the old file or the new one,
/// never a torn one. The one implementation tuna's crates use.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes).map_err(|e| Error::Io { path: path.to_path_buf(), source: e }))
}

/// [`write_atomic`] with the content written by `write` (in pieces: a large file need not exist in
/// memory whole). An error from `write` leaves `path` as it was and no temporary file behind.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut dyn std::io::Write) -> Result<()>) -> Result<()> {
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
    let written = std::fs::File::create(&tmp).map_err(io(&tmp)).and_then(|f| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        write(&mut w)?;
        let f = w.into_inner().map_err(|e| Error::Io { path: tmp.clone(), source: e.into_error() })?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))
    });
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

/// Remove the temporary files a killed [`write_atomic`] left in `dir` (`.<name>.tmp-<pid>`, as
/// large as what was being written). For a folder only its owner writes to (a run holding its
/// lock): any there now are stale.
pub fn remove_stale_temps(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(".tmp-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_safetensors_read_back_as_the_in_memory_ones() {
        let tensors: Vec<(String, HostTensor)> = vec![
            ("b.weight".into(), (vec![2, 3], (0..6).map(|i| i as f32 * 0.5 - 1.0).collect())),
            ("a".into(), (vec![5], vec![f32::MIN_POSITIVE, -0.0, 1e30, 3.25, -7.0])),
            ("empty".into(), (vec![0, 4], vec![])),
        ];
        let names: Vec<(String, Vec<usize>)> = tensors.iter().map(|(n, (s, _))| (n.clone(), s.clone())).collect();
        let mut streamed = Vec::new();
        write_safetensors_f32(&mut streamed, &names, |i| Ok(tensors[i].1 .1.clone())).unwrap();
        let header = u64::from_le_bytes(streamed[..8].try_into().unwrap()) as usize;
        assert_eq!((header % 8, streamed.len()), (0, 8 + header + 4 * 11), "the data starts 8-aligned");
        let read = safetensors::SafeTensors::deserialize(&streamed).unwrap();
        let reference = safetensors_bytes(&tensors).unwrap();
        let want = safetensors::SafeTensors::deserialize(&reference).unwrap();
        for (name, _) in &names {
            let (a, b) = (read.tensor(name).unwrap(), want.tensor(name).unwrap());
            assert_eq!((a.shape(), a.dtype(), a.data()), (b.shape(), b.dtype(), b.data()), "{name}");
        }
        let meta = |b: &[u8]| safetensors::SafeTensors::read_metadata(b).unwrap().1.metadata().clone();
        assert_eq!(meta(&streamed), meta(&reference));
        assert_eq!(read.len(), 3);
        // A tensor whose values disagree with its shape is refused, naming it.
        let err = write_safetensors_f32(&mut Vec::new(), &names, |_| Ok(vec![1.0])).unwrap_err();
        assert!(err.to_string().contains("`b.weight` has 1 values"), "{err}");
    }
}
