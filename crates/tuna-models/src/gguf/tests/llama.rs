//! Llama GGUF: Hugging Face names, config from metadata, Q/K un-permutation, tokenizer.

use super::*;

pub(super) const HIDDEN: usize = 32;
pub(super) const HEADS: usize = 4;
pub(super) const KV_HEADS: usize = 2;
pub(super) const HEAD_DIM: usize = HIDDEN / HEADS;
pub(super) const FFN: usize = 64;
pub(super) const LAYERS: usize = 2;

pub(super) fn tokens() -> Vec<&'static str> {
    vec![
        "<|endoftext|>",
        "<|im_start|>",
        "h",
        "e",
        "l",
        "o",
        "Ġ",
        "w",
        "r",
        "d",
        "he",
        "ll",
        "hell",
        "hello",
        "Ġw",
        "1",
        "11",
    ]
}

/// Distinct values, so any misplaced row shows.
pub(super) fn ramp(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| (i * 7 + seed * 1000) as f32 * 0.001).collect()
}

/// llama.cpp's converter, as its numpy reads: `w.reshape(heads, 2, rows/heads/2, cols)
/// .swapaxes(1, 2).reshape(rows, cols)`: (h, j, i) -> stored (h, i, j).
pub(super) fn llama_cpp_permute<T: Copy + Default>(w: &[T], rows: usize, cols: usize, heads: usize) -> Vec<T> {
    let half = rows / heads / 2;
    let mut out = vec![T::default(); w.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let src = (h * 2 * half + j * half + i) * cols;
                let dst = (h * 2 * half + i * 2 + j) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

pub(super) fn llama_writer(hf_q: &[Vec<f32>], hf_k: &[Vec<f32>]) -> Writer {
    let mut w = Writer::new();
    w.kv("general.architecture", s("llama"))
        .kv("llama.embedding_length", MetaValue::U32(HIDDEN as u32))
        .kv("llama.block_count", MetaValue::U32(LAYERS as u32))
        .kv("llama.feed_forward_length", MetaValue::U32(FFN as u32))
        .kv("llama.attention.head_count", MetaValue::U32(HEADS as u32))
        .kv("llama.attention.head_count_kv", MetaValue::U32(KV_HEADS as u32))
        .kv("llama.rope.freq_base", MetaValue::F32(100000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-5))
        .kv("llama.context_length", MetaValue::U32(8192))
        .kv("tokenizer.ggml.model", s("gpt2"))
        .kv("tokenizer.ggml.pre", s("smollm"))
        .kv("tokenizer.ggml.tokens", strs(&tokens()))
        .kv("tokenizer.ggml.merges", strs(&["h e", "l l", "he ll", "hell o", "Ġ w", "1 1"]))
        .kv("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
        .kv("tokenizer.ggml.eos_token_id", MetaValue::U32(0))
        .kv(
            "tokenizer.ggml.token_type",
            MetaValue::Array([3, 3].into_iter().chain([1; 15]).map(MetaValue::I32).collect()),
        );
    let vocab = tokens().len();
    w.f32("token_embd.weight", &[vocab, HIDDEN], &ramp(vocab * HIDDEN, 1));
    for l in 0..LAYERS {
        let kv = KV_HEADS * HEAD_DIM;
        w.f32(
            &format!("blk.{l}.attn_q.weight"),
            &[HIDDEN, HIDDEN],
            &llama_cpp_permute(&hf_q[l], HIDDEN, HIDDEN, HEADS),
        );
        w.f32(&format!("blk.{l}.attn_k.weight"), &[kv, HIDDEN], &llama_cpp_permute(&hf_k[l], kv, HIDDEN, KV_HEADS));
        w.f32(&format!("blk.{l}.attn_v.weight"), &[kv, HIDDEN], &ramp(kv * HIDDEN, 4));
        w.f32(&format!("blk.{l}.attn_output.weight"), &[HIDDEN, HIDDEN], &ramp(HIDDEN * HIDDEN, 5));
        w.f32(&format!("blk.{l}.ffn_gate.weight"), &[FFN, HIDDEN], &ramp(FFN * HIDDEN, 6));
        w.f32(&format!("blk.{l}.ffn_up.weight"), &[FFN, HIDDEN], &ramp(FFN * HIDDEN, 7));
        w.f32(&format!("blk.{l}.ffn_down.weight"), &[HIDDEN, FFN], &ramp(FFN * HIDDEN, 8));
        w.f32(&format!("blk.{l}.attn_norm.weight"), &[HIDDEN], &ramp(HIDDEN, 9));
        w.f32(&format!("blk.{l}.ffn_norm.weight"), &[HIDDEN], &ramp(HIDDEN, 10));
    }
    w.f32("output_norm.weight", &[HIDDEN], &ramp(HIDDEN, 11));
    w
}

#[test]
fn llama_names_config_and_qk_unpermutation() {
    let hf_q: Vec<Vec<f32>> = (0..LAYERS).map(|l| ramp(HIDDEN * HIDDEN, 20 + l)).collect();
    let hf_k: Vec<Vec<f32>> = (0..LAYERS).map(|l| ramp(KV_HEADS * HEAD_DIM * HIDDEN, 30 + l)).collect();
    let w = llama_writer(&hf_q, &hf_k);
    let tmp = w.temp("llama");
    let g = GgufFile::open(&tmp.0).unwrap();

    let c = g.llama_config().unwrap();
    assert_eq!((c.hidden_size, c.num_hidden_layers, c.intermediate_size), (HIDDEN, LAYERS, FFN));
    assert_eq!((c.num_attention_heads, c.kv_heads(), c.head_dim()), (HEADS, KV_HEADS, HEAD_DIM));
    assert_eq!((c.vocab_size, c.max_position_embeddings, c.head_dim), (tokens().len(), 8192, None));
    assert_eq!(c.rope_theta, 1e5);
    assert_eq!(c.rms_norm_eps, 1e-5f32 as f64);
    assert!(c.tie_word_embeddings);

    let kv = KV_HEADS * HEAD_DIM;
    let mut expected = vec![
        ("model.embed_tokens.weight".to_string(), vec![tokens().len(), HIDDEN]),
        ("model.norm.weight".into(), vec![HIDDEN]),
    ];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        expected.extend([
            (format!("{p}.self_attn.q_proj.weight"), vec![HIDDEN, HIDDEN]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, HIDDEN]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, HIDDEN]),
            (format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, HIDDEN]),
            (format!("{p}.mlp.gate_proj.weight"), vec![FFN, HIDDEN]),
            (format!("{p}.mlp.up_proj.weight"), vec![FFN, HIDDEN]),
            (format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, FFN]),
            (format!("{p}.input_layernorm.weight"), vec![HIDDEN]),
            (format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]),
        ]);
    }
    let mut names = g.names();
    names.sort();
    let mut want: Vec<String> = expected.iter().map(|(n, _)| n.clone()).collect();
    want.sort();
    assert_eq!(names, want, "exactly the Hugging Face names, no lm_head when tied");
    for (n, shape) in &expected {
        assert_eq!(g.require(n, shape).unwrap().len(), shape.iter().product::<usize>(), "{n}");
    }
    assert!(g.get("lm_head.weight").is_none() && g.get("blk.0.attn_q.weight").is_none());

    for l in 0..LAYERS {
        // Loading gives back exactly the Hugging Face matrix the converter permuted.
        let q = g.get(&format!("model.layers.{l}.self_attn.q_proj.weight")).unwrap().unwrap();
        assert_eq!(&*q, &hf_q[l][..], "q layer {l}");
        let k = g.get(&format!("model.layers.{l}.self_attn.k_proj.weight")).unwrap().unwrap();
        assert_eq!(&*k, &hf_k[l][..], "k layer {l}");
        // And against the direct index formula: HF row h*hd + j*half + i is stored row h*hd + 2i + j.
        let stored = g.dequantize_tensor(&format!("blk.{l}.attn_k.weight")).unwrap();
        let half = HEAD_DIM / 2;
        for r in 0..kv {
            let (h, within) = (r / HEAD_DIM, r % HEAD_DIM);
            let (j, i) = (within / half, within % half);
            let src = h * HEAD_DIM + 2 * i + j;
            assert_eq!(k[r * HIDDEN..(r + 1) * HIDDEN], stored[src * HIDDEN..(src + 1) * HIDDEN], "k row {r}");
        }
        assert_ne!(&*stored, &hf_k[l][..], "the file really is permuted");
    }
    // V and O are not permuted.
    assert_eq!(&*g.get("model.layers.0.self_attn.v_proj.weight").unwrap().unwrap(), &ramp(kv * HIDDEN, 4)[..]);
}

