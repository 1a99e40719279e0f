"""PASCAL VOC detection AP with the devkit's rules (docs/evaluation.md), vectorised with NumPy.

No loop over detections: per class, every detection's best ground truth comes from one padded
(detections, ground truths of its image) IoU array, and the greedy claiming in score order reduces to
"the first detection (in score order) whose best ground truth is g claims g".
"""

from typing import Any, Dict, Mapping, Sequence

import numpy as np

from mdssd_jax.metrics import base

# The devkit's 11 recall thresholds, computed as voc_eval.py does (np.arange, so 0.3 is
# 0.30000000000000004 and a recall of exactly 3/10 does not reach it, as in voc_eval.py).
VOC07_RECALL_THRESHOLDS = np.arange(0.0, 1.1, 0.1)

# Detections x padded ground truths per IoU block; bounds memory at a few tens of MB.
_IOU_BLOCK_ELEMENTS = 1 << 21


def pairwise_iou_px(a_px: np.ndarray, b_px: np.ndarray, pixel_offset: float = 1.0) -> np.ndarray:
  """IoU of boxes in pixels, elementwise over broadcast leading dimensions.

  Args:
    a_px: (..., 4) corner form, pixels.
    b_px: (..., 4) corner form, pixels, broadcastable against `a_px`.
    pixel_offset: 1.0 for the VOC devkit's convention (a box covers pixels x1..x2 inclusive, so
      width = x2 - x1 + 1); 0.0 for continuous coordinates (TT100K's official evaluation).
  Returns:
    (...) IoU; 0 where the union is empty.
  """
  ix1 = np.maximum(a_px[..., 0], b_px[..., 0])
  iy1 = np.maximum(a_px[..., 1], b_px[..., 1])
  ix2 = np.minimum(a_px[..., 2], b_px[..., 2])
  iy2 = np.minimum(a_px[..., 3], b_px[..., 3])
  inter = np.maximum(ix2 - ix1 + pixel_offset, 0.0) * np.maximum(iy2 - iy1 + pixel_offset, 0.0)
  area_a = (a_px[..., 2] - a_px[..., 0] + pixel_offset) * (a_px[..., 3] - a_px[..., 1] + pixel_offset)
  area_b = (b_px[..., 2] - b_px[..., 0] + pixel_offset) * (b_px[..., 3] - b_px[..., 1] + pixel_offset)
  union = area_a + area_b - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _field(record: Mapping[str, Any], key: str, where: str) -> np.ndarray:
  if key not in record:
    raise KeyError(f"{where} has no '{key}' (keys: {sorted(record)}); expected per-image dicts with "
                   "boxes (K, 4) pixels xyxy, scores/labels (predictions) or labels/difficult "
                   "(ground truths)")
  return np.asarray(record[key])


def flatten_predictions(predictions: Sequence[Mapping[str, Any]]) -> Dict[str, np.ndarray]:
  """Per-image prediction dicts -> one flat table.

  Returns: dict image (D,) int64 index into `predictions`, boxes (D, 4) float64 pixels xyxy,
  scores (D,) float64, labels (D,) int64, in input order (image by image).
  """
  rows = []
  for i, p in enumerate(predictions):
    where = f"predictions[{i}]"
    b = _field(p, "boxes", where).reshape(-1, 4).astype(np.float64)
    s = _field(p, "scores", where).reshape(-1).astype(np.float64)
    l = _field(p, "labels", where).reshape(-1).astype(np.int64)
    if not len(b) == len(s) == len(l):
      raise ValueError(f"{where}: {len(b)} boxes, {len(s)} scores, {len(l)} labels; need one each")
    rows.append(dict(boxes=b, scores=s, labels=l))
  return _flat_table(rows, boxes=np.zeros((0, 4)), scores=np.zeros((0,)),
                     labels=np.zeros((0,), np.int64))


