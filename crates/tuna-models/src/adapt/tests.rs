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
