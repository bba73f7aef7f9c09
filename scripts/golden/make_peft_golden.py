#!/usr/bin/env python3
"""Golden fixtures for tuna_models::adapt from Hugging Face PEFT: prompt tuning, P-tuning, prefix tuning and LoRA.

Loads the committed tiny base models (crates/tuna-models/tests/fixtures/{gpt2,llama,bert}, made by
make_golden.py; not rebuilt here), wraps them with PEFT, overwrites every trainable adapter parameter with
seeded noise (PEFT's default inits hide bugs: LoRA B = 0) and writes, for each case,
crates/tuna-models/tests/fixtures/peft/<case>/:
  adapter_config.json, adapter_model.safetensors   as PeftModel.save_pretrained writes them (README.md dropped)
  golden.safetensors                               inputs, outputs, loss, gradients of the loss w.r.t. every
                                                   trainable adapter parameter (grad.<name>)
  meta.json                                        versions, seed, config, shapes, positions, checks made
It also runs the checks behind peft/SPEC.md (config fields PEFT needs on load, the prefix column layout,
positions, the LoRA merge formula) and writes their results to peft/checks.json.

Run:    python scripts/golden/make_peft_golden.py            (fixtures + checks + a self-test of --check-tuna)
Check:  python scripts/golden/make_peft_golden.py --check-tuna DIR
        DIR/<case>/ holds what tuna wrote: adapter_config.json, adapter_model.safetensors,
        tuna_outputs.safetensors (input_ids int64; logits or last_hidden_state f32) and a file `base`
        naming the fixture (gpt2, llama or bert). Writes DIR/peft_check.json.
CI does not run this: the fixtures are committed and tuna's tests compare against them.
"""

import argparse
import copy
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import accelerate
import numpy as np
import peft
import safetensors
import torch
import transformers
from peft import (LoraConfig, PeftConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig,
                  TaskType, get_peft_model)
from safetensors.torch import load_file, save_file
from transformers import BertModel, DynamicCache, GPT2LMHeadModel, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import max_rel, rounding_report, softmax_in_input_dtype  # noqa: E402

SEED = 4321
BATCH, SEQ = 2, 5
VOCAB = 96
LORA_STD = 0.3
PROMPT_STD = 0.5
MLP_WEIGHT_STD = 0.3
MLP_BIAS_STD = 0.1
ROOT = Path(__file__).resolve().parents[2]
FIXTURES_REL = Path("crates") / "tuna-models" / "tests" / "fixtures"  # relative: ends up in base_model_name_or_path
OUT = ROOT / FIXTURES_REL / "peft"
BASE_CLASSES = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM, "bert": BertModel}


def case_configs():
    """case -> (base fixture, factory of a fresh PEFT config). Fresh each time: PEFT fills fields in place."""
    c = TaskType.CAUSAL_LM
    return {
        "gpt2_prompt": ("gpt2", lambda: PromptTuningConfig(task_type=c, num_virtual_tokens=4, prompt_tuning_init="RANDOM")),
        "llama_prompt": ("llama", lambda: PromptTuningConfig(task_type=c, num_virtual_tokens=4, prompt_tuning_init="RANDOM")),
        "bert_prompt": ("bert", lambda: PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=4,
                                                           prompt_tuning_init="RANDOM")),
        "gpt2_prefix": ("gpt2", lambda: PrefixTuningConfig(task_type=c, num_virtual_tokens=3, prefix_projection=False)),
        "llama_prefix": ("llama", lambda: PrefixTuningConfig(task_type=c, num_virtual_tokens=3, prefix_projection=False)),
        # Not in the brief: PEFT was expected not to prefix-tune BERT, but peft 0.21.2 + transformers 5.24 can.
        "bert_prefix": ("bert", lambda: PrefixTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=3,
                                                           prefix_projection=False)),
        "gpt2_prefix_proj": ("gpt2", lambda: PrefixTuningConfig(task_type=c, num_virtual_tokens=3, prefix_projection=True,
                                                                encoder_hidden_size=16)),
        "llama_prefix_proj": ("llama", lambda: PrefixTuningConfig(task_type=c, num_virtual_tokens=3, prefix_projection=True,
                                                                  encoder_hidden_size=16)),
        # P-tuning: PEFT's prompt encoder (MLP, or a 2-layer bidirectional LSTM + MLP head) over the virtual tokens.
        "gpt2_ptuning": ("gpt2", lambda: PromptEncoderConfig(task_type=c, num_virtual_tokens=3, encoder_hidden_size=8,
                                                             encoder_reparameterization_type="MLP")),
        "llama_ptuning": ("llama", lambda: PromptEncoderConfig(task_type=c, num_virtual_tokens=3, encoder_hidden_size=8,
                                                               encoder_reparameterization_type="MLP")),
        "bert_ptuning": ("bert", lambda: PromptEncoderConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=3,
                                                             encoder_hidden_size=8, encoder_reparameterization_type="MLP")),
        "llama_ptuning_lstm": ("llama", lambda: PromptEncoderConfig(task_type=c, num_virtual_tokens=4, encoder_hidden_size=6,
                                                                    encoder_reparameterization_type="LSTM")),
        "gpt2_lora": ("gpt2", lambda: LoraConfig(task_type=c, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                 fan_in_fan_out=True, lora_dropout=0.0, bias="none")),
        "llama_lora": ("llama", lambda: LoraConfig(task_type=c, r=4, lora_alpha=8,
                                                   target_modules=["q_proj", "v_proj", "down_proj"],
                                                   lora_dropout=0.0, bias="none")),
        "bert_lora": ("bert", lambda: LoraConfig(task_type=TaskType.FEATURE_EXTRACTION, r=4, lora_alpha=8,
                                                 target_modules=["query", "value"], lora_dropout=0.0, bias="none")),
    }


