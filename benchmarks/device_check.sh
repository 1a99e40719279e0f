#!/usr/bin/env bash
# One prepared check for a lent NVIDIA GPU (H100 / H200 / A100): installs the GPU build of JAX from
# requirements-gpu.txt (only requirements.txt where a JAX that sees the GPU is already installed),
# then, in one run (under ten minutes on an H100/H200 after the install):
#   1. the bf16 train-step table of SSD300, MDSSD300 and MDSSD512 at batch 32 (bench_train: images/s,
#      TFLOP/s, MFU, the model / match+loss / optimiser split, compile time, the input pipeline's
#      images/s per worker on this host); MAX_BATCH=512 adds the largest batch that fits (each
#      size compiles anew: minutes; off by default to keep the run inside ten minutes);
#   2. torchvision's ssd300_vgg16 train step on the same GPU (benchmarks/torch_cpu.py step: bf16
#      autocast, channels_last, batch 32, random images and boxes, its own loss and matcher) and the
#      ratio of our SSD300 step's images/s to it; skipped, with a line saying so, where torch or
#      torchvision is missing (TORCH_PYTHON names another Python that has them);
#   3. the whole training command end to end: main.py with configs/ssd300_voc.py on the generated
#      synthetic data at 300 px (generation, input pipeline with its workers, checkpoints every
#      100 steps, an evaluation at the end) for E2E_STEPS (300) steps at batch 32, and its images/s
#      after compilation against the bare step's of table 1.
# Random images and generated data; nothing but PyPI packages is downloaded. Everything is written
# to $OUT (or ./device_check_out): device_check.md (tables 1-3), torchvision_step.json, e2e_train.log.
#
#   bash benchmarks/device_check.sh                 # install + measure
#   SKIP_INSTALL=1 bash benchmarks/device_check.sh  # JAX with CUDA already installed
#   QUICK=1 SKIP_INSTALL=1 bash benchmarks/device_check.sh   # toy sizes, proves the script on a CPU
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
OUT_DIR="${OUT:-$PWD/device_check_out}"
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
        --max_batch="${MAX_BATCH:-0}" --dtype=bfloat16 --repeats=5 --input
        --time_budget_s="${TIME_BUDGET_S:-200}")
fi
TABLE="$OUT_DIR/device_check.md"
start=$(date +%s)
"$PYTHON" -m benchmarks.bench_train "${ARGS[@]}" --out "$TABLE"
echo "table 1 took $(( $(date +%s) - start )) s"

# ---- 2. torchvision's ssd300_vgg16 on the same device ----------------------------------------------
TORCH_PYTHON="${TORCH_PYTHON:-$PYTHON}"
TORCH_JSON="$OUT_DIR/torchvision_step.json"
rm -f "$TORCH_JSON"
if "$TORCH_PYTHON" -c "import torch, torchvision" >/dev/null 2>&1; then
  start=$(date +%s)
  if [[ "${QUICK:-0}" == "1" ]]; then    # full-size model on the CPU: batch 2, one timed step
    TORCH_ARGS=(--device=cpu --batch=2 --repeats=1 --warmup=1 --bf16 --channels_last)
  else
    TORCH_ARGS=(--device=cuda --batch=32 --repeats=20 --warmup=5 --bf16 --channels_last)
  fi
  "$TORCH_PYTHON" benchmarks/torch_cpu.py step "${TORCH_ARGS[@]}" | tee "$TORCH_JSON"
  echo "torchvision's step took $(( $(date +%s) - start )) s"
else
  echo "torch or torchvision is not installed for $TORCH_PYTHON: torchvision's ssd300_vgg16 step" \
       "is skipped (set TORCH_PYTHON to a Python that has both)"
fi

# ---- 3. main.py end to end on the generated data at 300 px --------------------------------------
E2E_DIR="$(mktemp -d)"
trap 'rm -rf "$E2E_DIR"' EXIT
if [[ "${QUICK:-0}" == "1" ]]; then
  E2E=(--config.train.num_steps=6 --config.train.global_batch_size=2
       --config.train.reference_batch_size=2 --config.model.width_multiplier=0.03125
       --config.data.synthetic.num_train=32 --config.data.synthetic.num_test=4
       --config.data.num_workers=1 --config.train.log_every_steps=2
       --config.train.checkpoint_every_steps=3 --config.evals.voc.max_images=4)
