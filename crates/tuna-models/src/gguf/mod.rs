//! GGUF (llama.cpp's checkpoint format, versions 2 and 3): a memory-mapped reader with typed
//! metadata, dequantization to f32, and a `WeightSource` under Hugging Face names for llama.
//!
//! Layout: magic `GGUF`, version (u32), tensor count and metadata count (u64), metadata entries
//! (key string, value type, value), tensor infos (name, rank, dims innermost first, ggml type,
//! offset), padding to `general.alignment` (default 32), then the data section, where each
//! tensor's offset is relative to the section start and a multiple of the alignment.

mod dequant;
mod llama;
mod parse;
#[cfg(test)]
mod tests;
mod tokenizer;

pub use dequant::{dequantize, GgmlType, QK};
pub use llama::{hf_name, unpermute_rows, Permuted};
pub use parse::{MetaValue, TensorInfo, MAX_DIMS};
pub use tokenizer::token_type;

use crate::error::{Error, Result};
use crate::weights::WeightSource;
use memmap2::Mmap;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Alignment of the data section and of tensor offsets when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;

/// An open GGUF file: header parsed and checked, tensor data memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    alignment: usize,
    data_start: usize,
    /// Weight-source name -> (index into `tensors`, Q/K permutation to undo).
    by_name: HashMap<String, (usize, Option<Permuted>)>,
    /// Weight-source names in file order.
    names: Vec<String>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Open and check `path`: header, alignment, and every tensor's data within the file.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::Io { path: path.clone(), source };
        let file = File::open(&path).map_err(io)?;
        if file.metadata().map_err(io)?.len() == 0 {
            return Err(Error::Format { path, msg: "truncated: empty file, not a GGUF file".into() });
        }
        // SAFETY: the map is read-only and tuna never writes a checkpoint it is reading. As with
        // every memory-mapped reader, another process truncating the file meanwhile is outside
        // what Rust can guard against; all reads below are bounds-checked against the map.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let header = parse::parse_header(&mmap).map_err(|msg| Error::Format { path: path.clone(), msg })?;
        let mut g = GgufFile {
            path,
            mmap,
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            alignment: DEFAULT_ALIGNMENT,
            data_start: 0,
            by_name: HashMap::new(),
            names: Vec::new(),
        };
        g.alignment = g.read_alignment()?;
        g.data_start = header.end.div_ceil(g.alignment) * g.alignment;
        for t in &g.tensors {
            g.check_tensor(t)?;
        }
        g.index_names()?;
        Ok(g)
    }

    pub(crate) fn format_err(&self, msg: String) -> Error {
        Error::Format { path: self.path.clone(), msg }
    }

    fn read_alignment(&self) -> Result<usize> {
        let Some(v) = self.meta("general.alignment") else { return Ok(DEFAULT_ALIGNMENT) };
        match v.as_u64().and_then(|a| usize::try_from(a).ok()) {
            Some(a) if a.is_power_of_two() => Ok(a),
            _ => Err(self.format_err(format!("`general.alignment` is {v:?}: must be a power of two"))),
        }
    }

    /// Byte range of `t`'s data in the file (saturating), when its type's size is known.
    fn byte_range(&self, t: &TensorInfo) -> Result<Option<(usize, usize)>> {
        let row = t.dims.first().copied().unwrap_or(1) as usize;
        let nbytes = t.ty.nbytes(t.numel(), row).map_err(|m| self.format_err(format!("tensor `{}`: {m}", t.name)))?;
        let Some(n) = nbytes else { return Ok(None) };
        let start = (self.data_start as u64).saturating_add(t.offset);
        let end = start.saturating_add(n as u64);
        Ok(Some((usize::try_from(start).unwrap_or(usize::MAX), usize::try_from(end).unwrap_or(usize::MAX))))
    }

    fn check_tensor(&self, t: &TensorInfo) -> Result<()> {
        if !t.offset.is_multiple_of(self.alignment as u64) {
            return Err(self.format_err(format!(
                "tensor `{}` offset {} is not a multiple of the alignment {}",
                t.name, t.offset, self.alignment
            )));
        }
        let len = self.mmap.len();
        let end = match self.byte_range(t)? {
            Some((_, e)) => e,
            None => (self.data_start as u64).saturating_add(t.offset).try_into().unwrap_or(usize::MAX),
        };
        if end > len {
            return Err(self.format_err(format!(
                "truncated: tensor `{}` ({}, dims {:?}) ends at byte {end}, beyond the end of the file ({len} bytes)",
                t.name,
                t.ty.name(),
                t.dims
            )));
        }
        Ok(())
    }

    /// Weight-source names: Hugging Face names for llama (unmapped names kept as they are),
    /// the file's names otherwise. Integer tensors are skipped.
    fn index_names(&mut self) -> Result<()> {
        let is_llama = self.architecture() == Some("llama");
        for (i, t) in self.tensors.iter().enumerate() {
            if t.ty.is_integer() {
                continue;
            }
            let (name, perm) = match is_llama.then(|| hf_name(&t.name)).flatten() {
                Some(m) => m,
                None => (t.name.clone(), None),
            };
            if self.by_name.insert(name.clone(), (i, perm)).is_some() {
                return Err(self.format_err(format!("two tensors map to the name `{name}`")));
            }
            self.names.push(name);
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn alignment(&self) -> usize {
        self.alignment
    }
    /// Byte offset of the data section.
    pub fn data_start(&self) -> usize {
        self.data_start
    }
    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }
    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }
    /// Tensor infos in file order, under the file's own names.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn tensor_info(&self, gguf_name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == gguf_name)
    }

    /// The stored bytes of tensor `gguf_name` (file name, not Hugging Face name).
    pub fn tensor_bytes(&self, gguf_name: &str) -> Result<&[u8]> {
        let t = self.tensor_info(gguf_name).ok_or_else(|| self.format_err(format!("no tensor `{gguf_name}`")))?;
        self.bytes_of(t)
    }

    fn bytes_of(&self, t: &TensorInfo) -> Result<&[u8]> {
        match self.byte_range(t)? {
            Some((s, e)) => {
                self.mmap.get(s..e).ok_or_else(|| self.format_err(format!("tensor `{}` out of range", t.name)))
            }
            None => Err(self.unsupported(t)),
        }
    }

    fn unsupported(&self, t: &TensorInfo) -> Error {
        Error::Unsupported {
            path: self.path.clone(),
            what: format!(
                "tensor `{}` of type {} (tuna dequantizes F32, F16, BF16, Q8_0, Q4_0, Q4_1)",
                t.name,
                t.ty.name()
            ),
        }
    }

    /// Tensor `gguf_name` as f32 in the file's layout (no un-permutation): borrowed from the map
    /// for aligned F32 data on little-endian hosts, dequantized otherwise.
    pub fn dequantize_tensor(&self, gguf_name: &str) -> Result<Cow<'_, [f32]>> {
        let t = self.tensor_info(gguf_name).ok_or_else(|| self.format_err(format!("no tensor `{gguf_name}`")))?;
        self.dequant(t)
    }

    fn dequant(&self, t: &TensorInfo) -> Result<Cow<'_, [f32]>> {
        if !t.ty.is_supported() {
            return Err(self.unsupported(t));
        }
        let bytes = self.bytes_of(t)?;
        #[cfg(target_endian = "little")]
        if t.ty == GgmlType::F32 {
            // SAFETY: every bit pattern is a valid f32, and `align_to` puts in `mid` only whole,
            // aligned f32s; we borrow only when nothing is left over on either side.
            let (pre, mid, post) = unsafe { bytes.align_to::<f32>() };
            if pre.is_empty() && post.is_empty() {
                return Ok(Cow::Borrowed(mid));
            }
        }
        dequantize(t.ty, bytes, t.numel()).map(Cow::Owned).map_err(|_| self.unsupported(t))
    }
}

