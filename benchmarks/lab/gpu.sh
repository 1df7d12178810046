#!/usr/bin/env bash
# One command for a GPU machine: install a CUDA build of torch and microbatch, run the
# gpu-marked tests, the raw GPU ceiling, naive vs microbatch vs ceiling
# (benchmarks.compare) and the front-end scaling curve (microbatch serve --workers N loaded
# by benchmarks.bench), CUDA graphs against plain compile (--compile-mode reduce-overhead),
# collating ahead against not (--collate-ahead off), then write the report
# (benchmarks.lab.gpu_report).
#
#   bash benchmarks/lab/gpu.sh --help
#
# A step that fails is reported and the next one runs (a GPU machine is often lent for a
# short while; one broken step should not cost the others); the exit status is 1 then.
# For a short lease: --quick, --time-limit (skip what would not end in time) and
# --archive (the results so far in one file after every step); for a machine that
# cannot reach a package index: --bundle (made by python -m benchmarks.lab.gpu_bundle).
set -euo pipefail
invoked_from=$PWD
cd "$(dirname "$0")/../.."

python=${PYTHON:-$(command -v python || command -v python3 || echo python)}
nvidia_smi=${NVIDIA_SMI:-nvidia-smi}
torch_index_url=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}
torch_version=${TORCH_VERSION:-2.13.0}

dry_run=0
skip_install=0
bundle=""
archive=""
time_limit=0
name=""
duration=5
warmup=2
workers_list=1,2,4,8
concurrency_list=1,4,16,64,256,512
processes=4
port=8765
report_only=""

usage() {
  cat <<'EOF'
usage: bash benchmarks/lab/gpu.sh [options]

On a machine with an NVIDIA GPU, in the current Python environment (activate a venv
first): install a CUDA build of torch and microbatch[dev,bench], run the gpu-marked tests,
the raw GPU ceiling, microbatch serve --workers N, --compile-mode reduce-overhead (CUDA
graphs) and --collate-ahead off at each concurrency, then naive vs microbatch vs ceiling
(benchmarks.compare); keep every output in benchmarks/results/NAME/ and write the report
to benchmarks/results/NAME.md and NAME.png.

options:
  --help              show this help and exit
  --dry-run           print every command it would run, run none (works without a GPU)
  --skip-install      use the torch and microbatch already installed
  --bundle DIR        no package index: install what a bundle holds (made elsewhere by
                      python -m benchmarks.lab.gpu_bundle make DIR) into a temporary
                      directory on PYTHONPATH, beside the machine's own CUDA torch;
                      implies --skip-install
  --quick             fewer steps, for a short lease: --concurrency 1,64,256
                      --workers 1,4 --duration 4 --warmup 1 (with --time-limit, what
                      still does not fit is skipped)
  --time-limit S      skip a step that would not end within S seconds of the start
                      (by the load it runs and the slowest server start so far); the
                      report says what was skipped and is written in any case
  --archive FILE      after every step, rebuild the report and pack it with the results
                      directory into FILE (.tar.gz): a run cut short leaves what it had
  --name NAME         results name (default: <gpu>-<date>, e.g. nvidia-h200-2026-12-03)
  --duration S        measured seconds per load step (default: 5)
  --warmup S          unmeasured seconds before each load step (default: 2)
  --workers LIST      microbatch serve --workers values (default: 1,2,4,8)
  --concurrency LIST  closed-loop client counts (default: 1,4,16,64,256,512)
  --processes P       load-generator processes in the workers runs (default: 4)
  --port PORT         port of the workers runs' server (default: 8765)
  --report-only DIR   only rebuild the report from a saved results directory

environment:
  TORCH_INDEX_URL  where torch comes from (default: https://download.pytorch.org/whl/cu128)
  TORCH_VERSION    the torch version installed (default: 2.13.0)
  PYTHON           the interpreter of the environment used (default: python)
  NVIDIA_SMI       the command that finds the GPU (default: nvidia-smi)
  GIT_COMMIT       the commit the results record, where the tree has no .git
  GPU_SH_ON_CPU    1: a rehearsal, every step on the CPU of a machine with no GPU (give
                   NVIDIA_SMI a command that prints a name): it checks the script and
                   the bundle, its figures are not a GPU's
EOF
}

usage_error() {
  echo "gpu.sh: $1 (bash benchmarks/lab/gpu.sh --help lists the options)" >&2
  exit 2
}

value_of() {  # OPTION [VALUE...]: VALUE, or a usage error when there is none
  if [[ $# -lt 2 || $2 == --* ]]; then usage_error "$1 needs a value"; fi
  printf '%s' "$2"
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --help | -h) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --skip-install) skip_install=1; shift ;;
    --bundle) bundle=$(value_of "$@"); skip_install=1; shift 2 ;;
    --quick) concurrency_list=1,64,256; workers_list=1,4; duration=4; warmup=1; shift ;;
    --time-limit) time_limit=$(value_of "$@"); shift 2 ;;
    --archive) archive=$(value_of "$@"); shift 2 ;;
    --name) name=$(value_of "$@"); shift 2 ;;
    --duration) duration=$(value_of "$@"); shift 2 ;;
    --warmup) warmup=$(value_of "$@"); shift 2 ;;
    --workers) workers_list=$(value_of "$@"); shift 2 ;;
    --concurrency) concurrency_list=$(value_of "$@"); shift 2 ;;
    --processes) processes=$(value_of "$@"); shift 2 ;;
    --port) port=$(value_of "$@"); shift 2 ;;
    --report-only) report_only=$(value_of "$@"); shift 2 ;;
    *) usage_error "unknown option '$1'" ;;
  esac
