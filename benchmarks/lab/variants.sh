#!/usr/bin/env bash
# Batching settings side by side on one server: this working tree's default server pinned
# to CPU 0, the load generator on CPU 1. Each workload gets a fresh server (what the
# engine learned from one workload does not steer the next); for each round, each
# variant's settings are PATCHed in (the defaults restored first) and the workload runs
# at every load, so drift of the host hits all variants alike. One bench JSON per
# (workload, variant, round) in --out, then a table of medians over the rounds
# (summary.md), with latencies by kind (query, chunk) for the mix.
#
#   bash benchmarks/lab/variants.sh --variant 'LABEL={"min_batch_gain": 0.05}' ...
#        [--workloads mix,queries] [--concurrency 64] [--rate 73] [--rounds 2]
#        [--duration 12] [--warmup 2] [--out DIR] [--serve-args "--torch-threads 1"]
# A variant labelled `default` with `{}` runs the defaults. Without --concurrency and
# --rate, 64 clients.
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

workloads="mix" concurrency="" rate="" rounds=2 duration=12 warmup=2 out=""
serve_args="--torch-threads 1" variants=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --variant) variants+=("$2"); shift 2 ;;
    --workloads) workloads=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --serve-args) serve_args=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "variants.sh: unknown option $1 (--help)" >&2; exit 2 ;;
  esac
done
[[ ${#variants[@]} -gt 0 ]] || variants=('default={}')
[[ -n $concurrency || -n $rate ]] || concurrency=64
out=${out:-$(mktemp -d)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(git rev-parse --show-toplevel)"  # this working tree's server and its python -m

loads=()
[[ -n $concurrency ]] && loads+=(--concurrency "$concurrency")
[[ -n $rate ]] && loads+=(--rate "$rate")
server=""
stop() { [[ -z $server ]] || { kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }; server=""; }
trap stop EXIT
for workload in ${workloads//,/ }; do
  port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  url="http://127.0.0.1:$port"
  # shellcheck disable=SC2086
  taskset -c 0 python -m server.cli serve --port "$port" $serve_args >"$out/server-$workload.log" 2>&1 &
  server=$!
  for _ in $(seq 600); do
    curl -sf "$url/ready" >/dev/null && break
    kill -0 "$server" 2>/dev/null || { echo "variants.sh: the server exited (server-$workload.log)" >&2; exit 1; }
    sleep 0.5
  done
  curl -sf "$url/ready" >/dev/null || { echo "variants.sh: the server did not start" >&2; exit 1; }
  # The settings as PATCH takes them (the reply also describes the SLO controller's state).
  defaults=$(curl -sf "$url/admin/batching" | python -c \
    'import json, sys; print(json.dumps({k: v for k, v in json.load(sys.stdin).items() if k not in ("configured", "slo")}))')
  for round in $(seq "$rounds"); do
    for variant in "${variants[@]}"; do
      label=${variant%%=*} settings=${variant#*=}
      curl -sf -X PATCH "$url/admin/batching" -H 'content-type: application/json' -d "$defaults" >/dev/null
      curl -sf -X PATCH "$url/admin/batching" -H 'content-type: application/json' -d "$settings" >/dev/null
      echo "$workload, round $round, $label" >&2
      taskset -c 1 python -m server.cli bench "$url" --workload "$workload" "${loads[@]}" \
        --duration "$duration" --warmup "$warmup" --label "$label" \
        --json "$out/$workload-$label-$round.json" >/dev/null
    done
  done
  stop
done
python -m benchmarks.lab.variants "$out" "${variants[@]}" >"$out/summary.md"
cat "$out/summary.md"
