#!/usr/bin/env bash
# One prepared check for a lent NVIDIA GPU (H100 / H200 / A100): installs the GPU build of JAX from
# requirements-gpu.txt, then prints the bf16 train-step table of SSD300, MDSSD300 and MDSSD512 at
# batch 32 and the largest batch that fits (doubling, capped), with images/s, achieved TFLOP/s, MFU,
# the step split, compile time and the input pipeline's images/s per worker on this host.
# Random images; nothing but PyPI packages is downloaded. Writes the table to $OUT/device_check.md
# (or ./device_check.md) as well.
#
#   bash benchmarks/device_check.sh                 # install + measure (about 5 minutes after install)
#   SKIP_INSTALL=1 bash benchmarks/device_check.sh  # JAX with CUDA already installed
#   QUICK=1 SKIP_INSTALL=1 bash benchmarks/device_check.sh   # toy width, proves the script on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD}"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-python3}"

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

if [[ "${SKIP_INSTALL:-0}" != "1" ]]; then
  start=$(date +%s)
  if ! "$PYTHON" -m pip install -q -r requirements-gpu.txt; then
    echo "pip could not install requirements-gpu.txt; trying with what is installed" >&2
  fi
  echo "install took $(( $(date +%s) - start )) s"
fi

# JAX must see the GPU, or the figures would be CPU figures under a GPU heading.
if [[ "${QUICK:-0}" != "1" ]]; then
  "$PYTHON" - <<'PY'
import sys, jax
platform = jax.devices()[0].platform
print(f"jax {jax.__version__}: {jax.devices()}")
if platform != "gpu":
    sys.exit(f"JAX runs on {platform!r}, not the GPU: install the CUDA build "
             "(pip install -r requirements-gpu.txt) and check nvidia-smi")
PY
fi

# Let XLA take almost all of the card (the default pre-allocates 75 %), so the largest batch is the
# card's, and keep the autotuner's choice stable between runs.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

if [[ "${QUICK:-0}" == "1" ]]; then
  ARGS=(--quick --configs="${CONFIGS:-ssd300_voc,mdssd300_voc,mdssd512_voc}" --batch 2 --max_batch 4
        --dtype=bfloat16 --input)
else
  ARGS=(--configs="${CONFIGS:-ssd300_voc,mdssd300_voc,mdssd512_voc}" --batch 32
        --max_batch="${MAX_BATCH:-512}" --dtype=bfloat16 --repeats=5 --input
        --time_budget_s="${TIME_BUDGET_S:-200}")
fi
"$PYTHON" -m benchmarks.bench_train "${ARGS[@]}" --out "$OUT_DIR/device_check.md"
