#!/usr/bin/env bash
# Training-step throughput and peak memory, tuna vs PyTorch + PEFT, on the CPU: full fine-tuning,
# prompt tuning, prefix tuning and LoRA at MiniLM and SmolLM2-135M shapes. tuna runs once per base
# precision (the frozen block weights in f32, bf16 or int8 per output channel; parameter-efficient
# methods only, full fine-tuning stays f32); PyTorch + PEFT runs in f32 and under bf16 autocast.
# Every (model, shape, method, side, precision) runs as a fresh process (peak RSS is that
# configuration's), with the same thread count, batch, sequence length and step count on both
# sides. Results go to a JSONL file; the CPU model and its matrix instructions are printed above
# the markdown tables. Run on an idle machine: other load skews both sides (OpenMP worse than rayon).
#
#   scripts/bench/train_step.sh     # defaults below: 72 processes (56 without autocast), roughly
#                                   # 30-40 min on 2 idle AVX-512 cores; on AVX2-only 2 cores ~25-35 min
#                                   # (autocast skipped), over an hour with AUTOCAST="f32 bf16"
#   THREADS=4 SMOL_LAYERS=10 scripts/bench/train_step.sh
#   MODELS=minilm METHODS="prompt lora" MINILM_STEPS=2 MINILM_WARMUP=1 scripts/bench/train_step.sh
#
# Environment: THREADS (2), PYTHON (the tuna-golden venv if present, else python3; needs
# scripts/bench/requirements.txt), OUT (target/bench/train_step.jsonl), PEAK_GFLOPS (200: the
# matmul peak of THREADS cores on this machine in GFLOP/s, for the FLOP-floor table; set it),
# MINILM_BATCH ("16 32") / SEQ (64) / STEPS ("10 5") / WARMUP ("2 1"),
# SMOL_BATCH (4) / SEQ ("64 128") / STEPS ("3 2") / WARMUP (1), SMOL_LAYERS (30 = the real depth),
# METHODS ("full prompt prefix lora"), MODELS ("minilm smollm2"), SIDES ("tuna pytorch"),
# BASE_PRECISIONS ("f32 bf16 int8", tuna side), AUTOCAST (PyTorch side: "f32 bf16" = plain f32 and
# --autocast bf16; when unset, "f32" alone on CPUs where PyTorch has no oneDNN bf16, i.e. AVX2-only,
# since autocast there runs ~10x slower than f32 and would dominate the runtime).
# Shapes: MiniLM runs each MINILM_BATCH at MINILM_SEQ, SmolLM2 each SMOL_SEQ at SMOL_BATCH (so the
# defaults are MiniLM 16 x 64 and 32 x 64, SmolLM2 4 x 64 and 4 x 128). STEPS and WARMUP are lists
# matched to the shapes in order; a shorter list repeats its last value (a single number = all).
set -euo pipefail
cd "$(dirname "$0")/../.."

THREADS=${THREADS:-2}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x /root/venvs/tuna-golden/bin/python ]]; then PYTHON=/root/venvs/tuna-golden/bin/python; else PYTHON=python3; fi
fi
OUT=${OUT:-target/bench/train_step.jsonl}
PEAK_GFLOPS=${PEAK_GFLOPS:-200}
METHODS=${METHODS:-full prompt prefix lora}
MODELS=${MODELS:-minilm smollm2}
SIDES=${SIDES:-tuna pytorch}
BASE_PRECISIONS=${BASE_PRECISIONS:-f32 bf16 int8}
# bf16 autocast by default only where PyTorch has oneDNN bf16 kernels (AVX-512 / AMX); without them
# (e.g. AVX2-only CPUs) it runs but ~10x slower than f32, so it is skipped unless AUTOCAST asks for it
if [[ -z "${AUTOCAST:-}" ]]; then
    AUTOCAST="f32 bf16"
    if [[ " $SIDES " == *" pytorch "* ]] && [[ $("$PYTHON" -c 'import torch; print(torch.ops.mkldnn._is_mkldnn_bf16_supported())' 2>/dev/null) != True ]]; then
        AUTOCAST=f32
        autocast_note="PyTorch bf16 autocast skipped: no oneDNN bf16 on this CPU (AUTOCAST=\"f32 bf16\" runs it, ~10x slower than f32)"
        echo "$autocast_note" >&2
    fi
fi
SMOL_LAYERS=${SMOL_LAYERS:-30}
MINILM_BATCH=${MINILM_BATCH:-16 32}
MINILM_SEQ=${MINILM_SEQ:-64}
MINILM_STEPS=${MINILM_STEPS:-10 5}
MINILM_WARMUP=${MINILM_WARMUP:-2 1}
SMOL_BATCH=${SMOL_BATCH:-4}
SMOL_SEQ=${SMOL_SEQ:-64 128}
SMOL_STEPS=${SMOL_STEPS:-3 2}
SMOL_WARMUP=${SMOL_WARMUP:-1}

