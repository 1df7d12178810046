#!/usr/bin/env bash
# Before/after in one run: the server at git ref BEFORE (default: HEAD~1) against this
# working tree, same model and settings, both pinned to CPU 0, the load generator on
# CPU 1, the two servers alternating load by load and round by round so that drift of
# the host hits both alike. Writes one bench JSON per (round, load, side) and a table
# (summary.md). --after-args adds flags to the working tree's server only: HEAD against
# the working tree with --after-args "--workers 2" compares two ways to serve.
#
#   bash benchmarks/lab/ab.sh BEFORE [--concurrency 1,64] [--rounds 2] [--duration 20]
#                                [--out DIR] [--serve-args "--torch-threads 1"]
#                                [--after-args "--workers 2"]
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }

before="HEAD~1" concurrency="1,64" rounds=2 duration=20 out="" serve_args="--torch-threads 1"
after_args=""
if [[ $# -gt 0 && $1 != --* ]]; then before=$1; shift; fi
while [[ $# -gt 0 ]]; do
  case $1 in
    --concurrency) concurrency=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --serve-args) serve_args=$2; shift 2 ;;
    --after-args) after_args=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "ab.sh: unknown option $1 (--help)" >&2; exit 2 ;;
  esac
done

root=$(git rev-parse --show-toplevel)
out=${out:-$(mktemp -d)}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # the servers start from their own trees
tree=$(mktemp -d)
git -C "$root" worktree add --detach -q "$tree" "$before"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  git -C "$root" worktree remove --force "$tree" || true
}
trap cleanup EXIT

start() {  # start SIDE SOURCE PORT [FLAGS]: serve the code at SOURCE on PORT
  local side=$1 source=$2 port=$3 extra=${4:-}
  # shellcheck disable=SC2086  # serve_args and extra are lists of flags
  (cd "$source" && PYTHONPATH="$source" exec taskset -c 0 python -m server.cli serve \
      --port "$port" $serve_args $extra > "$out/$side.log" 2>&1) &
  pids+=($!)
}
start before "$tree" 8301
start after "$root" 8302 "$after_args"
for i in 0 1; do
  port=$((8301 + i))
  until curl -sf "http://127.0.0.1:$port/ready" > /dev/null; do
    kill -0 "${pids[$i]}" 2>/dev/null || { echo "ab.sh: the server on $port exited" >&2; exit 1; }
    sleep 1
  done
done
echo "before: $(git -C "$tree" rev-parse --short HEAD); after: working tree $after_args; out: $out"

IFS=, read -ra loads <<< "$concurrency"
for round in $(seq 1 "$rounds"); do
  for load in "${loads[@]}"; do
    order=(before after)
    if (( (round + load) % 2 )); then order=(after before); fi
    for side in "${order[@]}"; do
      port=8301; [[ $side == after ]] && port=8302
      taskset -c 1 python -m server.cli bench "http://127.0.0.1:$port" --concurrency "$load" \
        --duration "$duration" --warmup 3 --label "$side" \
        --json "$out/r$round-c$load-$side.json" > /dev/null
    done
  done
done

python - "$out" <<'EOF' | tee "$out/summary.md"
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
rows = {}
for f in sorted(out.glob("r*-c*-*.json")):
    _, load, side = f.stem.split("-")
    step = json.loads(f.read_text())["steps"][0]
    rows.setdefault(int(load[1:]), {}).setdefault(side, []).append(step)
print("| clients | before req/s | after req/s | after/before | before p99 ms | after p99 ms |")
print("|---|---|---|---|---|---|")
for load, sides in sorted(rows.items()):
    rps = {s: statistics.mean(x["throughput_rps"] for x in v) for s, v in sides.items()}
    p99 = {s: statistics.mean(x["latency_ms"]["p99"] for x in v) for s, v in sides.items()}
    print(f"| {load} | {rps['before']:.1f} | {rps['after']:.1f} | "
          f"{rps['after'] / rps['before']:.3f} | {p99['before']:.1f} | {p99['after']:.1f} |")
EOF