def load_base(arch, dtype=torch.float32):
    cls = BASE_CLASSES[arch]
    kw = {"add_pooling_layer": False} if arch == "bert" else {}
    # The relative path is what save_pretrained records as base_model_name_or_path.
    model = cls.from_pretrained(str(FIXTURES_REL / arch), dtype=dtype, attn_implementation="eager", **kw)
    return model.eval()


def make_inputs():
    gen = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen, dtype=torch.int64)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    return input_ids, attention_mask, gen


def randomize_adapter(model, gen):
    """Overwrites every trainable parameter with seeded noise, in named_parameters order."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "lora_" in name:
                std = LORA_STD
            elif ".transform." in name or ".mlp_head." in name or ".lstm_head." in name:
                std = MLP_BIAS_STD if name.endswith("bias") else MLP_WEIGHT_STD
            else:  # prompt / prefix embedding
                std = PROMPT_STD
            p.copy_(noise * std)


def lm_loss(logits, labels):
    """HF's causal LM loss: mean CE of logits[:, t] against labels[:, t + 1] (labels unshifted, -100 ignored)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)


def forward(arch, model, input_ids, attention_mask, probe=None):
    """(loss, {output name: tensor}) of a PEFT model (or a base model, for the no-adapter reference)."""
    if arch == "bert":
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        loss = None if probe is None else (hidden * probe.to(hidden.dtype)).sum()
        return loss, {"last_hidden_state": hidden}
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    logits = out.logits
    n_virtual = logits.shape[1] - input_ids.shape[1]
    full_labels = torch.cat([torch.full((input_ids.shape[0], n_virtual), -100), input_ids], 1)
    manual = lm_loss(logits, full_labels)
    if logits.dtype == torch.float32:
        assert torch.allclose(manual, out.loss, atol=1e-6, rtol=1e-6), (manual, out.loss)
        return out.loss, {"logits": logits}
    return manual, {"logits": logits}  # HF takes the loss in f32 even for an f64 model


def run_case_model(arch, model, input_ids, attention_mask, probe, capture_prefix=False):
    model.zero_grad(set_to_none=True)
    captured = {}
    handle = None
    if capture_prefix:  # gradient w.r.t. the projected prefix (the tensor that is saved)
        def hook(_m, _inp, out):
            out.retain_grad()
            captured["out"] = out
        handle = model.prompt_encoder["default"].register_forward_hook(hook)
    loss, outs = forward(arch, model, input_ids, attention_mask, probe)
    loss.backward()
    if handle:
        handle.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    extra = {}
    if capture_prefix:
        extra["projected"] = captured["out"].detach()[0].clone()
        extra["grad_projected"] = captured["out"].grad.detach().sum(0)  # the encoder output is per batch row
    return loss.detach(), {k: v.detach() for k, v in outs.items()}, grads, extra


def saved_key(name, encoded=False):
    """PEFT named_parameters name -> key in adapter_model.safetensors (None: not saved as such; P-tuning saves only
    its encoder's output)."""
    if name == "prompt_encoder.default.embedding.weight" and not encoded:
        return "prompt_embeddings"
    if ".lora_" in name:
        return name.replace(".default.", ".")
    return None