done

list_re='^[1-9][0-9]*(,[1-9][0-9]*)*$'
seconds_re='^[0-9]+([.][0-9]+)?$'
count_re='^[1-9][0-9]*$'
name_re='^[A-Za-z0-9][A-Za-z0-9._-]*$'
[[ $workers_list =~ $list_re ]] || usage_error "--workers takes counts like 1,2,4,8, got '$workers_list'"
[[ $concurrency_list =~ $list_re ]] ||
  usage_error "--concurrency takes counts like 1,4,16, got '$concurrency_list'"
[[ $duration =~ $seconds_re ]] || usage_error "--duration takes seconds, got '$duration'"
[[ $warmup =~ $seconds_re ]] || usage_error "--warmup takes seconds, got '$warmup'"
[[ $processes =~ $count_re ]] || usage_error "--processes takes a count, got '$processes'"
[[ $port =~ $count_re ]] || usage_error "--port takes a port number, got '$port'"
[[ $time_limit =~ ^[0-9]+$ ]] || usage_error "--time-limit takes whole seconds, got '$time_limit'"
if [[ -n $bundle && ! -f $bundle/manifest.json ]]; then
  if [[ $bundle != /* && -f $invoked_from/$bundle/manifest.json ]]; then
    bundle="$invoked_from/$bundle"
  else
    usage_error "--bundle takes a directory made by python -m benchmarks.lab.gpu_bundle make, got '$bundle'"
  fi
fi
if [[ -n $archive && $archive != /* ]]; then archive="$invoked_from/$archive"; fi
if [[ -n $name && ! $name =~ $name_re ]]; then
  usage_error "--name takes letters, digits, '.', '_' and '-', got '$name'"
fi
IFS=, read -r -a workers <<<"$workers_list"
IFS=, read -r -a clients <<<"$concurrency_list"

quote() {  # ARG...: the command line as one would type it
  local arg out="" plain='^[-A-Za-z0-9_./:=,@%+]+$' q="'"
  for arg in "$@"; do
    if [[ $arg =~ $plain ]]; then out+=" $arg"; else out+=" '${arg//$q/$q\\$q$q}'"; fi
  done
  printf '%s' "${out# }"
}

run() {  # COMMAND...: print it, then run it unless --dry-run
  echo "+ $(quote "$@")"
  if ((dry_run)); then return 0; fi
  "$@"
}

run_logged() {  # LOG COMMAND...: print it, then run it with its output shown and kept in LOG
  local log=$1
  shift
  echo "+ $(quote "$@") 2>&1 | tee $(quote "$log")"
  if ((dry_run)); then return 0; fi
  "$@" 2>&1 | tee "$log"
}

failed=()
fail() {  # STEP STATUS: note a failed step and go on with the next
  echo "gpu.sh: $1 failed (exit status $2); going on with the next step" >&2
  failed+=("$1")
}

planned=0 # a dry run's clock: the seconds the steps it would run are expected to take
now() { echo $((SECONDS + planned)); }

phase() {
  local t
  t=$(now)
  printf '\n== [%dm%02ds] %s\n' $((t / 60)) $((t % 60)) "$1"
}

if [[ -n $report_only ]]; then
  # DIR is where the caller stands; every other path here is the repository's.
  if [[ $report_only != /* && $invoked_from != "$PWD" ]]; then
    report_only="$invoked_from/$report_only"
  fi
  out_args=()
  if [[ -n $name ]]; then out_args=(--out "benchmarks/results/$name"); fi
  run "$python" -m benchmarks.lab.gpu_report "$report_only" "${out_args[@]}"
  exit 0
fi

# Only a zero status counts: without its driver, nvidia-smi prints its complaint on stdout.
gpu=""
if names=$("$nvidia_smi" --query-gpu=name --format=csv,noheader 2>/dev/null); then
  gpu=${names%%$'\n'*}
fi
if [[ -z $gpu ]]; then
  if ((!dry_run)); then
    echo "gpu.sh: no NVIDIA GPU found (nvidia-smi); run this on a machine with one, or use" \
      "--dry-run to see the commands, --report-only DIR to rebuild a report" >&2
    exit 1
  fi
  gpu="no GPU"
  echo "gpu.sh: no NVIDIA GPU found (nvidia-smi); a dry run only"
fi
if [[ -z $name ]]; then
  slug=$(printf '%s' "$gpu" | tr '[:upper:]' '[:lower:]' | tr -s ' ' '-' | tr -cd 'a-z0-9._-')
  name="$slug-$(date +%F)"
fi
out="benchmarks/results/$name"
if ((!dry_run)) && [[ -e $out ]]; then
  echo "gpu.sh: $out already exists; choose another --name, or --report-only $out" >&2
  exit 2
fi

server_pid=""
stop_server() {
  if [[ -z $server_pid ]]; then return 0; fi
  kill -TERM "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}
site="" # --bundle: where it is unpacked for this run
finish() {
  stop_server
  if [[ -n $site ]] && ((!dry_run)); then rm -rf "$site"; fi
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_server() {  # LOG COMMAND...: start it in the background, its output in LOG
  local log=$1
  shift
  echo "+ $(quote "$@") >$(quote "$log") 2>&1 &"
  if ((dry_run)); then return 0; fi
  "$@" >"$log" 2>&1 &
  server_pid=$!
}

# Guesses, for --time-limit: the first server's start (load, compile, warm-up; then the
# slowest start measured), the gpu-marked tests, the ceiling (it compiles too).
startup_s=90
tests_s=120
ceiling_s=60
slowest_start=0
wait_ready() {  # URL LOG: until URL/ready answers 200; fails if the server exits or 600 s pass
  local url=$1 log=$2 started=$SECONDS deadline=$((SECONDS + 600))
  local probe='import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)'
  echo "+ wait for $url/ready (at most 600 s)"
  if ((dry_run)); then return 0; fi
  until "$python" -c "$probe" "$url/ready" 2>/dev/null; do
    if ! kill -0 "$server_pid" 2>/dev/null; then
      echo "gpu.sh: the server exited before it was ready; the end of $log:" >&2
      tail -n 20 "$log" >&2
      return 1
    fi
    if ((SECONDS > deadline)); then
      echo "gpu.sh: the server was not ready after 600 s; see $log" >&2
      return 1
    fi
    sleep 1 # a child process warming up its model
  done
  if ((SECONDS - started > slowest_start)); then slowest_start=$((SECONDS - started)); fi
  startup_s=$slowest_start
  echo "ready after $((SECONDS - started)) s"
}

skipped=()
in_time() {  # STEP SECONDS: whether STEP, expected to take SECONDS, ends within --time-limit
  local t
  t=$(now)
  if ((time_limit == 0 || t + $2 <= time_limit)); then
    if ((dry_run)); then planned=$((planned + $2)); fi
    return 0
  fi
  local why="expected to end near $((t + $2)) s (started at $t s), past --time-limit $time_limit s"
  echo "gpu.sh: skipping $1: $why" >&2
  skipped+=("$1")
  if ((!dry_run)); then printf '%s\t%s\n' "$1" "$why" >>"$out/skipped.tsv"; fi
  return 1
}

load_s() {  # STEPS [SERVERS]: the expected seconds of STEPS load steps on SERVERS new servers
  awk -v n="$1" -v s="${2:-1}" -v d="$duration" -v w="$warmup" -v u="$startup_s" \
    -v p="$((processes > 1 ? 2 : 0))" 'BEGIN { print int(s * u + n * (d + w + p) + 5) }'
}

save() {  # after a step: rebuild the report and pack it with the results into --archive
  if [[ -z $archive ]]; then return 0; fi
  echo "+ $(quote "$python") -m benchmarks.lab.gpu_report $(quote "$out") >/dev/null; tar -czf $(quote "$archive") ..."
  if ((dry_run)); then return 0; fi
  "$python" -m benchmarks.lab.gpu_report "$out" >/dev/null 2>&1 || true
  local results=${out##*/} pieces=()
  for piece in "$results" "$results.md" "$results.png"; do
    if [[ -e benchmarks/results/$piece ]]; then pieces+=("$piece"); fi
  done
  # An archive that cannot be written costs the archive, never the run.
  if ! tar -czf "$archive.part" -C benchmarks/results "${pieces[@]}" ||
    ! mv "$archive.part" "$archive"; then
    echo "gpu.sh: could not write $archive; going on" >&2
  fi
}

