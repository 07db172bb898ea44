#!/usr/bin/env bash
# devft against PyTorch + PEFT on the same machine, back to back: the LoRA training step and the
# inference forward pass on SmolLM2-135M's shape (batch 4 x 128, r = 8 on all seven projections),
# each on $THREADS threads (default 2). Prints both, the ratios, and the peak RSS of each process.
#
#   benches/side_by_side.sh [--steps N] [--pairs N]
#
# --pairs N runs the two N times, alternating (devft, PyTorch, devft, ...), and prints every
# pair's ratios and their mean and range: this machine kind's speed drifts by 10-20% over
# minutes, and a ratio is only as good as the two runs it pairs.
#
# The PyTorch side runs in its own virtual environment (target/peft-venv), created on first use
# with pinned versions from PyPI. Criterion's estimates land in target/criterion as usual; the
# comparison is also written to target/side-by-side.json.
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS="${THREADS:-2}"
STEPS=10
PAIRS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) STEPS="$2"; shift 2 ;;
    --pairs) PAIRS="$2"; shift 2 ;;
    *) echo "usage: $0 [--steps N] [--pairs N]" >&2; exit 2 ;;
  esac
done

VENV=target/peft-venv
PINS=(torch==2.15.0 transformers==5.24.0 peft==0.21.2 numpy==2.4.6)
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import peft' 2>/dev/null; then
  echo "creating $VENV with ${PINS[*]}" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PINS[@]}"
fi

echo "building the criterion benchmark (release)" >&2
BENCH_EXE=$(cargo bench --bench model_step --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "model_step":
        print(m["executable"])')
[ -n "$BENCH_EXE" ] || { echo "could not build benches/model_step.rs" >&2; exit 1; }

OUT=target/side-by-side
rm -rf "$OUT" && mkdir -p "$OUT"
CRITERION=target/criterion/smollm2_135m_shape_4x128
for pair in $(seq 1 "$PAIRS"); do
  echo "pair $pair of $PAIRS: devft ($THREADS threads)" >&2
  RAYON_NUM_THREADS="$THREADS" /usr/bin/time -f %M -o "$OUT/devft-$pair-peak-rss-kb" \
    "$BENCH_EXE" --bench >&2
  for bench in lora_train_step inference_forward; do
    cp "$CRITERION/$bench/new/estimates.json" "$OUT/devft-$pair-$bench.json"
  done

  # devft's bench sets glibc's malloc to serve every block from its heap and to keep what is
  # freed (devft::allocator); PyTorch's process gets the same two settings through
  # GLIBC_TUNABLES, so both allocate alike.
  echo "pair $pair of $PAIRS: PyTorch + PEFT ($THREADS threads, the same glibc malloc settings)" >&2
  GLIBC_TUNABLES="glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647" \
    THREADS="$THREADS" /usr/bin/time -f %M -o "$OUT/peft-$pair-peak-rss-kb" \
    "$VENV/bin/python" benches/peft_train_step.py --steps "$STEPS" > "$OUT/peft-$pair.json"
done

python3 - "$THREADS" "$PAIRS" "$OUT" <<'EOF'
import json, statistics, sys
threads, pairs, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
tokens = 4 * 128
def devft_s(pair, bench):
    return json.load(open(f"{out}/devft-{pair}-{bench}.json"))["median"]["point_estimate"] / 1e9
def peak_mb(side, pair):
    return int(open(f"{out}/{side}-{pair}-peak-rss-kb").read().split()[-1]) / 1024
runs = []
for pair in range(1, pairs + 1):
    runs.append({
        "devft": {"train_step_median_s": devft_s(pair, "lora_train_step"),
                  "infer_forward_median_s": devft_s(pair, "inference_forward")},
        "peft": json.load(open(f"{out}/peft-{pair}.json")),
        "peak_rss_mb": {"devft": peak_mb("devft", pair), "peft": peak_mb("peft", pair)},
    })
first = runs[0]["peft"]
print(f"threads: {threads}; torch {first['torch']}, transformers {first['transformers']}, peft {first['peft']}")
print("| pair | devft step | PyTorch + PEFT step | ratio | devft forward | PyTorch + PEFT forward | ratio "
      "| peak RSS, devft / PyTorch |")
print("|---|---|---|---|---|---|---|---|")
ratios = {"train_step": [], "forward": []}
for pair, run in enumerate(runs, 1):
    cells = []
    for name, key in (("train_step", "train_step_median_s"), ("forward", "infer_forward_median_s")):
        d, p = run["devft"][key], run["peft"][key]
        ratios[name].append(p / d)
        cells.append(f"{d:.3f} s ({tokens / d:.0f} tokens/s) | {p:.3f} s ({tokens / p:.0f} tokens/s) | {p / d:.2f}x")
    rss = run["peak_rss_mb"]
    print(f"| {pair} | {' | '.join(cells)} | {rss['devft']:.0f} / {rss['peft']:.0f} MB |")
print("devft's speed / PyTorch + PEFT's, mean (range) over pairs:")
for name, values in ratios.items():
    print(f"  {name}: {statistics.mean(values):.2f}x ({min(values):.2f}-{max(values):.2f})")
json.dump({"threads": threads, "pairs": runs}, open("target/side-by-side.json", "w"), indent=2)
EOF