def make_case(case, arch, config_fn, out_dir, checks):
    torch.manual_seed(SEED)
    input_ids, attention_mask, gen = make_inputs()
    base = load_base(arch)
    with torch.no_grad():
        _, base_outs = forward(arch, base, input_ids, attention_mask)
    model = get_peft_model(base, config_fn())
    model.eval()
    cfg = model.peft_config["default"]
    randomize_adapter(model, gen)
    n_virtual = cfg.num_virtual_tokens if cfg.is_prompt_learning else 0
    n_out = n_virtual if cfg.peft_type in ("PROMPT_TUNING", "P_TUNING") else 0  # virtual positions in the output
    out_name = "last_hidden_state" if arch == "bert" else "logits"
    probe = None
    if arch == "bert":
        probe = torch.randn(BATCH, n_out + SEQ, 32, generator=gen, dtype=torch.float32)
    # An encoder's output is what PEFT saves: its gradient and the encoder's parameters are recorded too.
    projected = (cfg.peft_type == "PREFIX_TUNING" and cfg.prefix_projection) or cfg.peft_type == "P_TUNING"
    loss, outs, grads, extra = run_case_model(arch, model, input_ids, attention_mask, probe, projected)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    effect = float((outs[out_name][:, n_out:] - base_outs[out_name]).abs().max())
    assert effect > 1e-2, f"{case}: the adapter barely changes the outputs ({effect})"

    # f64 rerun: same adapter values on an f64 base (rounding alone; a tolerance guide).
    model64 = get_peft_model(load_base(arch, torch.float64), config_fn())
    model64.eval()
    with torch.no_grad():
        p32 = dict(model.named_parameters())
        for n, p in model64.named_parameters():
            if p.requires_grad:
                p.copy_(p32[n].double())
    model64.double()
    with softmax_in_input_dtype():
        loss64, outs64, grads64, _ = run_case_model(arch, model64, input_ids, attention_mask, probe)
    rounding = rounding_report((loss, outs, grads), (loss64, outs64, grads64))

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.save_pretrained(str(out_dir))
    written = sorted(p.name for p in out_dir.iterdir())
    (out_dir / "README.md").unlink()  # model card template, not part of the format

    with safetensors.safe_open(str(out_dir / "adapter_model.safetensors"), "pt") as f:
        file_meta = f.metadata()
        saved = {k: f.get_tensor(k) for k in f.keys()}
    if projected:
        assert torch.allclose(saved["prompt_embeddings"], extra["projected"], atol=1e-6)

    golden = {"input_ids": input_ids, "attention_mask": attention_mask}
    if arch != "bert":
        golden["labels"] = input_ids.clone()
    else:
        golden["probe"] = probe
    golden["loss"] = loss.float().reshape(())
    golden.update({k: v.float().contiguous() for k, v in outs.items()})
    golden.update({f"grad.{n}": g.float().contiguous() for n, g in grads.items()})
    if projected:
        golden.update({f"param.{n}": p.detach().float().contiguous()
                       for n, p in model.named_parameters() if p.requires_grad})
        golden["grad_saved.prompt_embeddings"] = extra["grad_projected"].float().contiguous()
    save_file(golden, str(out_dir / "golden.safetensors"), metadata={"case": case})

    with open(out_dir / "adapter_config.json") as f:
        adapter_config = json.load(f)
    shapes = {k: list(v.shape) for k, v in golden.items()}
    positions = {
        "PROMPT_TUNING": f"virtual tokens take positions 0..{n_virtual - 1}, content tokens {n_virtual}..{n_virtual + SEQ - 1}; "
                         f"the output has {n_virtual} + {SEQ} positions, the virtual ones first",
        "P_TUNING": f"as PROMPT_TUNING, with the encoder's output as the prompt: virtual tokens take positions "
                    f"0..{n_virtual - 1}, content tokens {n_virtual}..{n_virtual + SEQ - 1}; the output has {n_virtual} + "
                    f"{SEQ} positions, the virtual ones first",
        "PREFIX_TUNING": f"the prefix is a KV cache of {n_virtual} entries used as stored (no RoPE applied to it); "
                         f"content tokens take positions {n_virtual}..{n_virtual + SEQ - 1}; the output has {SEQ} positions",
        "LORA": f"content tokens take positions 0..{SEQ - 1}; the output has {SEQ} positions",
    }[cfg.peft_type]
    if arch == "bert":
        loss_doc = (f"sum over b, t, h of last_hidden_state[b, t, h] * probe[b, t, h], over all {n_out + SEQ} "
                    "positions (virtual ones included); token_type_ids all 0")
    elif n_virtual and cfg.peft_type in ("PROMPT_TUNING", "P_TUNING"):
        loss_doc = (f"HF causal LM loss as PEFT computes it: labels are extended with {n_virtual} x -100 in front, "
                    f"then mean CE of logits[:, t] against extended_labels[:, t + 1]: {SEQ} terms per row, the first "
                    f"being logits at the last virtual position ({n_virtual - 1}) predicting input_ids[:, 0]")
    else:
        loss_doc = f"HF causal LM loss: mean CE of logits[:, t] against labels[:, t + 1], {SEQ - 1} terms per row"
    meta = {
        "case": case,
        "base": arch,
        "base_fixture": str(FIXTURES_REL / arch),
        "made_by": "scripts/golden/make_peft_golden.py",
        "versions": {"peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                     "safetensors": safetensors.__version__, "accelerate": accelerate.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "seed": SEED,
        "dtype": "float32 weights and outputs; attn_implementation eager; CPU; deterministic algorithms",
        "model_class": type(model).__name__,
        "base_model_class": type(model.get_base_model()).__name__,
        "init": (f"after get_peft_model every trainable parameter is redrawn in named_parameters order from a seeded "
                 f"generator: lora_A/lora_B N(0, {LORA_STD}^2), prompt/prefix embeddings N(0, {PROMPT_STD}^2), "
                 f"prefix MLP weights N(0, {MLP_WEIGHT_STD}^2), biases N(0, {MLP_BIAS_STD}^2)"),
        "peft_config": adapter_config,
        "save_pretrained_wrote": written,
        "adapter_model_metadata": file_meta,
        "adapter_model_keys": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                               for k, v in saved.items()},
        "grad_name_to_saved_key": {n: saved_key(n, cfg.peft_type == "P_TUNING") for n in grads},
        "inputs": {"input_ids": f"int64 [{BATCH}, {SEQ}], random ids in 3..{VOCAB - 1}, no padding",
                   "attention_mask": f"int64 [{BATCH}, {SEQ}], all ones (PEFT prepends ones for virtual tokens)",
                   **({"labels": "int64, = input_ids (HF convention, unshifted)"} if arch != "bert" else
                      {"probe": f"f32 {list(probe.shape)}, N(0, 1)"})},
        "positions": positions,
        "loss": loss_doc,
        "shapes": shapes,
        "max_abs_change_of_outputs_by_the_adapter": effect,
        "f32_vs_f64_max_relative_difference": rounding,
    }
    if cfg.peft_type == "P_TUNING":
        meta["encoder"] = (f"{cfg.encoder_reparameterization_type}: prompt_encoder.default.embedding.weight [n, token_dim] "
                           "-> " + ("mlp_head (Linear token_dim->h, ReLU, Linear h->h, ReLU, Linear h->token_dim)"
                                    if cfg.encoder_reparameterization_type == "MLP" else
                                    "lstm_head (bidirectional LSTM, encoder_num_layers layers, hidden h, gates i f g o) -> "
                                    "mlp_head (Linear 2h->2h, ReLU, Linear 2h->token_dim)") +
                           f", h = encoder_hidden_size = {cfg.encoder_hidden_size}; run on one row, repeated over the "
                           "batch; adapter_model.safetensors holds only the encoder's output (= prompt_embeddings); "
                           "param.<name> are the encoder's parameters; grad_saved.prompt_embeddings is the gradient "
                           "w.r.t. the encoder's output")
    elif projected:
        meta["projection"] = ("prompt_encoder.default.embedding.weight [n, token_dim] -> transform.0 (Linear token_dim->"
                              "encoder_hidden_size) -> tanh -> transform.2 (Linear -> num_layers*2*token_dim); "
                              "adapter_model.safetensors holds only the projected output (= prompt_embeddings); "
                              "param.<name> are the MLP's parameters; grad_saved.prompt_embeddings is the gradient "
                              "w.r.t. the projected prefix (summed over the batch)")
    with open(out_dir / "meta.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    print(f"{case}: loss {loss.item():.6f}, effect {effect:.3f}, {len(grads)} grads, {size / 1024:.0f} KiB, "
          f"f32 vs f64: {rounding}")
    checks[case] = {"outputs": outs[out_name], "input_ids": input_ids}
    return model


