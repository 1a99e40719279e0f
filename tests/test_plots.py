"""Per-size-bucket AP, PR curves and missed objects (mdssd_jax/metrics/sizes.py, mdssd_jax/report/plots.py) against a plain devkit loop."""

import math
import os

import numpy as np
import pytest

from mdssd_jax.metrics import sizes
from mdssd_jax.report import plots

BUCKETS = sizes.SIZE_BUCKETS_PX


# ---- an independent reference: the VOC devkit's voc_eval loop, one detection at a time -----------

def _iou_plus_one(a, b):
  ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
  ix2, iy2 = min(a[2], b[2]), min(a[3], b[3])
  iw, ih = max(ix2 - ix1 + 1.0, 0.0), max(iy2 - iy1 + 1.0, 0.0)
  inter = iw * ih
  union = (a[2] - a[0] + 1.0) * (a[3] - a[1] + 1.0) + (b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0) - inter
  return inter / union if union > 0 else 0.0


def _longer(b):
  return max(b[2] - b[0], b[3] - b[1])


def _voc_area_ap(rec, prec):
  mrec = [0.0] + list(rec) + [1.0]
  mpre = [0.0] + list(prec) + [0.0]
  for i in range(len(mpre) - 2, -1, -1):
    mpre[i] = max(mpre[i], mpre[i + 1])
  return sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i])


def reference(preds, gts, lo, hi, thr=0.5):
  """(AP per class, pooled [(score, is_tp)], num_gt) of bucket [lo, hi), devkit style."""
  labels = sorted({int(l) for g in gts for l in g["labels"]})
  aps, pooled = {}, []
  for c in labels:
    npos = 0
    claimed = {}
    for i, g in enumerate(gts):
      for j, (box, l, d) in enumerate(zip(g["boxes"], g["labels"], g["difficult"])):
        if l == c and not d and lo <= _longer(box) < hi:
          npos += 1
        claimed[(i, j)] = False
    dets = [(float(s), i, list(b)) for i, p in enumerate(preds)
            for b, s, l in zip(p["boxes"], p["scores"], p["labels"]) if l == c]
    dets = sorted(dets, key=lambda d: -d[0])
    flags = []
    for score, i, box in dets:
      ovmax, jmax = -np.inf, -1
      for j, (gbox, l) in enumerate(zip(gts[i]["boxes"], gts[i]["labels"])):
        if l != c:
          continue
        o = _iou_plus_one(box, gbox)
        if o > ovmax:
          ovmax, jmax = o, j
      if ovmax > thr:
        size = _longer(gts[i]["boxes"][jmax])
        if gts[i]["difficult"][jmax]:
          continue
        if not claimed[(i, jmax)]:
          claimed[(i, jmax)] = True
          is_tp = True
        else:
          is_tp = False
      else:
        size, is_tp = _longer(box), False
      if lo <= size < hi:
        flags.append(is_tp)
        pooled.append((score, is_tp))
    if npos == 0:
      continue
    tp = np.cumsum([1.0 if f else 0.0 for f in flags])
    fp = np.cumsum([0.0 if f else 1.0 for f in flags])
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    aps[c] = _voc_area_ap(rec, prec)
  num_gt = sum(1 for g in gts for b, d in zip(g["boxes"], g["difficult"]) if not d and lo <= _longer(b) < hi)
  return aps, pooled, num_gt


def _random_case(seed, num_images=12, num_classes=3):
  rng = np.random.default_rng(seed)
  preds, gts = [], []
  for _ in range(num_images):
    n = rng.integers(0, 7)
    sizes = rng.choice([6, 12, 20, 28, 40, 80, 120, 200], size=n) * rng.uniform(0.8, 1.2, n)
    xy = rng.uniform(0, 300, (n, 2))
    aspect = rng.uniform(0.5, 1.0, n)
    boxes = np.stack([xy[:, 0], xy[:, 1], xy[:, 0] + sizes, xy[:, 1] + sizes * aspect], 1)
    labels = rng.integers(1, num_classes + 1, n)
    difficult = rng.uniform(size=n) < 0.1
    gts.append(dict(boxes=boxes, labels=labels, difficult=difficult))
    # Detections: jittered copies (some duplicated, some wrong class) plus random false positives.
    det_boxes, det_labels = [], []
    for b, l in zip(boxes, labels):
      for _ in range(rng.integers(0, 3)):
        w = b[2] - b[0]
        det_boxes.append(b + rng.normal(0, 0.12 * w, 4))
        det_labels.append(l if rng.uniform() < 0.85 else rng.integers(1, num_classes + 1))
    for _ in range(rng.integers(0, 4)):
      s = rng.choice([8, 24, 60, 150])
      x, y = rng.uniform(0, 300, 2)
      det_boxes.append(np.array([x, y, x + s, y + s]))
      det_labels.append(rng.integers(1, num_classes + 1))
    k = len(det_boxes)
    preds.append(dict(boxes=np.array(det_boxes).reshape(-1, 4), labels=np.array(det_labels, int),
                      scores=rng.uniform(0.01, 1.0, k)))
  return preds, gts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bucket_ap_and_pr_match_devkit_loop(seed):
  preds, gts = _random_case(seed)
  result = sizes.size_bucket_metrics(preds, gts, BUCKETS, missed_score_threshold=0.3)
  assert result["buckets"] == [b[0] for b in BUCKETS]
  checked = 0
  for name, lo, hi in BUCKETS:
    aps, pooled, num_gt = reference(preds, gts, lo, hi)
    assert result["num_gt"][name] == num_gt
    assert set(result["AP_per_class"][name]) == set(aps)
    for label, ap in aps.items():
      assert result["AP_per_class"][name][label] == pytest.approx(ap, abs=1e-12)
      checked += 1
    expected = float(np.mean(list(aps.values()))) if aps else float("nan")
    np.testing.assert_allclose(result["AP"][name], expected, atol=1e-12)
    if num_gt:
      pooled = sorted(pooled, key=lambda p: -p[0])
      tp = np.cumsum([p[1] for p in pooled])
      np.testing.assert_allclose(result["pr"][name]["recall"], tp / num_gt)
      np.testing.assert_allclose(result["pr"][name]["precision"], tp / np.arange(1, len(pooled) + 1))
  assert checked >= 4


