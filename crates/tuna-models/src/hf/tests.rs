//! Tests of Hugging Face folder loading on small safetensors files written here, and on the
//! all-MiniLM-L6-v2 folder when `.assets/` holds it.

use super::*;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::PathBuf;

const BERT_CONFIG: &str = r#"{"model_type":"bert","vocab_size":4,"hidden_size":2,"num_hidden_layers":1,
  "num_attention_heads":1,"intermediate_size":4,"max_position_embeddings":8}"#;
const GPT2_CONFIG: &str = r#"{"model_type":"gpt2","vocab_size":4,"n_positions":8,"n_embd":2,"n_layer":1,"n_head":1}"#;

/// A fresh empty folder under the target dir's temp area.
fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tuna-hf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// (name, dtype, shape, bytes) -> safetensors file bytes.
fn st_bytes(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> =
        tensors.iter().map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize(views, None).unwrap()
}

fn write_folder(tag: &str, config: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
    let d = tmp_dir(tag);
    std::fs::write(d.join("config.json"), config).unwrap();
    for (name, bytes) in files {
        std::fs::write(d.join(name), bytes).unwrap();
    }
    d
}

fn mixed_tensors() -> Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)> {
    let f16: Vec<u8> = [1.5f32, -2.0, 0.25].iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
    let bf16: Vec<u8> = [3.0f32, -0.5].iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
    let i64s: Vec<u8> = [0i64, 1, 2, 3].iter().flat_map(|x| x.to_le_bytes()).collect();
    vec![
        (
            "bert.embeddings.word_embeddings.weight",
            Dtype::F32,
            vec![4, 2],
            f32_bytes(&[0., 1., 2., 3., 4., 5., 6., 7.]),
        ),
        ("bert.encoder.layer.0.attention.self.query.bias", Dtype::F16, vec![3], f16),
        ("cls.predictions.bias", Dtype::BF16, vec![2], bf16),
        ("bert.embeddings.position_ids", Dtype::I64, vec![1, 4], i64s),
    ]
}