# ---------------------------------------------------------------- checks behind SPEC.md


def peft_outputs(arch, adapter_dir, input_ids, **load_kw):
    base = load_base(arch)
    model = PeftModel.from_pretrained(base, str(adapter_dir), **load_kw).eval()
    with torch.no_grad():
        _, outs = forward(arch, model, input_ids, torch.ones_like(input_ids))
    return next(iter(outs.values())), model


def field_default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "<no default>"


def field_checks(case, arch, out_dir, ref, input_ids):
    """Deletes each field of adapter_config.json in turn and records what PEFT then does."""
    with open(out_dir / "adapter_config.json") as f:
        config = json.load(f)
    config_cls = type(PeftConfig.from_pretrained(str(out_dir)))
    defaults = {k: field_default(f) for k, f in config_cls.__dataclass_fields__.items()}
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copy(out_dir / "adapter_model.safetensors", tmp)
        for field in config:
            reduced = {k: v for k, v in config.items() if k != field}
            with open(tmp / "adapter_config.json", "w") as f:
                json.dump(reduced, f)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out, _ = peft_outputs(arch, tmp, input_ids)
                if out.shape != ref.shape:
                    status = f"loads, output shape {list(out.shape)}"
                else:
                    d = float((out - ref).abs().max())
                    status = "same outputs" if d == 0 else f"loads, outputs differ by {d:.3g}"
            except Exception as e:  # noqa: BLE001
                status = f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            default = defaults.get(field, "<not a field>")
            result[field] = {"value": config[field], "class_default": default, "without_it": status}
    print(f"{case}: fields whose removal breaks loading or changes outputs: "
          f"{[k for k, v in result.items() if v['without_it'] != 'same outputs']}")
    return result