def test_missed_sizes_match_a_loop():
  preds, gts = _random_case(5)
  result = sizes.size_bucket_metrics(preds, gts, BUCKETS, missed_score_threshold=0.4)
  all_sizes, missed = [], []
  for p, g in zip(preds, gts):
    for box, label, difficult in zip(g["boxes"], g["labels"], g["difficult"]):
      if difficult:
        continue
      all_sizes.append(_longer(box))
      found = any(l == label and s >= 0.4 and _iou_plus_one(b, box) > 0.5
                  for b, s, l in zip(p["boxes"], p["scores"], p["labels"]))
      if not found:
        missed.append(_longer(box))
  np.testing.assert_allclose(np.sort(result["gt_sizes_px"]), np.sort(all_sizes))
  np.testing.assert_allclose(np.sort(result["missed_sizes_px"]), np.sort(missed))
  assert 0 < len(missed) < len(all_sizes)


def test_hand_case_bucket_rule():
  # Image 0: a 10 px object found, a 20 px object missed; a 150 px false positive (its own bucket:
  # large) and a 10 px detection of the 20 px object's class far away (bucket: tiny, false).
  gts = [dict(boxes=np.array([[0, 0, 10, 10], [50, 50, 70, 70]], float), labels=np.array([1, 2]))]
  preds = [dict(boxes=np.array([[0, 0, 10, 10], [100, 100, 250, 250], [200, 0, 210, 10]], float),
                scores=np.array([0.9, 0.8, 0.7]), labels=np.array([1, 1, 2]))]
  result = sizes.size_bucket_metrics(preds, gts, BUCKETS)
  assert result["AP"]["tiny"] == pytest.approx(1.0)      # class 1: its only tiny detection is right
  assert result["AP"]["small"] == pytest.approx(0.0)     # class 2's small object never found
  assert math.isnan(result["AP"]["large"])               # no large object: no AP, only a false positive
  np.testing.assert_allclose(result["pr"]["tiny"]["precision"], [1.0, 0.5])   # 0.9 hit, 0.7 false
  np.testing.assert_allclose(result["missed_sizes_px"], [20.0])
  assert sizes.bucket_scalars(result) == {"AP_size/tiny": 1.0, "AP_size/small": 0.0}


def test_bad_buckets_error():
  with pytest.raises(ValueError, match="inside the previous bucket"):
    sizes.check_size_buckets((("a", 0, 32), ("b", 16, 64)))
  with pytest.raises(ValueError, match=r"\(name, lowest_px, highest_px\)"):
    sizes.check_size_buckets((("a", 0),))


def test_plots_written_and_sent_to_writer(tmp_path):
  preds, gts = _random_case(3)
  result = sizes.size_bucket_metrics(preds, gts)
  history = [{"step": 100, "mAP": 0.2, **sizes.bucket_scalars(result)},
             {"step": 200, "mAP": 0.4, "AP_size/tiny": 0.3, "AP_size/small": 0.5}]

  class Writer:
    def __init__(self):
      self.images = {}

    def write_images(self, step, images):
      self.images[step] = images

  writer = Writer()
  paths = plots.write_evaluation_plots(str(tmp_path), 200, result, history, writer=writer)
  assert sorted(paths) == ["ap_by_size", "missed_by_size", "pr_by_size"]
  for path in paths.values():
    assert os.path.getsize(path) > 5000 and path.startswith(str(tmp_path / "plots"))
  images = writer.images[200]
  assert sorted(images) == ["plots/ap_by_size", "plots/missed_by_size", "plots/pr_by_size"]
  for image in images.values():
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3 and image.dtype == np.uint8
    assert image.std() > 5     # something is drawn
