#!/usr/bin/env python3
"""Checks .assets/all-MiniLM-L6-v2 (from scripts/fetch-assets.sh) with transformers: the
sentence-transformers embedding (mask-weighted mean of the last hidden states) of two sentences.

The reference value (sentence-transformers' own): the cosine of "A man is eating food." and "A man is eating a piece of bread." is 0.7553.
Prints the cosine and the first embedding values (for tuna's own MiniLM test) and exits non-zero on a miss.
"""

import sys
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / ".assets" / "all-MiniLM-L6-v2"
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread."]
EXPECTED = 0.7553


def main():
    tok = AutoTokenizer.from_pretrained(FOLDER)
    model = AutoModel.from_pretrained(FOLDER, attn_implementation="eager").float().eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    cos = torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0).item()
    print("ids:", batch["input_ids"].tolist())
    print("embedding[0][:6]:", [round(v, 6) for v in emb[0][:6].tolist()])
    print(f"cosine: {cos:.6f} (expected {EXPECTED})")
    if abs(cos - EXPECTED) > 5e-5:
        sys.exit("cosine differs from the reference 0.7553")


if __name__ == "__main__":
    main()
