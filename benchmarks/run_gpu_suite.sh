#!/usr/bin/env bash
# Everything only a GPU can tell, in one go: the GPU tests, the compile check, and every benchmark,
# with results written to benchmarks/results/<device>-<date>/ (or $1).
#
#   pip install --no-build-isolation --no-deps -e .   # on the GPU machine, once
#   bash benchmarks/run_gpu_suite.sh
#   python benchmarks/tune_kernels.py --out benchmarks/results/<device>-<date>/tuning.md   # then, if time allows
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
device=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
out=${1:-benchmarks/results/${device}-$(date +%Y-%m-%d)}
mkdir -p "$out"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  python - <<'PY'
import torch, triton
print(f"device: {torch.cuda.get_device_name()}  capability: {torch.cuda.get_device_capability()}")
print(f"torch {torch.__version__}  triton {triton.__version__}  cuda {torch.version.cuda}")
PY
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv 2>/dev/null
} | tee "$out/environment.txt"

status=0
python -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.txt" || status=1
python benchmarks/bench_layernorm_family.py --out "$out/layernorm_family.md" 2>&1 | tee "$out/layernorm_family.txt" || status=1
python benchmarks/bench_attention.py --out "$out/attention.md" 2>&1 | tee "$out/attention.txt" || status=1
python benchmarks/bench_mlm_head.py --out "$out/mlm_head.md" 2>&1 | tee "$out/mlm_head.txt" || status=1
python benchmarks/bench_model.py --out "$out/model_step.json" 2>&1 | tee "$out/model_step.txt" || status=1
exit $status
