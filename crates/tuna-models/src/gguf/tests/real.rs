//! The real SmolLM2-135M-Instruct Q4_1 GGUF from `.assets/` (skipped, by name, when absent).

use super::*;
use std::collections::BTreeMap;

fn asset(test: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.assets/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        tuna_kernels::testing::note_skip(test, &format!("{} is absent (fetch it with the assets script)", p.display()));
        None
    }
}

#[test]
fn smollm2_config_and_one_tensor_of_each_type() {
    let Some(path) = asset("smollm2_config_and_one_tensor_of_each_type") else { return };
    let g = GgufFile::open(&path).unwrap();
    let c = g.llama_config().unwrap();
    assert_eq!((c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.kv_heads()), (30, 576, 9, 3));
    assert_eq!((c.intermediate_size, c.vocab_size, c.head_dim()), (1536, 49152, 64));
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 1e5);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-9, "{}", c.rms_norm_eps);

    // One tensor of each type present, dequantized: finite, not constant, of plausible size.
    let mut by_type: BTreeMap<String, &TensorInfo> = BTreeMap::new();
    for t in g.tensors() {
        by_type.entry(t.ty.name()).or_insert(t);
    }
    let types: Vec<&String> = by_type.keys().collect();
    assert!(types.contains(&&"Q4_1".to_string()) && types.contains(&&"F32".to_string()), "{types:?}");
    for (ty, t) in &by_type {
        let w = g.dequantize_tensor(&t.name).unwrap();
        assert_eq!(w.len(), t.numel());
        let mean = w.iter().map(|&v| v as f64).sum::<f64>() / w.len() as f64;
        let var = w.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / w.len() as f64;
        assert!(w.iter().all(|v| v.is_finite()), "{ty} `{}`", t.name);
        assert!(var > 0.0 && var.sqrt() < 100.0 && mean.abs() < 100.0, "{ty} `{}`: mean {mean} var {var}", t.name);
        println!("{ty}: `{}` {:?} mean {mean:.4} std {:.4}", t.name, t.shape(), var.sqrt());
    }

    // Under Hugging Face names, with the shapes the model asks for.
    assert!(g.get("lm_head.weight").is_none());
    assert_eq!(g.require("model.embed_tokens.weight", &[49152, 576]).unwrap().len(), 49152 * 576);
    let q = g.require("model.layers.0.self_attn.q_proj.weight", &[576, 576]).unwrap();
    let k = g.require("model.layers.29.self_attn.k_proj.weight", &[192, 576]).unwrap();
    assert!(q.iter().chain(k.iter()).all(|v| v.is_finite()));
    assert_eq!(g.require("model.norm.weight", &[576]).unwrap().len(), 576);
    assert_eq!(g.names().len(), 2 + 30 * 9);
}

/// Reference values from llama.cpp's own Python reader (gguf-py 0.17.1: `gguf.quants.dequantize`,
/// then for Q/K numpy's `reshape(heads, rows/heads/2, 2, cols).swapaxes(1, 2)`); tuna matched all
/// six tensors it was compared on bit for bit. Rows 1 and 33 of Q move under the un-permutation.
#[test]
fn smollm2_values_match_gguf_py() {
    let Some(path) = asset("smollm2_values_match_gguf_py") else { return };
    let g = GgufFile::open(&path).unwrap();
    let cases: [(&str, usize, usize, [f64; 4], f64); 5] = [
        (
            "model.layers.3.self_attn.q_proj.weight",
            576,
            1,
            [-0.011138916015625, -0.1654052734375, -0.1654052734375, 0.091705322265625],
            -96.36239624023438,
        ),
        (
            "model.layers.3.self_attn.q_proj.weight",
            576,
            33,
            [-0.054656982421875, 0.224945068359375, 0.08514404296875, -0.10125732421875],
            -96.36239624023438,
        ),
        (
            "model.layers.3.self_attn.k_proj.weight",
            576,
            100,
            [0.317626953125, 0.4173583984375, -0.3804931640625, 0.317626953125],
            -52.82200622558594,
        ),
        (
            "model.embed_tokens.weight",
            576,
            100,
            [0.019052505493164062, -0.08437538146972656, -0.1660289764404297, -0.10070610046386719],
            -15353.04449415207,
        ),
        (
            "model.layers.0.mlp.down_proj.weight",
            1536,
            5,
            [-0.198577880859375, -0.127227783203125, -0.055877685546875, -0.055877685546875],
            150.63577270507812,
        ),
    ];
    for (name, cols, row, first, sum) in cases {
        let w = g.get(name).unwrap().unwrap();
        // The references are exact f32 values written out in full, so compare exactly in f64.
        let got: Vec<f64> = w[row * cols..row * cols + 4].iter().map(|&v| v as f64).collect();
        assert_eq!(got, first, "{name} row {row}");
        let s: f64 = w.iter().map(|&v| v as f64).sum();
        assert!((s - sum).abs() < 1e-6 * sum.abs().max(1.0), "{name}: sum {s} vs {sum}");
    }
}

#[test]
fn smollm2_tokenizer() {
    let Some(path) = asset("smollm2_tokenizer") else { return };
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.tokenizer_model(), Some("gpt2"));
    let toks = g.tokens().unwrap();
    assert_eq!(toks.len(), 49152);
    assert_eq!(&toks[..3], ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]);
    println!(
        "pre {:?} bos {:?} eos {:?} pad {:?} merges {}",
        g.tokenizer_pre(),
        g.bos_token_id(),
        g.eos_token_id(),
        g.padding_token_id(),
        g.merges().unwrap().len()
    );
    let tok = g.build_tokenizer().unwrap();
    let text = "<|im_start|>user\nWhat is 2+2? Héllo, wörld!<|im_end|>";
    let enc = tok.encode(text, false).unwrap();
    assert_eq!(enc.get_ids()[0], 1, "special token kept whole");
    assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
    assert_eq!(tok.get_vocab_size(true), 49152);
}
