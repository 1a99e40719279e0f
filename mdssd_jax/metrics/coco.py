"""COCO box metrics (the twelve numbers of COCOeval.summarize) from in-memory per-image dicts.

Ground truth and detections go to pycocotools (or faster-coco-eval, which computes the same numbers
in C++) as in-memory COCO objects: no annotation files. Their console output is captured.
"""

import contextlib
import io
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from mdssd_jax.metrics import base

# The order of COCOeval.stats.
STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")
BACKENDS = ("pycocotools", "faster_coco_eval")
# pycocotools is in requirements.txt; faster_coco_eval is optional (see benchmarks/bench_eval.py).
DEFAULT_BACKEND = "pycocotools"


def _backend_classes(backend: str):
  if backend == "pycocotools":
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    return COCO, COCOeval
  if backend == "faster_coco_eval":
    try:
      from faster_coco_eval import COCO, COCOeval_faster
    except ImportError as e:
      raise ImportError("coco backend 'faster_coco_eval' needs `pip install faster-coco-eval`; or set "
                        "config.evals.<name>.coco_backend='pycocotools'") from e
    return COCO, COCOeval_faster
  raise ValueError(f"unknown coco backend '{backend}'; known: {', '.join(BACKENDS)}")


def xyxy_to_xywh(boxes_px: np.ndarray) -> np.ndarray:
  """(N, 4) corner form pixels -> (N, 4) COCO [x, y, width, height] pixels."""
  boxes_px = np.asarray(boxes_px, np.float64).reshape(-1, 4)
  return np.concatenate([boxes_px[:, :2], boxes_px[:, 2:] - boxes_px[:, :2]], axis=1)


def _category(label_to_category_id: Optional[Mapping[int, int]], label: int) -> int:
  if label_to_category_id is None:
    return int(label)
  if label not in label_to_category_id:
    raise KeyError(f"label {label} has no COCO category id in label_to_category_id "
                   f"(it maps {sorted(label_to_category_id)[:5]}...); pass a complete mapping")
  return int(label_to_category_id[label])


def build_ground_truth_dataset(ground_truths: Sequence[Mapping[str, Any]],
                               label_to_category_id: Optional[Mapping[int, int]] = None,
                               extra_labels: Sequence[int] = ()) -> Dict[str, Any]:
  """COCO annotation dict (images, annotations, categories) from per-image ground-truth dicts.

  Image i gets id i + 1 (or the dict's "image_id"). Each ground truth: boxes (N, 4) pixels xyxy,
  labels (N,) int; optional iscrowd (N,) bool (if absent, "difficult" stands for iscrowd, as the data
  sets store COCO's crowd flag there), ignore (N,) bool, area (N,) float in pixels: the annotation's
  area, which pycocotools' small/medium/large buckets use (COCO's files carry the segmentation's
  area, smaller than the box's for most objects); where absent or < 0 (the eval batches' -1 for data
  sets without it), the box's area stands in.
  Categories: every mapped label of label_to_category_id, else every label seen (+ extra_labels).
  """
  images, annotations = [], []
  labels_seen = set(int(l) for l in extra_labels)
  for i, g in enumerate(ground_truths):
    image_id = int(g.get("image_id", i + 1))
    images.append({"id": image_id})
    boxes = xyxy_to_xywh(g["boxes"])
    labels = np.asarray(g["labels"]).reshape(-1).astype(int)
    crowd = g.get("iscrowd", g.get("difficult"))
    crowd = np.zeros(len(boxes), bool) if crowd is None else np.asarray(crowd, bool).reshape(-1)
    ignore = np.asarray(g["ignore"], bool).reshape(-1) if "ignore" in g else None
    area = boxes[:, 2] * boxes[:, 3]
    if g.get("area") is not None:
      given = np.asarray(g["area"], np.float64).reshape(-1)
      if given.shape != area.shape:
        raise ValueError(f"ground truth {i}: {given.size} areas for {len(area)} boxes")
      area = np.where(given >= 0, given, area)
    for j in range(len(boxes)):
      labels_seen.add(int(labels[j]))
      ann = {"id": len(annotations) + 1, "image_id": image_id,
             "category_id": _category(label_to_category_id, int(labels[j])),
             "bbox": [float(v) for v in boxes[j]], "area": float(area[j]), "iscrowd": int(crowd[j])}
      if ignore is not None:
        ann["ignore"] = int(ignore[j])
      annotations.append(ann)
  if label_to_category_id is not None:
    category_ids = sorted(set(int(v) for v in label_to_category_id.values()))
  else:
    category_ids = sorted(labels_seen)
  return {"images": images, "annotations": annotations,
          "categories": [{"id": c, "name": str(c)} for c in category_ids]}


def build_results(predictions: Sequence[Mapping[str, Any]], ground_truths: Sequence[Mapping[str, Any]],
                  label_to_category_id: Optional[Mapping[int, int]] = None) -> List[Dict[str, Any]]:
  """COCO results list [{image_id, category_id, bbox [x, y, w, h], score}] from per-image predictions."""
  results = []
  for i, (p, g) in enumerate(zip(predictions, ground_truths)):
    image_id = int(g.get("image_id", i + 1))
    boxes = xyxy_to_xywh(p["boxes"])
    scores = np.asarray(p["scores"], np.float64).reshape(-1)
    labels = np.asarray(p["labels"]).reshape(-1).astype(int)
    for j in range(len(boxes)):
      results.append({"image_id": image_id,
                      "category_id": _category(label_to_category_id, int(labels[j])),
                      "bbox": [float(v) for v in boxes[j]], "score": float(scores[j])})
  return results


