#!/usr/bin/env python3
"""Golden fixtures for tuna's T5: tiny random T5 models from Hugging Face transformers, and PEFT
adapters on them.

Writes crates/tuna-models/tests/fixtures/:
  t5/       original T5 style: ReLU feed-forward, head tied to the shared embedding (decoder output
            scaled by d_model**-0.5), 2 encoder + 2 decoder layers
  t5v11/    T5 v1.1 / flan-T5 style: gated-GELU feed-forward, separate lm_head (no scaling),
            2 encoder + 3 decoder layers, d_kv * heads != d_model
  each:     config.json, model.safetensors, tokenizer.json (a tiny T5-style tokenizer: <pad> 0,
            </s> 1, <unk> 2, "$A </s>"), golden.safetensors (inputs, logits, loss, every gradient),
            meta.json
  t5_buckets.json  the relative-position bucket of every distance -300..300 (T5's defaults, 32
                   buckets, max distance 128; bidirectional and causal)
  peft/t5_lora, peft/t5_prompt, peft/t5_ptuning, peft/t5_prefix (on t5v11): adapter folders as
                   PEFT saves them, with golden.safetensors (logits, loss, trainable gradients)

Run:  pip install -r scripts/golden/requirements.txt && python scripts/golden/make_t5_golden.py
CI does not run this: the fixtures are committed and tuna's tests compare against them.
"""

import json
import os
import platform
import shutil
from pathlib import Path

import peft
import safetensors
import tokenizers
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import T5Config, T5ForConditionalGeneration

from tiny_tokenizers import CORPUS, canonical_ids

SEED = 4321
VOCAB = 96
MATRIX_STD = 0.25
NORM_WEIGHT_STD = 0.2
ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "crates" / "tuna-models" / "tests" / "fixtures"
ENC_LEN, DEC_LEN, BATCH = 7, 5, 2


def t5_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=[], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok = canonical_ids(tok)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", eos)])
    assert tok.get_vocab_size() <= VOCAB
    return tok


def config(kind):
    common = dict(vocab_size=VOCAB, d_model=32, num_heads=4, relative_attention_num_buckets=8,
                  relative_attention_max_distance=20, dropout_rate=0.0, layer_norm_epsilon=1e-6,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    if kind == "t5":
        return T5Config(d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, feed_forward_proj="relu", **common)
    return T5Config(d_kv=6, d_ff=40, num_layers=2, num_decoder_layers=3, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False, **common)


def build(kind):
    torch.manual_seed(SEED)
    cfg = config(kind)
    cfg._attn_implementation = "eager"
    model = T5ForConditionalGeneration(cfg)
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        if kind == "t5v11":
            # A head of its own (flan-T5 checkpoints carry lm_head.weight beside shared.weight).
            model.lm_head.weight = torch.nn.Parameter(torch.empty(VOCAB, cfg.d_model))
            model.config.scale_decoder_outputs = False
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                p.copy_(noise * (1.0 if "relative_attention_bias" in name else MATRIX_STD))
            else:
                p.copy_(1.0 + noise * NORM_WEIGHT_STD)
    return model.float().eval()


def inputs(gen):
    input_ids = torch.randint(3, VOCAB, (BATCH, ENC_LEN), generator=gen)
    attention_mask = torch.ones(BATCH, ENC_LEN, dtype=torch.int64)
    # Row 1 is right-padded, as T5 tokenizers pad (a soft prompt then sits right before the content).
    input_ids[0, -1] = 1  # </s>
    input_ids[1, 3] = 1
    attention_mask[1, 4:] = 0
    input_ids[1, 4:] = 0
    labels = torch.randint(3, VOCAB, (BATCH, DEC_LEN), generator=gen)
    labels[:, -1] = 1
    labels[1, 3] = 1
    labels[1, 4:] = -100  # row 1's target is shorter: -100 after its </s>
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def run(model, t):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], labels=t["labels"])
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


