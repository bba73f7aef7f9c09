//! A mixed-adapter batch on SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to f32, CPU): rows
//! routed to the base, two soft prompts, a prefix, a prefix MLP, P-tuning v2, two LoRAs and a
//! Houlsby adapter each equal the row alone (logits at every position, greedy tokens). Skips by
//! name when the asset is absent.

mod golden_common;
mod mixed_common;

use std::path::PathBuf;
use std::sync::Arc;
use tuna_kernels::testing::Tol;
use tuna_kernels::Cpu;

/// f32 on a 30-layer model: the mixed batch's matmuls over other row counts and its attention
/// over more (masked) keys round differently from the row alone.
const SAME_F32: Tol = Tol::new("SmolLM2 mixed batch vs each row alone (f32)", 2e-3, 2e-3);

#[test]
fn smollm2_mixed_batch_equals_each_row_alone() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.assets/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        tuna_kernels::testing::note_skip(
            "mixed_smollm2::smollm2_mixed_batch_equals_each_row_alone",
            "asset absent (scripts/fetch-assets.sh)",
        );
        return;
    }
    mixed_common::check_mixed::<Cpu, f32>(&Arc::new(Cpu), &path, "llama", SAME_F32, 3, "smollm2");
}
