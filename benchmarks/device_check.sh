#!/usr/bin/env bash
# One prepared check for a lent NVIDIA GPU (H100 / H200 / A100): installs the GPU build of JAX from
# requirements-gpu.txt (only requirements.txt where a JAX that sees the GPU is already installed),
# then prints the bf16 train-step table of SSD300, MDSSD300 and MDSSD512 at batch 32 and the
# largest batch that fits (64, 128, ... MAX_BATCH, tried from the top), with images/s, achieved
# TFLOP/s, MFU, the step split, compile time and the input pipeline's images/s per worker on this
# host. Random images; nothing but PyPI packages is downloaded. Writes the table to
# $OUT/device_check.md (or ./device_check.md) as well.
#
#   bash benchmarks/device_check.sh                 # install + measure (about 5 minutes after install)
#   SKIP_INSTALL=1 bash benchmarks/device_check.sh  # JAX with CUDA already installed
#   QUICK=1 SKIP_INSTALL=1 bash benchmarks/device_check.sh   # toy width, proves the script on a CPU
#
# A machine with no network and its own JAX (e.g. jax 0.11 + CUDA 13): TensorFlow is not needed
# (bench_train.py stands in for clu's TF summary writer); carry the other missing packages as
# wheels (ml_collections, clu, grain, array-record, tensorflow-datasets, tensorflow-metadata,
# immutabledict, toml, portpicker, googleapis-common-protos, and promise, whose wheel `pip wheel`
# builds from its sdist; tensorflow-metadata wants protobuf >= 6.31), `pip install --no-index
# --no-deps --target /tmp/site` them there, and run with PYTHONPATH=/tmp/site SKIP_INSTALL=1
# (benchmarks/results/device_check_h200.md: one such run).
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
  # A JAX that already sees a GPU (an image's own build, e.g. jax 0.11 with the CUDA 13 plugin)
  # stays: requirements-gpu.txt's jax[cuda12] would put a second CUDA plugin beside it. Then only
  # the rest of the requirements is installed. Few retries and a short timeout, so a machine with
  # no network falls through in seconds to what is installed (see SKIP_INSTALL above).
  REQUIREMENTS=requirements-gpu.txt
  if "$PYTHON" -c "import jax, sys; sys.exit(jax.devices()[0].platform != 'gpu')" >/dev/null 2>&1; then
    REQUIREMENTS=requirements.txt
  fi
  if ! "$PYTHON" -m pip install -q --retries 1 --timeout 15 -r "$REQUIREMENTS"; then
    echo "pip could not install $REQUIREMENTS; trying with what is installed" >&2
  fi
  echo "install of $REQUIREMENTS took $(( $(date +%s) - start )) s"
fi

# JAX must see the GPU, or the figures would be CPU figures under a GPU heading.
if [[ "${QUICK:-0}" != "1" ]]; then
  "$PYTHON" - <<'PY'
import sys, jax, jaxlib
platform = jax.devices()[0].platform
print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, python {sys.version.split()[0]}: "
      f"{jax.devices()}")
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
  # A CPU compiles slowly: a budget that lets every config's largest-batch try run.
  ARGS=(--quick --configs="${CONFIGS:-ssd300_voc,mdssd300_voc,mdssd512_voc}" --batch 2 --max_batch 4
        --dtype=bfloat16 --input --time_budget_s="${TIME_BUDGET_S:-3600}")
else
  ARGS=(--configs="${CONFIGS:-ssd300_voc,mdssd300_voc,mdssd512_voc}" --batch 32
        --max_batch="${MAX_BATCH:-512}" --dtype=bfloat16 --repeats=5 --input
        --time_budget_s="${TIME_BUDGET_S:-200}")
fi
"$PYTHON" -m benchmarks.bench_train "${ARGS[@]}" --out "$OUT_DIR/device_check.md"
