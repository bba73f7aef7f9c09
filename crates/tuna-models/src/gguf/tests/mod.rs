//! GGUF reader tests: synthetic files from a test-only writer (round trips, hand-computed
//! dequantization, llama names and Q/K un-permutation, corrupt headers) and the real SmolLM2 file.

mod corrupt;
mod llama;
mod q4;
mod real;
mod writer;

use super::*;
use std::path::PathBuf;
use writer::*;

/// A temporary file removed when dropped.
pub struct Temp(pub PathBuf);

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Writer {
    pub fn temp(&self, tag: &str) -> Temp {
        Temp(self.write(tag))
    }
}

fn lo_hi() -> ([u8; 16], [u8; 16]) {
    let lo: [u8; 16] = std::array::from_fn(|j| j as u8);
    let hi: [u8; 16] = std::array::from_fn(|j| 15 - j as u8);
    (lo, hi)
}

#[test]
fn dequantizes_hand_computed_blocks() {
    // Q8_0: d = 0.5, quants -16..16 (and the extremes).
    let mut qs: [i8; 32] = std::array::from_fn(|i| i as i8 - 16);
    qs[0] = -128;
    qs[31] = 127;
    let y = dequantize(GgmlType::Q8_0, &q8_0_block(0.5, &qs), 32).unwrap();
    let want: Vec<f32> = qs.iter().map(|&q| q as f32 * 0.5).collect();
    assert_eq!(y, want);
    assert_eq!((y[0], y[1], y[16], y[31]), (-64.0, -7.5, 0.0, 63.5));

    // Q4_0: element j is the low nibble of byte j, element j + 16 the high nibble; (q - 8) * d.
    let (lo, hi) = lo_hi();
    let y = dequantize(GgmlType::Q4_0, &q4_0_block(0.25, &lo, &hi), 32).unwrap();
    for j in 0..16 {
        assert_eq!(y[j], (j as f32 - 8.0) * 0.25, "Q4_0 element {j}");
        assert_eq!(y[j + 16], (7.0 - j as f32) * 0.25, "Q4_0 element {}", j + 16);
    }
    assert_eq!((y[0], y[15], y[16], y[31]), (-2.0, 1.75, 1.75, -2.0));

    // Q4_1: q * d + m with d = 0.5, m = -1.
    let y = dequantize(GgmlType::Q4_1, &q4_1_block(0.5, -1.0, &lo, &hi), 32).unwrap();
    for j in 0..16 {
        assert_eq!(y[j], j as f32 * 0.5 - 1.0);
        assert_eq!(y[j + 16], (15 - j) as f32 * 0.5 - 1.0);
    }
    assert_eq!((y[0], y[15], y[16]), (-1.0, 6.5, 6.5));

    // Two blocks in a row keep their own scales.
    let mut two = q8_0_block(1.0, &[1; 32]);
    two.extend(q8_0_block(-2.0, &[3; 32]));
    let y = dequantize(GgmlType::Q8_0, &two, 64).unwrap();
    assert!(y[..32].iter().all(|&v| v == 1.0) && y[32..].iter().all(|&v| v == -6.0));

    // F16 / BF16 / F32.
    let vals = [1.5f32, -2.0, 65504.0, 0.0, -0.125];
    let b: Vec<u8> = vals.iter().flat_map(|&v| f16_bytes(v)).collect();
    assert_eq!(dequantize(GgmlType::F16, &b, 5).unwrap(), vals);
    let b: Vec<u8> = vals.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
    assert_eq!(dequantize(GgmlType::BF16, &b, 5).unwrap(), [1.5, -2.0, 65536.0, 0.0, -0.125]);
    assert!(dequantize(GgmlType::Q4K, &[0; 144], 256).unwrap_err().contains("Q4_K"));
}

