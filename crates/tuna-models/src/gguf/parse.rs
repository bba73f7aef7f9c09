//! GGUF header parsing: magic, version, typed metadata values (arrays and strings included) and
//! tensor infos, with every length checked against the bytes that remain.

use super::dequant::GgmlType;
use std::collections::{BTreeMap, HashSet};

/// Maximum tensor rank ggml knows (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Arrays nested deeper than this are rejected (no real file nests at all; this bounds recursion).
const MAX_ARRAY_DEPTH: usize = 4;

/// One typed metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// Any integer type that fits in `u64` (negative values and non-integers give `None`).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type as `i64` (u64 above `i64::MAX` gives `None`).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            MetaValue::U64(v) => i64::try_from(v).ok(),
            _ => self.as_u64().map(|v| v as i64),
        }
    }

    /// Floats (and integers, converted).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A tensor's entry in the header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` is the fastest-varying (columns); the reverse of row-major shape.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Row-major shape (outermost first), as Hugging Face and numpy write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements (checked for overflow when the header was parsed).
    pub fn numel(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
}

/// The parsed header: everything before the data section.
#[derive(Debug)]
pub struct Header {
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    /// Byte offset where tensor infos end (the data section starts at the next aligned offset).
    pub end: usize,
}

/// A bounds-checked little-endian reader; errors are plain messages (the caller adds the path).
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let left = self.buf.len() - self.pos;
        if n > left {
            return Err(format!(
                "truncated: {what} needs {n} bytes at offset {} but only {left} remain (file is {} bytes)",
                self.pos,
                self.buf.len()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// A count of items each at least `min_size` bytes long: absurd if they could not fit.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize, String> {
        let n = self.u64(what)?;
        let fits = usize::try_from(n).ok().filter(|&n| n.checked_mul(min_size).is_some_and(|b| b <= self.remaining()));
        fits.ok_or_else(|| {
            format!(
                "absurd {what} {n} (or truncated file): at least {min_size} bytes each, only {} bytes remain",
                self.remaining()
            )
        })
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.count(1, &format!("length of {what}"))?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<MetaValue, String> {
        let what = format!("value of `{key}`");
        Ok(match ty {
            0 => MetaValue::U8(u8::from_le_bytes(self.array(&what)?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.array(&what)?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(format!("{what}: bool byte is {b}, not 0 or 1")),
            },
            8 => MetaValue::String(self.string(&what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}"));
                }
                let elem = self.u32(&format!("array type of `{key}`"))?;
                let min = min_value_size(elem).ok_or_else(|| format!("{what}: unknown array element type {elem}"))?;
                let n = self.count(min, &format!("array length of `{key}`"))?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(&what)?)),
            other => return Err(format!("{what}: unknown metadata value type {other}")),
        })
    }
}

/// Smallest encoded size of a value of type `ty` (strings and arrays: their length field).
fn min_value_size(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

/// Parse the header of a GGUF v2/v3 file held in `buf`. Errors are messages without the path.
pub fn parse_header(buf: &[u8]) -> Result<Header, String> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c.array::<4>("magic")?;
    if &magic != b"GGUF" {
        return Err(format!("bad magic {magic:02x?} (expected \"GGUF\"): not a GGUF file"));
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(format!("unsupported GGUF version {version} (tuna reads versions 2 and 3)"));
    }
    // A tensor info is at least: name length (8), n_dims (4), type (4), offset (8).
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.count(8 + 4 + 1, "metadata count")?;
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.string(&format!("key of metadata entry {i}"))?;
        let ty = c.u32(&format!("type of `{key}`"))?;
        let value = c.value(ty, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("duplicate metadata key `{key}`"));
        }
    }
    let n_tensors =
        usize::try_from(n_tensors).ok().filter(|&n| n.checked_mul(24).is_some_and(|b| b <= c.remaining())).ok_or_else(
            || format!("absurd tensor count {n_tensors} (or truncated file): only {} bytes remain", c.remaining()),
        )?;
    let mut tensors = Vec::with_capacity(n_tensors);
    let mut seen = HashSet::new();
    for i in 0..n_tensors {
        let name = c.string(&format!("name of tensor {i}"))?;
        let n_dims = c.u32(&format!("rank of `{name}`"))? as usize;
        if n_dims > MAX_DIMS {
            return Err(format!("tensor `{name}` has rank {n_dims} (ggml allows at most {MAX_DIMS})"));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(c.u64(&format!("dims of `{name}`"))?);
        }
        if dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).is_none_or(|n| n > isize::MAX as u64) {
            return Err(format!("tensor `{name}` has absurd dims {dims:?}"));
        }
        let ty = GgmlType::from_u32(c.u32(&format!("type of `{name}`"))?);
        let offset = c.u64(&format!("offset of `{name}`"))?;
        if !seen.insert(name.clone()) {
            return Err(format!("duplicate tensor name `{name}`"));
        }
        tensors.push(TensorInfo { name, dims, ty, offset });
    }
    Ok(Header { version, metadata, tensors, end: c.pos })
}
