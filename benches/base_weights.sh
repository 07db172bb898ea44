#!/usr/bin/env bash
# The real SmolLM2-135M Q4_1 GGUF with its frozen base in f32 and kept quantised, back to back,
# each in its own process on $THREADS threads (default 2): the weights' bytes, the peak RSS of
# loading and of the LoRA training steps, the process's peak, and the training step's and the
# forward pass's time (benches/base_weights.rs; criterion's estimates land in target/criterion).
#
#   benches/base_weights.sh
#
# Needs the model in the asset cache (the main job fetches it). Writes target/base-weights.json.
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS="${THREADS:-2}"
echo "building the criterion benchmark (release)" >&2
BENCH_EXE=$(cargo bench --bench base_weights --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "base_weights":
        print(m["executable"])')
[ -n "$BENCH_EXE" ] || { echo "could not build benches/base_weights.rs" >&2; exit 1; }

for base in f32 quantised; do
  rm -f "target/base-weights-$base.json"
  echo "$base base ($THREADS threads)" >&2
  DEVFT_BASE="$base" RAYON_NUM_THREADS="$THREADS" \
    /usr/bin/time -f %M -o "target/base-weights-$base-peak-rss-kb" "$BENCH_EXE" --bench >&2
  [ -f "target/base-weights-$base.json" ] || { echo "the $base run measured nothing" >&2; exit 1; }
done

python3 - "$THREADS" <<'PY'
import json, sys
threads = int(sys.argv[1])
tokens = 4 * 128
runs = {}
for base in ("f32", "quantised"):
    r = json.load(open(f"target/base-weights-{base}.json"))
    group = f"target/criterion/smollm2_gguf_{base}_base_4x128"
    median = lambda bench: json.load(open(f"{group}/{bench}/new/estimates.json"))["median"]["point_estimate"] / 1e9
    r["train_step_s"] = median("lora_train_step")
    r["forward_s"] = median("inference_forward")
    r["process_peak_rss_bytes"] = int(open(f"target/base-weights-{base}-peak-rss-kb").read().split()[-1]) * 1024
    runs[base] = r
mb = lambda b: f"{b / 1e6:.0f} MB" if b is not None else "n/a"
f, q = runs["f32"], runs["quantised"]
print(f"threads: {threads}")
print("| | f32 base | quantised base | quantised / f32 |")
print("|---|---|---|---|")
for key, label in [("weight_bytes", "weights in memory"), ("load_peak_rss_bytes", "peak RSS while loading"),
                   ("train_step_peak_rss_bytes", "peak RSS of the training steps"),
                   ("process_peak_rss_bytes", "peak RSS of the process")]:
    ratio = f"{q[key] / f[key]:.2f}" if f.get(key) and q.get(key) else "n/a"
    print(f"| {label} | {mb(f.get(key))} | {mb(q.get(key))} | {ratio} |")
for key, label in [("train_step_s", "LoRA training step"), ("forward_s", "inference forward")]:
    print(f"| {label} | {f[key]:.3f} s ({tokens / f[key]:.0f} tokens/s) | {q[key]:.3f} s ({tokens / q[key]:.0f} tokens/s) | {q[key] / f[key]:.2f} (time) |")
json.dump({"threads": threads, **runs}, open("target/base-weights.json", "w"), indent=2)
PY