else
  # Workers: the host's cores less two (the training process, the GPU's feeder), at most 12.
  WORKERS=$(( $(nproc) - 2 )); (( WORKERS > 12 )) && WORKERS=12; (( WORKERS < 1 )) && WORKERS=1
  E2E=(--config.train.num_steps="${E2E_STEPS:-300}" --config.train.global_batch_size=32
       --config.data.synthetic.num_train=1024 --config.data.synthetic.num_test=64
       --config.data.num_workers="$WORKERS" --config.train.log_every_steps=50
       --config.train.checkpoint_every_steps=100 --config.evals.voc.max_images=64)
fi
# Synthetic data (6 classes) in place of VOC, no ImageNet trunk to load (random init), gradient
# clipping so that a random-init SGD run stays finite; only an evaluation at the end.
start=$(date +%s)
"$PYTHON" main.py --config=configs/ssd300_voc.py --workdir="$E2E_DIR/run" \
    --config.data.name=synthetic_small_objects --config.model.num_classes=6 \
    --config.data.train_split=train --config.data.eval_split=test \
    --config.data.data_dir="$E2E_DIR/data" --config.model.allow_random_trunk=True \
    --config.model.dtype=bfloat16 --config.train.grad_clip_norm=1.0 \
    --config.evals.voc.every_steps=0 "${E2E[@]}" 2>&1 | tee "$OUT_DIR/e2e_train.log"
echo "the training command took $(( $(date +%s) - start )) s"

"$PYTHON" - "$TABLE" "$TORCH_JSON" "$OUT_DIR/e2e_train.log" "${QUICK:-0}" <<'PY'
"""Appends tables 2 and 3 to device_check.md, from bench_train's table, the torch JSON and the log."""
import json, os, re, sys
table_path, torch_path, log_path, quick = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
rows = {}
for line in open(table_path):
  cells = [c.strip() for c in line.strip().strip("|").split("|")]
  if len(cells) > 6 and cells[1].isdigit():
    rows.setdefault(cells[0], (int(cells[1]), float(cells[2]), float(cells[6])))  # batch, img/s, ms
ours = rows.get("ssd300_voc")
note = " QUICK: our model at toy width, not comparable." if quick else ""
out = ["", "## torchvision's ssd300_vgg16 on the same device", ""]
if os.path.exists(torch_path) and ours:
  torch = json.loads(open(torch_path).read().strip().splitlines()[-1])
  out += [f"{torch['version']}; {torch['device']}, bf16 autocast {torch['bf16']}, channels_last "
          f"{torch['channels_last']}, median of its steps.{note}", "",
          "| step | batch | images/s | step ms |", "|---|---|---|---|",
          f"| ours, ssd300_voc | {ours[0]} | {ours[1]:.1f} | {ours[2]:.1f} |",
          f"| torchvision ssd300_vgg16 | {torch['batch']} | {torch['images_per_s']:.1f} | "
          f"{1e3 * torch['step_s']:.1f} |", "",
          f"**ours / torchvision images/s: {ours[1] / torch['images_per_s']:.2f}x**"]
else:
  out += ["not measured (torch or torchvision missing, or no ssd300_voc row)"]
out += ["", "## main.py end to end (synthetic data at 300 px, ssd300_voc, bf16)", ""]
log = open(log_path).read()
progress = re.findall(r"step (\d+)/(\d+) .*?([0-9.]+) steps/s", log)
done = re.search(r"Done: (\d+) steps in (\S+), ([0-9.]+) images/s", log)
batch = int(re.search(r"global batch (\d+)", log).group(1)) if "global batch" in log else 0
if progress and batch:
  step, total, rate = progress[-1]
  e2e = float(rate) * batch
  out.append(f"{step} steps at batch {batch}: {e2e:.1f} images/s after compilation (the progress "
             "line's steps/s from the first step on: input pipeline, checkpoints and metrics "
             "included)" + (f"; {done.group(3)} images/s over the whole run with compilation "
                            f"({done.group(2)})" if done else "") + ".")
  if ours and ours[0] == batch:
    out.append(f"**training command / bare step ({ours[1]:.1f} images/s, table 1): "
               f"{e2e / ours[1]:.2f}** (6 classes against VOC's 20 in the heads).{note}")
  else:
    out.append(f"(no bare step at batch {batch} in table 1 to compare with){note}")
else:
  out.append("the training command printed no progress line: see e2e_train.log")
text = "\n".join(out) + "\n"
print(text)
with open(table_path, "a") as f:
  f.write(text)
PY
