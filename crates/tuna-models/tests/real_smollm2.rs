//! SmolLM2-135M-Instruct from its Q4_1 GGUF (`scripts/fetch-assets.sh`), greedy, answers the
//! capital of France with Paris. Skips by name when the asset is absent.

use std::path::PathBuf;
use std::sync::Arc;
use tuna_kernels::Cpu;
use tuna_models::generate::{generate, Sampling};
use tuna_models::gguf::GgufFile;
use tuna_models::llama::Llama;
use tuna_models::params::Loader;

#[test]
fn smollm2_gguf_answers_paris() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.assets/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        tuna_kernels::testing::note_skip(
            "real_smollm2::smollm2_gguf_answers_paris",
            "asset absent (scripts/fetch-assets.sh)",
        );
        return;
    }
    let gguf = GgufFile::open(&path).unwrap();
    let cfg = gguf.llama_config().unwrap();
    let tok = gguf.build_tokenizer().unwrap();
    let dev = Arc::new(Cpu);
    let model = Llama::<Cpu, f32>::load(&cfg, &mut Loader::frozen(&gguf, &dev)).unwrap();
    let prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let ids = tok.encode(prompt, false).unwrap().get_ids().to_vec();
    let eos = tok.token_to_id("<|im_end|>");
    let out = generate(&model, &ids, 24, &Sampling::Greedy, eos).unwrap();
    let text = tok.decode(&out, true).unwrap();
    println!("SmolLM2 answered: {text:?}");
    assert!(text.contains("Paris"), "answer without Paris: {text:?}");
}
