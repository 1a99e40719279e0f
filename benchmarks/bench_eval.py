"""Seconds to evaluate a VOC07-test-sized set: N images x K detections, ~3 ground truths, 20 classes.

  python -m benchmarks.bench_eval [--images 5000] [--detections 200] [--repeats 3] [--coco_repeats 1]

Detections are realistic-ish: a few jittered copies of each ground-truth box (right or wrong class)
plus low-scoring clutter, as an SSD's top-200 list after NMS looks. COCO runs through pycocotools and,
if installed, faster-coco-eval (both give the same twelve numbers; the table says whether they agree).
"""

import argparse
import os
import time

import numpy as np

from mdssd_jax.metrics import coco, tt100k, voc


def make_case(num_images, num_detections, num_classes=20, mean_gt=3.0, seed=0):
  rng = np.random.default_rng(seed)
  predictions, ground_truths = [], []
  for _ in range(num_images):
    h, w = rng.integers(300, 501, size=2)
    n = max(1, rng.poisson(mean_gt))
    wh = rng.uniform(0.05, 0.8, size=(n, 2)) * [w, h]
    xy = rng.uniform(0, 1, size=(n, 2)) * ([w, h] - wh)
    boxes = np.concatenate([xy, xy + wh], axis=1)
    labels = rng.integers(1, num_classes + 1, size=n)
    ground_truths.append(dict(boxes=boxes, labels=labels, difficult=rng.random(n) < 0.1))
    near = boxes[rng.integers(0, n, size=min(num_detections, 5 * n))]
    near = near + rng.normal(0, 0.08, size=near.shape) * np.tile(near[:, 2:] - near[:, :2], 2)
    near_labels = np.where(rng.random(len(near)) < 0.7, labels[rng.integers(0, n, size=len(near))],
                           rng.integers(1, num_classes + 1, size=len(near)))
    k = num_detections - len(near)
    cwh = rng.uniform(0.02, 0.6, size=(k, 2)) * [w, h]
    cxy = rng.uniform(0, 1, size=(k, 2)) * ([w, h] - cwh)
    clutter = np.concatenate([cxy, cxy + cwh], axis=1)
    scores = np.concatenate([rng.uniform(0.3, 1.0, len(near)), rng.uniform(0.01, 0.5, k)])
    predictions.append(dict(boxes=np.concatenate([near, clutter]).astype(np.float32),
                            scores=scores.astype(np.float32),
                            labels=np.concatenate([near_labels, rng.integers(1, num_classes + 1, k)])))
  return predictions, ground_truths


def timed(fn, repeats):
  """(best wall seconds, best CPU seconds of this process, result): CPU time is the fair figure on a
  shared machine, wall time what a user waits for on an idle one."""
  wall, cpu, result = float("inf"), float("inf"), None
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    wall = min(wall, time.perf_counter() - start)
    cpu = min(cpu, time.process_time() - start_cpu)
  return (wall, cpu), result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=5000)
  parser.add_argument("--detections", type=int, default=200)
  parser.add_argument("--repeats", type=int, default=3, help="VOC / TT100K runs (best is shown)")
  parser.add_argument("--coco_repeats", type=int, default=1, help="COCO runs (minutes each)")
  args = parser.parse_args()
  predictions, ground_truths = make_case(args.images, args.detections)
  rows = []
  for use_07 in (True, False):
    seconds, r = timed(lambda: voc.evaluate(predictions, ground_truths, 0.5, use_07), args.repeats)
    rows.append((f"VOC {'07 11-point' if use_07 else 'area (2010+)'}", seconds, f"mAP {100 * r['mAP']:.2f}"))
  seconds, r = timed(lambda: tt100k.evaluate(predictions, ground_truths, 0.5, 0.5), args.repeats)
  rows.append(("TT100K (mAP + P/R, 4 sizes)", seconds, f"mAP {100 * r['mAP']:.2f}"))
  stats = {}
  for backend in coco.BACKENDS:
    try:
      coco._backend_classes(backend)
    except ImportError:
      rows.append((f"COCO {backend}", (float("nan"), float("nan")), "not installed"))
      continue
    seconds, r = timed(lambda: coco.evaluate(predictions, ground_truths, backend=backend),
                       args.coco_repeats)
    stats[backend] = np.array([r[n] for n in coco.STAT_NAMES])
    rows.append((f"COCO {backend}", seconds, f"AP {100 * r['AP']:.2f} AP50 {100 * r['AP50']:.2f}"))
  print(f"{args.images} images x {args.detections} detections, 20 classes, "
        f"{sum(len(g['labels']) for g in ground_truths)} ground truths")
  print(f"{'evaluator':<30} {'wall s':>8} {'CPU s':>8}  result")
  for name, (wall, cpu), note in rows:
    print(f"{name:<30} {wall:8.2f} {cpu:8.2f}  {note}")
  if len(stats) == 2:
    diff = np.max(np.abs(stats["pycocotools"] - stats["faster_coco_eval"]))
    print(f"pycocotools vs faster_coco_eval: largest difference over the 12 numbers {diff:.2e}")


if __name__ == "__main__":
  main()
