//! Corrupt files: every bad header gives an error naming the file, never a panic.

use super::*;

/// A small valid file: metadata incl. a string array, two tensors.
fn valid() -> Writer {
    let mut w = Writer::new();
    w.kv("general.architecture", s("llama")).kv("tokenizer.ggml.tokens", strs(&["a", "bc"]));
    w.f32("x", &[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    w.tensor("y", &[32], 8, q8_0_block(1.0, &[1; 32]));
    w
}

/// Open the bytes as a file named after `tag`; the error message, which must name the file.
fn open_err(tag: &str, bytes: &[u8]) -> String {
    let tmp = Temp(write_bytes(tag, bytes));
    let e = GgufFile::open(&tmp.0).expect_err(tag).to_string();
    assert!(e.contains(&*tmp.0.to_string_lossy()), "error does not name the file: {e}");
    e
}

fn expect(tag: &str, w: &Writer, needle: &str) {
    let e = open_err(tag, &w.bytes());
    assert!(e.contains(needle), "{tag}: expected `{needle}` in: {e}");
}

#[test]
fn valid_file_opens() {
    let tmp = valid().temp("valid");
    let g = GgufFile::open(&tmp.0).unwrap();
    assert_eq!(g.tensors().len(), 2);
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = valid().bytes();
    for n in 0..bytes.len() {
        let e = open_err("trunc", &bytes[..n]);
        assert!(e.contains("truncated"), "prefix of {n} bytes: {e}");
    }
}

#[test]
fn bad_magic_and_versions() {
    let mut w = valid();
    w.magic = *b"GGML";
    expect("magic", &w, "bad magic");
    for v in [0, 1, 4, u32::MAX] {
        let mut w = valid();
        w.version = v;
        expect("version", &w, &format!("unsupported GGUF version {v}"));
    }
}

#[test]
fn absurd_counts() {
    let mut w = valid();
    w.tensor_count = Some(u64::MAX);
    expect("tcount", &w, "absurd tensor count");
    let mut w = valid();
    w.tensor_count = Some(1 << 40);
    expect("tcount2", &w, "absurd tensor count");
    let mut w = valid();
    w.kv_count = Some(u64::MAX / 2);
    expect("kvcount", &w, "absurd metadata count");
    // An array claiming 2^60 strings: its length field is patched in place.
    let mut b = valid().bytes();
    let key = b"tokenizer.ggml.tokens";
    let at = b.windows(key.len()).position(|x| x == key).unwrap() + key.len() + 4 + 4;
    b[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let e = open_err("arrlen", &b);
    assert!(e.contains("absurd array length of `tokenizer.ggml.tokens`"), "{e}");
    // A key whose length is absurd.
    let mut b = valid().bytes();
    b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open_err("keylen", &b).contains("absurd length of key"));
    // Dims whose product overflows.
    let mut w = valid();
    w.tensor("big", &[u64::MAX / 2, 4], 0, vec![]);
    expect("dims", &w, "absurd dims");
    let mut w = valid();
    w.tensor("r5", &[1, 1, 1, 1, 1], 0, vec![0; 4]);
    expect("rank", &w, "rank 5");
}

#[test]
fn bad_values_and_duplicates() {
    let mut w = valid();
    w.kv("k", MetaValue::Bool(true));
    let mut b = w.bytes();
    let at = b.windows(5).position(|x| x == b"k\x07\0\0\0").unwrap() + 5;
    b[at] = 2;
    assert!(open_err("bool", &b).contains("bool byte is 2"));
    let mut b = w.bytes();
    b[at - 4] = 13;
    assert!(open_err("vtype", &b).contains("unknown metadata value type 13"));
    let mut w = valid();
    w.kv("general.architecture", s("again"));
    expect("dupkey", &w, "duplicate metadata key `general.architecture`");
    let mut w = valid();
    w.f32("x", &[1], &[0.0]);
    expect("dupname", &w, "duplicate tensor name `x`");
    let mut w = valid();
    w.kv("bad", MetaValue::String("x".into()));
    let mut b = w.bytes();
    let at = b.windows(3).position(|x| x == b"bad").unwrap() + 3 + 4 + 8;
    b[at] = 0xff;
    assert!(open_err("utf8", &b).contains("not valid UTF-8"));
}

#[test]
fn misaligned_offsets_bad_alignment_and_data_beyond_eof() {
    let mut w = valid();
    w.tensors[1].offset = Some(4);
    expect("misaligned", &w, "offset 4 is not a multiple of the alignment 32");
    for a in [MetaValue::U32(0), MetaValue::U32(24), MetaValue::I32(-32), s("32")] {
        let mut w = valid();
        w.kv("general.alignment", a);
        expect("alignment", &w, "must be a power of two");
    }
    // A tensor whose data lies past the end.
    let mut w = valid();
    w.tensors[1].dims = vec![32, 1000];
    expect("beyond", &w, "tensor `y` (Q8_0, dims [32, 1000]) ends at byte");
    let mut w = valid();
    w.tensors[0].offset = Some(u64::MAX - 31);
    expect("offset-overflow", &w, "beyond the end of the file");
    // An unknown type's offset past the end is still caught.
    let mut w = valid();
    w.tensor("z", &[4], 99, vec![]);
    w.tensors[2].offset = Some(1 << 20);
    expect("unknown-type", &w, "tensor `z`");
    // Rows that are not whole quantization blocks.
    let mut w = valid();
    w.tensor("q", &[16, 2], 8, vec![0; 34]);
    expect("blocks", &w, "not whole Q8_0 blocks");
    let e = GgufFile::open("/nonexistent/model.gguf").unwrap_err();
    assert!(matches!(e, Error::Io { .. }) && e.to_string().contains("/nonexistent/model.gguf"), "{e}");
}