#[test]
fn unpermutes_quantized_q_over_query_heads() {
    // A Q8_0 attn_q (rows of 32): un-permutation happens after dequantization, row by row.
    let rows = HIDDEN;
    let blocks: Vec<Vec<u8>> = (0..rows).map(|r| q8_0_block(1.0, &[r as i8; 32])).collect();
    let mut w = llama_writer(&[ramp(HIDDEN * HIDDEN, 0), ramp(HIDDEN * HIDDEN, 0)], &[ramp(512, 0), ramp(512, 0)]);
    w.tensors.retain(|t| t.name != "blk.1.attn_q.weight");
    w.tensor("blk.1.attn_q.weight", &[HIDDEN as u64, rows as u64], 8, blocks.concat());
    w.f32("output.weight", &[tokens().len(), HIDDEN], &ramp(tokens().len() * HIDDEN, 3));
    let tmp = w.temp("llama-q8");
    let g = GgufFile::open(&tmp.0).unwrap();
    assert!(!g.llama_config().unwrap().tie_word_embeddings);
    assert_eq!(g.shape("lm_head.weight"), Some(vec![tokens().len(), HIDDEN]));
    let q = g.get("model.layers.1.self_attn.q_proj.weight").unwrap().unwrap();
    let half = HEAD_DIM / 2;
    for r in 0..rows {
        let (h, within) = (r / HEAD_DIM, r % HEAD_DIM);
        let stored_row = h * HEAD_DIM + 2 * (within % half) + within / half;
        assert!(q[r * HIDDEN..(r + 1) * HIDDEN].iter().all(|&v| v == stored_row as f32), "row {r}");
    }
    assert_eq!(unpermute_rows(&[0.0; 6], 3, 2, 1).unwrap_err(), "cannot un-permute 3x2 (len 6) over 1 heads");
}

