#!/usr/bin/env python3
"""Golden fixtures for tuna-models: tiny random GPT-2, Llama and BERT from Hugging Face transformers.

For each architecture writes crates/tuna-models/tests/fixtures/<arch>/:
  config.json, model.safetensors   the model folder, as save_pretrained writes it (f32)
  tokenizer.json, tokens.json      a tiny tokenizer trained here, and sentences with their ids
  golden.safetensors               inputs, outputs, loss and the gradient of the loss w.r.t. every parameter
  meta.json                        versions, seed, what each tensor and the loss mean

Run:  pip install -r scripts/golden/requirements.txt && python scripts/golden/make_golden.py
CI does not run this: the fixtures are committed and tuna's tests compare against them.
"""

import argparse
import contextlib
import json
import os
import platform
import shutil
from pathlib import Path

import numpy as np
import safetensors
import tokenizers
import torch
import transformers
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tiny_tokenizers import build_tokenizer, tokens_record

SEED = 1234
BATCH, SEQ = 2, 7
VOCAB = 96
# Weight scales of the re-initialisation (HF's std 0.02 makes attention uniform and logits ~0,
# which would hide RoPE, masking and scaling bugs).
MATRIX_STD = 0.25
NORM_WEIGHT_STD = 0.2
BIAS_STD = 0.1
ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "crates" / "tuna-models" / "tests" / "fixtures"


def configs():
    gpt2 = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    llama = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, rope_theta=1e5, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    bert = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
    )
    return {"gpt2": gpt2, "llama": llama, "bert": bert}


def build_model(arch, config):
    config._attn_implementation = "eager"
    if arch == "gpt2":
        model = GPT2LMHeadModel(config)
    elif arch == "llama":
        model = LlamaForCausalLM(config)
    else:
        # No pooler: the probe loss does not reach it, and sentence embeddings use mean pooling.
        model = BertModel(config, add_pooling_layer=False)
    model = model.float().eval()
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                p.copy_(noise * MATRIX_STD)
            elif name.endswith("bias"):
                p.copy_(noise * BIAS_STD)
            else:  # LayerNorm / RMSNorm gains
                p.copy_(1.0 + noise * NORM_WEIGHT_STD)
    return model


def make_inputs(arch, gen):
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen, dtype=torch.int64)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    if arch in ("llama", "bert"):
        pad = 3  # row 1 is left-padded
        attention_mask[1, :pad] = 0
        input_ids[1, :pad] = 0  # pad id
    # Positions as HF's forward uses them without explicit ids: 0..SEQ-1 for every row, padded or not.
    position_ids = torch.arange(SEQ, dtype=torch.int64).unsqueeze(0).expand(BATCH, SEQ).contiguous()
    return input_ids, attention_mask, position_ids


def forward(arch, model, tensors, probe=None):
    """Runs the model and returns (loss, outputs dict). `tensors` holds the int inputs."""
    kw = dict(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"],
              position_ids=tensors["position_ids"])
    if arch == "bert":
        kw["token_type_ids"] = tensors["token_type_ids"]
        hidden = model(**kw).last_hidden_state
        mask = tensors["attention_mask"].to(hidden.dtype).unsqueeze(-1)
        loss = (hidden * probe.to(hidden.dtype) * mask).sum()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return loss, {"last_hidden_state": hidden, "pooled_mean": pooled}
    out = model(**kw, labels=tensors["labels"])
    logits = out.logits
    # Cross-check HF's causal LM loss with the documented definition (next_token_labels).
    manual = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tensors["next_token_labels"].reshape(-1), ignore_index=-100)
    assert torch.allclose(manual.float(), out.loss, atol=1e-6, rtol=1e-6), (manual, out.loss)
    # HF computes the loss in f32 even for an f64 model; the f64 reference run keeps f64.
    return (manual if logits.dtype == torch.float64 else out.loss), {"logits": logits}


def run(arch, model, tensors, probe):
    model.zero_grad(set_to_none=True)
    loss, outs = forward(arch, model, tensors, probe)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{arch}: no gradient for {name}"
        grads[name] = p.grad.detach().clone()
    return loss.detach(), {k: v.detach() for k, v in outs.items()}, grads


@contextlib.contextmanager
def softmax_in_input_dtype():
    """HF's eager attention takes the softmax in f32 even for an f64 model, which also turns the f64 mask
    minimum into -inf (NaN rows); for the f64 reference run the softmax stays in f64."""
    original = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        if dtype == torch.float32 and x.dtype == torch.float64:
            dtype = torch.float64
        return original(x, dim=dim, dtype=dtype)

    torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.nn.functional.softmax = original


def compact_json(record):
    """JSON with one line per test case (readable diffs, small files)."""
    head = {k: v for k, v in record.items() if k not in ("cases", "pair")}
    lines = [json.dumps(head, ensure_ascii=False)[:-1] + ","]
    cases = [json.dumps(c, ensure_ascii=False) for c in record["cases"]]
    lines.append(' "cases": [\n  ' + ",\n  ".join(cases) + "\n ],")
    lines.append(' "pair": ' + json.dumps(record["pair"], ensure_ascii=False))
    return "\n".join(lines) + "\n}\n"


def max_rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def rounding_report(f32, f64):
    """How far f32 rounding alone moves each quantity: `f32` and `f64` are (loss, outputs dict,
    grads dict) of the same computation in each precision."""
    (loss, outs, grads), (loss64, outs64, grads64) = f32, f64
    rounding = {"loss": max_rel(loss, loss64)}
    rounding.update({k: max_rel(v, outs64[k]) for k, v in outs.items()})
    # Per-parameter relative numbers mislead where a gradient is zero in exact arithmetic (attention key
    # biases: a constant added to every score of a row), so grads get one scale for the whole model.
    rounding["grads_max_abs_diff"] = max(float((g.double() - grads64[n]).abs().max()) for n, g in grads.items())
    rounding["grads_max_abs"] = max(float(g.abs().max()) for g in grads.values())
    return rounding


