"""AP by object size: AP@0.5 per bucket of the object's longer side in pixels (VOC devkit rules).

`size_bucket_metrics` computes AP@0.5 with the PASCAL VOC devkit's rules (metrics/voc.py:
score-ordered matching per class, IoU > threshold, duplicates false, difficult ground truth ignored)
per bucket of the object's longer side in pixels. The bucket rule is COCO's area-range rule applied
to the longer side: a ground truth outside the bucket is left out of its positives together with
the detection matched to it; a detection matched to a ground truth of the bucket counts for the
bucket whatever its own size; an unmatched detection counts for the bucket of its own box. It also
returns the precision-recall curve of each bucket (all classes pooled) and the sizes of the ground
truths that no detection found, for the histogram of missed objects (report/plots.py draws them).
"""

import math
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from mdssd_jax.metrics import voc

# (name, lowest, highest) longer side in pixels of the evaluated image; lowest <= size < highest.
SIZE_BUCKETS_PX: Tuple[Tuple[str, float, float], ...] = (
    ("tiny", 0.0, 16.0), ("small", 16.0, 32.0), ("medium", 32.0, 96.0), ("large", 96.0, math.inf))

# Eval-result keys of the per-bucket AP (metrics dict, eval_results.jsonl, TensorBoard "eval/...").
AP_KEY_PREFIX = "AP_size/"
# AP by object size is AP@0.5 (VOC's matching), whatever the evaluator's own metric.
SIZE_AP_IOU = 0.5


def check_size_buckets(size_buckets, where: str = "config.eval.size_buckets_px"):
  """((name, lo, hi), ...) as floats; one clear error for a malformed or overlapping list."""
  out = []
  try:
    for name, lo, hi in size_buckets:
      out.append((str(name), float(lo), float(hi)))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where} must be ((name, lowest_px, highest_px), ...), e.g. "
                     f"{SIZE_BUCKETS_PX[:2]}; got {size_buckets!r}") from e
  if not out:
    raise ValueError(f"{where} is empty; give at least one (name, lowest_px, highest_px)")
  for i, (name, lo, hi) in enumerate(out):
    if not lo < hi:
      raise ValueError(f"{where}: bucket {name!r} has lowest {lo} >= highest {hi}")
    if i and lo < out[i - 1][2]:
      raise ValueError(f"{where}: bucket {name!r} starts at {lo} px, inside the previous bucket "
                       f"(up to {out[i - 1][2]} px); list buckets in increasing, disjoint order")
  return tuple(out)


def _in_bucket(sizes: np.ndarray, lo: float, hi: float) -> np.ndarray:
  return (sizes >= lo) & (sizes < hi)


def missed_ground_truths(prediction: Mapping[str, Any], ground_truth: Mapping[str, Any],
                         iou_threshold: float = 0.5, score_threshold: float = 0.3,
                         pixel_offset: float = 1.0) -> np.ndarray:
  """Which ground truths of one image no detection found.

  A ground truth is found when some detection of its class scoring >= score_threshold overlaps it
  by IoU > iou_threshold (no one-to-one claiming: this asks "was it seen at all").

  Args:
    prediction: boxes (K, 4) pixels xyxy, scores (K,), labels (K,).
    ground_truth: boxes (N, 4) pixels xyxy, labels (N,).
  Returns:
    (N,) bool, True = missed.
  """
  gt_boxes = np.asarray(ground_truth["boxes"], np.float64).reshape(-1, 4)
  gt_labels = np.asarray(ground_truth["labels"]).reshape(-1)
  boxes = np.asarray(prediction["boxes"], np.float64).reshape(-1, 4)
  scores = np.asarray(prediction["scores"], np.float64).reshape(-1)
  labels = np.asarray(prediction["labels"]).reshape(-1)
  keep = scores >= score_threshold
  boxes, labels = boxes[keep], labels[keep]
  if len(gt_boxes) == 0:
    return np.zeros(0, bool)
  if len(boxes) == 0:
    return np.ones(len(gt_boxes), bool)
  iou = voc.pairwise_iou_px(gt_boxes[:, None, :], boxes[None, :, :], pixel_offset)   # (N, K)
  found = np.any((iou > iou_threshold) & (gt_labels[:, None] == labels[None, :]), axis=1)
  return ~found


