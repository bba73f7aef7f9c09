//! A tiny GGUF writer for tests (not the library): metadata of any type, tensors of any ggml
//! type from raw bytes, and knobs that corrupt the header. The CLI tests include it too
//! (`tests/common`), so it names `MetaValue` through its parent module.

use super::MetaValue;
use half::f16;
use std::path::PathBuf;

pub struct RawTensor {
    pub name: String,
    /// GGUF order (innermost first).
    pub dims: Vec<u64>,
    pub ty: u32,
    pub data: Vec<u8>,
    /// Written instead of the computed offset when set.
    pub offset: Option<u64>,
}

pub struct Writer {
    pub magic: [u8; 4],
    pub version: u32,
    pub kvs: Vec<(String, MetaValue)>,
    pub tensors: Vec<RawTensor>,
    /// Layout alignment (write `general.alignment` yourself when it is not 32).
    pub alignment: usize,
    pub tensor_count: Option<u64>,
    pub kv_count: Option<u64>,
}

impl Writer {
    pub fn new() -> Writer {
        Writer {
            magic: *b"GGUF",
            version: 3,
            kvs: vec![],
            tensors: vec![],
            alignment: 32,
            tensor_count: None,
            kv_count: None,
        }
    }

    pub fn kv(&mut self, key: &str, v: MetaValue) -> &mut Self {
        self.kvs.push((key.into(), v));
        self
    }

    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.push(RawTensor { name: name.into(), dims: dims.to_vec(), ty, data, offset: None });
        self
    }

    /// An F32 tensor with row-major `shape` (written reversed, as GGUF does).
    pub fn f32(&mut self, name: &str, shape: &[usize], vals: &[f32]) -> &mut Self {
        assert_eq!(shape.iter().product::<usize>(), vals.len());
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensor(name, &dims, 0, vals.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&self.magic);
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.tensor_count.unwrap_or(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&self.kv_count.unwrap_or(self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            put_str(&mut b, k);
            b.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut b, v);
        }
        let mut offsets = Vec::new();
        let mut data_len = 0usize;
        for t in &self.tensors {
            offsets.push(data_len);
            data_len = (data_len + t.data.len()).div_ceil(self.alignment) * self.alignment;
        }
        for (t, &off) in self.tensors.iter().zip(&offsets) {
            put_str(&mut b, &t.name);
            b.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&t.ty.to_le_bytes());
            b.extend_from_slice(&t.offset.unwrap_or(off as u64).to_le_bytes());
        }
        b.resize(b.len().div_ceil(self.alignment) * self.alignment, 0);
        let start = b.len();
        for (t, &off) in self.tensors.iter().zip(&offsets) {
            b.resize(start + off, 0);
            b.extend_from_slice(&t.data);
        }
        b
    }

    /// Write to a fresh temporary file named after `tag`.
    pub fn write(&self, tag: &str) -> PathBuf {
        write_bytes(tag, &self.bytes())
    }
}

pub fn write_bytes(tag: &str, bytes: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("tuna-gguf-test-{}-{tag}.gguf", std::process::id()));
    std::fs::write(&p, bytes).expect("write temp file");
    p
}

pub fn type_id(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

pub fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn put_value(b: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => b.push(*x),
        MetaValue::I8(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => b.push(*x as u8),
        MetaValue::String(s) => put_str(b, s),
        MetaValue::Array(items) => {
            // Element type from the first item; empty arrays are written as arrays of strings.
            let elem = items.first().map(type_id).unwrap_or(8);
            b.extend_from_slice(&elem.to_le_bytes());
            b.extend_from_slice(&(items.len() as u64).to_le_bytes());
            items.iter().for_each(|it| put_value(b, it));
        }
        MetaValue::U64(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => b.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => b.extend_from_slice(&x.to_le_bytes()),
    }
}

pub fn s(x: &str) -> MetaValue {
    MetaValue::String(x.into())
}

pub fn strs(xs: &[&str]) -> MetaValue {
    MetaValue::Array(xs.iter().map(|x| s(x)).collect())
}

pub fn f16_bytes(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

/// One Q8_0 block: scale `d` (exact in f16) and 32 quants.
pub fn q8_0_block(d: f32, qs: &[i8; 32]) -> Vec<u8> {
    let mut b = f16_bytes(d).to_vec();
    b.extend(qs.iter().map(|&q| q as u8));
    b
}

/// One Q4_0 block: element `j` is `lo[j]`, element `j + 16` is `hi[j]` (4-bit codes).
pub fn q4_0_block(d: f32, lo: &[u8; 16], hi: &[u8; 16]) -> Vec<u8> {
    let mut b = f16_bytes(d).to_vec();
    b.extend(lo.iter().zip(hi).map(|(&l, &h)| l | (h << 4)));
    b
}

/// One Q4_1 block: as Q4_0 with a minimum `m` after the scale.
pub fn q4_1_block(d: f32, m: f32, lo: &[u8; 16], hi: &[u8; 16]) -> Vec<u8> {
    let mut b = f16_bytes(d).to_vec();
    b.extend_from_slice(&f16_bytes(m));
    b.extend(lo.iter().zip(hi).map(|(&l, &h)| l | (h << 4)));
    b
}
