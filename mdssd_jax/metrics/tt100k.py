"""TT100K traffic-sign metrics: precision/recall at a score threshold and mAP, overall and per size.

Sizes (docs/evaluation.md, TT100K) are buckets of the box's longer side in pixels: small [0, 32), medium
[32, 96), large [96, 400); "all" spans [0, 400) as the official `eval_annos` default does. IoU is
continuous (no +1 pixel) and must exceed the threshold; a match needs the same class.

Precision/recall follow the official `anno_func.eval_annos` (read, not copied): per image, the
detections scoring >= score_threshold and the ground truths are matched one-to-one, greedily by
DESCENDING IoU over all same-class pairs with IoU > threshold (ties: ground truth order, then
detection order). For a size bucket: a ground truth outside it is erased together with the detection
matched to it; an unmatched detection is erased when its OWN longer side is outside the bucket; a
detection matched to a ground truth in the bucket counts whatever its own size. precision = matched /
counted detections, recall = matched / counted ground truths (1.0 when a denominator is 0, as there).

mAP (not part of the official script; the MDSSD paper reports it): per class, the VOC devkit's
score-ordered matching (voc.py) on continuous IoU, then per bucket the same erasing rule: a detection
whose best same-class ground truth overlaps by more than the threshold belongs to that ground truth's
bucket, any other to its own; AP = area under the precision envelope (or 11-point), averaged over the
classes with ground truth in the bucket. Difficult ground truths (TT100K has none) are erased everywhere.
"""

from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from mdssd_jax.metrics import base
from mdssd_jax.metrics import voc

# (name, (lowest, highest) longer side in pixels), docs/evaluation.md.
DEFAULT_SIZE_RANGES: Tuple[Tuple[str, Tuple[float, float]], ...] = (
    ("small", (0.0, 32.0)), ("medium", (32.0, 96.0)), ("large", (96.0, 400.0)))
# Score above which a detection counts for precision/recall (config.evals.<name>.score_threshold of a tt100k entry).
DEFAULT_SCORE_THRESHOLD = 0.5


def _ranges_with_all(size_ranges) -> List[Tuple[str, Tuple[float, float]]]:
  size_ranges = [(str(n), (float(lo), float(hi))) for n, (lo, hi) in size_ranges]
  lo = min(r[0] for _, r in size_ranges)
  hi = max(r[1] for _, r in size_ranges)
  return [("all", (lo, hi))] + size_ranges


def match_at_threshold(dets: Mapping[str, np.ndarray], gts: Mapping[str, np.ndarray],
                       iou_threshold: float, score_threshold: float) -> np.ndarray:
  """The official one-to-one matching by descending IoU, within each image and class.

  Args:
    dets, gts: flat tables from voc.flatten_predictions / voc.flatten_ground_truths.
  Returns:
    (D,) int64: the flat ground-truth index each detection is matched to; -1 = unmatched;
    detections scoring below score_threshold are never matched.
  """
  num_det = len(dets["labels"])
  match = np.full(num_det, -1, np.int64)
  considered = np.flatnonzero(dets["scores"] >= score_threshold)
  if len(considered) == 0 or len(gts["labels"]) == 0:
    return match
  # Ground truths per (image, class) key in a padded table, as voc.best_ground_truth does per image.
  num_labels = int(max(gts["labels"].max(), dets["labels"].max())) + 1
  gt_key = gts["image"] * num_labels + gts["labels"]
  keys, gt_slot = np.unique(gt_key, return_inverse=True)
  det_key = dets["image"][considered] * num_labels + dets["labels"][considered]
  pos = np.searchsorted(keys, det_key)
  has = (pos < len(keys)) & (keys[np.minimum(pos, len(keys) - 1)] == det_key)
  considered, pos = considered[has], pos[has]
  if len(considered) == 0:
    return match
  counts = np.bincount(gt_slot, minlength=len(keys))
  order = np.argsort(gt_slot, kind="stable")
  rank = np.arange(len(order)) - (np.cumsum(counts) - counts)[gt_slot[order]]
  table = np.full((len(keys), counts.max()), -1, np.int64)
  table[gt_slot[order], rank] = order
  cand = table[pos]                                                    # (d, max_per_key)
  ious = voc.pairwise_iou_px(dets["boxes"][considered][:, None, :], gts["boxes"][np.maximum(cand, 0)],
                             pixel_offset=0.0)
  ok = (cand >= 0) & (ious > iou_threshold)
  d_local, slot = np.nonzero(ok)
  pair_det = considered[d_local]
  pair_gt = cand[d_local, slot]
  pair_iou = ious[d_local, slot]
  # Official order: per image, descending IoU; ties by ground truth, then detection order.
  order = np.lexsort((pair_det, pair_gt, -pair_iou, dets["image"][pair_det]))
  gt_taken = np.zeros(len(gts["labels"]), bool)
  for k in order.tolist():    # only pairs above the IoU threshold: few, so a plain loop is fast
    d, g = pair_det[k], pair_gt[k]
    if match[d] < 0 and not gt_taken[g]:
      match[d] = g
      gt_taken[g] = True
  return match


def _in_range(sizes: np.ndarray, size_range: Tuple[float, float]) -> np.ndarray:
  return (sizes >= size_range[0]) & (sizes < size_range[1])


