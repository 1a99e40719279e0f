"""The small-object study: MDSSD against SSD with the same trunk, data and training budget.

Three detectors, all from `configs/demo_synthetic.py` (same width, input size, optimiser, steps, seed),
trained on the generated small-object data set and evaluated per object size:

  ssd          SSD: heads on conv4_3, conv7, conv8_2 .. conv11_2 (the demo's ladder without its finest
               rung: default boxes from 20 px up)
  ssd_fine     SSD plus a head on the raw conv3_3 map (48x48) with the finest rung (10-20 px): the
               same default boxes as MDSSD, no fusion (separates "finer boxes" from "fusion")
  mdssd        MDSSD: Fusion Blocks on conv3_3/conv4_3/conv7 (from conv8_2/conv9_2/conv10_2) as heads

    python benchmarks/study_small_objects.py --workdir=/tmp/study            # about 3 x 10 min here
    python benchmarks/study_small_objects.py --workdir=/tmp/study --steps=300 --variants=ssd,mdssd

Prints a markdown table of VOC-style AP@0.5 (area) overall and per bucket of the object's longer
side, and writes `study.png` and `study.json` in the workdir. Each variant resumes from its own
subfolder, so an interrupted study continues where it stopped.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

# (name, (lowest, highest) longer side in pixels of the demo's 192 px image).
SIZE_BUCKETS = (("tiny", (0.0, 16.0)), ("small", (16.0, 32.0)), ("medium", (32.0, 400.0)))


def variant_config(name, steps, width):
  """The demo config as MDSSD, as SSD, or as SSD with MDSSD's finest default boxes on raw conv3_3."""
  from configs import demo_synthetic  # pylint: disable=g-import-not-at-top
  config = demo_synthetic.get_config()
  config.train.num_steps = steps
  config.model.width_multiplier = width
  if name == "mdssd":
    return config
  if name not in ("ssd", "ssd_fine"):
    raise ValueError(f"unknown variant {name!r}; known: ssd, ssd_fine, mdssd")
  # SSD: the trunk's conv4_3 and conv7 take the places of Fusion Modules 2 and 3, with the same
  # default boxes; the finest rung (Fusion Module 1's) goes, unless ssd_fine puts it on conv3_3.
  num_fusions = len(config.model.fusions)
  config.model.architecture = "ssd"
  heads = ("conv4_3", "conv7") + tuple(config.model.head_sources[num_fusions:])
  first = 0 if name == "ssd_fine" else 1
  config.model.head_sources = (("conv3_3",) if name == "ssd_fine" else ()) + heads
  config.model.fusions = ()
  for key in ("feature_sizes", "steps", "min_sizes", "max_sizes", "aspect_ratios"):
    config.anchors[key] = tuple(config.anchors[key])[first:]
  return config


def size_metrics(setup, state):
  """AP overall and per SIZE_BUCKETS on the eval split, through the TT100K-style bucketed evaluator."""
  from mdssd_jax import train  # pylint: disable=g-import-not-at-top
  from mdssd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mdssd_jax.evaluation import loop, tt100k  # pylint: disable=g-import-not-at-top
  config = setup.config
  predict = setup.jitted_predict()
  variables = train.model_variables(state)
  parts = []
  for batch in pipeline.make_eval_batches(config):
    detections = jax.device_get(predict(variables, setup.global_batch({"image": batch["image"]})["image"]))
    parts.append(loop.batch_to_arrays(detections, batch))
  arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  predictions, ground_truths = loop.arrays_to_images(arrays)
  result = tt100k.evaluate(predictions, ground_truths, iou_threshold=config.eval.iou_threshold,
                           size_ranges=SIZE_BUCKETS, use_07_metric=False)
  out = {"AP": result["mAP"]}
  for bucket, _ in SIZE_BUCKETS:
    out[f"AP_{bucket}"] = result[f"mAP_{bucket}"]
    out[f"recall_{bucket}"] = result[f"recall_{bucket}"]
    out[f"gt_{bucket}"] = result["counts"][bucket]["gt"]
  return out


def run_variant(name, args):
  from mdssd_jax import train  # pylint: disable=g-import-not-at-top
  config = variant_config(name, args.steps, args.width)
  workdir = os.path.join(args.workdir, name)
  start = time.time()
  train.train_and_evaluate(config, workdir)
  minutes = (time.time() - start) / 60
  setup, state, step = train.load_checkpoint(config, workdir)
  metrics = size_metrics(setup, state)
  with open(os.path.join(workdir, train.EVAL_RESULTS_FILE)) as f:
    curve = {int(r["step"]): r["mAP"] for r in map(json.loads, f)}   # the last evaluation per step
  metrics.update(curve=curve)
  metrics.update(variant=name, step=int(step), minutes=minutes, default_boxes=len(setup.anchors),
                 params=sum(x.size for x in jax.tree_util.tree_leaves(state["params"])))
  return metrics


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--variants", default="ssd,ssd_fine,mdssd")
  parser.add_argument("--steps", type=int, default=None, help="default: the demo config's")
  parser.add_argument("--width", type=float, default=None, help="default: the demo config's")
  args = parser.parse_args()
  from configs import demo_synthetic  # pylint: disable=g-import-not-at-top
  demo = demo_synthetic.get_config()
  args.steps = args.steps or demo.train.num_steps
  args.width = args.width or demo.model.width_multiplier
  os.makedirs(args.workdir, exist_ok=True)

  rows = [run_variant(name, args) for name in args.variants.split(",")]
  with open(os.path.join(args.workdir, "study.json"), "w") as f:
    json.dump(rows, f, indent=1)
  buckets = [b for b, _ in SIZE_BUCKETS]
  header = ("| detector | default boxes | params | steps | train min | AP@0.5 | "
            + " | ".join(f"AP {b} ({lo:g}-{hi:g} px, n={rows[0]['gt_' + b]})"
                         for b, (lo, hi) in SIZE_BUCKETS) + " |")
  print(header)
  print("|" + "---|" * (6 + len(buckets)))
  for r in rows:
    print(f"| {r['variant']} | {r['default_boxes']} | {r['params'] / 1e6:.2f}M | {r['step']} | "
          f"{r['minutes']:.1f} | {r['AP']:.3f} | " + " | ".join(f"{r['AP_' + b]:.3f}" for b in buckets)
          + " |")
  steps = sorted(set().union(*(r["curve"] for r in rows)))
  print("\nVOC mAP@0.5 (area) at each evaluation during training (the learning curves):")
  print("| detector | " + " | ".join(f"step {s}" for s in steps) + " |")
  print("|---|" + "---|" * len(steps))
  for r in rows:
    print(f"| {r['variant']} | " + " | ".join(f"{r['curve'].get(s, float('nan')):.3f}" for s in steps)
          + " |")
  _plot(rows, buckets, os.path.join(args.workdir, "study.png"))


def _plot(rows, buckets, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  keys = ["AP"] + [f"AP_{b}" for b in buckets]
  x = np.arange(len(keys))
  width = 0.8 / len(rows)
  fig, ax = plt.subplots(figsize=(7, 3.5))
  for i, r in enumerate(rows):
    ax.bar(x + i * width, [r[k] for k in keys], width, label=r["variant"])
  ax.set_xticks(x + width * (len(rows) - 1) / 2, ["all"] + buckets)
  ax.set_ylabel("AP@0.5")
  ax.set_title("Small-object study on the synthetic data set")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"plot: {path}")


if __name__ == "__main__":
  main()
