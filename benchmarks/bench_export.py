"""Latency (batch 1) and throughput (batch 8) of the exported detector: JAX, SavedModel, TFLite.

  python -m benchmarks.bench_export [--configs demo_synthetic,mdssd300_voc] [--repeats 10]
                                   [--large_repeats 3]        # from the repository root

For each config, a randomly initialised model (weights do not change the time of the dense network;
NMS runs on the candidates above config.eval.score_threshold, which an untrained model may have more
or fewer of) is exported with mdssd_jax/run/export.py into a temporary folder, then timed on this machine:

- JAX: the jitted `predict.make_predict_fn` (forward + decode + NMS) on uint8 (B, S, S, 3);
- SavedModel: `serving_default` on uint8 (B, S, S, 3) (its resize is then an identity warp), run by
  TF's XLA (lowered for CPU only here; top-k as a sort, see mdssd_jax/run/export.py);
- TFLite: the interpreter (XNNPACK, the default delegate) on the network + decoding, one image per
  invoke (the graph has batch 1); batch 8 is 8 invokes. Its time does NOT include NMS, which the
  caller runs.

Medians over --repeats calls after one warm-up call (compilation excluded); configs whose input is
300 px or more use --large_repeats. Prints a markdown table.
"""

import argparse
import importlib
import os
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks.bench_train import median_seconds  # pylint: disable=wrong-import-position
from mdssd_jax.state import experiment  # pylint: disable=wrong-import-position
from mdssd_jax.run import export
from mdssd_jax import models
from mdssd_jax.core import pixels
from mdssd_jax.inference import predictor as predict

BATCHES = (1, 8)


def bench_config(name, repeats):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{name}").get_config()
  model, anchors = models.build_detector(config)
  variables = jax.jit(lambda r: experiment.init_variables(model, config, r))(
      jax.random.key(0, impl="rbg"))
  variables = jax.device_get(variables)
  convention = pixels.as_convention(config.model.pixel)
  size = config.model.input_size_px
  num_classes = config.model.num_classes
  class_names = [f"class_{k}" for k in range(1, num_classes + 1)]
  rng = np.random.default_rng(0)
  images = {b: rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8) for b in BATCHES}
  rows = {}

  jitted = jax.jit(predict.make_predict_fn(model, anchors, config, convention))
  for b in BATCHES:
    rows[("JAX predict (jit, CPU)", b)] = median_seconds(
        lambda b=b: jax.block_until_ready(jitted(variables, images[b])), repeats)

  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "export")
    start = time.perf_counter()
    export.export_detector(out, model, anchors, config, convention, variables, class_names,
                           formats=("saved_model", "tflite"), platforms=("cpu",))
    export_s = time.perf_counter() - start
    serve = tf.saved_model.load(os.path.join(out, "saved_model")).signatures["serving_default"]
    for b in BATCHES:
      tensor = tf.constant(images[b])
      rows[("SavedModel (TF 2.21, XLA)", b)] = median_seconds(
          lambda t=tensor: serve(images=t)["num_detections"].numpy(), repeats)
    # TF 2.21 warns that tf.lite.Interpreter moves to the ai_edge_litert package; it still works.
    warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
    interpreter = tf.lite.Interpreter(model_path=os.path.join(out, "model.tflite"))
    runner = interpreter.get_signature_runner("serving_default")
    for b in BATCHES:
      def run_tflite(b=b):
        for i in range(b):
          runner(images=images[b][i:i + 1])
      rows[("TFLite interpreter (no NMS)", b)] = median_seconds(run_tflite, repeats)
    tflite_mb = os.path.getsize(os.path.join(out, "model.tflite")) / 2**20
  return rows, dict(export_s=export_s, tflite_mb=tflite_mb, params=models.count_params(variables["params"]),
                    size=size, anchors=len(anchors))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", default="demo_synthetic,mdssd300_voc")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--large_repeats", type=int, default=3)
  args = parser.parse_args()
  print(f"CPU: {os.cpu_count()} cores visible; jax {jax.__version__}")
  lines = ["| model | runtime | batch 1: ms / image | batch 8: images / s |", "|---|---|---|---|"]
  notes = []
  for name in args.configs.split(","):
    config = importlib.import_module(f"configs.{name}").get_config()
    repeats = args.large_repeats if config.model.input_size_px >= 300 else args.repeats
    rows, meta = bench_config(name, repeats)
    for runtime in sorted({r for r, _ in rows}, key=lambda r: list(dict.fromkeys(k for k, _ in rows)).index(r)):
      lines.append(f"| `{name}` ({meta['size']} px, {meta['params'] / 1e6:.2f} M params) | {runtime} | "
                   f"{1000 * rows[(runtime, 1)]:.1f} | {8 / rows[(runtime, 8)]:.1f} |")
    notes.append(f"{name}: export (SavedModel + TFLite) took {meta['export_s']:.0f} s; model.tflite "
                 f"{meta['tflite_mb']:.1f} MiB; {meta['anchors']} default boxes; median of {repeats} runs")
    print("\n".join(lines[-len({r for r, _ in rows}):]), flush=True)
  print("\n" + "\n".join(lines))
  print("\n" + "\n".join(notes))


if __name__ == "__main__":
  main()
