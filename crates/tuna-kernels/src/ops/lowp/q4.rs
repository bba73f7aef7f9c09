//! ggml's 4-bit block formats as a GGUF file stores them (`--base-precision q4`): 32 weights
//! along a row (the input dimension) per block, the blocks of a row one after another.
//!
//! - `Q4_0`: `{ f16 d; u8 qs[16]; }`, 18 bytes: `w = (q - 8) * d`.
//! - `Q4_1`: `{ f16 d; f16 m; u8 qs[16]; }`, 20 bytes: `w = q * d + m`.
//!
//! In both, element `j` of a block is the low nibble of `qs[j]` and element `j + 16` its high
//! nibble. [`dequant_block`] is the one dequantization of these formats in tuna: the GGUF reader's
//! dequant-at-load calls it too, so a packed q4 weight and the same weight dequantized at load are
//! the same f32 numbers.

use half::f16;

/// Weights per block (ggml's `QK4_0` and `QK4_1`).
pub const Q4_BLOCK: usize = 32;

/// Which of ggml's 4-bit block formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Q4Format {
    /// Scale only: `(q - 8) * d`.
    Q4_0,
    /// Scale and minimum: `q * d + m`.
    Q4_1,
}

impl Q4Format {
    /// ggml's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Q4Format::Q4_0 => "Q4_0",
            Q4Format::Q4_1 => "Q4_1",
        }
    }

    /// Bytes per block of [`Q4_BLOCK`] weights.
    pub fn block_bytes(self) -> usize {
        match self {
            Q4Format::Q4_0 => 2 + Q4_BLOCK / 2,
            Q4Format::Q4_1 => 2 + 2 + Q4_BLOCK / 2,
        }
    }
}

impl std::fmt::Display for Q4Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes one block `b` (exactly [`Q4Format::block_bytes`] bytes) into `y` (32 values).
#[inline(always)]
pub fn dequant_block(fmt: Q4Format, b: &[u8], y: &mut [f32]) {
    debug_assert_eq!(b.len(), fmt.block_bytes());
    let (lo, hi) = y[..Q4_BLOCK].split_at_mut(Q4_BLOCK / 2);
    match fmt {
        Q4Format::Q4_0 => {
            let d = f16_at(b, 0);
            for (j, &q) in b[2..2 + Q4_BLOCK / 2].iter().enumerate() {
                lo[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
                hi[j] = ((q >> 4) as i32 - 8) as f32 * d;
            }
        }
        Q4Format::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for (j, &q) in b[4..4 + Q4_BLOCK / 2].iter().enumerate() {
                lo[j] = (q & 0x0f) as f32 * d + m;
                hi[j] = (q >> 4) as f32 * d + m;
            }
        }
    }
}

/// Dequantizes whole blocks: `bytes` holds `y.len() / 32` blocks.
pub fn dequant_blocks(fmt: Q4Format, bytes: &[u8], y: &mut [f32]) {
    debug_assert_eq!(bytes.len() / fmt.block_bytes(), y.len() / Q4_BLOCK);
    for (b, y) in bytes.chunks_exact(fmt.block_bytes()).zip(y.chunks_exact_mut(Q4_BLOCK)) {
        dequant_block(fmt, b, y);
    }
}
