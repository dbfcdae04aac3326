#!/usr/bin/env bash
# Every check that needs a GPU, in one run (about 6 minutes on one H200): the integrations' CUDA checks (fp16 with
# a real GradScaler), SAM on a torch.compile'd BatchNorm model under inductor, the SAM benchmark on the GPU, and
# flatminima sharpness --device cuda.
# Writes each report to $OUT (default: runs/cuda-checks) and exits non-zero if a check failed.
#   bash benchmarks/cuda_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/cuda-checks}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install -q --no-deps -e .
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, '| transformers', transformers.__version__, '| lightning', lightning.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
status=0
run() {  # run NAME TIMEOUT COMMAND...: its output to $OUT/NAME.md and the console
  local name=$1 limit=$2
  shift 2
  echo "## $name: $*" | tee "$OUT/$name.md"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.md"
  local rc=${PIPESTATUS[0]}
  echo "exit $rc" | tee -a "$OUT/$name.md"
  [ "$rc" = 0 ] || status=1
}
run huggingface 120 python3 benchmarks/cuda_check_huggingface.py
run lightning 120 python3 benchmarks/cuda_check_lightning.py
run compile 150 python3 benchmarks/cuda_check_compile.py --backend inductor
run bench-sam 180 python3 benchmarks/bench_sam.py --device cuda --output "$OUT/results-sam-cuda.md"
# flatminima sharpness --device cuda on a freshly trained digits model (every estimator of the report on the GPU)
run sharpness 120 bash -c "python3 -m flatminima train --epochs 1 --device cuda --no-progress --overwrite \
  --output '$OUT/sharpness-run' && python3 -m flatminima sharpness --checkpoint '$OUT/sharpness-run/model.pt' \
  --device cuda --examples 256 --k 3 --trace-probes 8 --density-runs 1 --output '$OUT/sharpness-run/sharpness'"
exit $status
