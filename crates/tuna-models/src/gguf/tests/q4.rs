//! `--base-precision q4`: a GGUF's Q4_0 / Q4_1 block weights kept as their blocks. The model it
//! loads computes with exactly the weights dequant-at-load gives (Q/K un-permuted alike) on the
//! widen path, within int8's requantization and activation rounding on a dot path, holds
//! 18 or 20 bytes per 32 of them, and a file with no Q4 block weight is refused by name. A tiny
//! synthetic Llama (always), and the real SmolLM2 Q4_1 file (skipped by name when absent).

use super::llama::*;
use super::*;
use crate::model::{AnyModel, BasePrecision, Net};
use std::sync::Arc;
use tuna_autograd::Ints;
use tuna_kernels::rng::SplitMix64;
use tuna_kernels::Cpu;

type Model = AnyModel<Cpu, f32>;

/// `rows` x `cols` of random ggml `ty` (2: Q4_0, 3: Q4_1) blocks, rows of `cols / 32` blocks.
fn q4_bytes(rng: &mut SplitMix64, ty: u32, rows: usize, cols: usize) -> Vec<u8> {
    let mut b = Vec::new();
    for _ in 0..rows * cols / QK {
        b.extend(f16_bytes(rng.next_f64() as f32 * 0.05 + 0.01));
        if ty == 3 {
            b.extend(f16_bytes(-(rng.next_f64() as f32) * 0.3));
        }
        b.extend((0..QK / 2).map(|_| (rng.next_f64() * 256.0) as u8));
    }
    b
}

/// The synthetic Llama with every block linear in `ty` blocks but layer 1's `ffn_down`, which
/// stays F32 (a block weight stored otherwise: it loads as f32 under q4).
fn q4_llama(ty: u32) -> Writer {
    let kv = KV_HEADS * HEAD_DIM;
    let mut w = llama_writer(
        &[ramp(HIDDEN * HIDDEN, 20), ramp(HIDDEN * HIDDEN, 21)],
        &[ramp(kv * HIDDEN, 30), ramp(kv * HIDDEN, 31)],
    );
    let mut rng = SplitMix64::new(ty as u64);
    let linears = [
        ("attn_q", HIDDEN, HIDDEN),
        ("attn_k", kv, HIDDEN),
        ("attn_v", kv, HIDDEN),
        ("attn_output", HIDDEN, HIDDEN),
        ("ffn_gate", FFN, HIDDEN),
        ("ffn_up", FFN, HIDDEN),
        ("ffn_down", HIDDEN, FFN),
    ];
    for l in 0..LAYERS {
        for (part, rows, cols) in linears {
            if l == 1 && part == "ffn_down" {
                continue;
            }
            let name = format!("blk.{l}.{part}.weight");
            w.tensors.retain(|t| t.name != name);
            w.tensor(&name, &[cols as u64, rows as u64], ty, q4_bytes(&mut rng, ty, rows, cols));
        }
    }
    w
}

fn open(path: &Path, base: BasePrecision) -> crate::error::Result<Model> {
    AnyModel::open_with(&Arc::new(Cpu), path, |_| false, base)
}

/// Logits `[1, ids.len(), vocab]` of a forward from position 0.
fn logits(m: &Model, ids: &[u32]) -> Vec<f32> {
    let Net::Llama(l) = &m.net else { panic!("not a llama") };
    let dev = Arc::new(Cpu);
    let t = ids.len();
    let pos: Vec<u32> = (0..t as u32).collect();
    let (ids, pos) = (Ints::new(&dev, &[1, t], ids).unwrap(), Ints::new(&dev, &[1, t], &pos).unwrap());
    l.forward(&ids, &pos, None, None).unwrap().to_vec().unwrap()
}

/// The q4 model against the f32 one of the same file: every packed weight is released in the
/// q4 model and widens to exactly the f32 model's weight; returns (packed bytes, those weights'
/// f32 bytes, how many were packed).
fn same_weights(q: &Model, f: &Model) -> (usize, usize, usize) {
    let f32_weights: std::collections::HashMap<String, tuna_autograd::Tensor<Cpu, f32>> =
        f.named_weights().into_iter().collect();
    let (mut packed, mut full, mut n) = (0, 0, 0);
    for (name, t) in q.named_weights() {
        let Some(pw) = q.packed_weight(&name) else {
            assert!(!t.is_released(), "{name}: released but not packed");
            continue;
        };
        assert!(t.is_released(), "{name}: a q4 weight kept f32 storage");
        assert_eq!(pw.precision(), BasePrecision::Q4, "{name}");
        let want = f32_weights[&name].to_vec().unwrap();
        assert!(pw.to_f32() == want, "{name}: the kept blocks are not the weight dequant-at-load gives");
        packed += pw.bytes();
        full += t.bytes();
        n += 1;
    }
    (packed, full, n)
}

/// The largest |f32 - q4| logit difference allowed, relative to the largest |logit|: `widened`
/// where the products widen the blocks to f32, `dot` where they take an int8 dot path
/// (`TUNA_CPU_MATRIX`, or the CPU's default).
fn q4_logit_bound(widened: f32, dot: f32) -> f32 {
    if tuna_kernels::ops::lowp::matrix_path().dot_isa().is_some() {
        dot
    } else {
        widened
    }
}

