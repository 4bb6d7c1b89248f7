#!/usr/bin/env bash
# The one prepared GPU check (issue #13). On a machine with a CUDA device, in under ~8 minutes on one H100/H200:
#   1. the GPU-marked tests (Triton kernels for real, flash-attn paths);
#   2. lightning attention (Triton) vs flash-attn 2 and fla's chunk_simple_gla at 2K..64K, fwd and fwd+bwd
#      (B=1, H=32, head_dim 128, bf16: bench/lightning.py);
#   3. 10 steps of configs/tnl-1b.yaml at 8K and 32K tokens, bf16, selective activation checkpointing, one
#      sequence per step: tokens/s, MFU and peak memory next to the planner's prediction (pretrain/plan.py).
# It appends one table, with the card's name and the date, to bench/RESULTS.md. Without a CUDA device it says so
# and exits 3, touching nothing.
#
#   bash bench/gpu_check.sh            (PYTHON=... to choose the interpreter; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device is visible to $PY (torch.cuda.is_available() is False): nothing was run" \
         "and bench/RESULTS.md is unchanged; run this on a machine with a GPU" >&2
    exit 3
fi
CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "gpu_check on $CARD (work folder $WORK)"

echo "== 1. GPU-marked tests"
if "$PY" -m pytest -q -m gpu tests > "$WORK/tests.txt" 2>&1; then TESTS=passed; else TESTS=FAILED; fi
tail -n 3 "$WORK/tests.txt"

echo "== 2. lightning attention vs flash-attn 2 and fla"
"$PY" -m bench.lightning --seqlens 2048,8192,32768,65536 --heads 32 --dim 128 --batch 1 --dtype bf16 \
    | tee "$WORK/lightning.txt"

echo "== 3. tnl-1b, 10 steps at 8K and 32K (bf16, selective AC)"
ROWS=""
for L in 8192 32768; do
    RUN="$WORK/run-$L"
    "$PY" -m pretrain --config configs/tnl-1b.yaml --data.loader=concat --data.seq_len=$L \
        --data.tokens_per_step=$L --data.prepared_dir="$WORK/data" --model.vocab_size=32000 \
        --train.steps=10 --train.warmup_steps=2 --train.activation_checkpointing=selective \
        --train.out_dir="$RUN" --log.every=1 --log.tensorboard=false --checkpoint.every=0 > "$WORK/train-$L.txt" 2>&1
    ROW=$("$PY" - "$RUN" "$L" <<'PYEOF'
import json, sys
from pretrain.config import load_config
from pretrain.plan import DEVICES, Layout, estimate
import torch
run, seq = sys.argv[1], int(sys.argv[2])
recs = [json.loads(x) for x in open(f"{run}/metrics.jsonl")][3:]  # after compile/warm-up steps
tok = sum(r["tokens_per_s"] for r in recs) / len(recs)
mfu = sum(r["mfu"] or 0 for r in recs) / len(recs)
peak = max(r.get("mem_peak_bytes", r.get("memory_bytes", 0)) for r in recs)
name = torch.cuda.get_device_name(0)
device = "h200-141gb" if "H200" in name else "h100-80gb"
cfg = load_config("configs/tnl-1b.yaml", ["--model.vocab_size=32000", "--train.activation_checkpointing=selective"])
e = estimate(cfg, Layout(1, 1, 1, 1, "selective", 1), seq, seq, device)
print(f"| {seq} | {tok:,.0f} | {100 * mfu:.1f}% | {peak / 2**30:.1f} | {e['used'] / 2**30:.1f} | "
      f"{seq / e['time']:,.0f} |")
PYEOF
)
    echo "$ROW"
    ROWS="$ROWS$ROW"$'\n'
done

{
    echo
    echo "## GPU check on $CARD ($(date -u +%Y-%m-%d), bash bench/gpu_check.sh)"
    echo
    echo "GPU-marked tests: $TESTS."
    echo
    echo '```'
    cat "$WORK/lightning.txt"
    echo '```'
    echo
    echo "configs/tnl-1b.yaml (vocab 32000), one sequence per step, bf16, selective AC, steps 4-10:"
    echo
    echo "| seq | tokens/s | MFU | peak GiB | planner GiB | planner tokens/s |"
    echo "|---|---|---|---|---|---|"
    printf '%s' "$ROWS"
} >> bench/RESULTS.md
echo "appended to bench/RESULTS.md"
[ "$TESTS" = passed ]