def write_model(kind):
    model = build(kind)
    gen = torch.Generator().manual_seed(SEED + 2)
    t = inputs(gen)
    loss, logits, grads = run(model, t)
    missing = [n for n, p in model.named_parameters() if n not in grads]
    out = OUT / kind
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    cfg = json.loads((out / "config.json").read_text())
    if kind == "t5v11":
        # As flan-T5's config.json says it (transformers 5 writes tie_word_embeddings true plus its
        # own scale_decoder_outputs false); loading this gives the same model (asserted below).
        cfg["tie_word_embeddings"] = False
        cfg.pop("scale_decoder_outputs", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    again = T5ForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    assert torch.allclose(again(**t).logits, logits, atol=0, rtol=0), "reloaded model differs"
    t5_tokenizer().save(str(out / "tokenizer.json"))
    decoder_input_ids = model._shift_right(t["labels"])
    # Greedy generation from row 0's encoder input (no padding): the new tokens after the start token
    # (use_cache=False: transformers 5.24's cache breaks with more decoder than encoder layers).
    with torch.no_grad():
        gen_out = model.generate(input_ids=t["input_ids"][:1], max_new_tokens=8, do_sample=False, num_beams=1,
                                 eos_token_id=None, pad_token_id=0, use_cache=False)
    golden = {**t, "decoder_input_ids": decoder_input_ids, "loss": loss.reshape(()), "logits": logits,
              "generated": gen_out[0, 1:].contiguous()}
    golden.update({f"grad.{n}": g.contiguous() for n, g in grads.items()})
    save_file(golden, str(out / "golden.safetensors"), metadata={"arch": kind})
    with safetensors.safe_open(str(out / "model.safetensors"), "pt") as f:
        saved = sorted(f.keys())
    meta = {
        "arch": kind,
        "made_by": "scripts/golden/make_t5_golden.py",
        "versions": versions(),
        "seed": SEED,
        "model": "T5ForConditionalGeneration, eager attention, f32, CPU, dropout 0",
        "init": f"matrices N(0, {MATRIX_STD}^2) (relative_attention_bias N(0, 1)), norm gains 1 + N(0, {NORM_WEIGHT_STD}^2)",
        "inputs": {
            "input_ids": f"int64 [{BATCH}, {ENC_LEN}], row 1 right-padded by 3 (id 0), each row's last real token is </s> (1)",
            "attention_mask": "int64, 1 = real token",
            "labels": f"int64 [{BATCH}, {DEC_LEN}]; row 1: 4 tokens then -100",
            "decoder_input_ids": "labels shifted right with decoder_start_token_id 0, -100 -> 0 (what HF feeds the decoder)",
            "generated": "int64 [8]: model.generate(input_ids[:1], greedy, max_new_tokens 8, no eos stop), without the start token",
        },
        "loss": "mean cross-entropy of logits against labels over labels != -100 (HF's Seq2SeqLM loss)",
        "logits": f"f32 [{BATCH}, {DEC_LEN}, {VOCAB}]",
        "grads": "grad.<name> for every parameter with a gradient (shared.weight carries the embedding's and, tied, the head's)",
        "params_without_grad": missing,
        "saved_tensors": saved,
        "tied_head": kind == "t5",
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{kind}: loss {loss.item():.6f}, {len(grads)} grads, saved {len(saved)} tensors")
    return model, t


def buckets():
    rel = torch.arange(-300, 301)
    rec = {"relative_positions": "-300..300", "num_buckets": 32, "max_distance": 128}
    for bi in (True, False):
        b = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            rel, bidirectional=bi, num_buckets=32, max_distance=128)
        rec["bidirectional" if bi else "causal"] = b.tolist()
    small = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        rel, bidirectional=True, num_buckets=8, max_distance=20)
    rec["bidirectional_8_20"] = small.tolist()
    (OUT / "t5_buckets.json").write_text(json.dumps(rec) + "\n")


def peft_case(name, base_kind, cfg):
    base = build(base_kind)
    base_dir = OUT / base_kind
    torch.manual_seed(SEED + 7)
    pm = peft.get_peft_model(base, cfg)
    # Trainable tensors drawn away from their init (LoRA's B starts at 0: outputs would not move).
    gen = torch.Generator().manual_seed(SEED + 8)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    pm.train()  # dropout 0 everywhere: train() only matters for PEFT's own switches
    t = inputs(torch.Generator().manual_seed(SEED + 2))
    out = pm(input_ids=t["input_ids"], attention_mask=t["attention_mask"], labels=t["labels"])
    pm.zero_grad(set_to_none=True)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    dest = OUT / "peft" / name
    if dest.exists():
        shutil.rmtree(dest)
    pm.save_pretrained(dest)
    (dest / "README.md").unlink(missing_ok=True)
    # Reload: the saved adapter reproduces the outputs.
    fresh = build(base_kind)
    again = peft.PeftModel.from_pretrained(fresh, dest)
    again.eval()
    with torch.no_grad():
        out2 = again(input_ids=t["input_ids"], attention_mask=t["attention_mask"], labels=t["labels"])
    assert torch.allclose(out2.logits, out.logits, atol=1e-5), f"{name}: reloaded adapter differs"
    golden = {**t, "loss": out.loss.detach().reshape(()), "logits": out.logits.detach()}
    golden.update({f"grad.{n}": g.contiguous() for n, g in grads.items()})
    golden.update({f"param.{n}": p.detach().contiguous() for n, p in pm.named_parameters() if p.requires_grad})
    save_file(golden, str(dest / "golden.safetensors"), metadata={"case": name})
    with safetensors.safe_open(str(dest / "adapter_model.safetensors"), "pt") as f:
        saved = {k: list(f.get_tensor(k).shape) for k in f.keys()}
    meta = {"case": name, "base": f"fixtures/{base_kind}", "made_by": "scripts/golden/make_t5_golden.py",
            "versions": versions(), "inputs": "as the base fixture's golden (input_ids, attention_mask, labels)",
            "trainable_init": "every trainable tensor redrawn N(0, 0.3^2) after get_peft_model",
            "grads": sorted(grads), "params": "param.<name>: each trainable tensor's value (as grads)",
            "saved": saved, "loss": out.loss.item()}
    (dest / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"peft/{name}: loss {out.loss.item():.6f}, saved {saved}")


def versions():
    return {"transformers": transformers.__version__, "torch": torch.__version__, "peft": peft.__version__,
            "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version()}


def main():
    os.environ.setdefault("PYTHONHASHSEED", "0")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for kind in ("t5", "t5v11"):
        write_model(kind)
    buckets()
    TT = peft.TaskType.SEQ_2_SEQ_LM
    peft_case("t5_lora", "t5v11", peft.LoraConfig(task_type=TT, r=4, lora_alpha=8, lora_dropout=0.0,
                                                   target_modules=["q", "v"]))
    peft_case("t5_prompt", "t5v11", peft.PromptTuningConfig(task_type=TT, num_virtual_tokens=4))
    peft_case("t5_ptuning", "t5v11", peft.PromptEncoderConfig(task_type=TT, num_virtual_tokens=3,
                                                              encoder_hidden_size=8))
    peft_case("t5_prefix", "t5", peft.PrefixTuningConfig(task_type=TT, num_virtual_tokens=3))


if __name__ == "__main__":
    main()