write_environment() {  # FILE: GPU, driver, torch and CUDA versions; fails unless torch sees CUDA
  local driver
  echo "+ $(quote "$python") - $(quote "$1") <<'PY'  # GPU, driver, torch and CUDA versions"
  if ((dry_run)); then return 0; fi
  driver=$("$nvidia_smi" --query-gpu=driver_version --format=csv,noheader | head -n 1 || true)
  "$python" - "$1" "$driver" "$bundle" <<'PY'
import json
import os
import sys
from pathlib import Path

import torch

from benchmarks import environment

on_cpu = os.environ.get("GPU_SH_ON_CPU") == "1"
if not torch.cuda.is_available() and not on_cpu:
    sys.exit(
        f"gpu.sh: torch {torch.__version__} does not see the GPU (torch.cuda.is_available() "
        "is False); install a CUDA build (drop --skip-install, or set TORCH_INDEX_URL)"
    )
record = {
    **environment.describe(),
    "device": "cpu (a rehearsal)" if on_cpu else torch.cuda.get_device_name(0),
    "device_count": 0 if on_cpu else torch.cuda.device_count(),
    "driver": sys.argv[2] or None,
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
}
if sys.argv[3]:
    record["bundle"] = json.loads((Path(sys.argv[3]) / "manifest.json").read_text())

with open(sys.argv[1], "w") as f:
    json.dump(record, f, indent=2)
PY
}