def make_arch(arch, config, out_dir):
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = build_model(arch, config)
    input_ids, attention_mask, position_ids = make_inputs(arch, gen)
    tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    probe = None
    if arch == "bert":
        probe = torch.randn(BATCH, SEQ, config.hidden_size, generator=gen, dtype=torch.float32)
        tensors["token_type_ids"] = torch.zeros_like(input_ids)
    else:
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        # A left-padded row's first real token would be predicted from a padding position, whose
        # query sees only padding keys (HF's eager attention then spreads uniformly over every key;
        # tuna's fused attention outputs zeros): not a meaningful prediction, so it is ignored too.
        after_pad = torch.zeros_like(attention_mask, dtype=torch.bool)
        after_pad[:, 1:] = attention_mask[:, :-1] == 0
        labels = labels.masked_fill(after_pad, -100)
        next_token = torch.full_like(labels, -100)
        next_token[:, :-1] = labels[:, 1:]
        tensors["labels"] = labels
        tensors["next_token_labels"] = next_token

    loss, outs, grads = run(arch, model, tensors, probe)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())

    # The same computation in f64 tells how far f32 rounding alone moves each quantity (a tolerance guide).
    model64 = build_model(arch, config).double()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    with softmax_in_input_dtype():
        loss64, outs64, grads64 = run(arch, model64, tensors, probe)
    rounding = rounding_report((loss, outs, grads), (loss64, outs64, grads64))

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    golden = dict(tensors)
    if probe is not None:
        golden["probe"] = probe
    golden["loss"] = loss.float().reshape(())
    golden.update({k: v.float().contiguous() for k, v in outs.items()})
    golden.update({f"grad.{n}": g.float().contiguous() for n, g in grads.items()})
    save_file(golden, str(out_dir / "golden.safetensors"), metadata={"arch": arch})  # one key: safetensors writes a map in hash order

    with safetensors.safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    missing = [n for n in grads if n not in saved]

    tok = build_tokenizer(arch)
    tok.save(str(out_dir / "tokenizer.json"))
    with open(out_dir / "tokens.json", "w") as f:
        f.write(compact_json(tokens_record(arch, tok)))

    meta = {
        "arch": arch,
        "made_by": "scripts/golden/make_golden.py",
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "seed": SEED,
        "dtype": "float32 weights and outputs; attn_implementation eager; CPU; deterministic algorithms",
        "init": (f"after HF init every parameter is redrawn from a seeded generator: matrices N(0, {MATRIX_STD}^2), "
                 f"biases N(0, {BIAS_STD}^2), norm gains 1 + N(0, {NORM_WEIGHT_STD}^2)"),
        "model_class": type(model).__name__,
        "inputs": {
            "input_ids": "int64 [2, 7]" + ("; row 1 is left-padded with 3 pad tokens (id 0)"
                                            if arch != "gpt2" else "; no padding"),
            "attention_mask": "int64 [2, 7], 1 = real token",
            "position_ids": "int64 [2, 7], 0..6 for every row (HF's default, padded rows too); passed explicitly",
            **({"token_type_ids": "int64 [2, 7], all 0"} if arch == "bert" else
               {"labels": "int64 [2, 7], HF convention (unshifted), -100 at pads and at the first real token after left padding (predicted from a padding position)",
                "next_token_labels": "int64 [2, 7], target of logits[b, t], -100 at pads and the last position"}),
        },
        "loss": (
            "HF causal LM loss: mean cross-entropy of logits[b, t] against next_token_labels[b, t] over the "
            "entries != -100; labels is the HF-convention tensor (input_ids with -100 at pads, shifted inside "
            "the model); next_token_labels[b, t] = labels[b, t + 1], -100 at the last position"
            if arch != "bert" else
            "sum over b, t, h of last_hidden_state[b, t, h] * probe[b, t, h] * attention_mask[b, t] "
            "(token_type_ids all 0)"
        ),
        "outputs": (
            {"logits": "f32 [2, 7, 96]; rows where attention_mask is 0 are not meaningful (fully masked "
                       "queries), compare only where attention_mask is 1"}
            if arch != "bert" else
            {"last_hidden_state": "f32 [2, 7, 32]; rows where attention_mask is 0 are not in the loss",
             "pooled_mean": "f32 [2, 32]: sum_t mask*h / sum_t mask (sentence-transformers mean pooling)"}
        ),
        "grads": "grad.<name> for every parameter of model.named_parameters() (tied weights appear once, "
                 "with the summed gradient). Attention key-bias gradients are zero in exact arithmetic and hold "
                 "only rounding noise here: compare gradients with an absolute tolerance scaled to the largest one",
        "tied": ("lm_head.weight is tied to the input embedding and absent from model.safetensors"
                 if arch != "bert" else "no ties; no pooler"),
        "grad_names_missing_from_model_safetensors": missing,
        "f32_vs_f64_max_relative_difference": rounding,
        "tokenizer": tokens_record(arch, tok)["kind"],
    }
    with open(out_dir / "meta.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    print(f"{arch}: loss {loss.item():.6f}, {len(grads)} grads, {size / 1024:.0f} KiB, "
          f"f32 vs f64: {rounding}")
    assert size < 1 << 20, f"{arch} fixtures too large: {size} bytes"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--arch", choices=["gpt2", "llama", "bert"], action="append")
    args = ap.parse_args()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    cfgs = configs()
    for arch in args.arch or list(cfgs):
        make_arch(arch, cfgs[arch], args.out / arch)


if __name__ == "__main__":
    main()
