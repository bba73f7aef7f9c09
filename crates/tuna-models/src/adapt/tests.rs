//! Unit tests of the adaptation module's plain functions (the methods' behaviour on real models is
//! tested in `tests/adapt.rs` and against PEFT in `tests/peft_parity.rs`).

use super::*;

#[test]
fn methods_name_themselves_and_count_their_virtual_tokens() {
    let lora = Method::Lora(LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: vec![] });
    let cases = [
        (Method::Full { patterns: vec![] }, "full", 0),
        (Method::Prompt { n: 7, init: PromptInit::Random }, "prompt", 7),
        (Method::Prefix { n: 5, projection: None, init: PromptInit::Random }, "prefix", 5),
        (Method::Prefix { n: 3, projection: Some(16), init: PromptInit::Random }, "prefix-mlp", 3),
        (Method::PTuningV2 { n: 2, init: PromptInit::Random }, "ptuning-v2", 2),
        (Method::PTuning { n: 4, encoder: EncoderKind::Lstm, hidden: None }, "ptuning", 4),
        (Method::Houlsby { bottleneck: 8 }, "houlsby", 0),
        (lora, "lora", 0),
    ];
    for (m, name, n) in cases {
        assert_eq!((m.name(), m.virtual_tokens()), (name, n), "{m:?}");
    }
}

/// P-tuning's encoders have PEFT 0.21.2's parameters: counts of torch's `PromptEncoder`
/// (token_dim, encoder_hidden_size, virtual tokens) measured in the golden venv, and its tensor count.
#[test]
fn ptuning_encoders_have_pefts_sizes() {
    let dev = std::sync::Arc::new(tuna_kernels::Cpu);
    let cases = [
        (32, 8, 3, EncoderKind::Mlp, 720, 7),
        (32, 8, 3, EncoderKind::Lstm, 5264, 21),
        (48, 20, 5, EncoderKind::Mlp, 2648, 7),
        (48, 20, 5, EncoderKind::Lstm, 24968, 21),
    ];
    for (d, h, n, kind, count, tensors) in cases {
        let e = PromptEncoder::<tuna_kernels::Cpu, f32>::new(&dev, kind, n, d, h, 1).unwrap();
        let p = e.params();
        let got: usize = p.iter().map(|(_, t)| t.numel()).sum();
        assert_eq!((got, p.len()), (count, tensors), "{kind:?} d {d} h {h} n {n}");
        assert_eq!(e.forward().unwrap().shape(), [n, d], "{kind:?}: the prompt is [n, token_dim]");
    }
    let e = PromptEncoder::<tuna_kernels::Cpu, f32>::new(&dev, EncoderKind::Mlp, 3, 32, 0, 1).err().unwrap();
    assert!(e.to_string().contains("encoder hidden size of at least 1"), "{e}");
}
