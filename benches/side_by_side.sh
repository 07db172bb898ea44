#!/usr/bin/env bash
# devft against PyTorch + PEFT on the same machine, back to back: the LoRA training step and the
# inference forward pass on SmolLM2-135M's shape (batch 4 x 128, r = 8 on all seven projections),
# each on $THREADS threads (default 2). Prints both, the ratios, and the peak RSS of each process.
#
#   benches/side_by_side.sh [--steps N]
#
# The PyTorch side runs in its own virtual environment (target/peft-venv), created on first use
# with pinned versions from PyPI. Criterion's estimates land in target/criterion as usual; the
# comparison is also written to target/side-by-side.json.
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS="${THREADS:-2}"
STEPS=10
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) STEPS="$2"; shift 2 ;;
    *) echo "usage: $0 [--steps N]" >&2; exit 2 ;;
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

echo "devft ($THREADS threads)" >&2
RAYON_NUM_THREADS="$THREADS" /usr/bin/time -f %M -o target/devft-peak-rss-kb \
  "$BENCH_EXE" --bench >&2

# devft's bench sets glibc's malloc to keep freed heap memory (devft::allocator); PyTorch's
# process gets the same two settings through GLIBC_TUNABLES, so both allocate alike.
echo "PyTorch + PEFT ($THREADS threads, the same glibc malloc settings)" >&2
GLIBC_TUNABLES="glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=2147483647" \
  THREADS="$THREADS" /usr/bin/time -f %M -o target/peft-peak-rss-kb \
  "$VENV/bin/python" benches/peft_train_step.py --steps "$STEPS" > target/peft-result.json

python3 - "$THREADS" <<'EOF'
import json, sys
threads = int(sys.argv[1])
tokens = 4 * 128
def median_s(bench):
    path = f"target/criterion/smollm2_135m_shape_4x128/{bench}/new/estimates.json"
    return json.load(open(path))["median"]["point_estimate"] / 1e9
def peak_mb(name):
    return int(open(f"target/{name}-peak-rss-kb").read().split()[-1]) / 1024
peft = json.load(open("target/peft-result.json"))
rows = {
    "train_step": (median_s("lora_train_step"), peft["train_step_median_s"]),
    "forward": (median_s("inference_forward"), peft["infer_forward_median_s"]),
}
print(f"threads: {threads}; torch {peft['torch']}, transformers {peft['transformers']}, peft {peft['peft']}")
print(f"| | devft | PyTorch + PEFT | devft speed / PyTorch's |")
print(f"|---|---|---|---|")
for name, (d, p) in rows.items():
    print(f"| {name} | {d:.3f} s ({tokens / d:.0f} tokens/s) | {p:.3f} s ({tokens / p:.0f} tokens/s) | {p / d:.2f}x |")
print(f"| peak RSS of the process | {peak_mb('devft'):.0f} MB | {peak_mb('peft'):.0f} MB | |")
json.dump({
    "threads": threads, "peft": peft,
    "devft": {"train_step_median_s": rows["train_step"][0], "infer_forward_median_s": rows["forward"][0]},
    "peak_rss_mb": {"devft": peak_mb("devft"), "peft": peak_mb("peft")},
}, open("target/side-by-side.json", "w"), indent=2)
EOF
