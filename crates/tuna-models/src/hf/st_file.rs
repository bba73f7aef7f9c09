//! One memory-mapped `.safetensors` file: header checks with errors naming the file, the tensor
//! table, and conversion of a tensor's bytes to f32 (zero-copy for aligned little-endian f32).

use crate::error::{Error, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Bytes before the JSON header: its length, a little-endian u64.
const N_LEN: usize = 8;

/// How a stored tensor becomes f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FloatKind {
    F32,
    F16,
    BF16,
    F64,
    /// A float type tuna cannot convert (FP8, FP4, complex): an error when the tensor is read.
    Unsupported(Dtype),
}

/// A float tensor's place in the file.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub kind: FloatKind,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

/// A mapped safetensors file: float tensors by name, and the names of the skipped non-float ones.
pub(crate) struct StFile {
    pub path: PathBuf,
    map: Mmap,
    pub tensors: BTreeMap<String, Entry>,
    pub skipped: Vec<String>,
}

fn kind_of(dtype: Dtype) -> Option<FloatKind> {
    match dtype {
        Dtype::F32 => Some(FloatKind::F32),
        Dtype::F16 => Some(FloatKind::F16),
        Dtype::BF16 => Some(FloatKind::BF16),
        Dtype::F64 => Some(FloatKind::F64),
        Dtype::BOOL
        | Dtype::U8
        | Dtype::I8
        | Dtype::I16
        | Dtype::U16
        | Dtype::I32
        | Dtype::U32
        | Dtype::I64
        | Dtype::U64 => None,
        other => Some(FloatKind::Unsupported(other)),
    }
}

impl StFile {
    /// Map and check `path`. Errors name the file: unreadable, shorter than the header it
    /// announces, tensor data past the end, an unknown dtype, or inconsistent offsets.
    pub fn open(path: &Path) -> Result<StFile> {
        let io = |e| Error::Io { path: path.to_path_buf(), source: e };
        let fmt = |msg: String| Error::Format { path: path.to_path_buf(), msg };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len() as usize;
        if len < N_LEN {
            return Err(fmt(format!("truncated safetensors: {len} bytes, less than the 8-byte header length")));
        }
        // SAFETY: the map is read-only and private to this reader; as with every memory-mapped
        // loader, another process truncating or rewriting the file while it is open is outside
        // what we can guard against (the documented memmap2 caveat). Every range read from it
        // is checked against its length below.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let mut n_bytes = [0u8; N_LEN];
        n_bytes.copy_from_slice(&map[..N_LEN]);
        let n = u64::from_le_bytes(n_bytes);
        if n > (len - N_LEN) as u64 {
            return Err(fmt(format!(
                "truncated safetensors: header length {n} runs past the end of the file ({len} bytes)"
            )));
        }
        let n = n as usize;
        let data_start = N_LEN + n;
        let header: serde_json::Value = serde_json::from_slice(&map[N_LEN..data_start])
            .map_err(|e| fmt(format!("invalid safetensors header JSON: {e}")))?;
        let obj = header.as_object().ok_or_else(|| fmt("safetensors header is not a JSON object".into()))?;
        // Check dtypes and the data's extent ourselves, for messages that say what is wrong.
        let mut data_end = 0u64;
        for (name, t) in obj.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
            let dtype = t.get("dtype").cloned().unwrap_or(serde_json::Value::Null);
            if serde_json::from_value::<Dtype>(dtype.clone()).is_err() {
                return Err(fmt(format!("tensor `{name}` has unknown dtype {dtype}")));
            }
            if let Some(end) = t.get("data_offsets").and_then(|o| o.get(1)).and_then(|e| e.as_u64()) {
                data_end = data_end.max(end);
            }
        }
        if data_end > (len - data_start) as u64 {
            return Err(fmt(format!(
                "truncated safetensors: tensor data runs to byte {} but the file has {len} bytes",
                data_start as u64 + data_end
            )));
        }
        let (_, meta) = SafeTensors::read_metadata(&map[..]).map_err(|e| match e {
            SafeTensorError::MetadataIncompleteBuffer => fmt(format!(
                "{} trailing bytes after the last tensor's data",
                len as u64 - data_start as u64 - data_end
            )),
            other => fmt(format!("invalid safetensors: {other}")),
        })?;
        let mut tensors = BTreeMap::new();
        let mut skipped = Vec::new();
        for (name, info) in meta.tensors() {
            match kind_of(info.dtype) {
                None => skipped.push(name),
                Some(kind) => {
                    let (s, e) = info.data_offsets;
                    let entry = Entry { kind, shape: info.shape.clone(), start: data_start + s, end: data_start + e };
                    tensors.insert(name, entry);
                }
            }
        }
        skipped.sort();
        Ok(StFile { path: path.to_path_buf(), map, tensors, skipped })
    }

    /// Whether `name` is stored here at all (float or skipped).
    pub fn holds(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.skipped.iter().any(|s| s == name)
    }

    /// The f32 values of a tensor of this file.
    pub fn read(&self, name: &str, e: &Entry) -> Result<Cow<'_, [f32]>> {
        let bytes = &self.map[e.start..e.end];
        Ok(match e.kind {
            FloatKind::F32 => f32_view(bytes),
            FloatKind::F16 => {
                Cow::Owned(bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect())
            }
            FloatKind::BF16 => {
                Cow::Owned(bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect())
            }
            FloatKind::F64 => Cow::Owned(
                bytes
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
                    .collect(),
            ),
            FloatKind::Unsupported(d) => {
                return Err(Error::Unsupported {
                    path: self.path.clone(),
                    what: format!("dtype {d:?} of tensor `{name}` (tuna reads F32, F16, BF16, F64)"),
                })
            }
        })
    }
}

/// Little-endian f32 bytes as f32: borrowed when 4-byte aligned on a little-endian machine.
fn f32_view(bytes: &[u8]) -> Cow<'_, [f32]> {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: every 4-byte pattern is a valid f32, and `align_to` only puts in `mid` what
        // is correctly aligned; we use `mid` only when nothing is left over on either side.
        let (pre, mid, post) = unsafe { bytes.align_to::<f32>() };
        if pre.is_empty() && post.is_empty() {
            return Cow::Borrowed(mid);
        }
    }
    Cow::Owned(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}