#[test]
fn round_trips_metadata_and_tensors_of_every_supported_type() {
    let (lo, hi) = lo_hi();
    let nested = MetaValue::Array(vec![MetaValue::Array(vec![MetaValue::I16(-3)]), MetaValue::Array(vec![])]);
    let metas = vec![
        ("a.u8", MetaValue::U8(200)),
        ("a.i8", MetaValue::I8(-100)),
        ("a.u16", MetaValue::U16(60000)),
        ("a.i16", MetaValue::I16(-30000)),
        ("a.u32", MetaValue::U32(4_000_000_000)),
        ("a.i32", MetaValue::I32(-2_000_000_000)),
        ("a.f32", MetaValue::F32(0.25)),
        ("a.bool", MetaValue::Bool(true)),
        ("a.str", s("héllo wörld")),
        ("a.strs", strs(&["x", "", "y z"])),
        ("a.ints", MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(-2)])),
        ("a.nested", nested),
        ("a.u64", MetaValue::U64(u64::MAX)),
        ("a.i64", MetaValue::I64(i64::MIN)),
        ("a.f64", MetaValue::F64(-1e300)),
    ];
    let mut w = Writer::new();
    for (k, v) in &metas {
        w.kv(k, v.clone());
    }
    let f32_vals: Vec<f32> = (0..6).map(|i| i as f32 - 2.5).collect();
    w.f32("t.f32", &[2, 3], &f32_vals);
    w.tensor("t.f16", &[3], 1, [1.0f32, -0.5, 2.0].iter().flat_map(|&v| f16_bytes(v)).collect());
    let mut q8 = q8_0_block(0.5, &[2; 32]);
    q8.extend(q8_0_block(0.25, &[-4; 32]));
    w.tensor("t.q8_0", &[32, 2], 8, q8);
    w.tensor("t.q4_0", &[32], 2, q4_0_block(1.0, &lo, &hi));
    w.tensor("t.q4_1", &[32], 3, q4_1_block(2.0, 0.5, &lo, &hi));
    w.tensor("t.i32", &[2], 26, vec![1, 0, 0, 0, 2, 0, 0, 0]);
    w.tensor("t.q4_k", &[256], 12, vec![0; 144]);
    let tmp = w.temp("roundtrip");
    let g = GgufFile::open(&tmp.0).unwrap();

    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.data_start() % 32, 0);
    for (k, v) in &metas {
        assert_eq!(g.meta(k), Some(v), "{k}");
    }
    assert_eq!(g.metadata().len(), metas.len());
    assert_eq!(g.meta("a.u32").unwrap().as_u64(), Some(4_000_000_000));
    assert_eq!(g.meta("a.i8").unwrap().as_u64(), None);

    // Non-float tensors are skipped; not-dequantizable ones are listed but fail by name.
    assert_eq!(g.names(), ["t.f32", "t.f16", "t.q8_0", "t.q4_0", "t.q4_1", "t.q4_k"]);
    assert_eq!(g.tensor_info("t.i32").unwrap().ty, GgmlType::I32);
    assert_eq!(g.shape("t.f32"), Some(vec![2, 3]));
    assert_eq!(g.shape("t.q8_0"), Some(vec![2, 32]));
    let f = g.get("t.f32").unwrap().unwrap();
    assert!(matches!(f, Cow::Borrowed(_)), "aligned F32 is borrowed from the map");
    assert_eq!(&*f, &f32_vals[..]);
    assert_eq!(&*g.require("t.f16", &[3]).unwrap(), [1.0, -0.5, 2.0]);
    let q8 = g.get("t.q8_0").unwrap().unwrap();
    assert!(q8[..32].iter().all(|&v| v == 1.0) && q8[32..].iter().all(|&v| v == -1.0));
    let q40 = g.get("t.q4_0").unwrap().unwrap();
    assert_eq!((q40[0], q40[16], q40[31]), (-8.0, 7.0, -8.0));
    let q41 = g.get("t.q4_1").unwrap().unwrap();
    assert_eq!((q41[1], q41[17]), (2.5, 28.5));
    let e = g.get("t.q4_k").unwrap().unwrap_err().to_string();
    assert!(e.contains("t.q4_k") && e.contains("Q4_K") && e.contains("roundtrip"), "{e}");
    assert!(matches!(g.get("t.q4_k").unwrap(), Err(Error::Unsupported { .. })));
    assert!(g.get("t.i32").is_none() && g.get("absent").is_none());
    let e = g.require("t.f32", &[3, 2]).unwrap_err().to_string();
    assert!(e.contains("[2, 3]") && e.contains("roundtrip"), "{e}");
}

#[test]
fn honours_general_alignment() {
    let mut w = Writer::new();
    w.alignment = 64;
    w.kv("general.alignment", MetaValue::U32(64));
    w.f32("a", &[3], &[1.0, 2.0, 3.0]).f32("b", &[2], &[4.0, 5.0]);
    let tmp = w.temp("align64");
    let g = GgufFile::open(&tmp.0).unwrap();
    assert_eq!((g.alignment(), g.data_start() % 64), (64, 0));
    assert_eq!(g.tensor_info("b").unwrap().offset, 64);
    assert_eq!(&*g.get("b").unwrap().unwrap(), [4.0, 5.0]);
    // Version 2 files read the same.
    w.version = 2;
    let tmp = w.temp("v2");
    assert_eq!(GgufFile::open(&tmp.0).unwrap().version(), 2);
}