MINIMAL = {
    "PROMPT_TUNING": ["peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
                      "num_attention_heads", "num_layers"],
    "PREFIX_TUNING": ["peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
                      "num_attention_heads", "num_layers"],
    "P_TUNING": ["peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
                 "num_attention_heads", "num_layers"],
    "LORA": ["peft_type", "task_type", "r", "lora_alpha", "target_modules", "fan_in_fan_out", "bias"],
}


def minimal_config_check(case, arch, out_dir, ref, input_ids):
    with open(out_dir / "adapter_config.json") as f:
        config = json.load(f)
    keep = MINIMAL[config["peft_type"]]
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(out_dir / "adapter_model.safetensors", tmp)
        minimal = {k: config[k] for k in keep if k in config}
        with open(Path(tmp) / "adapter_config.json", "w") as f:
            json.dump(minimal, f)
        try:
            out, _ = peft_outputs(arch, tmp, input_ids)
            d = float((out - ref).abs().max()) if out.shape == ref.shape else float("inf")
            return {"config": minimal, "max_abs_diff": d, "ok": d == 0}
        except Exception as e:  # noqa: BLE001
            return {"config": minimal, "error": f"{type(e).__name__}: {e}", "ok": False}


def prefix_layout_check(arch, out_dir, ref, input_ids):
    """Rebuilds PEFT's prefix from the saved prompt_embeddings with the layout stated in SPEC.md and runs the
    base model with it as a plain KV cache: positions n..n+T-1 must reproduce PEFT, positions 0..T-1 must not."""
    with open(out_dir / "adapter_config.json") as f:
        cfg = json.load(f)
    emb = load_file(str(out_dir / "adapter_model.safetensors"))["prompt_embeddings"]
    n, L, H, td = cfg["num_virtual_tokens"], cfg["num_layers"], cfg["num_attention_heads"], cfg["token_dim"]
    D = td // H
    assert emb.shape == (n, L * 2 * td)
    base = load_base(arch)
    b, t = input_ids.shape
    res = {}
    kw = {"token_type_ids": torch.zeros_like(input_ids)} if arch == "bert" else {}
    for label, start in (("positions_from_n", n), ("positions_from_0", 0)):
        cache = DynamicCache(config=base.config)
        for i in range(L):
            # columns [(2i) * td, (2i+1) * td): layer i's keys; [(2i+1) * td, (2i+2) * td): its values; each [H, D]
            k = emb[:, (2 * i) * td:(2 * i + 1) * td].reshape(n, H, D).permute(1, 0, 2)
            v = emb[:, (2 * i + 1) * td:(2 * i + 2) * td].reshape(n, H, D).permute(1, 0, 2)
            cache.update(k.unsqueeze(0).expand(b, -1, -1, -1).contiguous(),
                         v.unsqueeze(0).expand(b, -1, -1, -1).contiguous(), i)
        pos = torch.arange(start, start + t).unsqueeze(0).expand(b, t)
        with torch.no_grad():
            out = base(input_ids=input_ids, attention_mask=torch.ones(b, n + t, dtype=torch.int64),
                       past_key_values=cache, position_ids=pos, **kw)
        out = out.last_hidden_state if arch == "bert" else out.logits
        res[label] = float((out - ref).abs().max())
    res["ok"] = res["positions_from_n"] < 1e-5 and res["positions_from_0"] > 1e-3
    res["layout"] = ("prompt_embeddings[j, ((2*i + s) * H + h) * D + d] = layer i, s = 0 keys / 1 values, "
                     f"head h < H = num_attention_heads = {H}, d < D = token_dim / H = {D}")
    return res


