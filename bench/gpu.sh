#!/usr/bin/env bash
# GPU step benchmark (under 5 minutes), for a fresh machine with a CUDA GPU and torch:
#   1. bench/step.py in bf16 at the playground size (ours and the plain loop), with MFU
#      against the GPU's measured bf16 matmul peak;
#   2. the same at a 4x larger model (d_model 512, d_ff 2048: 4x the weights per layer);
#   3. four copies of our bf16 step at once on the one GPU (what a fractional-GPU sweep
#      runs), aggregate tokens/s against one copy alone over the same timed window.
# Needs no Ray. Results: the printed tables and one JSON per run under $OUT_DIR.
#
#   bash bench/gpu.sh            # PYTHON=python3.12 OUT_DIR=/tmp/gpu bash bench/gpu.sh
#   WHEELS=wheels bash bench/gpu.sh   # offline: omegaconf, tqdm, numpy from a folder of wheels
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-${OUT:-/tmp/bench-gpu}}
WINDOW_S=${WINDOW_S:-30}
mkdir -p "$OUT_DIR"
# The package is imported from this checkout; nothing is installed into site-packages.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: needs torch with a visible CUDA GPU ($PY)" >&2
    exit 1
fi
# bench/step.py imports the package's config, data and train modules: they need these
# small pure-Python packages besides torch (Ray and pyarrow are not needed).
missing=$("$PY" -c 'import importlib.util as u; print(" ".join(m for m in ("omegaconf", "tqdm", "numpy") if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
    # WHEELS: a folder of wheels for a machine without network (pip download them elsewhere).
    echo "gpu.sh: installing $missing${WHEELS:+ from $WHEELS}"
    if ! "$PY" -m pip install -q ${WHEELS:+--no-index --find-links "$WHEELS"} $missing; then
        echo "gpu.sh: could not install $missing (no network? set WHEELS to a folder of wheels); install them and rerun" >&2
        exit 1
    fi
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))'

step() {  # step NAME ARGS...: one run of bench/step.py, its JSON saved as NAME.json
    local name=$1; shift
    timeout 240 "$PY" bench/step.py --device cuda --curve-steps 0 --json "$@" | tee "$OUT_DIR/$name.log"
    tail -n 1 "$OUT_DIR/$name.log" > "$OUT_DIR/$name.json"
}

echo "== 1. playground size, bf16"
step playground --variants ours_bf16,plain_bf16 --rounds 40 --warmup 5
echo "== 2. 4x larger model, bf16"
step large --variants ours_bf16,plain_bf16 --d-model 512 --d-ff 2048 --rounds 20 --warmup 3

echo "== 3. one copy alone, then four at once (${WINDOW_S} s timed window each)"
COPY_ARGS=(--variants ours_bf16 --no-peak --warmup 5 --duration "$WINDOW_S")
start_at=$(( $(date +%s) + 25 ))  # room for imports and warm-up before the window opens
step alone "${COPY_ARGS[@]}" --start-at "$start_at" > /dev/null
start_at=$(( $(date +%s) + 30 ))
pids=()
for i in 1 2 3 4; do
    step "copy$i" "${COPY_ARGS[@]}" --start-at "$start_at" > /dev/null &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

"$PY" - "$OUT_DIR" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name): return json.loads((out / f"{name}.json").read_text())
print("\nGPU step benchmark (bf16, batch 16 x seq 128)")
print(f"{'model':12}{'ours tok/s':>12}{'plain tok/s':>13}{'ours/plain':>12}{'MFU ours':>10}{'bf16 peak TFLOP/s':>19}")
for name in ("playground", "large"):
    r = load(name)
    print(f"{name:12}{r['tokens_per_s_ours_bf16']:12.0f}{r['tokens_per_s_plain_bf16']:13.0f}"
          f"{r['ratio_vs_plain_bf16']:12.2f}{r['mfu_bf16']:10.1%}{r['peak_gflops_bf16'] / 1e3:19.1f}")
alone = load("alone")["tokens_per_s_ours_bf16"]
copies = [load(f"copy{i}")["tokens_per_s_ours_bf16"] for i in (1, 2, 3, 4)]
print(f"\n4 copies at once: {sum(copies):.0f} tokens/s in all ({', '.join(f'{c:.0f}' for c in copies)}) "
      f"vs {alone:.0f} alone: {sum(copies) / alone:.2f}x")
summary = {"playground": load("playground"), "large": load("large"), "alone_tokens_per_s": alone,
           "copies_tokens_per_s": copies, "aggregate_ratio_4_vs_1": sum(copies) / alone}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({"aggregate_ratio_4_vs_1": summary["aggregate_ratio_4_vs_1"],
                  "mfu_bf16_playground": summary["playground"].get("mfu_bf16"),
                  "mfu_bf16_large": summary["large"].get("mfu_bf16")}))
PY