def _empty_results(coco_cls, gt):
  """A results COCO object with no detections (loadRes cannot take an empty list)."""
  res = coco_cls()
  res.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                 "annotations": []}
  res.createIndex()
  return res


def evaluate(predictions: Sequence[Mapping[str, Any]], ground_truths: Sequence[Mapping[str, Any]],
             label_to_category_id: Optional[Mapping[int, int]] = None,
             backend: str = DEFAULT_BACKEND) -> Dict[str, Any]:
  """COCO box AP/AR.

  Args:
    predictions: one dict per image: boxes (K, 4) pixels xyxy, scores (K,), labels (K,) int.
    ground_truths: one dict per image, same order (see `build_ground_truth_dataset`).
    label_to_category_id: our label -> the data set's category id (identity if None).
    backend: "pycocotools" or "faster_coco_eval".
  Returns:
    {"AP": .., "AP50": .., ..., "AR_large": ..} (COCOeval.stats; -1 where a figure has no ground
    truth), plus "per_class": {label: {"AP": .., "AP50": ..}} for labels with ground truth.
  """
  if len(predictions) != len(ground_truths):
    raise ValueError(f"{len(predictions)} prediction dicts but {len(ground_truths)} ground-truth "
                     "dicts; need one of each per image, in the same order")
  coco_cls, eval_cls = _backend_classes(backend)
  extra = [int(l) for p in predictions for l in np.asarray(p["labels"]).reshape(-1)]
  dataset = build_ground_truth_dataset(ground_truths, label_to_category_id,
                                       extra_labels=extra if label_to_category_id is None else ())
  results = build_results(predictions, ground_truths, label_to_category_id)
  log = io.StringIO()
  with contextlib.redirect_stdout(log):
    gt = coco_cls()
    gt.dataset = dataset
    gt.createIndex()
    dt = gt.loadRes(results) if results else _empty_results(coco_cls, gt)
    evaluator = eval_cls(gt, dt, "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  stats = np.asarray(evaluator.stats[:len(STAT_NAMES)], np.float64)
  metrics: Dict[str, Any] = {name: float(v) for name, v in zip(STAT_NAMES, stats)}
  metrics["per_class"] = _per_class(evaluator, label_to_category_id, dataset)
  return metrics


def _per_class(evaluator, label_to_category_id, dataset) -> Dict[int, Dict[str, float]]:
  """AP and AP50 per category from the accumulated precision (T, R, K, A, M), area all, 100 dets."""
  precision = np.asarray(evaluator.eval["precision"])
  cat_ids = [int(c) for c in evaluator.params.catIds]
  if label_to_category_id is None:
    to_label = {c: c for c in cat_ids}
  else:
    to_label = {int(v): int(k) for k, v in label_to_category_id.items()}
  has_gt = {a["category_id"] for a in dataset["annotations"]}
  per_class = {}
  for k, cat in enumerate(cat_ids):
    if cat not in has_gt:
      continue
    p = precision[:, :, k, 0, -1]
    p50 = precision[0, :, k, 0, -1]
    per_class[to_label[cat]] = {"AP": float(np.mean(p[p > -1])) if np.any(p > -1) else -1.0,
                                "AP50": float(np.mean(p50[p50 > -1])) if np.any(p50 > -1) else -1.0}
  return per_class


class CocoMetric(base.AccumulatingMetric):
  """Accumulates per-image predictions and ground truths; runs COCOeval once at the end."""

  HEADLINE = "AP"   # AP at IoU 0.50:0.95

  def __init__(self, class_names: Sequence[str],
               label_to_category_id: Optional[Mapping[int, int]] = None,
               backend: str = DEFAULT_BACKEND):
    _backend_classes(backend)   # fail now, not after a whole evaluation pass
    super().__init__(class_names)
    self.label_to_category_id = label_to_category_id
    self.backend = backend

  def _evaluate_all(self, predictions, ground_truths):
    return evaluate(predictions, ground_truths, self.label_to_category_id, self.backend)

  def compute(self) -> Dict[str, float]:
    """The twelve COCOeval figures: AP, AP50, AP75, AP_small, ..., AR_large."""
    result = self._evaluate()
    return {name: result[name] for name in STAT_NAMES}

  def table(self) -> str:
    result = self._evaluate()
    width = max([len(n) for n in self.class_names] + [10])
    lines = [f"{'class':<{width}}  {'AP':>6}  {'AP50':>6}   (COCO, {self.num_images} images)"]
    for label, name in enumerate(self.class_names, start=1):
      if label in result["per_class"]:
        r = result["per_class"][label]
        lines.append(f"{name:<{width}}  {100 * r['AP']:6.2f}  {100 * r['AP50']:6.2f}")
      else:
        lines.append(f"{name:<{width}}  {'-':>6}  {'-':>6}")
    lines.append("  ".join(f"{n}={100 * result[n]:.2f}" for n in STAT_NAMES))
    return "\n".join(lines)
