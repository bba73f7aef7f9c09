#!/usr/bin/env python3
"""PyTorch + PEFT peer of tuna's training-step bench (crates/tuna-models/benches/train_step.rs).

One (model, method) configuration per process, so the peak RSS is that configuration's: random
initialized Hugging Face models at MiniLM (BertModel + a 2-class nn.Linear head on the mean-pooled
output, cross-entropy) or SmolLM2-135M shape (LlamaForCausalLM with labels = input ids), f32 on
the CPU, SDPA attention (transformers' default), dropout 0 (tuna's models have none), AdamW
(lr 1e-4, weight decay 0.01, PyTorch's default implementation unless --adamw says otherwise).
`--autocast bf16` runs the forward pass and the loss under `torch.autocast(device, dtype=bfloat16)`,
PyTorch's CPU mixed precision as its users run it: master weights, gradients and AdamW stay f32,
autocast-eligible ops (matmuls, linear layers, SDPA) compute in bf16 with per-forward weight casts.
Prints one JSON line in the same format as the tuna bench, plus "precision" ("f32" or
"bf16-autocast").

Run: python scripts/bench/train_step.py --model minilm --method lora --batch 16 --seq 64 \
         --steps 10 --warmup 2 [--layers L] [--threads 2] [--autocast bf16]
"""
import argparse
import json
import sys
import time

import torch
from torch import nn


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def minilm_config():
    from transformers import BertConfig
    return BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2,
                      layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      hidden_act="gelu", attn_implementation="sdpa")


def smollm2_config(layers):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers or 30,
                       num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=1e5,
                       tie_word_embeddings=True, max_position_embeddings=8192, attention_dropout=0.0,
                       attn_implementation="sdpa")


def peft_config(method, task_type, lora_targets):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig
    if method == "prompt":
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=20, prompt_tuning_init="RANDOM")
    if method == "prefix":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=20, prefix_projection=False)
    if method == "lora":
        return LoraConfig(task_type=task_type, r=8, lora_alpha=16, target_modules=lora_targets, lora_dropout=0.0,
                          bias="none")
    raise ValueError(f"unknown method {method}")


class BertClassifier(nn.Module):
    """Mean-pooled encoder output through a 2-class linear head (the head trains in every method).
    `mask` covers the encoder's output positions (wider than the input with a soft prompt)."""

    def __init__(self, encoder, hidden):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(hidden, 2)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, ids, mask, targets, n_prompt):
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        if n_prompt:
            mask = torch.cat([mask.new_ones(mask.shape[0], n_prompt), mask], dim=1)
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return nn.functional.cross_entropy(self.classifier(pooled), targets, ignore_index=-100)


