#!/usr/bin/env bash
# Everything only a GPU can tell: the GPU tests and every benchmark (and, on request, the launch
# configuration sweep), each step's report under one results folder.
#
#   pip install --no-build-isolation --no-deps -e .        # on the GPU machine, once
#   bash benchmarks/run_gpu_suite.sh                        # env tests layernorm attention mlm model
#   bash benchmarks/run_gpu_suite.sh -t 300 attention tune  # chosen steps, each capped at 300 s
#   bash benchmarks/run_gpu_suite.sh --quick layernorm      # the suite's --quick shapes (a smoke run)
#   bash benchmarks/run_gpu_suite.sh --tar results.tgz      # also pack the folder into one archive
#
# Steps: env (devices and versions), tests (pytest -m gpu), layernorm, attention, mlm, model, pretrain,
# inference, st-train (the families of `bertfast bench`; pretrain, inference and st-train only on request), tune
# (benchmarks/tune_kernels.py). Results go to benchmarks/results/<device>-<date>/ (or -o DIR): <step>.txt
# holds a step's console output; each benchmark step writes run.json, <family>.md and <family>.png in
# <step>/.
# Every step runs under `timeout` so that one slow step cannot take the others' time; the exit status
# is non-zero when any step failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

out="" limit=480 tarball="" quick="" steps=()
while (($#)); do
  case "$1" in
    -o|--out) out=$2; shift 2 ;;
    -t|--timeout) limit=$2; shift 2 ;;
    --tar) tarball=$2; shift 2 ;;
    --quick) quick=--quick; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    env|tests|layernorm|attention|mlm|model|pretrain|inference|st-train|tune) steps+=("$1"); shift ;;
    *) echo "run_gpu_suite.sh: unknown step or option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
((${#steps[@]})) || steps=(env tests layernorm attention mlm model)

device=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || {
  echo "run_gpu_suite.sh: no CUDA device" >&2; exit 2; }
out=${out:-benchmarks/results/${device}-$(date +%Y-%m-%d)}
mkdir -p "$out"

step_command() {
  case "$1" in
    env) python - <<'PY'
import datetime, subprocess, torch, triton
print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%MZ}")
print(f"device: {torch.cuda.get_device_name()}  capability: {torch.cuda.get_device_capability()}")
print(f"torch {torch.__version__}  triton {triton.__version__}  cuda {torch.version.cuda}")
query = "name,driver_version,clocks.max.sm,memory.total"
print(subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True).stdout)
PY
      ;;
    tests) python -m pytest -q -m gpu tests ;;
    layernorm) bench layernorm-family layernorm ;;
    attention|model|pretrain|inference|st-train) bench "$1" "$1" ;;
    mlm) bench mlm-head mlm ;;
    tune) python benchmarks/tune_kernels.py --out "$out/tuning.md" ;;
  esac
}
bench() { python -m bertfast bench "$1" --device cuda $quick --output-dir "$out/$2"; }  # family, step
export -f step_command bench
export out quick

status=0
for step in "${steps[@]}"; do
  echo "== $step (at most ${limit}s)"
  timeout --kill-after=10 "$limit" bash -c "step_command $step" 2>&1 | tee "$out/$step.txt"
  code=${PIPESTATUS[0]}
  if ((code == 124 || code == 137)); then
    echo "== $step: stopped after ${limit}s" | tee -a "$out/$step.txt"
  fi
  ((code == 0)) || status=1
done
if [[ -n $tarball ]]; then
  tar -czf "$tarball" -C "$(dirname "$out")" "$(basename "$out")" && echo "packed $out into $tarball"
fi
exit $status
