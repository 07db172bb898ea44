#!/usr/bin/env bash
# Runs devft on a local Flower 1.42 deployment: one SuperLink and N SuperNodes on 127.0.0.1,
# the app in flower/, the devft_py extension built from bindings/python.
#
#   scripts/run_flower.sh [--rounds N] [--nodes N] [--stop-node-after-round K]
#                         [--stop-signal TERM|KILL] [--fault F] [--out DIR] [--port P]
#                         [--round-timeout S] [--timeout S] [--config 'key=value ...']
#                         [--node-memory LIST]
#                         [--no-build | --wheel] [--check [ARGS...]]
#
#   --rounds N                 devft's `rounds` (default: the app's pyproject, 4)
#   --nodes N                  SuperNodes, one per partition (devft's `num-partitions`; default 2)
#   --stop-node-after-round K  stop SuperNode 1 (partition 1) once round K has finished
#   --stop-signal S            TERM (default: it deregisters, the SuperLink fails its messages at
#                              once) or KILL (a crash: noticed after its heartbeat lapses, 36-60 s)
#   --fault F                  partition 1 sends malformed replies: comma-separated per-round
#                              kinds (garbage, truncated, oversized, nan, wrong-key, devft-error,
#                              raise, none)
#   --out DIR                  where the ServerApp writes adapter.safetensors, ledger.json,
#                              metrics.json, settings.json, flower.json (default target/flower-out)
#   --port P                   the SuperLink's port (default 9190; SuperNodes use P+1..P+N)
#   --round-timeout S          seconds the ServerApp waits for a round's replies (default 600)
#   --timeout S                seconds the whole `flwr run` may take (default 1800)
#   --config 'k=v ...'         more run config overrides (TOML values), may repeat; they win
#   --node-memory LIST         comma-separated memory budgets SuperNode I declares in its node
#                              config (`memory-budget`, e.g. 4M; `none` or empty: no limit)
#   --no-build                 use the devft_py already installed in the venv
#   --wheel                    build devft_py as a release wheel with maturin and install that
#                              (default: a cargo build of the extension on the test profile, which
#                              reuses what `cargo test` compiled, copied into the venv)
#   --check [ARGS...]          afterwards run scripts/flower_check.py OUT ARGS... (all the
#                              remaining arguments)
#
# Environment: PYTHON (the interpreter for the venv, default python3). Linux only (setsid, .so).
# Logs: OUT/logs/{superlink,supernode-I,run}.log. Exit status: the run's (non-zero when the
# ServerApp failed or the outputs are missing), or the checker's with --check.
set -euo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.."
ROOT=$PWD

FLWR_VERSION=1.42.0
MATURIN_VERSION=1.16.0
GGUF_VERSION=0.19.0

ROUNDS=""
NODES=2
STOP_AFTER=""
STOP_SIGNAL=TERM
FAULT=none
OUT=target/flower-out
PORT=9190
ROUND_TIMEOUT=600
RUN_TIMEOUT=1800
BUILD=1
CHECK=0
CHECK_ARGS=()
CONFIG=()
NODE_MEMORY=()

usage() { sed -n '2,33p' "$SELF" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
need() { [[ $# -ge 2 && -n $2 ]] || { echo "run_flower.sh: $1 needs a value" >&2; usage; }; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --rounds) need "$@"; ROUNDS=$2; shift 2 ;;
    --nodes) need "$@"; NODES=$2; shift 2 ;;
    --stop-node-after-round) need "$@"; STOP_AFTER=$2; shift 2 ;;
    --stop-signal) need "$@"; STOP_SIGNAL=$2; shift 2 ;;
    --fault) need "$@"; FAULT=$2; shift 2 ;;
    --out) need "$@"; OUT=$2; shift 2 ;;
    --port) need "$@"; PORT=$2; shift 2 ;;
    --round-timeout) need "$@"; ROUND_TIMEOUT=$2; shift 2 ;;
    --timeout) need "$@"; RUN_TIMEOUT=$2; shift 2 ;;
    --config) need "$@"; CONFIG+=(-c "$2"); shift 2 ;;
    --node-memory) need "$@"; IFS=, read -r -a NODE_MEMORY <<< "$2"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --wheel) BUILD=wheel; shift ;;
    --check) CHECK=1; shift; CHECK_ARGS=("$@"); break ;;
    -h|--help) usage 0 ;;
    *) echo "run_flower.sh: unknown argument $1" >&2; usage ;;
  esac