# Load steps: each workers count, CUDA graphs and collate-ahead off run every load once
# (2 s more a step for several load-generator processes to start together); compare runs
# every load on 3-4 servers (naive, adaptive, window, and the float32 server when the
# default precision is lower) plus one open-loop load each and the load generator's own
# ceiling.
compare_servers=4
compare_steps=$((compare_servers * (${#clients[@]} + 1) + 1))
serve_runs=$((${#workers[@]} + 2))
steps=$((compare_steps + serve_runs * ${#clients[@]}))
total_s=$(($(load_s $((serve_runs * ${#clients[@]})) 0) + $(load_s "$compare_steps" 0)))
echo "GPU: $gpu; results: $out/ and $out.md"
echo "about $steps load steps of ${warmup}+${duration} s: ~$((total_s / 60)) min of load," \
  "plus installs and $((serve_runs + compare_servers)) server starts (model load, compile," \
  "warm-up)"
if ((time_limit)); then echo "time limit: $time_limit s; a step that would end later is skipped"; fi

if ((!skip_install)); then
  phase "install torch $torch_version from $torch_index_url, then microbatch[dev,bench]"
  run "$python" -m pip install "torch==$torch_version" --index-url "$torch_index_url"
  # Naming torch again keeps pip from swapping the CUDA build for another torch.
  run "$python" -m pip install -e '.[dev,bench]' "torch==$torch_version"
fi
if [[ -n $bundle ]]; then
  phase "install the bundle $bundle (no package index)"
  if ((dry_run)); then
    site="${TMPDIR:-/tmp}/microbatch-bundle.XXXXXX"
  else
    site=$(mktemp -d "${TMPDIR:-/tmp}/microbatch-bundle.XXXXXX") # removed at exit
  fi
  run "$python" -m benchmarks.lab.gpu_bundle unpack "$bundle" "$site"
  echo "+ export PYTHONPATH=$site\${PYTHONPATH:+:\$PYTHONPATH}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

phase "environment"
run mkdir -p "$out"
if ((dry_run)); then
  echo "+ $nvidia_smi >$out/nvidia-smi.txt"
else
  "$nvidia_smi" >"$out/nvidia-smi.txt"
fi
write_environment "$out/environment.json"
save

# tests/batcher holds every gpu-marked test (tests/benchmarks/test_gpu_script.py checks),
# and needs only what a bundle carries.
phase "gpu-marked tests"
if in_time tests "$tests_s"; then
  tests_status=0
  run_logged "$out/gpu-tests.log" "$python" -m pytest -m gpu -q -p no:cacheprovider tests/batcher ||
    tests_status=$?
  # 5: pytest collected no gpu test, which is not a failure of this machine.
  if ((tests_status != 0 && tests_status != 5)); then fail "the gpu tests" "$tests_status"; fi
  save
fi

phase "raw GPU ceiling (tokenize + forward + pool, no HTTP, no queue)"
if in_time ceiling "$ceiling_s"; then
  run "$python" -m benchmarks.ceiling --texts 1024 --accuracy-texts 0 --json "$out/ceiling.json" ||
    fail "the ceiling" $?
  save
fi

url="http://127.0.0.1:$port"
serve_and_bench() {  # STEP LABEL SERVE-FLAGS...: serve, load it at every concurrency, stop
  local step=$1 label=$2
  shift 2
  in_time "$step" "$(load_s "${#clients[@]}")" || return 0
  start_server "$out/$step.log" "$python" -m server.cli serve "$@" --port "$port"
  if wait_ready "$url" "$out/$step.log"; then
    run "$python" -m benchmarks.bench "$url" --concurrency "$concurrency_list" \
      --duration "$duration" --warmup "$warmup" --processes "$processes" \
      --label "$label" --json "$out/$step.json" || fail "bench of $label" $?
  else
    fail "microbatch serve $*" 1
  fi
  echo "+ kill -TERM \$server_pid; wait \$server_pid"
  stop_server
  save
}

for n in "${workers[@]}"; do
  phase "microbatch serve --workers $n"
  # --workers 1 is the one-process server; N > 1: N front-ends on one engine process.
  serve_and_bench "workers-$n" "workers $n" --workers "$n"
done

phase "CUDA graphs: microbatch serve --compile-mode reduce-overhead (against workers-1's plain compile)"
serve_and_bench graphs "cuda graphs" --compile-mode reduce-overhead

phase "collating ahead: microbatch serve --collate-ahead off (against workers-1, which collates ahead)"
serve_and_bench no-collate-ahead "no collate ahead" --collate-ahead off

phase "naive vs microbatch vs ceiling (benchmarks.compare)"
if in_time compare "$(load_s "$compare_steps" "$compare_servers")"; then
  run "$python" -m benchmarks.compare --concurrency "$concurrency_list" --duration "$duration" \
    --warmup "$warmup" --out-dir "$out" --name compare || fail "compare" $?
  save
fi

phase "report"
run "$python" -m benchmarks.lab.gpu_report "$out" || fail "the report" $?
save

printf '\ntotal time: %dm%02ds\n' $((SECONDS / 60)) $((SECONDS % 60))
if ((${#skipped[@]})); then
  echo "gpu.sh: skipped for time (--time-limit $time_limit): ${skipped[*]}" >&2
fi
if ((${#failed[@]})); then
  echo "gpu.sh: failed steps: ${failed[*]}" >&2
  exit 1
fi