def prompt_positions_check(arch, out_dir, ref, input_ids):
    """PEFT's prompt tuning == the base model on [prompt; embed(ids)] with positions 0..n+T-1."""
    emb = load_file(str(out_dir / "adapter_model.safetensors"))["prompt_embeddings"]
    n = emb.shape[0]
    base = load_base(arch)
    b, t = input_ids.shape
    with torch.no_grad():
        x = torch.cat([emb.unsqueeze(0).expand(b, -1, -1), base.get_input_embeddings()(input_ids)], 1)
        res = {}
        for label, pos in (("positions_0_to_n_plus_T", torch.arange(n + t)),
                           ("content_positions_from_0", torch.cat([torch.arange(n), torch.arange(t)]))):
            kw = {"token_type_ids": torch.zeros(b, n + t, dtype=torch.int64)} if arch == "bert" else {}
            out = base(inputs_embeds=x, attention_mask=torch.ones(b, n + t, dtype=torch.int64),
                       position_ids=pos.unsqueeze(0).expand(b, -1), **kw)
            out = out.last_hidden_state if arch == "bert" else out.logits
            res[label] = float((out - ref).abs().max())
    res["ok"] = res["positions_0_to_n_plus_T"] < 1e-5 and res["content_positions_from_0"] > 1e-3
    return res


def lora_merge_check(arch, out_dir, model, ref, input_ids):
    """W_merged = W + (alpha/r) * B @ A for nn.Linear ([out, in]); GPT-2 Conv1D stores W as [in, out] and gets
    W + (alpha/r) * (B @ A)^T. Checks the stated formula against PEFT's merge_and_unload and the forward."""
    with open(out_dir / "adapter_config.json") as f:
        cfg = json.load(f)
    scale = cfg["lora_alpha"] / cfg["r"]
    sd = load_file(str(out_dir / "adapter_model.safetensors"))
    base = load_base(arch)
    base_sd = base.state_dict()
    manual = {}
    for key in sd:
        if not key.endswith("lora_A.weight"):
            continue
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        a, bm = sd[key], sd[key.replace("lora_A", "lora_B")]
        delta = scale * (bm @ a)
        w = base_sd[module + ".weight"]
        manual[module + ".weight"] = w + (delta.T if cfg["fan_in_fan_out"] else delta)
    base_sd.update(manual)
    base.load_state_dict(base_sd)
    with torch.no_grad():
        _, outs = forward(arch, base, input_ids, torch.ones_like(input_ids))
    out = next(iter(outs.values()))
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    weight_diff = max(float((merged[k] - v).abs().max()) for k, v in manual.items())
    res = {"scale": scale, "merged_modules": sorted(manual), "manual_merge_vs_peft_merge_max_abs": weight_diff,
           "manual_merge_forward_vs_peft_max_abs": float((out - ref).abs().max())}
    res["ok"] = weight_diff < 1e-6 and res["manual_merge_forward_vs_peft_max_abs"] < 1e-4
    return res