fn err_of<T>(r: Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn reads_f32_zero_copy_converts_half_types_and_skips_ints() {
    let d = write_folder("mixed", BERT_CONFIG, &[("model.safetensors", st_bytes(&mixed_tensors()))]);
    let ck = HfCheckpoint::open(&d).unwrap();
    assert!(matches!(ck.config(), ModelConfig::Bert(c) if c.vocab_size == 4));
    assert_eq!(ck.path(), d.join("model.safetensors"));
    assert_eq!(ck.skipped(), vec!["bert.embeddings.position_ids".to_string()]);
    let names = ck.names();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(!names.iter().any(|n| n.contains("position_ids")));
    assert!(ck.shape("bert.embeddings.position_ids").is_none() && ck.get("embeddings.position_ids").is_none());

    let w = ck.require("bert.embeddings.word_embeddings.weight", &[4, 2]).unwrap();
    assert!(matches!(w, Cow::Borrowed(_)), "aligned f32 should be borrowed from the map");
    assert_eq!(&*w, &[0., 1., 2., 3., 4., 5., 6., 7.]);
    let q = ck.require("bert.encoder.layer.0.attention.self.query.bias", &[3]).unwrap();
    assert!(matches!(q, Cow::Owned(_)));
    assert_eq!(&*q, &[1.5, -2.0, 0.25]);
    assert_eq!(&*ck.require("cls.predictions.bias", &[2]).unwrap(), &[3.0, -0.5]);
}

#[test]
fn prefixed_and_bare_names_both_resolve() {
    // Stored with `bert.`: bare requests resolve (rule 2 strips, rule 3 adds).
    let d = write_folder("prefix", BERT_CONFIG, &[("model.safetensors", st_bytes(&mixed_tensors()))]);
    let ck = HfCheckpoint::open(&d).unwrap();
    assert_eq!(ck.resolve("embeddings.word_embeddings.weight"), Some("bert.embeddings.word_embeddings.weight"));
    assert_eq!(ck.shape("embeddings.word_embeddings.weight"), Some(vec![4, 2]));
    assert_eq!(ck.resolve("cls.predictions.bias"), Some("cls.predictions.bias"));
    assert_eq!(ck.resolve("bert.cls.predictions.bias"), Some("cls.predictions.bias"));
    assert_eq!(ck.resolve("pooler.dense.weight"), None);

    // GPT-2 stored bare (as the hub's `gpt2`): `transformer.`-prefixed requests resolve too.
    let t = vec![
        ("wte.weight", Dtype::F32, vec![4, 2], f32_bytes(&[0.; 8])),
        ("h.0.attn.c_attn.weight", Dtype::F32, vec![2, 6], f32_bytes(&[1.; 12])),
    ];
    let d = write_folder("gpt2bare", GPT2_CONFIG, &[("model.safetensors", st_bytes(&t))]);
    let ck = HfCheckpoint::open(&d).unwrap();
    assert_eq!(ck.resolve("transformer.h.0.attn.c_attn.weight"), Some("h.0.attn.c_attn.weight"));
    assert_eq!(ck.resolve("wte.weight"), Some("wte.weight"));
    assert_eq!(&*ck.require("transformer.h.0.attn.c_attn.weight", &[2, 6]).unwrap(), &[1.; 12]);

    // GPT-2 stored prefixed (a saved GPT2LMHeadModel): bare requests resolve.
    let t = vec![("transformer.wte.weight", Dtype::F32, vec![4, 2], f32_bytes(&[2.; 8]))];
    let d = write_folder("gpt2pre", GPT2_CONFIG, &[("model.safetensors", st_bytes(&t))]);
    let ck = HfCheckpoint::open(&d).unwrap();
    assert_eq!(&*ck.require("wte.weight", &[4, 2]).unwrap(), &[2.; 8]);
    assert_eq!(ck.names(), vec!["transformer.wte.weight".to_string()]);
}

#[test]
fn unaligned_f32_is_copied() {
    // Hand-made file: a 1-element f16 first, so the f32 after it starts 2 bytes off alignment.
    let mut header = concat!(
        r#"{"a":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},"#,
        r#""b":{"dtype":"F32","shape":[2],"data_offsets":[2,10]}}"#
    )
    .to_string();
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(half::f16::from_f32(0.5).to_le_bytes());
    bytes.extend(f32_bytes(&[7.0, -8.0]));
    let d = write_folder("unaligned", BERT_CONFIG, &[("model.safetensors", bytes)]);
    let ck = HfCheckpoint::open(&d).unwrap();
    let b = ck.require("b", &[2]).unwrap();
    assert!(matches!(b, Cow::Owned(_)));
    assert_eq!(&*b, &[7.0, -8.0]);
    assert_eq!(&*ck.require("a", &[1]).unwrap(), &[0.5]);
}

#[test]
fn sharded_index_with_two_shards() {
    let s1 = st_bytes(&[
        ("model.embed_tokens.weight", Dtype::F32, vec![2, 2], f32_bytes(&[1., 2., 3., 4.])),
        ("model.rotary.inv_freq_ids", Dtype::I64, vec![1], 5i64.to_le_bytes().to_vec()),
    ]);
    let s2 = st_bytes(&[("lm_head.weight", Dtype::F32, vec![2, 2], f32_bytes(&[5., 6., 7., 8.]))]);
    let index = r#"{"metadata":{"total_size":32},"weight_map":{
        "model.embed_tokens.weight":"model-00001-of-00002.safetensors",
        "model.rotary.inv_freq_ids":"model-00001-of-00002.safetensors",
        "lm_head.weight":"model-00002-of-00002.safetensors"}}"#;
    let files = [
        ("model-00001-of-00002.safetensors", s1),
        ("model-00002-of-00002.safetensors", s2),
        ("model.safetensors.index.json", index.as_bytes().to_vec()),
    ];
    let d = write_folder("sharded", BERT_CONFIG, &files);
    let ck = HfCheckpoint::open(&d).unwrap();
    assert_eq!(ck.path(), d.join("model.safetensors.index.json"));
    assert_eq!(ck.names(), vec!["lm_head.weight".to_string(), "model.embed_tokens.weight".to_string()]);
    assert_eq!(&*ck.require("lm_head.weight", &[2, 2]).unwrap(), &[5., 6., 7., 8.]);
    assert_eq!(&*ck.require("embed_tokens.weight", &[2, 2]).unwrap(), &[1., 2., 3., 4.]);
    assert_eq!(ck.skipped(), vec!["model.rotary.inv_freq_ids".to_string()]);

    // The index names a shard that is not there.
    std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap();
    let e = err_of(HfCheckpoint::open(&d));
    assert!(e.contains("model.safetensors.index.json") && e.contains("model-00002-of-00002.safetensors"), "{e}");
    assert!(e.contains("missing"), "{e}");

    // The index lists a tensor its shard does not hold.
    let bad = index.replace("lm_head.weight\":\"model-00002", "lm_head.weight\":\"model-00001");
    std::fs::write(d.join("model.safetensors.index.json"), bad).unwrap();
    let e = err_of(HfCheckpoint::open(&d));
    assert!(e.contains("`lm_head.weight` is not in its shard"), "{e}");
}

#[test]
fn wrong_shape_and_missing_tensor_through_require() {
    let d = write_folder("shape", BERT_CONFIG, &[("model.safetensors", st_bytes(&mixed_tensors()))]);
    let ck = HfCheckpoint::open(&d).unwrap();
    let e = err_of(ck.require("embeddings.word_embeddings.weight", &[30522, 384]));
    assert!(e.contains("model.safetensors"), "{e}");
    assert!(e.contains("embeddings.word_embeddings.weight"), "{e}");
    assert!(e.contains("[30522, 384]") && e.contains("[4, 2]"), "{e}");
    let e = err_of(ck.require("pooler.dense.weight", &[2, 2]));
    assert!(e.contains("missing tensor `pooler.dense.weight`") && e.contains("[2, 2]"), "{e}");
}