#[test]
fn q4_keeps_the_blocks_and_computes_what_dequant_at_load_does() {
    for (ty, block_bytes) in [(2u32, 18usize), (3, 20)] {
        let tmp = q4_llama(ty).temp(&format!("q4-llama-{ty}"));
        let (f, q) = (open(&tmp.0, BasePrecision::F32).unwrap(), open(&tmp.0, BasePrecision::Q4).unwrap());
        assert_eq!((f.base_precision(), q.base_precision()), (BasePrecision::F32, BasePrecision::Q4));
        let (packed, full, n) = same_weights(&q, &f);
        // 7 linears in 2 layers, less the F32 ffn_down of layer 1, which stays f32.
        assert_eq!(n, 13, "type {ty}");
        assert!(q.packed_weight("model.layers.1.mlp.down_proj.weight").is_none());
        assert!(q.packed_weight("model.layers.0.mlp.down_proj.weight").is_some());
        // block_bytes per 32 weights where f32 takes 128.
        assert_eq!(packed * 128, full * block_bytes, "type {ty}");
        // Nothing left to pack; the f32 ones are the layers the file did not hold in Q4.
        assert_eq!(q.packable_bytes(), HIDDEN * FFN * 4);
        // What the memory plan offers the f32 model: exactly the weights q4 holds as blocks.
        assert_eq!(f.q4_convertible_bytes(), (full, packed), "type {ty}");
        assert_eq!(q.q4_convertible_bytes(), (0, 0), "type {ty}: packed already");

        let ids = [1u32, 13, 14, 5, 8, 4, 9, 2];
        let (a, b) = (logits(&f, &ids), logits(&q, &ids));
        assert_eq!(a.len(), b.len());
        // Widened: the same f32 weights and activations, only the order of f32 sums may differ
        // (the packed product runs over blocks of rows). On an int8 dot path the blocks are
        // requantized to int8 and the activations quantized: the bound measured there, with room.
        let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
        let (bound, worst) =
            (q4_logit_bound(1e-5, 1e-3), a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max));
        println!("type {ty}: max |f32 - q4| logit {worst:e} (max |logit| {scale}; bound {bound} of it)");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= bound * scale, "type {ty} logit {i}: f32 {x} vs q4 {y}");
        }
        assert!(a.iter().any(|v| *v != a[0]), "degenerate logits");
    }
}

#[test]
fn q4_is_refused_where_no_block_weight_is_q4() {
    // Every tensor F32: refused before anything loads, naming the file.
    let tmp = q4_llama(2).temp("q4-none");
    let all_f32 = {
        let kv = KV_HEADS * HEAD_DIM;
        llama_writer(
            &[ramp(HIDDEN * HIDDEN, 0), ramp(HIDDEN * HIDDEN, 1)],
            &[ramp(kv * HIDDEN, 2), ramp(kv * HIDDEN, 3)],
        )
        .temp("q4-all-f32")
    };
    let e = open(&all_f32.0, BasePrecision::Q4).err().expect("refused").to_string();
    assert!(e.contains("q4-all-f32") && e.contains("Q4_0 or Q4_1") && e.contains("bf16 and int8"), "{e}");
    // Full fine-tuning trains every block weight: the general refusal.
    let e = AnyModel::<Cpu, f32>::open_with(&Arc::new(Cpu), &tmp.0, |_| true, BasePrecision::Q4)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("full fine-tuning"), "{e}");
    // A loaded f32 model is not made q4 afterwards.
    let mut f = open(&tmp.0, BasePrecision::F32).unwrap();
    let e = f.set_base_precision(BasePrecision::Q4).unwrap_err().to_string();
    assert!(e.contains("as the model loads"), "{e}");
    assert_eq!(f.base_precision(), BasePrecision::F32);
}

/// The real SmolLM2-135M-Instruct Q4_1 file: q4's logits are dequant-at-load's, and the packed
/// block weights take 20 bytes per 32 weights (5/32 of f32's).
#[test]
fn smollm2_q4_matches_dequant_at_load() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.assets/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !p.exists() {
        tuna_kernels::testing::note_skip("smollm2_q4_matches_dequant_at_load", &format!("{} is absent", p.display()));
        return;
    }
    let (f, q) = (open(&p, BasePrecision::F32).unwrap(), open(&p, BasePrecision::Q4).unwrap());
    let (packed, full, n) = same_weights(&q, &f);
    let rest = q.packable_bytes();
    println!(
        "SmolLM2 Q4_1 with --base-precision q4: {n} block weights packed, {packed} bytes ({:.1} MiB) where f32 \
         takes {full} ({:.1} MiB): {:.4} of f32; block weights left f32: {rest} bytes",
        packed as f64 / (1 << 20) as f64,
        full as f64 / (1 << 20) as f64,
        packed as f64 / full as f64
    );
    assert!(n > 0);
    // Q4_1 throughout the blocks: exactly 20 / 128 = 5 / 32.
    assert_eq!(packed * 32, full * 5);
    assert_eq!(f.q4_convertible_bytes(), (full, packed));
    let ids = q.encode_plain("<|im_start|>user\nWhat is the capital of France?<|im_end|>").unwrap();
    let (a, b) = (logits(&f, &ids), logits(&q, &ids));
    let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    // The dot path, measured on the portable twin (2026-12-07): 1.37 / 33.3 = 0.041 of the largest
    // logit over 540,672 logits (30 layers of quantized activations); the tiny file's 1.3e-5.
    let bound = q4_logit_bound(1e-4, 0.08);
    println!("{} logits, max |f32 - q4| {worst:e} (max |logit| {scale}; bound {bound} of it)", a.len());
    assert!(worst <= bound * scale, "max |f32 - q4| logit {worst} (max |logit| {scale})");
}