def build(args):
    from peft import TaskType, get_peft_model
    from transformers import BertModel, LlamaForCausalLM
    b, t = args.batch, args.seq
    if args.model == "minilm":
        cfg = minilm_config()
        encoder = BertModel(cfg, add_pooling_layer=False)
        n_prompt = 0
        if args.method != "full":
            encoder = get_peft_model(encoder, peft_config(args.method, TaskType.FEATURE_EXTRACTION,
                                                          ["query", "value"]))
            n_prompt = 20 if args.method == "prompt" else 0
        model = BertClassifier(encoder, cfg.hidden_size)
        ids = torch.randint(0, cfg.vocab_size, (b, t))
        mask = torch.ones(b, t, dtype=torch.long)
        targets = torch.randint(0, 2, (b,))
        step_loss = lambda: model(ids, mask, targets, n_prompt)  # noqa: E731
        layers = cfg.num_hidden_layers
    elif args.model == "smollm2":
        cfg = smollm2_config(args.layers)
        model = LlamaForCausalLM(cfg)
        if args.grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.method != "full":
            model = get_peft_model(model, peft_config(args.method, TaskType.CAUSAL_LM, ["q_proj", "v_proj"]))
        ids = torch.randint(0, cfg.vocab_size, (b, t))
        step_loss = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
        layers = cfg.num_hidden_layers
    elif args.model == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        cfg = GPT2Config(n_layer=args.layers or 12, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         attn_implementation="sdpa")
        model = GPT2LMHeadModel(cfg)
        if args.method != "full":
            model = get_peft_model(model, peft_config(args.method, TaskType.CAUSAL_LM, ["c_attn"]))
        ids = torch.randint(0, cfg.vocab_size, (b, t))
        step_loss = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
        layers = cfg.n_layer
    else:
        raise ValueError(f"unknown model {args.model}")
    if args.device == "cuda":
        model = model.cuda()
        dev_ids = ids.cuda()
        if args.model == "minilm":
            m2, t2 = mask.cuda(), targets.cuda()
            step_loss = lambda: model(dev_ids, m2, t2, n_prompt)  # noqa: E731
        else:
            step_loss = lambda: model(input_ids=dev_ids, labels=dev_ids).loss  # noqa: E731
    model.train()
    if args.grad_ckpt and args.model != "smollm2":
        raise ValueError("--grad-ckpt is wired for smollm2 only")
    params = [p for p in model.parameters() if p.requires_grad]
    if args.grad_ckpt:
        step_loss()  # a refusal (PEFT's prefix tuning with checkpointing) shows at the first forward
    return model, params, step_loss, layers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["minilm", "smollm2", "gpt2"], required=True)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: f32 eager PyTorch + PEFT on the GPU (the GPU check's peer)")
    ap.add_argument("--method", choices=["full", "prompt", "prefix", "lora"], required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grad-ckpt", action="store_true",
                    help="gradient checkpointing on (transformers' non-reentrant; prints the error where PEFT refuses)")
    ap.add_argument("--autocast", choices=["off", "bf16"], default="off",
                    help="bf16: forward and loss under torch.autocast(dtype=bfloat16); weights stay f32")
    ap.add_argument("--adamw", choices=["default", "foreach", "fused"], default="default",
                    help="PyTorch AdamW implementation (default: PyTorch's choice, the for-loop one on CPU)")
    ap.add_argument("--tf32", action="store_true",
                    help="CUDA: f32 matmuls on the tensor cores in TF32 (torch.backends.cuda.matmul.allow_tf32), "
                         "the peer of tuna's --tf32")
    ap.add_argument("--profile-ops", action="store_true",
                    help="also run torch.profiler over the measured steps and print its per-op table (self CPU "
                         "time, top 20) to stderr: the peer of `tuna profile`")
    args = ap.parse_args()
    if args.tf32 and args.device != "cuda":
        ap.error("--tf32 needs --device cuda")
    # Explicitly either way: PyTorch's default for matmuls has changed between releases.
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    precision = "bf16-autocast" if args.autocast == "bf16" else "f32"
    try:
        model, params, step_loss, layers = build(args)
        if args.autocast == "bf16":
            plain_loss = step_loss

            def step_loss():
                with torch.autocast(args.device, dtype=torch.bfloat16):
                    return plain_loss()
    except Exception as e:  # noqa: BLE001 - the refusal is the result
        print(json.dumps({"side": "pytorch+peft", "model": args.model, "method": args.method, "batch": args.batch,
                          "seq": args.seq, "grad_ckpt": args.grad_ckpt, "precision": precision,
                          "error": f"{type(e).__name__}: {e}"}))
        return
    kw = {"foreach": True} if args.adamw == "foreach" else {"fused": True} if args.adamw == "fused" else {}
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **kw)
    fwd = bwd = upd = 0.0
    start = time.perf_counter()
    loss = None
    prof = None
    try:
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                fwd = bwd = upd = 0.0
                if args.profile_ops:
                    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                    prof.__enter__()
                start = time.perf_counter()
            t0 = time.perf_counter()
            loss = step_loss()
            if args.device == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if args.device == "cuda":
                loss.item()  # as the tuna side, each step ends reading the loss back
            t3 = time.perf_counter()
            fwd, bwd, upd = fwd + t1 - t0, bwd + t2 - t1, upd + t3 - t2
    except Exception as e:  # noqa: BLE001 - e.g. an op autocast cannot run: the row shows the error
        print(json.dumps({"side": "pytorch+peft", "model": args.model, "method": args.method, "batch": args.batch,
                          "seq": args.seq, "grad_ckpt": args.grad_ckpt, "precision": precision,
                          "error": f"{type(e).__name__}: {e}"}))
        return
    secs = time.perf_counter() - start
    n = args.steps
    if prof is not None:
        prof.__exit__(None, None, None)
        print(f"torch.profiler, {n} steps (times are totals over them; the profiler's own overhead included):",
              file=sys.stderr)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)
    print(json.dumps({
        "side": "pytorch+peft", "model": args.model, "method": args.method, "layers": layers,
        "batch": args.batch, "seq": args.seq, "steps": n,
        "tokens_per_s": round(args.batch * args.seq * n / secs, 1), "step_ms": round(1e3 * secs / n, 2),
        "fwd_ms": round(1e3 * fwd / n, 2), "bwd_ms": round(1e3 * bwd / n, 2), "opt_ms": round(1e3 * upd / n, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1), "trainable": sum(p.numel() for p in params),
        "threads": torch.get_num_threads(), "loss": round(loss.item(), 5),
        "attn": "sdpa", "adamw": args.adamw, "precision": precision, "device": args.device,
        "grad_ckpt": args.grad_ckpt, "profiled": prof is not None, "tf32": args.tf32,
    }))


if __name__ == "__main__":
    main()