def flatten_ground_truths(ground_truths: Sequence[Mapping[str, Any]]) -> Dict[str, np.ndarray]:
  """Per-image ground-truth dicts -> one flat table.

  `difficult` may be left out (all False). Returns: dict image (G,) int64, boxes (G, 4) float64
  pixels xyxy, labels (G,) int64, difficult (G,) bool.
  """
  rows = []
  for i, g in enumerate(ground_truths):
    where = f"ground_truths[{i}]"
    b = _field(g, "boxes", where).reshape(-1, 4).astype(np.float64)
    l = _field(g, "labels", where).reshape(-1).astype(np.int64)
    d = (np.asarray(g["difficult"]).reshape(-1).astype(bool) if "difficult" in g
         else np.zeros(len(b), bool))
    if not len(b) == len(l) == len(d):
      raise ValueError(f"{where}: {len(b)} boxes, {len(l)} labels, {len(d)} difficult flags; need one each")
    rows.append(dict(boxes=b, labels=l, difficult=d))
  return _flat_table(rows, boxes=np.zeros((0, 4)), labels=np.zeros((0,), np.int64),
                     difficult=np.zeros((0,), bool))


def _flat_table(rows, **empty):
  """Per-image dicts of equally long arrays -> one table with an `image` index column; `empty`
  gives each column's value (shape, dtype) when there are no images."""
  counts = [len(r["boxes"]) for r in rows]
  table = {k: (np.concatenate([r[k] for r in rows]) if rows else e) for k, e in empty.items()}
  return dict(image=np.repeat(np.arange(len(rows)), counts), **table)


