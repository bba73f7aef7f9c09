//! A model with a PEFT adapter through the models crate alone: the tiny Llama test fixture (a
//! Hugging Face folder: config.json, model.safetensors, tokenizer.json) opened through the one
//! model interface, then a LoRA adapter PEFT saved for it (adapter_config.json +
//! adapter_model.safetensors) installed, and a few tokens generated greedily through the KV cache,
//! before and after.
//!
//! Run: `cargo run --example peft_generate` (the fixtures are found from this package's folder).

use std::path::PathBuf;
use std::sync::Arc;
use tuna_kernels::Cpu;
use tuna_models::generate::Sampling;
use tuna_models::model::AnyModel;

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crates/tuna-models/tests/fixtures");
    let mut model = AnyModel::<Cpu, f32>::open(&Arc::new(Cpu), &fixtures.join("llama"), |_| false)?;

    let prompt = model.encode("The cat sat on the mat.")?;
    let base = model.generate(&prompt, 8, &Sampling::Greedy)?;
    model.load_adapter(&fixtures.join("peft/llama_lora"))?; // LoRA on q_proj, v_proj, down_proj
    let tuned = model.generate(&prompt, 8, &Sampling::Greedy)?;
    assert!(base.len() <= 8 && tuned.len() <= 8);

    println!("prompt ids:        {prompt:?}");
    println!("base model:        {base:?} {:?}", model.tokenizer.decode(&base, true)?);
    println!("with llama_lora:   {tuned:?} {:?}", model.tokenizer.decode(&tuned, true)?);
    Ok(())
}