done
[[ $NODES =~ ^[1-9][0-9]*$ ]] || { echo "--nodes must be a positive integer" >&2; exit 2; }
[[ -z $STOP_AFTER || $STOP_AFTER =~ ^[1-9][0-9]*$ ]] || { echo "--stop-node-after-round must be a positive integer" >&2; exit 2; }
[[ -z $STOP_AFTER || $NODES -ge 2 ]] || { echo "--stop-node-after-round needs at least 2 nodes" >&2; exit 2; }
[[ $STOP_SIGNAL == TERM || $STOP_SIGNAL == KILL ]] || { echo "--stop-signal is TERM or KILL" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS=$OUT/logs
rm -rf "$LOGS" "$OUT"/{adapter.safetensors,ledger.json,metrics.json,settings.json,flower.json}
mkdir -p "$LOGS"
t_start=$SECONDS
say() { printf '[run_flower %3ds] %s\n' $((SECONDS - t_start)) "$*"; }

# --- the environment: flwr and the devft_py extension ---------------------------------------
VENV=target/flower-venv
PY=$VENV/bin/python
# gguf: bindings/python/tests/test_bindings.py writes its quantised GGUF model with it.
PINS="flwr==$FLWR_VERSION gguf==$GGUF_VERSION"
if [[ ! -x $PY || "$(cat "$VENV/.pins" 2>/dev/null)" != "$PINS" ]]; then
  say "creating $VENV ($PINS)"
  rm -rf "$VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
  "$PY" -m pip install --quiet --disable-pip-version-check $PINS
  echo "$PINS" > "$VENV/.pins"
fi
export PATH=$ROOT/$VENV/bin:$PATH
CARGO_TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [[ $BUILD == wheel ]]; then
  say "building the devft_py wheel (maturin $MATURIN_VERSION, release profile)"
  "$PY" -m pip install --quiet --disable-pip-version-check "maturin==$MATURIN_VERSION"
  rm -rf target/flower-wheels
  maturin build --release -m bindings/python/Cargo.toml -i "$PY" --out target/flower-wheels \
    > "$LOGS/build.log" 2>&1 || { tail -40 "$LOGS/build.log"; exit 1; }
  "$PY" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps target/flower-wheels/*.whl
elif [[ $BUILD == 1 ]]; then
  # The test profile, so that the dependencies `cargo test` compiled are reused (maturin's own
  # cargo call would compile burn again on the dev profile).
  say "building the devft_py extension (cargo, test profile)"
  cargo build -p devft-py --lib --profile test --features extension-module \
    > "$LOGS/build.log" 2>&1 || { tail -40 "$LOGS/build.log"; exit 1; }
  "$PY" -m pip uninstall --quiet --yes devft-py > /dev/null 2>&1 || true
  SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
  cp "$CARGO_TARGET/debug/libdevft_py.so" "$SITE/devft_py.abi3.so"
fi
"$PY" -c 'import devft_py' || { echo "devft_py is not installed in $VENV (drop --no-build)" >&2; exit 1; }

# --- Flower's configuration: hermetic, offline --------------------------------------------
export FLWR_HOME=$ROOT/target/flower-home
export FLWR_DISABLE_UPDATE_CHECK=1
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "devft-local"

[superlink.devft-local]
address = "127.0.0.1:$PORT"
insecure = true
EOF

# --- the deployment ------------------------------------------------------------------------
PIDS=()  # process group leaders (setsid): SuperNodes first, the SuperLink last
stop_group() {  # stop_group PID SIGNAL
  kill -"$2" -- "-$1" 2>/dev/null || kill -"$2" "$1" 2>/dev/null || true
}
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  local pid
  for pid in "${PIDS[@]}"; do stop_group "$pid" TERM; done
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && break
    sleep 0.5
  done
  for pid in "${PIDS[@]}"; do stop_group "$pid" KILL; done
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for ((p = PORT; p <= PORT + NODES; p++)); do
  if port_open "$p"; then echo "port $p is in use (another run?); pick --port" >&2; exit 1; fi
done

say "starting the SuperLink on 127.0.0.1:$PORT"
setsid flower-superlink --insecure --disable-runtime-dependency-installation \
  --host 127.0.0.1 --port "$PORT" > "$LOGS/superlink.log" 2>&1 &
SUPERLINK=$!
for _ in $(seq 1 100); do port_open "$PORT" && break; sleep 0.2; done
port_open "$PORT" || { tail -20 "$LOGS/superlink.log"; echo "the SuperLink did not start" >&2; PIDS+=("$SUPERLINK"); exit 1; }

NODE_PIDS=()
for ((i = 0; i < NODES; i++)); do
  budget=$(echo "${NODE_MEMORY[i]:-}" | tr -d ' ')
  node_config="partition-id=$i num-partitions=$NODES"
  [[ -z $budget || $budget == none ]] || node_config+=" memory-budget=\"$budget\""
  setsid flower-supernode --insecure --superlink "127.0.0.1:$PORT" --port $((PORT + 1 + i)) \
    --node-config "$node_config" > "$LOGS/supernode-$i.log" 2>&1 &
  NODE_PIDS+=($!)
  PIDS+=($!)
done
PIDS+=("$SUPERLINK")
say "started $NODES SuperNode(s): pids ${NODE_PIDS[*]}"

# --- the run -------------------------------------------------------------------------------
RUN_CONFIG="out-dir=\"$OUT\" model=\"$ROOT/tests/fixtures/tiny-llama\" data=\"$ROOT/tests/fixtures/data/tiny_instructions.jsonl\""
RUN_CONFIG+=" num-partitions=$NODES fault=\"$FAULT\" round-timeout=$ROUND_TIMEOUT"
[[ -n $ROUNDS ]] && RUN_CONFIG+=" rounds=$ROUNDS"
say "flwr run flower devft-local -c '$RUN_CONFIG' ${CONFIG[*]}"
stopped=0
while IFS= read -r line; do
  printf '%s\n' "$line"
  printf '%s\n' "$line" >> "$LOGS/run.log"
  if [[ -n $STOP_AFTER && $stopped == 0 && $line == *"[devft] round $STOP_AFTER finished"* ]]; then
    stop_group "${NODE_PIDS[1]}" "$STOP_SIGNAL"
    stopped=1
    say "stopped SuperNode 1 (partition 1, pid ${NODE_PIDS[1]}) with SIG$STOP_SIGNAL after round $STOP_AFTER"
  fi
done < <(timeout "$RUN_TIMEOUT" flwr run flower devft-local --stream -c "$RUN_CONFIG" "${CONFIG[@]}" 2>&1)

RUN_ID=$(sed -n 's/.*Successfully started run \([0-9]*\).*/\1/p' "$LOGS/run.log" | head -1)
[[ -n $RUN_ID ]] || { echo "the run did not start" >&2; exit 1; }
STATUS=$(flwr ls devft-local --run-id "$RUN_ID" --format json 2>/dev/null \
  | "$PY" -c 'import json,sys; r=json.load(sys.stdin)["runs"][0]; print(r.get("status", "?"))' 2>/dev/null || echo unknown)
say "run $RUN_ID: status $STATUS"
if [[ -n $STOP_AFTER && $stopped == 0 ]]; then
  echo "round $STOP_AFTER never finished: SuperNode 1 was not stopped" >&2; exit 1
fi
if [[ $STATUS != *completed* ]]; then
  for f in "$LOGS"/supernode-*.log; do echo "--- $f"; tail -15 "$f"; done
  echo "the run did not complete (status $STATUS)" >&2; exit 1
fi
for f in adapter.safetensors ledger.json metrics.json settings.json flower.json; do
  [[ -s $OUT/$f ]] || { echo "the run wrote no $OUT/$f" >&2; exit 1; }
done
say "outputs in $OUT"
if [[ $CHECK == 1 ]]; then
  say "checking against devft_py.run_in_process"
  "$PY" scripts/flower_check.py "$OUT" "${CHECK_ARGS[@]}"
fi
say "done"