def best_ground_truth(det_image: np.ndarray, det_boxes: np.ndarray, gt_image: np.ndarray,
                      gt_boxes: np.ndarray, num_images: int, pixel_offset: float = 1.0):
  """For each detection, the ground truth of its image with the highest IoU (claimed or not).

  All inputs belong to one class. Ties in IoU go to the ground truth listed first (np.argmax,
  as the devkit's).

  Args:
    det_image: (D,) image index of each detection.
    det_boxes: (D, 4) pixels xyxy.
    gt_image: (G,) image index of each ground truth, in [0, num_images).
    gt_boxes: (G, 4) pixels xyxy.
    num_images: number of images.
    pixel_offset: see `pairwise_iou_px`.
  Returns:
    (best_iou (D,) float64, -inf where the image has no ground truth; best_gt (D,) int64 index
    into the G ground truths, -1 where none).
  """
  num_det = len(det_image)
  best_iou = np.full(num_det, -np.inf)
  best_gt = np.full(num_det, -1, np.int64)
  if num_det == 0 or len(gt_image) == 0:
    return best_iou, best_gt
  # Ground truths of each image in a padded table: (num_images, max_per_image) of indices, -1 = none.
  order = np.argsort(gt_image, kind="stable")
  counts = np.bincount(gt_image, minlength=num_images)
  starts = np.cumsum(counts) - counts
  rank = np.arange(len(order)) - starts[gt_image[order]]
  table = np.full((num_images, counts.max()), -1, np.int64)
  table[gt_image[order], rank] = order
  block = max(1, _IOU_BLOCK_ELEMENTS // table.shape[1])
  for lo in range(0, num_det, block):
    cand = table[det_image[lo:lo + block]]                              # (d, max_per_image)
    ious = pairwise_iou_px(det_boxes[lo:lo + block, None, :], gt_boxes[np.maximum(cand, 0)],
                           pixel_offset)
    ious = np.where(cand >= 0, ious, -np.inf)
    arg = np.argmax(ious, axis=1)
    best_iou[lo:lo + block] = ious[np.arange(len(arg)), arg]
    best_gt[lo:lo + block] = np.where(np.isfinite(best_iou[lo:lo + block]),
                                      cand[np.arange(len(arg)), arg], -1)
  return best_iou, best_gt


def classify_detections(best_iou: np.ndarray, best_gt: np.ndarray, gt_difficult: np.ndarray,
                        iou_threshold: float):
  """The devkit's verdict for detections already sorted by descending score.

  A detection whose best ground truth overlaps by more than `iou_threshold`: ignored if that ground
  truth is difficult, a true positive if it is the first (in score order) to reach it, else a false
  positive (duplicate). Every other detection is a false positive.

  Returns: (tp (D,) bool, fp (D,) bool); ignored detections are neither.
  """
  hit = best_iou > iou_threshold
  difficult = hit & gt_difficult[np.maximum(best_gt, 0)]
  claims = np.flatnonzero(hit & ~difficult)
  tp = np.zeros(len(best_iou), bool)
  _, first = np.unique(best_gt[claims], return_index=True)
  tp[claims[first]] = True
  fp = ~hit | (hit & ~difficult & ~tp)
  return tp, fp


def precision_recall(tp: np.ndarray, fp: np.ndarray, num_positives: int):
  """Cumulative (precision, recall) over detections in score order, as voc_eval.py computes them."""
  tp_cum = np.cumsum(tp, dtype=np.float64)
  fp_cum = np.cumsum(fp, dtype=np.float64)
  recall = tp_cum / float(num_positives)
  precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
  return precision, recall


def average_precision(precision: np.ndarray, recall: np.ndarray, use_07_metric: bool = True) -> float:
  """AP from a precision/recall curve (recall non-decreasing).

  use_07_metric: VOC2007's 11-point AP, the mean over t in 0, 0.1, .., 1 of the highest precision
  at recall >= t (0 where recall never reaches t); else VOC2010+'s area under the monotone
  (non-increasing) precision envelope.
  """
  precision = np.asarray(precision, np.float64)
  recall = np.asarray(recall, np.float64)
  if use_07_metric:
    if len(recall) == 0:
      return 0.0
    best_after = np.maximum.accumulate(precision[::-1])[::-1]   # max precision at index >= i
    first = np.searchsorted(recall, VOC07_RECALL_THRESHOLDS, side="left")
    reached = first < len(recall)
    points = np.where(reached, best_after[np.minimum(first, len(recall) - 1)], 0.0)
    return float(np.sum(points) / len(VOC07_RECALL_THRESHOLDS))
  mrec = np.concatenate([[0.0], recall, [1.0]])
  mpre = np.concatenate([[0.0], precision, [0.0]])
  mpre = np.maximum.accumulate(mpre[::-1])[::-1]
  steps = np.flatnonzero(mrec[1:] != mrec[:-1])
  return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def match_class(dets: Mapping[str, np.ndarray], gts: Mapping[str, np.ndarray], label: int,
                num_images: int, iou_threshold: float, pixel_offset: float = 1.0):
  """Score-ordered devkit matching of one class.

  Detections are sorted by descending score with a STABLE sort: equal scores keep input order,
  i.e. image order as given, then the order within the image (as the MATLAB devkit's stable sort;
  voc_eval.py's quicksort leaves ties arbitrary).

  Returns dict: order (D_c,) indices into the flat detections of this class in score order,
  tp, fp (D_c,) bool, best_gt (D_c,) index into the flat ground truths (-1: none), best_iou
  (D_c,), num_positives (non-difficult ground truths of the class), gt_index (G_c,) the flat
  indices of this class's ground truths.
  """
  det_idx = np.flatnonzero(dets["labels"] == label)
  det_idx = det_idx[np.argsort(-dets["scores"][det_idx], kind="stable")]
  gt_idx = np.flatnonzero(gts["labels"] == label)
  best_iou, best_local = best_ground_truth(dets["image"][det_idx], dets["boxes"][det_idx],
                                           gts["image"][gt_idx], gts["boxes"][gt_idx],
                                           num_images, pixel_offset)
  difficult = gts["difficult"][gt_idx]
  tp, fp = classify_detections(best_iou, best_local, difficult if len(difficult) else np.zeros(1, bool),
                               iou_threshold)
  best_gt = np.where(best_local >= 0, gt_idx[np.maximum(best_local, 0)] if len(gt_idx) else -1, -1)
  return dict(order=det_idx, tp=tp, fp=fp, best_gt=best_gt, best_iou=best_iou,
              num_positives=int(np.sum(~difficult)), gt_index=gt_idx)


def longer_side_px(boxes_px: np.ndarray) -> np.ndarray:
  """(N, 4) corner form, pixels -> (N,) max(width, height), continuous (x2 - x1, no +1)."""
  boxes_px = np.asarray(boxes_px, np.float64).reshape(-1, 4)
  return np.maximum(boxes_px[:, 2] - boxes_px[:, 0], boxes_px[:, 3] - boxes_px[:, 1])


def sizes_for_buckets(m: Mapping[str, np.ndarray], gts: Mapping[str, np.ndarray],
                      det_size_px: np.ndarray, gt_size_px: np.ndarray, iou_threshold: float):
  """The sizes that put one class's detections and ground truths into size buckets.

  A detection that overlaps a ground truth above `iou_threshold` is judged at that ground truth's
  size (a slightly loose box of a 15 px object stays "tiny"); any other detection at its own size.

  Args:
    m: `match_class`'s dict of the class; gts: `flatten_ground_truths`'s dict.
    det_size_px (D,), gt_size_px (G,): longer sides of all flat detections and ground truths.
  Returns:
    det_bucket_size_px (D_c,) in m["order"]'s (score) order; class_gt_size_px (G_c,) and
    class_gt_not_difficult (G_c,) bool of the class's ground truths, in m["gt_index"]'s order.
  """
  hit = m["best_iou"] > iou_threshold
  own = det_size_px[m["order"]]
  via_gt = gt_size_px[np.maximum(m["best_gt"], 0)] if len(gt_size_px) else own
  return (np.where(hit, via_gt, own), gt_size_px[m["gt_index"]],
          ~gts["difficult"][m["gt_index"]])


def evaluate(predictions: Sequence[Mapping[str, Any]], ground_truths: Sequence[Mapping[str, Any]],
             iou_threshold: float = 0.5, use_07_metric: bool = True) -> Dict[str, Any]:
  """VOC mAP.

  Args:
    predictions: one dict per image: boxes (K, 4) pixels xyxy, scores (K,), labels (K,) int.
    ground_truths: one dict per image, same order: boxes (N, 4) pixels xyxy, labels (N,) int,
      difficult (N,) bool (optional, default False).
    iou_threshold: a detection matches when IoU > this (strictly, as the devkit).
    use_07_metric: VOC2007 11-point AP (True) or VOC2010+ area AP (False).
  Returns:
    {"mAP": mean AP over the classes with at least one non-difficult ground truth (NaN if there
    is none), "AP": {label: AP} for those classes, "num_positives": {label: count}}.
  """
  if len(predictions) != len(ground_truths):
    raise ValueError(f"{len(predictions)} prediction dicts but {len(ground_truths)} ground-truth "
                     "dicts; need one of each per image, in the same order")
  dets = flatten_predictions(predictions)
  gts = flatten_ground_truths(ground_truths)
  labels = np.unique(gts["labels"][~gts["difficult"]])
  ap, npos = {}, {}
  for label in labels.tolist():
    m = match_class(dets, gts, label, len(ground_truths), iou_threshold)
    precision, recall = precision_recall(m["tp"], m["fp"], m["num_positives"])
    ap[label] = average_precision(precision, recall, use_07_metric)
    npos[label] = m["num_positives"]
  mean = float(np.mean(list(ap.values()))) if ap else float("nan")
  return {"mAP": mean, "AP": ap, "num_positives": npos}


class VocMetric(base.AccumulatingMetric):
  """Accumulates per-image predictions and ground truths; computes VOC AP once at the end."""

  def __init__(self, class_names: Sequence[str], iou_threshold: float = 0.5,
               use_07_metric: bool = True):
    super().__init__(class_names)
    self.iou_threshold = iou_threshold
    self.use_07_metric = use_07_metric

  def _evaluate_all(self, predictions, ground_truths):
    return evaluate(predictions, ground_truths, self.iou_threshold, self.use_07_metric)

  def _name(self, label: int) -> str:
    return self.class_names[label - 1] if 1 <= label <= len(self.class_names) else f"class_{label}"

  def compute(self) -> Dict[str, float]:
    """{"mAP": .., "AP/<class name>": ..} for the classes with non-difficult ground truth."""
    result = self._evaluate()
    metrics = {"mAP": result["mAP"]}
    for label, value in sorted(result["AP"].items()):
      metrics[f"AP/{self._name(label)}"] = value
    return metrics

  def table(self) -> str:
    result = self._evaluate()
    metric = "VOC07 11-point" if self.use_07_metric else "VOC area"
    width = max([len(n) for n in self.class_names] + [8])
    lines = [f"{'class':<{width}}  {'AP %':>6}  {'#gt':>6}   ({metric} AP, IoU > {self.iou_threshold}, "
             f"{self.num_images} images)"]
    for label, name in enumerate(self.class_names, start=1):
      if label in result["AP"]:
        lines.append(f"{name:<{width}}  {100 * result['AP'][label]:6.2f}  {result['num_positives'][label]:6d}")
      else:
        lines.append(f"{name:<{width}}  {'-':>6}  {0:6d}")
    lines.append(f"{'mAP %':<{width}}  {100 * result['mAP']:6.2f}")
    return "\n".join(lines)
