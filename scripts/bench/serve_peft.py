#!/usr/bin/env python3
"""PyTorch + PEFT peer of tuna's multi-adapter serving benchmark: greedy decoding of the same
requests spread over N LoRA adapters of one SmolLM2-135M-shaped model (random weights: throughput
does not depend on them), f32 on the CPU.

Two ways PEFT serves several LoRA adapters:
  switch: the requests grouped by adapter; per group `set_adapter(name)` and one batched
          `generate` (what a server without mixed batches does);
  mixed:  PEFT's mixed-adapter inference, `generate(..., adapter_names=[...])` with each row naming
          its adapter (PEFT runs each adapter's rows through its LoRA in turn).

Every request has the same prompt length (no padding on either side) and produces exactly
--new-tokens tokens. Prints one JSON line: tokens/s and the wall time.

With --save DIR it writes the N adapters as PEFT folders DIR/a0 .. DIR/a(N-1) (tuna's side of the
benchmark, scripts/bench/serve.sh, serves those) and exits.

Run: python scripts/bench/serve_peft.py --adapters 4 --mode switch --requests 32 --batch 16 \
         --prompt-len 32 --new-tokens 32 [--layers L] [--threads 2]
"""
import argparse
import json
import time

import torch


def smollm2_config(layers):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers or 30,
                       num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=1e5,
                       tie_word_embeddings=True, max_position_embeddings=8192, attention_dropout=0.0,
                       attn_implementation="sdpa")


def build(args):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_config(args.layers))
    names = [f"a{i}" for i in range(args.adapters)]
    cfg = lambda: LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],  # noqa: E731
                             lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg(), adapter_name=names[0])
    for n in names[1:]:
        model.add_adapter(n, cfg())
    # PEFT starts B at zero (the identity); give every adapter a non-zero update so each one's
    # rows really go through its own matrices.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    model.eval()
    return model, names


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--mode", choices=["switch", "mixed"], default="switch")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, names = build(args)
    if args.save:
        # PEFT puts each adapter not named "default" in a folder of its name under the target.
        model.save_pretrained(args.save, selected_adapters=names)
        return
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 49152, (args.requests, args.prompt_len), generator=g)
    owner = [names[i % len(names)] for i in range(args.requests)]
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               pad_token_id=0)

    def run_batches(rows, **kw):
        for s in range(0, len(rows), args.batch):
            idx = rows[s:s + args.batch]
            ids = prompts[idx]
            extra = {k: [v[i] for i in idx] for k, v in kw.items()}
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen, **extra)

    def serve():
        if args.mode == "switch":
            for n in names:
                model.set_adapter(n)
                run_batches([i for i in range(args.requests) if owner[i] == n])
        else:
            run_batches(list(range(args.requests)), adapter_names=owner)

    with torch.inference_mode():
        # Warm-up: one small batch (allocations, SDPA kernels).
        model.set_adapter(names[0])
        model.generate(input_ids=prompts[:1], attention_mask=torch.ones_like(prompts[:1]), max_new_tokens=2,
                       do_sample=False, pad_token_id=0)
        t0 = time.perf_counter()
        serve()
        dt = time.perf_counter() - t0
    tokens = args.requests * args.new_tokens
    print(json.dumps({"side": "pytorch+peft", "mode": args.mode, "adapters": args.adapters,
                      "requests": args.requests, "batch": args.batch, "prompt_len": args.prompt_len,
                      "new_tokens": args.new_tokens, "layers": args.layers or 30, "threads": args.threads,
                      "seconds": dt, "tokens_per_s": tokens / dt}))


if __name__ == "__main__":
    main()
