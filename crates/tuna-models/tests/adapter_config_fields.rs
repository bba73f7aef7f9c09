//! Every field of `adapter_config.json` is honored or refused by name: adapter folders built in a
//! temporary folder from the PEFT fixtures (and from adapters tuna saves) with one field changed
//! load, or fail with an error naming the file, the field and its value. Also the LoRA
//! `target_modules` that contradict the tensors, integers out of their domain, and NaN or
//! infinite adapter tensors.

mod adapt_common;
mod golden_common;

use adapt_common::{frozen, Model, Net};
use golden_common::fixture;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use tuna_models::adapt::{peft, Adaptable, LoraConfig, Method};
use tuna_models::io;

/// An adapter folder in the temporary directory, removed when dropped.
struct Folder(PathBuf);

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh folder (unique across the tests running in parallel).
fn temp_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let k = NEXT.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("tuna-adapter-fields-{}-{k}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of the PEFT fixture `case` (its config and tensors).
fn copy(case: &str, tag: &str) -> Folder {
    let d = temp_dir(tag);
    for f in [peft::CONFIG, peft::WEIGHTS] {
        std::fs::copy(fixture("peft").join(case).join(f), d.join(f)).unwrap();
    }
    Folder(d)
}

/// An adapter tuna saves for `method` on the fixture model `arch`.
fn saved(arch: &str, method: Method, tag: &str) -> Folder {
    let d = temp_dir(tag);
    let mut m = frozen::<f32>(arch);
    m.install(&method, 7, None).and_then(|_| m.save_adapter(&d, arch)).unwrap();
    Folder(d)
}

impl Folder {
    fn config(&self) -> Map<String, Value> {
        let text = std::fs::read_to_string(self.0.join(peft::CONFIG)).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn write_config(&self, c: &Map<String, Value>) {
        std::fs::write(self.0.join(peft::CONFIG), serde_json::to_string_pretty(c).unwrap()).unwrap();
    }

    /// The folder with config field `key` set to `v`.
    fn set(self, key: &str, v: Value) -> Self {
        let mut c = self.config();
        c.insert(key.into(), v);
        self.write_config(&c);
        self
    }

    fn remove(self, key: &str) -> Self {
        let mut c = self.config();
        c.remove(key);
        self.write_config(&c);
        self
    }

    /// The folder with `file`'s tensor `name` changed by `f` (added when absent).
    fn edit_tensor(self, file: &str, name: &str, f: impl Fn(&mut (Vec<usize>, Vec<f32>))) -> Self {
        let path = self.0.join(file);
        let mut t = if path.exists() { io::read_tensors(&path).unwrap() } else { Default::default() };
        f(t.entry(name.to_string()).or_insert_with(|| (vec![2], vec![0.0; 2])));
        let list: Vec<_> = t.into_iter().collect();
        std::fs::write(&path, io::safetensors_bytes(&list).unwrap()).unwrap();
        self
    }
}

/// The fixture model `arch` with the adapter in `dir`.
fn load(arch: &str, dir: &Path) -> Result<Model<f32>, String> {
    let mut m = frozen::<f32>(arch);
    m.load_adapter(dir).map_err(|e| e.to_string())?;
    Ok(m)
}

fn arch_of(case: &str) -> &str {
    case.split('_').next().unwrap()
}

/// The error loading fixture `case` with `key` set to `v`.
fn err_with(case: &str, key: &str, v: Value) -> String {
    let f = copy(case, &format!("{case}-{key}")).set(key, v.clone());
    match load(arch_of(case), &f.0) {
        Ok(_) => panic!("{case}: `{key}` {v} loaded"),
        Err(e) => e,
    }
}

/// `e` is an error about `adapter_config.json` that says `text`.
#[track_caller]
fn says(e: &str, text: &str) {
    assert!(e.contains(&format!("adapter_config.json: {text}")), "error {e:?} does not say {text:?}");
}

#[test]
fn lora_options_tuna_lacks_are_refused_by_name() {
    let cases: [(&str, Value, &str); 14] = [
        ("rank_pattern", json!({"q_proj": 4}), "per-module ranks"),
        ("alpha_pattern", json!({"q_proj": 16}), "per-module alphas"),
        ("layers_to_transform", json!([0]), "LoRA on some layers only"),
        ("layers_pattern", json!("layers"), "LoRA on some layers only"),
        ("layer_replication", json!([[0, 1]]), "layer replication"),
        ("modules_to_save", json!(["lm_head"]), "trained copies of base modules"),
        ("target_parameters", json!(["mlp.experts.down_proj"]), "LoRA on parameters"),
        ("trainable_token_indices", json!([0, 1]), "trainable token embeddings"),
        ("bias", json!("all"), "trained biases"),
        ("bias", json!("lora_only"), "trained biases"),
        ("lora_bias", json!(true), "a bias on lora_B"),
        ("use_dora", json!(true), "DoRA"),
        ("use_qalora", json!(true), "QA-LoRA"),
        ("use_bdlora", json!({"nblocks": 2}), "block-diagonal LoRA"),
    ];
    for (key, v, why) in cases {
        let e = err_with("llama_lora", key, v.clone());
        says(&e, &format!("`{key}` {v} is not supported by tuna ({why}"));
    }
    // The exact text, as the issue spells it.
    says(
        &err_with("llama_lora", "rank_pattern", json!({"q_proj": 4})),
        r#"`rank_pattern` {"q_proj":4} is not supported by tuna (per-module ranks)"#,
    );
}

#[test]
fn prompt_learning_options_tuna_lacks_are_refused_by_name() {
    says(
        &err_with("gpt2_prompt", "modules_to_save", json!(["score"])),
        r#"`modules_to_save` ["score"] is not supported by tuna"#,
    );
    says(
        &err_with("gpt2_prefix", "num_transformer_submodules", json!(2)),
        "`num_transformer_submodules` is 2: this gpt2 model takes 1 (2 is an encoder-decoder model)",
    );
}

#[test]
fn unknown_fields_are_refused_unless_they_hold_nothing() {
    let e = err_with("llama_lora", "use_hyper_lora", json!(true));
    says(&e, "`use_hyper_lora` true is not a LORA field tuna knows");
    let e = err_with("bert_prompt", "prompt_scale", json!(2.0));
    says(&e, "`prompt_scale` 2.0 is not a PROMPT_TUNING field tuna knows");
    // `init_lora_weights` is a LoRA field, not a prefix one.
    let e = err_with("llama_prefix", "init_lora_weights", json!("pissa"));
    says(&e, "`init_lora_weights` \"pissa\" is not a PREFIX_TUNING field tuna knows");
    // "none" is the default of some known fields, not nothing: an unknown field holding it is refused.
    says(&err_with("llama_lora", "newer_peft_mode", json!("none")), "`newer_peft_mode` \"none\" is not a LORA field");
    for (i, v) in [Value::Null, json!(false), json!({}), json!([]), json!("")].into_iter().enumerate() {
        let f = copy("llama_lora", &format!("unknown-noop-{i}")).set("newer_peft_option", v.clone());
        load("llama", &f.0).unwrap_or_else(|e| panic!("unknown field holding {v}: {e}"));
    }
}

#[test]
fn fields_that_do_not_affect_a_loaded_adapter_are_accepted() {
    let cases: [(&str, &str, Value); 12] = [
        ("llama_lora", "peft_version", json!("0.99.0")),
        ("llama_lora", "base_model_name_or_path", json!("someone/else")),
        ("llama_lora", "revision", json!("main")),
        ("llama_lora", "task_type", json!("SEQ_CLS")),
        ("llama_lora", "inference_mode", json!(false)),
        ("llama_lora", "init_lora_weights", json!("gaussian")),
        ("llama_lora", "init_lora_weights", json!(false)),
        ("llama_lora", "megatron_core", json!("other.core")),
        ("llama_lora", "qalora_group_size", json!(32)),
        ("gpt2_prompt", "prompt_tuning_init", json!("TEXT")),
        ("gpt2_prompt", "tokenizer_name_or_path", json!("gpt2")),
        ("gpt2_prefix_proj", "encoder_hidden_size", json!(999)),
    ];
    for (i, (case, key, v)) in cases.into_iter().enumerate() {
        let f = copy(case, &format!("ignored-{i}")).set(key, v.clone());
        load(arch_of(case), &f.0).unwrap_or_else(|e| panic!("{case}: `{key}` {v}: {e}"));
    }
}

#[test]
fn inits_that_change_the_base_weights_are_refused() {
    for init in ["pissa", "pissa_niter_4", "olora", "corda", "loftq"] {
        let e = err_with("llama_lora", "init_lora_weights", json!(init));
        says(&e, &format!("`init_lora_weights` \"{init}\" is not supported by tuna (it changes the base weights"));
    }
    says(
        &err_with("llama_lora", "init_lora_weights", json!("mystery")),
        "`init_lora_weights` \"mystery\" is not supported by tuna (an initialization tuna does not know",
    );
}

#[test]
fn integers_out_of_their_domain_say_so() {
    let cases: [(&str, &str, Value, &str); 11] = [
        ("llama_lora", "r", json!(-3), "`r` is -3: expected a positive integer"),
        ("llama_lora", "r", json!(0), "`r` is 0: expected a positive integer"),
        ("llama_lora", "r", json!(4.5), "`r` is 4.5: expected a positive integer"),
        ("llama_lora", "r", json!("4"), "`r` is \"4\": expected a positive integer"),
        ("gpt2_prompt", "num_virtual_tokens", json!(-1), "`num_virtual_tokens` is -1: expected a positive integer"),
        ("gpt2_prompt", "num_virtual_tokens", json!(0), "`num_virtual_tokens` is 0: expected a positive integer"),
        ("gpt2_prompt", "token_dim", json!(-32), "`token_dim` is -32: expected a positive integer"),
        ("llama_prefix", "num_layers", json!(-2), "`num_layers` is -2: expected a positive integer"),
        ("gpt2_prompt", "num_layers", json!(1.5), "`num_layers` is 1.5: expected a positive integer"),
        (
            "gpt2_prefix_proj",
            "encoder_hidden_size",
            json!(-16),
            "`encoder_hidden_size` is -16: expected a positive integer",
        ),
        ("llama_prefix", "num_virtual_tokens", json!(2.5), "`num_virtual_tokens` is 2.5: expected a positive integer"),
    ];
    for (case, key, v, text) in cases {
        says(&err_with(case, key, v), text);
    }
    // A field that is truly missing still says so.
    let f = copy("llama_lora", "no-r").remove("r");
    says(&load("llama", &f.0).err().unwrap(), "no `r`");
    let f = copy("gpt2_prompt", "no-n").remove("num_virtual_tokens");
    says(&load("gpt2", &f.0).err().unwrap(), "no `num_virtual_tokens`");
}

#[test]
fn other_values_of_the_wrong_kind_say_so() {
    says(&err_with("llama_lora", "lora_alpha", json!("8")), "`lora_alpha` is \"8\": expected a number");
    says(&err_with("llama_lora", "lora_dropout", json!(1.5)), "`lora_dropout` is 1.5: expected a probability");
    says(&err_with("llama_lora", "use_rslora", json!("yes")), "`use_rslora` is \"yes\": expected true or false");
    says(
        &err_with("llama_lora", "target_modules", json!(["q_proj", 3])),
        "`target_modules` is [\"q_proj\",3]: expected module names",
    );
}

#[test]
fn dimensions_that_disagree_with_the_model_name_the_field() {
    // Prefix tuning splits its table over `num_attention_heads` key/value heads (2 in the Llama).
    let e = err_with("llama_prefix", "num_attention_heads", json!(4));
    says(&e, "adapter made for a model with key/value heads (num_attention_heads) 4, but this model has 2");
}

#[test]
fn target_modules_that_leave_out_tensors_are_refused() {
    // gpt2_lora holds c_attn and c_fc tensors.
    let e = err_with("gpt2_lora", "target_modules", json!(["c_attn"]));
    says(
        &e,
        r#"`target_modules` ["c_attn"] does not name module `transformer.h.0.mlp.c_fc`, but adapter_model.safetensors holds its `base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight`"#,
    );
    let e = err_with("gpt2_lora", "exclude_modules", json!(["c_fc"]));
    says(&e, r#"`exclude_modules` ["c_fc"] excludes module `transformer.h.0.mlp.c_fc`"#);
    // A whole-name pattern (a regular expression without special characters) names one module.
    let e = err_with("gpt2_lora", "target_modules", json!("transformer.h.0.attn.c_attn"));
    says(&e, "`target_modules` \"transformer.h.0.attn.c_attn\" does not name module `transformer.h.0.mlp.c_fc`");
}

#[test]
fn target_modules_naming_modules_without_tensors_are_refused() {
    let e = err_with("gpt2_lora", "target_modules", json!(["c_attn", "c_fc", "c_proj"]));
    says(
        &e,
        r#"`target_modules` ["c_attn","c_fc","c_proj"] names module `transformer.h.0.attn.c_proj`, but adapter_model.safetensors has no `base_model.model.transformer.h.0.attn.c_proj.lora_A.weight`"#,
    );
    let e = err_with("llama_lora", "target_modules", json!("all-linear"));
    says(&e, "`target_modules` \"all-linear\" names module `model.layers.0.self_attn.k_proj`");
}

#[test]
fn absent_target_modules_mean_peft_default_list() {
    // PEFT falls back to its per-model list: Llama's is q_proj and v_proj, not down_proj.
    let f = copy("llama_lora", "no-targets").remove("target_modules");
    let e = load("llama", &f.0).err().unwrap();
    says(
        &e,
        r#"`target_modules` (absent: PEFT's default for llama, ["q_proj","v_proj"]) does not name module `model.layers.0.mlp.down_proj`"#,
    );
    // GPT-2's is c_attn: an adapter on exactly those loads.
    let method = Method::Lora(LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, targets: vec!["c_attn".into()] });
    let f = saved("gpt2", method, "default-targets").remove("target_modules");
    let m = load("gpt2", &f.0).unwrap();
    assert_eq!(m.adapt().lora_config.as_ref().unwrap().targets, ["c_attn"]);
    // BERT's is query and value: the bert_lora fixture's own list.
    let f = copy("bert_lora", "bert-default-targets").remove("target_modules");
    load("bert", &f.0).unwrap();
}

#[test]
fn regular_expressions_are_refused_by_name() {
    let e = err_with("llama_lora", "target_modules", json!(r".*\.(q_proj|v_proj|down_proj)"));
    says(&e, r#"`target_modules` ".*\\.(q_proj|v_proj|down_proj)" is not supported by tuna (a regular expression"#);
}

#[test]
fn all_linear_loads_when_every_linear_has_its_tensors() {
    let all = ["c_attn", "c_proj", "c_fc"].map(String::from).to_vec();
    let method = Method::Lora(LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, targets: all });
    let f = saved("gpt2", method, "all-linear").set("target_modules", json!("all-linear"));
    let m = load("gpt2", &f.0).unwrap();
    let Net::Gpt2(g) = &m.net else { unreachable!() };
    let cfg = g.adapt().lora_config.clone().unwrap();
    // Saved again, the targets are the modules by name (a list means the same to PEFT).
    assert_eq!(cfg.targets.len(), 8, "{:?}", cfg.targets);
    assert!(cfg.targets.contains(&"transformer.h.1.mlp.c_proj".to_string()));
    // Excluding one module with its tensors present contradicts them.
    let f = f.set("exclude_modules", json!(["transformer.h.1.mlp.c_proj"]));
    says(&load("gpt2", &f.0).err().unwrap(), "`exclude_modules` [\"transformer.h.1.mlp.c_proj\"] excludes module");
}

#[test]
fn fan_in_fan_out_must_match_the_layer_kind() {
    let e = err_with("gpt2_lora", "fan_in_fan_out", json!(false));
    says(&e, "`fan_in_fan_out` false contradicts module `transformer.h.0.attn.c_attn`, a Conv1D ([in, out]) weight");
    let e = err_with("llama_lora", "fan_in_fan_out", json!(true));
    says(
        &e,
        "`fan_in_fan_out` true contradicts module `model.layers.0.mlp.down_proj`, an nn.Linear ([out, in]) weight",
    );
}

#[test]
fn rslora_is_honored_and_survives_a_save() {
    let f = copy("llama_lora", "rslora").set("use_rslora", json!(true));
    let m = load("llama", &f.0).unwrap();
    let Net::Llama(l) = &m.net else { unreachable!() };
    // r 4, alpha 8: 8 / sqrt(4) = 4 (plain LoRA: 2).
    assert!(l.adapt().lora.values().all(|x| x.scale == 4.0));
    let again = temp_dir("rslora-again");
    peft::save(l, &again, "llama").unwrap();
    let m2 = load("llama", &again).unwrap();
    let Net::Llama(l2) = &m2.net else { unreachable!() };
    assert!(l2.adapt().lora.values().all(|x| x.scale == 4.0));
    std::fs::remove_dir_all(&again).ok();
}

#[test]
fn houlsby_fields_are_checked() {
    let f = saved("llama", Method::Houlsby { bottleneck: 4 }, "houlsby");
    load("llama", &f.0).unwrap();
    let f = f.set("non_linearity", json!("relu"));
    says(
        &load("llama", &f.0).err().unwrap(),
        "`non_linearity` \"relu\" is not supported by tuna (its Houlsby adapters: \"gelu_tanh\")",
    );
    let f = f.set("non_linearity", json!("gelu_tanh")).set("placement", json!("parallel"));
    says(&load("llama", &f.0).err().unwrap(), "`placement` \"parallel\" is not supported by tuna");
    let f = f.remove("placement").set("bottleneck_size", json!(0));
    says(&load("llama", &f.0).err().unwrap(), "`bottleneck_size` is 0: expected a positive integer");
    let f = f.set("bottleneck_size", json!(-4));
    says(&load("llama", &f.0).err().unwrap(), "`bottleneck_size` is -4: expected a positive integer");
}

/// P-tuning's encoder fields: kept (PEFT's defaults when absent) and saved again, checked in form;
/// they do not change the loaded prompt (the saved tensor is the encoder's output).
#[test]
fn ptuning_fields_are_checked() {
    use tuna_models::adapt::{EncoderKind, EncoderSpec};
    let spec = |m: &Model<f32>| m.adapt().prompt.as_ref().and_then(|p| p.ptuning);
    let ids: Vec<u32> = (3..13).collect();
    let out = |m: &Model<f32>| {
        use adapt_common::Fixture;
        tuna_autograd::no_grad(|| m.outputs(&ids, 2, None)).to_vec().unwrap()
    };
    let m = load("llama", &copy("llama_ptuning_lstm", "pt").0).unwrap();
    assert_eq!(spec(&m), Some(EncoderSpec { kind: EncoderKind::Lstm, hidden: 6, layers: 2 }));
    let want = out(&m);
    let f = copy("llama_ptuning_lstm", "pt-bare")
        .remove("encoder_reparameterization_type")
        .remove("encoder_hidden_size")
        .remove("encoder_num_layers")
        .set("encoder_dropout", json!(0.3));
    let bare = load("llama", &f.0).unwrap();
    assert_eq!(spec(&bare), Some(EncoderSpec { kind: EncoderKind::Mlp, hidden: 32, layers: 2 }), "PEFT's defaults");
    assert_eq!(out(&bare), want, "the encoder fields do not change the loaded prompt");
    let e = err_with("llama_ptuning_lstm", "encoder_reparameterization_type", json!("GRU"));
    says(&e, r#"`encoder_reparameterization_type` "GRU": expected "MLP" or "LSTM""#);
    says(&err_with("gpt2_ptuning", "encoder_hidden_size", json!(0)), "`encoder_hidden_size` is 0: expected a positive");
    says(&err_with("gpt2_ptuning", "encoder_num_layers", json!(-2)), "`encoder_num_layers` is -2: expected a positive");
    says(
        &err_with("bert_ptuning", "prompt_scale", json!(2.0)),
        "`prompt_scale` 2.0 is not a P_TUNING field tuna knows",
    );
    says(&err_with("gpt2_ptuning", "token_dim", json!(64)), "adapter made for a model with hidden size (token_dim) 64");
}

#[test]
fn non_finite_adapter_tensors_are_refused_at_load() {
    let f = copy("gpt2_prompt", "nan").edit_tensor(peft::WEIGHTS, "prompt_embeddings", |(_, v)| {
        v[0] = f32::NAN;
        v[5] = f32::INFINITY;
    });
    let e = load("gpt2", &f.0).err().unwrap();
    assert!(
        e.contains("adapter_model.safetensors: tensor `prompt_embeddings` holds 2 non-finite values (NaN or infinite)"),
        "{e}"
    );
    let f = copy("gpt2_prompt", "inf-extra").edit_tensor(peft::EXTRA, "head.weight", |(_, v)| v[1] = f32::NEG_INFINITY);
    let e = load("gpt2", &f.0).err().unwrap();
    assert!(e.contains("tuna_extra.safetensors: tensor `head.weight` holds 1 non-finite values"), "{e}");
    // A finite extra tensor loads.
    let f = copy("gpt2_prompt", "fine-extra").edit_tensor(peft::EXTRA, "head.weight", |_| {});
    let m = load("gpt2", &f.0).unwrap();
    assert_eq!(m.adapt().extra.len(), 1);
}

#[test]
fn adapter_tensors_the_adapter_does_not_use_are_refused() {
    let f = copy("llama_lora", "extra-tensor").edit_tensor(
        peft::WEIGHTS,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
        |_| {},
    );
    let e = load("llama", &f.0).err().unwrap();
    assert!(
        e.contains("adapter_model.safetensors: tensors this adapter does not use: `base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector` (1 in all)"),
        "{e}"
    );
}