#[test]
fn config_rejects_other_architectures_and_missing_fields() {
    let mut w = Writer::new();
    w.kv("general.architecture", s("gpt2")).f32("token_embd.weight", &[2, 2], &[0.0; 4]);
    let tmp = w.temp("arch-gpt2");
    let g = GgufFile::open(&tmp.0).unwrap();
    let e = g.llama_config().unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }) && e.to_string().contains("gpt2"), "{e}");
    assert!(e.to_string().contains("arch-gpt2"));
    assert_eq!(g.names(), ["token_embd.weight"], "non-llama files keep their own names");

    let mut w = llama_writer(&[ramp(1024, 0), ramp(1024, 0)], &[ramp(512, 0), ramp(512, 0)]);
    w.kvs.retain(|(k, _)| k != "llama.block_count");
    let tmp = w.temp("llama-missing");
    let e = GgufFile::open(&tmp.0).unwrap().llama_config().unwrap_err().to_string();
    assert!(e.contains("llama.block_count") && e.contains("llama-missing"), "{e}");
}

#[test]
fn tokenizer_metadata_and_byte_level_bpe() {
    let tmp = llama_writer(&[ramp(1024, 0), ramp(1024, 0)], &[ramp(512, 0), ramp(512, 0)]).temp("tok");
    let g = GgufFile::open(&tmp.0).unwrap();
    assert_eq!((g.tokenizer_model(), g.tokenizer_pre()), (Some("gpt2"), Some("smollm")));
    assert_eq!(g.tokens().unwrap(), tokens());
    assert_eq!(g.merges().unwrap().len(), 6);
    assert_eq!((g.bos_token_id(), g.eos_token_id(), g.padding_token_id()), (Some(1), Some(0), None));
    assert_eq!(g.token_types().unwrap().unwrap()[..3], [3, 3, 1]);

    let tok = g.build_tokenizer().unwrap();
    let ids = |text: &str| tok.encode(text, false).unwrap().get_ids().to_vec();
    assert_eq!(ids("hello"), [13]);
    assert_eq!(ids("<|im_start|>hello world"), [1, 13, 14, 5, 8, 4, 9]);
    assert_eq!(ids("11"), [15, 15], "digits split one by one for the smollm pre-tokenizer");
    assert_eq!(tok.encode("11", false).unwrap().get_tokens(), ["1", "1"]);
    assert_eq!(tok.decode(&[1, 13, 14, 5, 8, 4, 9], false).unwrap(), "<|im_start|>hello world");
    assert_eq!(tok.decode(&[1, 13], true).unwrap(), "hello");
}

/// Load the synthetic llama GGUF as a model; the error's text if any.
fn load_llama(w: &Writer, tag: &str) -> Result<(), String> {
    let tmp = w.temp(tag);
    let g = GgufFile::open(&tmp.0).map_err(|e| e.to_string())?;
    let cfg = g.llama_config().map_err(|e| e.to_string())?;
    let dev = std::sync::Arc::new(tuna_kernels::Cpu);
    let model = crate::llama::Llama::<tuna_kernels::Cpu, f32>::load(&cfg, &mut crate::params::Loader::frozen(&g, &dev));
    model.map(drop).map_err(|e| e.to_string())
}

#[test]
fn tensors_the_model_does_not_use_are_an_error_naming_them() {
    let layer = |l| ramp(HIDDEN * HIDDEN, l);
    let kv = || ramp(KV_HEADS * HEAD_DIM * HIDDEN, 0);
    let make = || llama_writer(&[layer(0), layer(1)], &[kv(), kv()]);
    load_llama(&make(), "llama-all-used").unwrap();
    // One block less in the metadata than in the tensors: the second block's nine are unused.
    let mut fewer = make();
    fewer.kvs.retain(|(k, _)| k != "llama.block_count");
    fewer.kv("llama.block_count", MetaValue::U32(1));
    let e = load_llama(&fewer, "llama-one-block").unwrap_err();
    assert!(e.contains("llama-one-block") && e.contains("tensors the model does not use: `model.layers.1."), "{e}");
    assert!(e.contains(" and 4 more (9 in all)"), "{e}");
    // A bias the architecture has no place for (under its Hugging Face name), and RoPE scaling
    // factors tuna does not apply: refused, not ignored.
    let mut extra = make();
    extra.f32("blk.0.attn_q.bias", &[HIDDEN], &ramp(HIDDEN, 2));
    extra.f32("rope_freqs.weight", &[HEAD_DIM / 2], &ramp(HEAD_DIM / 2, 3));
    let e = load_llama(&extra, "llama-extra").unwrap_err();
    assert!(
        e.contains(
            "tensors the model does not use: `model.layers.0.self_attn.q_proj.bias`, `rope_freqs.weight` (2 in all)"
        ),
        "{e}"
    );
}
