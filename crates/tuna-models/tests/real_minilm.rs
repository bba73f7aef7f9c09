//! all-MiniLM-L6-v2 (`scripts/fetch-assets.sh`): the mean-pooled cosine of the reference sentence
//! pair is 0.7553. Skips by name when the asset is absent.

use std::path::PathBuf;
use std::sync::Arc;
use tuna_autograd::{no_grad, Ints};
use tuna_kernels::Cpu;
use tuna_models::bert::{cosine, Bert};
use tuna_models::config::ModelConfig;
use tuna_models::hf::HfCheckpoint;
use tuna_models::params::Loader;
use tuna_models::tokenizer::Tokenizer;

#[test]
fn minilm_cosine_matches_sentence_transformers() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.assets/all-MiniLM-L6-v2");
    if !dir.join("model.safetensors").is_file() {
        tuna_kernels::testing::note_skip(
            "real_minilm::minilm_cosine_matches_sentence_transformers",
            "asset absent (scripts/fetch-assets.sh)",
        );
        return;
    }
    let ck = HfCheckpoint::open(&dir).unwrap();
    let ModelConfig::Bert(cfg) = ck.config().clone() else { panic!("MiniLM is a BERT") };
    let dev = Arc::new(Cpu);
    let model = Bert::<Cpu, f32>::load(&cfg, &mut Loader::frozen(&ck, &dev)).unwrap();
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap().without_padding_and_truncation();
    let embed = |text: &str| -> Vec<f32> {
        let ids = tok.encode(text, true).unwrap();
        let n = ids.len();
        let ids = Ints::new(&dev, &[1, n], &ids).unwrap();
        let mask = Ints::new(&dev, &[1, n], &vec![1u8; n]).unwrap();
        no_grad(|| {
            let h = model.forward(&ids, &mask)?;
            model.mean_pooled(&h, &mask)
        })
        .unwrap()
        .to_vec()
        .unwrap()
    };
    let c = cosine(&embed("A man is eating food."), &embed("A man is eating a piece of bread."));
    println!("MiniLM cosine: {c:.4}");
    assert!((c - 0.7553).abs() < 1e-3, "cosine {c}");
}