impl WeightSource for GgufFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.by_name.get(name).map(|&(i, _)| self.tensors[i].shape())
    }

    fn q4_format(&self, name: &str) -> Option<tuna_kernels::ops::lowp::Q4Format> {
        self.by_name.get(name).and_then(|&(i, _)| self.tensors[i].ty.q4_format())
    }

    fn q4_blocks(&self, name: &str) -> Option<Result<(tuna_kernels::ops::lowp::Q4Format, Cow<'_, [u8]>)>> {
        let &(i, perm) = self.by_name.get(name)?;
        let t = &self.tensors[i];
        let fmt = t.ty.q4_format()?;
        Some(self.bytes_of(t).and_then(|b| match perm {
            None => Ok((fmt, Cow::Borrowed(b))),
            Some(which) => {
                // Rows (output channels) are whole runs of blocks: un-permuting them moves bytes.
                let heads = self.permute_heads(which)?;
                let rows = t.shape()[0];
                let row_bytes = b.len() / rows.max(1);
                unpermute_rows(b, rows, row_bytes, heads)
                    .map(|v| (fmt, Cow::Owned(v)))
                    .map_err(|m| self.format_err(format!("tensor `{}`: {m}", t.name)))
            }
        }))
    }

    fn get(&self, name: &str) -> Option<Result<Cow<'_, [f32]>>> {
        let &(i, perm) = self.by_name.get(name)?;
        let t = &self.tensors[i];
        Some(self.dequant(t).and_then(|w| match perm {
            None => Ok(w),
            Some(which) => {
                let heads = self.permute_heads(which)?;
                let shape = t.shape();
                let cols = shape[1..].iter().product();
                unpermute_rows(&w, shape[0], cols, heads)
                    .map(Cow::Owned)
                    .map_err(|m| self.format_err(format!("tensor `{}`: {m}", t.name)))
            }
        }))
    }
}