def evaluate(predictions: Sequence[Mapping[str, Any]], ground_truths: Sequence[Mapping[str, Any]],
             iou_threshold: float = 0.5, score_threshold: float = DEFAULT_SCORE_THRESHOLD,
             size_ranges=DEFAULT_SIZE_RANGES, use_07_metric: bool = False) -> Dict[str, Any]:
  """TT100K metrics.

  Args:
    predictions: one dict per image: boxes (K, 4) pixels xyxy, scores (K,), labels (K,) int.
    ground_truths: one dict per image: boxes (N, 4) pixels xyxy, labels (N,), difficult (optional).
    iou_threshold: a match needs IoU > this.
    score_threshold: detections scoring >= this count for precision and recall.
    size_ranges: ((name, (lo, hi)), ...) buckets of the longer side in pixels.
    use_07_metric: 11-point AP instead of the area AP.
  Returns:
    flat {"mAP", "precision", "recall", "mAP_<bucket>", "precision_<bucket>", "recall_<bucket>"}
    (mAP NaN where no class has ground truth in the bucket) plus "AP": {bucket: {label: AP}} and
    "counts": {bucket: {"gt", "detections", "matched"}} (at the score threshold); bucket "all" included.
  """
  if len(predictions) != len(ground_truths):
    raise ValueError(f"{len(predictions)} prediction dicts but {len(ground_truths)} ground-truth "
                     "dicts; need one of each per image, in the same order")
  dets = voc.flatten_predictions(predictions)
  gts = voc.flatten_ground_truths(ground_truths)
  det_size = voc.longer_side_px(dets["boxes"])
  gt_size = voc.longer_side_px(gts["boxes"])
  buckets = _ranges_with_all(size_ranges)
  out: Dict[str, Any] = {"AP": {}, "counts": {}}

  # ---- precision / recall at the score threshold (official rules) ----
  match = match_at_threshold(dets, gts, iou_threshold, score_threshold)
  considered = dets["scores"] >= score_threshold
  matched = match >= 0
  for name, size_range in buckets:
    gt_keep = _in_range(gt_size, size_range) & ~gts["difficult"]
    det_keep = considered & np.where(matched, gt_keep[np.maximum(match, 0)] if len(gt_keep) else False,
                                     _in_range(det_size, size_range))
    num_matched = int(np.sum(det_keep & matched))
    num_det, num_gt = int(np.sum(det_keep)), int(np.sum(gt_keep))
    suffix = "" if name == "all" else f"_{name}"
    out[f"precision{suffix}"] = num_matched / num_det if num_det else 1.0
    out[f"recall{suffix}"] = num_matched / num_gt if num_gt else 1.0
    out["counts"][name] = {"gt": num_gt, "detections": num_det, "matched": num_matched}

  # ---- AP per class and bucket (score-ordered devkit matching) ----
  per_bucket: Dict[str, Dict[int, float]] = {name: {} for name, _ in buckets}
  for label in np.unique(gts["labels"]).tolist():
    m = voc.match_class(dets, gts, label, len(ground_truths), iou_threshold, pixel_offset=0.0)
    bucket_size, gt_sizes, gt_ok = voc.sizes_for_buckets(m, gts, det_size, gt_size, iou_threshold)
    for name, size_range in buckets:
      num_positives = int(np.sum(gt_ok & _in_range(gt_sizes, size_range)))
      if num_positives == 0:
        continue
      # tp | fp excludes detections whose best ground truth is difficult (neither).
      keep = _in_range(bucket_size, size_range) & (m["tp"] | m["fp"])
      precision, recall = voc.precision_recall(m["tp"][keep], m["fp"][keep], num_positives)
      per_bucket[name][label] = voc.average_precision(precision, recall, use_07_metric)
  for name, _ in buckets:
    suffix = "" if name == "all" else f"_{name}"
    values = list(per_bucket[name].values())
    out[f"mAP{suffix}"] = float(np.mean(values)) if values else float("nan")
    out["AP"][name] = per_bucket[name]
  return out


class Tt100kMetric(base.AccumulatingMetric):
  """Accumulates per-image predictions and ground truths; computes TT100K metrics at the end."""

  def __init__(self, class_names: Sequence[str], iou_threshold: float = 0.5,
               score_threshold: float = DEFAULT_SCORE_THRESHOLD, use_07_metric: bool = False,
               size_ranges=DEFAULT_SIZE_RANGES):
    super().__init__(class_names)
    self.iou_threshold = iou_threshold
    self.score_threshold = score_threshold
    self.use_07_metric = use_07_metric
    self.size_ranges = tuple(size_ranges)

  def _evaluate_all(self, predictions, ground_truths):
    return evaluate(predictions, ground_truths, self.iou_threshold, self.score_threshold,
                    self.size_ranges, self.use_07_metric)

  def compute(self) -> Dict[str, float]:
    """mAP, precision, recall, and each with a _<bucket> suffix (small, medium, large)."""
    result = self._evaluate()
    return {k: float(v) for k, v in result.items() if k not in ("AP", "counts")}

  def table(self) -> str:
    result = self._evaluate()
    names = ["all"] + [n for n, _ in self.size_ranges]
    width = max([len(n) for n in self.class_names] + [10])
    lines = [f"{'class':<{width}}  " + "  ".join(f"{'AP_' + n:>9}" for n in names)
             + f"   (TT100K, IoU > {self.iou_threshold}, {self.num_images} images)"]
    for label, cname in enumerate(self.class_names, start=1):
      cells = [f"{100 * result['AP'][n][label]:9.2f}" if label in result["AP"][n] else f"{'-':>9}"
               for n in names]
      lines.append(f"{cname:<{width}}  " + "  ".join(cells))
    for n in names:
      suffix = "" if n == "all" else f"_{n}"
      c = result["counts"][n]
      lines.append(f"{n:<8} mAP {100 * result['mAP' + suffix]:6.2f}  precision "
                   f"{100 * result['precision' + suffix]:6.2f}  recall {100 * result['recall' + suffix]:6.2f}"
                   f"  (score >= {self.score_threshold}: {c['matched']} matched of {c['detections']} "
                   f"detections, {c['gt']} ground truths)")
    return "\n".join(lines)