# nth I LIST...: the I-th (0-based) word of LIST, or its last word when LIST is shorter
nth() {
    local i=$1
    shift
    local words=("$@")
    if ((i < ${#words[@]})); then echo "${words[$i]}"; else echo "${words[${#words[@]} - 1]}"; fi
}

for p in $BASE_PRECISIONS; do
    [[ $p == f32 || $p == bf16 || $p == int8 ]] || { echo "BASE_PRECISIONS: unknown $p (f32|bf16|int8)" >&2; exit 1; }
done
for p in $AUTOCAST; do
    [[ $p == f32 || $p == bf16 ]] || { echo "AUTOCAST: unknown $p (f32|bf16)" >&2; exit 1; }
done

BIN=
if [[ " $SIDES " == *" tuna "* ]]; then
    echo "building the tuna bench (release)..." >&2
    BIN=$(cargo build --release -p tuna-models --bench train_step --message-format=json 2>/dev/null |
        "$PYTHON" -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "train_step" and m.get("executable"):
        print(m["executable"])')
    if [[ -z "$BIN" ]]; then
        cargo build --release -p tuna-models --bench train_step >&2 # show the error
        echo "no train_step executable" >&2
        exit 1
    fi
fi

# the CPU and the matrix instructions it has (x86 flag names, as /proc/cpuinfo spells them)
cpu_model=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)
cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2- || true) "
matrix_isa=(avx2 fma avx512f avx512_vnni avx512_bf16 avx_vnni amx_tile amx_bf16 amx_int8)
present=()
for f in "${matrix_isa[@]}"; do
    if [[ $cpu_flags == *" $f "* ]]; then present+=("$f"); fi
done
if ((${#present[@]})); then isa_line="${present[*]}"; else isa_line="none of ${matrix_isa[*]}"; fi

mkdir -p "$(dirname "$OUT")"
: >"$OUT"
start=$SECONDS
# run LABEL CMD...: one configuration, its last stdout line (the JSON) appended to $OUT; a crash
# leaves an error line instead, so the tables show the rest
run() {
    local label=$1 line
    shift
    echo "[$((SECONDS - start))s] $label" >&2
    if line=$("$@" 2>/dev/null | tail -n 1) && [[ $line == "{"* ]]; then
        echo "$line" >>"$OUT"
    else
        echo "  failed: $label" >&2
    fi
}
for model in $MODELS; do
    if [[ $model == minilm ]]; then
        # shellcheck disable=SC2206
        sizes=($MINILM_BATCH) steps=($MINILM_STEPS) warmups=($MINILM_WARMUP)
    else
        # shellcheck disable=SC2206
        sizes=($SMOL_SEQ) steps=($SMOL_STEPS) warmups=($SMOL_WARMUP)
    fi
    for i in "${!sizes[@]}"; do
        st=$(nth "$i" "${steps[@]}")
        wu=$(nth "$i" "${warmups[@]}")
        if [[ $model == minilm ]]; then
            args=(--batch "${sizes[$i]}" --seq "$MINILM_SEQ" --steps "$st" --warmup "$wu")
        else
            args=(--batch "$SMOL_BATCH" --seq "${sizes[$i]}" --steps "$st" --warmup "$wu" --layers "$SMOL_LAYERS")
        fi
        shape="${args[1]}x${args[3]}"
        for method in $METHODS; do
            for side in $SIDES; do
                if [[ $side == tuna ]]; then
                    for prec in $BASE_PRECISIONS; do
                        [[ $method == full && $prec != f32 ]] && continue # full fine-tuning trains every weight: f32
                        run "$model $shape $method tuna base $prec" env RAYON_NUM_THREADS="$THREADS" \
                            "$BIN" --model "$model" --method "$method" "${args[@]}" --base-precision "$prec"
                    done
                else
                    for ac in $AUTOCAST; do
                        extra=()
                        [[ $ac == bf16 ]] && extra=(--autocast bf16)
                        run "$model $shape $method pytorch $ac" env OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" \
                            "$PYTHON" scripts/bench/train_step.py --model "$model" --method "$method" "${args[@]}" \
                            --threads "$THREADS" "${extra[@]}"
                    done
                fi
            done
        done
    done
done
echo "[$((SECONDS - start))s] done; results in $OUT" >&2
echo
echo "CPU: ${cpu_model:-unknown}; $(nproc) cores online, $THREADS threads per run"
echo "matrix instructions: $isa_line"
if [[ -n "${autocast_note:-}" ]]; then echo "$autocast_note"; fi
if [[ " $SIDES " == *" pytorch "* ]]; then
    "$PYTHON" -c 'import torch
try:
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
except Exception:  # noqa: BLE001
    bf16 = "unknown"
print(f"PyTorch {torch.__version__}: CPU kernels {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 {bf16}")' 2>/dev/null || true
fi
echo
"$PYTHON" scripts/bench/train_step_table.py "$OUT" "$PEAK_GFLOPS"
