//! ggml tensor types, their storage sizes, and dequantization to f32 of the types tuna reads
//! (F32, F16, BF16, Q8_0, Q4_0, Q4_1), written from ggml's block layouts.

use half::{bf16, f16};
use tuna_kernels::ops::lowp::{q4, Q4Format};

/// Elements per block of the legacy quantizations (`QK4_0`, `QK4_1`, `QK8_0`).
pub const QK: usize = 32;

/// A ggml tensor type, by its number in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
    /// Any other number (IQ*, TQ*, MXFP4 and types newer than this reader).
    Other(u32),
}

impl GgmlType {
    pub fn from_u32(v: u32) -> GgmlType {
        use GgmlType::*;
        match v {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => BF16,
            other => Other(other),
        }
    }

    /// ggml's name for the type (`Q4_K`, `F16`, ...), for messages.
    pub fn name(self) -> String {
        use GgmlType::*;
        let s = match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            BF16 => "BF16",
            Other(n) => return format!("ggml type {n}"),
        };
        s.to_string()
    }

    /// Integer tensors: not weights, skipped by the weight source.
    pub fn is_integer(self) -> bool {
        matches!(self, GgmlType::I8 | GgmlType::I16 | GgmlType::I32 | GgmlType::I64)
    }

    /// The kernels' q4 block format of this type (`Q4_0`, `Q4_1`), for `--base-precision q4`.
    pub fn q4_format(self) -> Option<Q4Format> {
        match self {
            GgmlType::Q4_0 => Some(Q4Format::Q4_0),
            GgmlType::Q4_1 => Some(Q4Format::Q4_1),
            _ => None,
        }
    }

    /// Whether [`dequantize`] handles this type.
    pub fn is_supported(self) -> bool {
        use GgmlType::*;
        matches!(self, F32 | F16 | BF16 | Q8_0 | Q4_0 | Q4_1)
    }

    /// (elements per block, bytes per block), when known.
    pub fn block(self) -> Option<(usize, usize)> {
        use GgmlType::*;
        Some(match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            I8 => (1, 1),
            I64 | F64 => (1, 8),
            Q4_0 => (QK, 2 + 16),
            Q4_1 => (QK, 2 + 2 + 16),
            Q5_0 => (QK, 2 + 4 + 16),
            Q5_1 => (QK, 2 + 2 + 4 + 16),
            Q8_0 => (QK, 2 + 32),
            Q8_1 => (QK, 4 + 32),
            Q2K => (256, 84),
            Q3K => (256, 110),
            Q4K => (256, 144),
            Q5K => (256, 176),
            Q6K => (256, 210),
            Q8K => (256, 292),
            Other(_) => return None,
        })
    }

    /// Bytes a tensor of `numel` elements with rows of `row_len` takes; `Err` with a message if
    /// the rows do not divide into whole blocks. `Ok(None)` for types of unknown size.
    pub fn nbytes(self, numel: usize, row_len: usize) -> Result<Option<usize>, String> {
        let Some((bs, ts)) = self.block() else { return Ok(None) };
        if !row_len.is_multiple_of(bs) {
            return Err(format!("rows of {row_len} elements are not whole {} blocks of {bs}", self.name()));
        }
        (numel / bs).checked_mul(ts).map(Some).ok_or_else(|| format!("{numel} elements overflow the byte count"))
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantize `bytes` (exactly the tensor's storage) of type `ty` into `numel` f32 values.
/// The caller has checked the length with [`GgmlType::nbytes`]; unsupported types give `Err`
/// with the type's name.
pub fn dequantize(ty: GgmlType, bytes: &[u8], numel: usize) -> Result<Vec<f32>, String> {
    let (bs, ts) = ty.block().filter(|_| ty.is_supported()).ok_or_else(|| ty.name())?;
    debug_assert_eq!(bytes.len(), numel / bs * ts);
    let mut out = vec![0f32; numel];
    let blocks = bytes.chunks_exact(ts).zip(out.chunks_exact_mut(bs));
    match ty {
        GgmlType::F32 => blocks.for_each(|(b, o)| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        GgmlType::F16 => blocks.for_each(|(b, o)| o[0] = f16_at(b, 0)),
        GgmlType::BF16 => blocks.for_each(|(b, o)| o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::Q8_0 => blocks.for_each(|(b, o)| dequant_q8_0(b, o)),
        GgmlType::Q4_0 => blocks.for_each(|(b, o)| dequant_q4_0(b, o)),
        GgmlType::Q4_1 => blocks.for_each(|(b, o)| dequant_q4_1(b, o)),
        _ => return Err(ty.name()),
    }
    Ok(out)
}

/// `block_q8_0 { f16 d; i8 qs[32]; }`: `y[i] = qs[i] * d`.
fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..2 + QK]) {
        *y = (q as i8) as f32 * d;
    }
}

/// `block_q4_0 { f16 d; u8 qs[16]; }`: element `j` is the low nibble of `qs[j]`, element `j + 16`
/// its high nibble; `y = (q - 8) * d`. The kernels' q4 dequantization, so that a weight kept in
/// Q4 (`--base-precision q4`) computes with exactly these values.
fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    q4::dequant_block(Q4Format::Q4_0, b, y);
}

/// `block_q4_1 { f16 d; f16 m; u8 qs[16]; }`: nibbles as in Q4_0; `y = q * d + m`.
fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    q4::dequant_block(Q4Format::Q4_1, b, y);
}