#[test]
fn folder_and_config_errors_name_the_file() {
    let missing = std::env::temp_dir().join("tuna-hf-no-such-folder");
    let e = err_of(HfCheckpoint::open(&missing));
    assert!(e.contains("tuna-hf-no-such-folder"), "{e}");

    let d = tmp_dir("noconfig");
    std::fs::write(d.join("model.safetensors"), st_bytes(&mixed_tensors())).unwrap();
    let e = err_of(HfCheckpoint::open(&d));
    assert!(e.contains("config.json"), "{e}");

    std::fs::write(d.join("config.json"), "{\"model_type\": \"bert\",").unwrap();
    let e = err_of(HfCheckpoint::open(&d));
    assert!(e.contains("config.json") && e.contains("invalid JSON"), "{e}");

    let d = write_folder("noweights", BERT_CONFIG, &[]);
    let e = err_of(HfCheckpoint::open(&d));
    assert!(e.contains("no model.safetensors or model.safetensors.index.json"), "{e}");

    let d = write_folder("badindex", BERT_CONFIG, &[("model.safetensors.index.json", b"{\"weight_map\": 3}".to_vec())]);
    let e = err_of(HfCheckpoint::open(&d));
    assert!(e.contains("model.safetensors.index.json") && e.contains("weight_map"), "{e}");
}

#[test]
fn truncated_and_malformed_safetensors_are_errors_naming_the_file() {
    let good = st_bytes(&mixed_tensors());
    let open_with = |tag: &str, bytes: Vec<u8>| {
        let d = write_folder(tag, BERT_CONFIG, &[("model.safetensors", bytes)]);
        err_of(HfCheckpoint::open(&d))
    };
    let e = open_with("short", good[..5].to_vec());
    assert!(e.contains("model.safetensors") && e.contains("truncated") && e.contains("5 bytes"), "{e}");

    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let e = open_with("halfheader", good[..8 + n / 2].to_vec());
    assert!(e.contains("model.safetensors") && e.contains(&format!("header length {n} runs past the end")), "{e}");

    let e = open_with("halfdata", good[..good.len() - 3].to_vec());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated") && e.contains("tensor data runs to byte"),
        "{e}"
    );

    let mut long = good.clone();
    long.extend([0u8; 4]);
    let e = open_with("trailing", long);
    assert!(e.contains("4 trailing bytes"), "{e}");

    let text = String::from_utf8_lossy(&good[8..8 + n]).replace("\"F16\"", "\"Q4\" ");
    let mut bad = good[..8].to_vec();
    bad.extend(text.as_bytes());
    bad.extend(&good[8 + n..]);
    let e = open_with("dtype", bad);
    assert!(e.contains("model.safetensors") && e.contains("unknown dtype \"Q4\""), "{e}");
    assert!(e.contains("bert.encoder.layer.0.attention.self.query.bias"), "{e}");

    let mut garbage = 6u64.to_le_bytes().to_vec();
    garbage.extend(b"{oops}");
    let e = open_with("json", garbage);
    assert!(e.contains("model.safetensors") && e.contains("invalid safetensors header JSON"), "{e}");
}

#[test]
fn fp8_tensor_errors_when_read() {
    let t = vec![("x", Dtype::F8_E4M3, vec![2], vec![0u8, 1])];
    let d = write_folder("fp8", BERT_CONFIG, &[("model.safetensors", st_bytes(&t))]);
    let ck = HfCheckpoint::open(&d).unwrap();
    assert_eq!(ck.shape("x"), Some(vec![2]));
    let e = err_of(ck.require("x", &[2]));
    assert!(e.contains("model.safetensors") && e.contains("F8_E4M3") && e.contains("`x`"), "{e}");
}

/// The all-MiniLM-L6-v2 folder, if fetched into `.assets/` (fetched by `scripts/fetch-assets.sh`).
pub(crate) fn minilm_dir() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.assets/all-MiniLM-L6-v2");
    d.join("model.safetensors").is_file().then_some(d)
}

#[test]
fn minilm_folder_when_present() {
    let Some(d) = minilm_dir() else {
        tuna_kernels::testing::note_skip("minilm_folder_when_present", ".assets/all-MiniLM-L6-v2 absent");
        return;
    };
    let ck = HfCheckpoint::open(&d).unwrap();
    let ModelConfig::Bert(c) = ck.config() else { panic!("not BERT: {:?}", ck.config()) };
    assert_eq!((c.num_hidden_layers, c.hidden_size, c.num_attention_heads), (6, 384, 12));
    let w = ck.require("embeddings.word_embeddings.weight", &[30522, 384]).unwrap();
    assert!(matches!(w, Cow::Borrowed(_)));
    assert!(w.iter().all(|x| x.is_finite()) && w.iter().any(|&x| x != 0.0));
    assert_eq!(ck.shape("bert.encoder.layer.5.output.LayerNorm.weight"), Some(vec![384]));
    assert_eq!(ck.skipped(), vec!["embeddings.position_ids".to_string()]);
    assert!(ck.tokenizer_file().is_some());
}