def size_bucket_metrics(predictions: Sequence[Mapping[str, Any]],
                        ground_truths: Sequence[Mapping[str, Any]],
                        size_buckets=SIZE_BUCKETS_PX, iou_threshold: float = 0.5,
                        use_07_metric: bool = False, pixel_offset: float = 1.0,
                        missed_score_threshold: float = 0.3) -> Dict[str, Any]:
  """AP@iou_threshold per size bucket, PR curves and missed-object sizes.

  Args:
    predictions: one dict per image: boxes (K, 4) pixels xyxy, scores (K,), labels (K,) 1..C.
    ground_truths: one dict per image, same order: boxes (N, 4), labels (N,), difficult (optional).
    size_buckets: ((name, lowest_px, highest_px), ...) of the longer side.
    iou_threshold: a match needs IoU > this (the devkit's strict inequality).
    use_07_metric: 11-point AP instead of the area under the precision envelope.
    pixel_offset: 1.0 for the devkit's inclusive pixels (as the VOC evaluator), 0.0 continuous.
    missed_score_threshold: detections scoring at least this count for "missed" (the score shown
      on pictures, config.eval.picture_score_threshold).
  Returns:
    dict with
      "buckets": names in order;
      "AP": {bucket: mean AP over the classes with a non-difficult ground truth in the bucket,
             NaN if none};
      "AP_per_class": {bucket: {label: AP}};
      "num_gt": {bucket: non-difficult ground truths};
      "pr": {bucket: {"precision": (D_b,), "recall": (D_b,)}}, all classes pooled in score order
            (empty arrays for a bucket without ground truth);
      "gt_sizes_px": (G,) longer sides of the non-difficult ground truths;
      "missed_sizes_px": (M,) longer sides of those no detection found (`missed_ground_truths`).
  """
  if len(predictions) != len(ground_truths):
    raise ValueError(f"{len(predictions)} prediction dicts but {len(ground_truths)} ground-truth "
                     "dicts; need one of each per image, in the same order")
  buckets = check_size_buckets(size_buckets, "size_buckets")
  dets = voc.flatten_predictions(predictions)
  gts = voc.flatten_ground_truths(ground_truths)
  det_size = voc.longer_side_px(dets["boxes"])
  gt_size = voc.longer_side_px(gts["boxes"])
  per_class: Dict[str, Dict[int, float]] = {name: {} for name, _, _ in buckets}
  pooled: Dict[str, List[Tuple[np.ndarray, np.ndarray, np.ndarray]]] = {n: [] for n, _, _ in buckets}
  for label in np.unique(gts["labels"]).tolist():
    m = voc.match_class(dets, gts, label, len(ground_truths), iou_threshold, pixel_offset)
    bucket_size, gt_sizes, gt_ok = voc.sizes_for_buckets(m, gts, det_size, gt_size, iou_threshold)
    scores = dets["scores"][m["order"]]
    for name, lo, hi in buckets:
      num_positives = int(np.sum(gt_ok & _in_bucket(gt_sizes, lo, hi)))
      # tp | fp leaves out detections whose best ground truth is difficult (neither, as the devkit).
      keep = _in_bucket(bucket_size, lo, hi) & (m["tp"] | m["fp"])
      pooled[name].append((scores[keep], m["tp"][keep], m["fp"][keep]))
      if num_positives == 0:
        continue
      precision, recall = voc.precision_recall(m["tp"][keep], m["fp"][keep], num_positives)
      per_class[name][label] = voc.average_precision(precision, recall, use_07_metric)

  ok = ~gts["difficult"]
  out: Dict[str, Any] = {"buckets": [n for n, _, _ in buckets], "AP": {}, "AP_per_class": per_class,
                         "num_gt": {}, "pr": {}}
  for name, lo, hi in buckets:
    values = list(per_class[name].values())
    out["AP"][name] = float(np.mean(values)) if values else float("nan")
    num_gt = int(np.sum(ok & _in_bucket(gt_size, lo, hi)))
    out["num_gt"][name] = num_gt
    if pooled[name] and num_gt:
      scores = np.concatenate([p[0] for p in pooled[name]])
      order = np.argsort(-scores, kind="stable")
      tp = np.concatenate([p[1] for p in pooled[name]])[order]
      fp = np.concatenate([p[2] for p in pooled[name]])[order]
      precision, recall = voc.precision_recall(tp, fp, num_gt)
    else:
      precision, recall = np.zeros(0), np.zeros(0)
    out["pr"][name] = {"precision": precision, "recall": recall}

  missed = [missed_ground_truths(p, g, iou_threshold, missed_score_threshold, pixel_offset)
            for p, g in zip(predictions, ground_truths)]
  missed_flat = np.concatenate(missed) if missed else np.zeros(0, bool)
  out["gt_sizes_px"] = gt_size[ok]
  out["missed_sizes_px"] = gt_size[ok & missed_flat] if len(missed_flat) else np.zeros(0)
  return out


def bucket_scalars(result: Mapping[str, Any]) -> Dict[str, float]:
  """{"AP_size/<bucket>": AP} for the metrics dict (NaN buckets left out: no object of that size)."""
  return {f"{AP_KEY_PREFIX}{name}": float(ap) for name, ap in result["AP"].items() if ap == ap}