def projection_load_check(arch, out_dir, input_ids, ref):
    """What PEFT does when loading a prefix_projection=True or a P_TUNING adapter (saved: the encoder's output)."""
    res = {}
    out, model = peft_outputs(arch, out_dir, input_ids)
    enc = model.prompt_encoder["default"]
    res["default_load"] = {
        "inference_mode": model.peft_config["default"].inference_mode,
        "encoder_parameters": {n: list(p.shape) for n, p in enc.named_parameters()},
        "max_abs_diff_vs_golden": float((out - ref).abs().max()),
    }
    try:
        out, model = peft_outputs(arch, out_dir, input_ids, is_trainable=True)
        res["is_trainable_true"] = {"loaded": True, "max_abs_diff_vs_golden": float((out - ref).abs().max())}
    except Exception as e:  # noqa: BLE001
        res["is_trainable_true"] = {"loaded": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    return res


def bert_prefix_check():
    try:
        model = get_peft_model(load_base("bert"), PrefixTuningConfig(task_type=TaskType.FEATURE_EXTRACTION,
                                                                     num_virtual_tokens=3))
        ids, mask, _ = make_inputs()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        return {"supported": True, "output_shape": list(out.shape)}
    except Exception as e:  # noqa: BLE001
        return {"supported": False, "error": f"{type(e).__name__}: {e}"}


# ---------------------------------------------------------------- --check-tuna


def check_tuna(dir_):
    dir_ = Path(dir_)
    report = {}
    for case_dir in sorted(p for p in dir_.iterdir() if p.is_dir()):
        entry = {"loaded": False, "error": None, "max_abs_diff": None, "max_rel": None, "ok": False}
        try:
            arch = (case_dir / "base").read_text().strip()
            if arch not in BASE_CLASSES:
                raise ValueError(f"unknown base {arch!r} in {case_dir / 'base'}")
            tuna = load_file(str(case_dir / "tuna_outputs.safetensors"))
            input_ids = tuna["input_ids"].to(torch.int64)
            key = "last_hidden_state" if arch == "bert" else "logits"
            if key not in tuna:
                raise KeyError(f"tuna_outputs.safetensors has no {key!r} (keys: {sorted(tuna)})")
            ref, _ = peft_outputs(arch, case_dir, input_ids)
            entry["loaded"] = True
            got = tuna[key].to(torch.float32)
            if got.shape != ref.shape:
                raise ValueError(f"{key} shape {list(got.shape)} != PEFT's {list(ref.shape)}")
            diff = float((got - ref).abs().max())
            ref_max = float(ref.abs().max())
            entry["max_abs_diff"] = diff
            entry["max_rel"] = diff / max(ref_max, 1e-30)
            entry["ok"] = bool(diff <= 1e-5 + 1e-5 * ref_max)
        except Exception as e:  # noqa: BLE001
            entry["error"] = f"{type(e).__name__}: {e}"
        report[case_dir.name] = entry
    with open(dir_ / "peft_check.json", "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    return report


def self_test_check_tuna(out_root, checks):
    """Lays PEFT's own adapters and outputs out as tuna would and checks them (must pass), then corrupts one
    adapter and one output (must fail)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for case, (arch, _) in case_configs().items():
            if case not in checks:
                continue
            d = tmp / case
            d.mkdir()
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy(out_root / case / name, d)
            (d / "base").write_text(arch + "\n")
            key = "last_hidden_state" if arch == "bert" else "logits"
            save_file({"input_ids": checks[case]["input_ids"], key: checks[case]["outputs"].contiguous()},
                      str(d / "tuna_outputs.safetensors"))
        good = check_tuna(tmp)
        assert all(v["ok"] and v["loaded"] for v in good.values()), good
        # Corruptions: a LoRA B matrix scaled, a prompt embedding with two columns swapped, an output nudged.
        sd = load_file(str(tmp / "llama_lora" / "adapter_model.safetensors"))
        k = next(k for k in sd if "lora_B" in k)
        sd[k] = sd[k] * 1.01
        save_file(sd, str(tmp / "llama_lora" / "adapter_model.safetensors"), metadata={"format": "pt"})
        sd = load_file(str(tmp / "gpt2_prefix" / "adapter_model.safetensors"))
        sd["prompt_embeddings"] = sd["prompt_embeddings"][:, torch.randperm(sd["prompt_embeddings"].shape[1],
                                                                             generator=torch.Generator().manual_seed(0))]
        save_file(sd, str(tmp / "gpt2_prefix" / "adapter_model.safetensors"), metadata={"format": "pt"})
        outs = load_file(str(tmp / "bert_lora" / "tuna_outputs.safetensors"))
        outs["last_hidden_state"][0, 0, 0] += 1e-3
        save_file(outs, str(tmp / "bert_lora" / "tuna_outputs.safetensors"))
        (tmp / "gpt2_lora" / "adapter_config.json").write_text("{}")
        bad = check_tuna(tmp)
        corrupted = {"llama_lora", "gpt2_prefix", "bert_lora", "gpt2_lora"}
        for case, v in bad.items():
            assert v["ok"] == (case not in corrupted), (case, v)
        return {"clean": {c: v["ok"] for c, v in good.items()},
                "corrupted": {c: {k: bad[c][k] for k in ("loaded", "ok", "max_abs_diff", "error")} for c in corrupted}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--case", action="append", help="only these cases (default: all)")
    ap.add_argument("--check-tuna", type=Path, metavar="DIR", help="check adapters and outputs tuna wrote in DIR")
    args = ap.parse_args()
    if os.environ.get("PYTHONHASHSEED") != "0":
        # PEFT stores target_modules from a Python set: its order in adapter_config.json follows string hashing.
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "PYTHONHASHSEED": "0"})
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    check_dir = args.check_tuna.resolve() if args.check_tuna else None
    args.out = args.out.resolve()
    os.chdir(ROOT)  # base fixtures load by a relative path
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if check_dir:
        report = check_tuna(check_dir)
        print(json.dumps(report, indent=1))
        sys.exit(0 if all(v["ok"] for v in report.values()) else 1)

    cases = case_configs()
    selected = args.case or list(cases)
    args.out.mkdir(parents=True, exist_ok=True)
    checks, spec_checks = {}, {"fields": {}, "minimal_config": {}}
    for case in selected:
        arch, config_fn = cases[case]
        out_dir = args.out / case
        model = make_case(case, arch, config_fn, out_dir, checks)
        ids = checks[case]["input_ids"]
        # Reference for the load checks: PEFT reloading its own files (for prefix_projection this differs from
        # the golden outputs by rounding: the reloaded adapter holds the projected prefix, not the MLP).
        ref, _ = peft_outputs(arch, out_dir, ids)
        spec_checks["fields"][case] = field_checks(case, arch, out_dir, ref, ids)
        spec_checks["minimal_config"][case] = minimal_config_check(case, arch, out_dir, ref, ids)
        ptype = model.peft_config["default"].peft_type
        if ptype == "PREFIX_TUNING":
            if not model.peft_config["default"].prefix_projection:
                spec_checks.setdefault("prefix_layout_and_positions", {})[case] = prefix_layout_check(
                    arch, out_dir, ref, ids)
            else:
                spec_checks.setdefault("prefix_projection_load", {})[case] = projection_load_check(
                    arch, out_dir, ids, ref)
        elif ptype == "PROMPT_TUNING":
            spec_checks.setdefault("prompt_positions", {})[case] = prompt_positions_check(arch, out_dir, ref, ids)
        elif ptype == "P_TUNING":
            # The saved encoder output used as a plain soft prompt, and what loading does with the encoder.
            spec_checks.setdefault("prompt_positions", {})[case] = prompt_positions_check(arch, out_dir, ref, ids)
            spec_checks.setdefault("ptuning_load", {})[case] = projection_load_check(arch, out_dir, ids, ref)
        elif ptype == "LORA":
            spec_checks.setdefault("lora_merge", {})[case] = lora_merge_check(arch, out_dir, model, ref, ids)
    spec_checks["bert_prefix_tuning"] = bert_prefix_check()
    if not args.case:
        spec_checks["check_tuna_self_test"] = self_test_check_tuna(args.out, checks)
    spec_checks["versions"] = {"peft": peft.__version__, "transformers": transformers.__version__,
                               "torch": torch.__version__}
    for group in ("prefix_layout_and_positions", "prompt_positions", "lora_merge"):
        for case, r in spec_checks.get(group, {}).items():
            print(f"{group} {case}: {r}")
            assert r["ok"], (group, case, r)
    for case, r in spec_checks["minimal_config"].items():
        print(f"minimal config {case}: {r}")
    print("projection load:", json.dumps(spec_checks.get("prefix_projection_load"), indent=1))
    print("p-tuning load:", json.dumps(spec_checks.get("ptuning_load"), indent=1))
    print("bert prefix:", spec_checks["bert_prefix_tuning"])
    print("check-tuna self-test:", json.dumps(spec_checks.get("check_tuna_self_test"), indent=1))
    with open(args.out / "checks.json", "w") as f:
        json.dump(spec_checks, f, indent=1, default=str)
        f.write("\n")
    # What this script writes (tuna_saved/ is written by tuna's test and only checked here).
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file() and "tuna_saved" not in p.parts)
    print(f"total {total / 1024:.0f} KiB")
    assert total < 400_000, total  # 300 000 before the four P-tuning cases (~120 000 with the LSTM)


if __name__ == "__main__":
    main()
