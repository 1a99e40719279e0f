"""TT100K metrics: a hand-made case with known per-bucket figures, and precision/recall against a
per-image loop that follows the official anno_func.eval_annos rules."""

import numpy as np
import pytest

from mdssd_jax.metrics import tt100k


def _hand_case():
  gt = dict(boxes=np.array([[10, 10, 30, 30],        # a: class 1, small (20 px)
                            [100, 100, 150, 150],    # b: class 1, medium (50)
                            [200, 200, 320, 320],    # c: class 2, large (120)
                            [400, 400, 430, 430],    # d: class 2, small (30)
                            [700, 700, 800, 800]],   # e: class 1, large (100), never found
                           float),
            labels=np.array([1, 1, 2, 2, 1]))
  pred = dict(boxes=np.array([[10, 10, 30, 30],      # 1: class 1 .90 -> a
                              [101, 101, 150, 150],  # 2: class 1 .80 -> b
                              [200, 200, 320, 320],  # 3: class 2 .70 -> c
                              [500, 500, 540, 540],  # 4: class 1 .60, FP, own 40 px: medium
                              [600, 600, 610, 610],  # 5: class 2 .40, below the score threshold
                              [11, 11, 31, 31],      # 6: class 1 .55, duplicate of a: FP, small
                              [400, 400, 432, 432],  # 7: class 2 .65 -> d; own 32 px (medium) but d is small
                              [900, 900, 910, 910]], # 8: class 2 .68, FP, small
                             float),
              scores=np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.55, 0.65, 0.68]),
              labels=np.array([1, 1, 2, 1, 2, 1, 2, 2]))
  return [pred], [gt]


def test_hand_made_case_per_bucket():
  preds, gts = _hand_case()
  r = tt100k.evaluate(preds, gts, iou_threshold=0.5, score_threshold=0.5)
  # At score >= .5: matched 1-a, 2-b, 3-c, 7-d; unmatched 4 (medium), 6 (small), 8 (small).
  assert r["precision"] == pytest.approx(4 / 7) and r["recall"] == pytest.approx(4 / 5)
  # Small: ground truths a, d; detections 1, 6, 8 and 7 (by its ground truth's size).
  assert r["precision_small"] == pytest.approx(2 / 4) and r["recall_small"] == 1.0
  assert r["precision_medium"] == pytest.approx(1 / 2) and r["recall_medium"] == 1.0
  assert r["precision_large"] == 1.0 and r["recall_large"] == pytest.approx(1 / 2)
  assert r["counts"]["small"] == {"gt": 2, "detections": 4, "matched": 2}
  # Area AP. Class 1 (a, b, e): TP TP FP FP -> 2/3 overall; small {1 TP, 6 FP} -> 1; medium
  # {2 TP, 4 FP} -> 1; large (e only, nothing found) -> 0. Class 2 (c, d): 3 TP, 8 FP, 7 TP, 5 FP ->
  # .5 + .5 * 2/3; small {8 FP, 7 TP, 5 FP} -> 1/2; no medium ground truth; large {3 TP} -> 1.
  assert r["AP"]["all"] == pytest.approx({1: 2 / 3, 2: 0.5 + 1 / 3})
  assert r["AP"]["small"] == pytest.approx({1: 1.0, 2: 0.5})
  assert r["AP"]["medium"] == pytest.approx({1: 1.0})
  assert r["AP"]["large"] == pytest.approx({1: 0.0, 2: 1.0})
  assert r["mAP"] == pytest.approx(0.75)
  assert r["mAP_small"] == pytest.approx(0.75)
  assert r["mAP_medium"] == pytest.approx(1.0)
  assert r["mAP_large"] == pytest.approx(0.5)


def _ref_official_pr(predictions, ground_truths, iou_threshold, score_threshold, lo, hi):
  """anno_func.eval_annos' counting, one image and one pair at a time (match_same=True)."""
  def iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

  def size(b):
    return max(b[2] - b[0], b[3] - b[1])

  det_n = det_c = gt_n = gt_c = 0
  for p, g in zip(predictions, ground_truths):
    match_g = [-1] * len(g["labels"])
    match_r = [-1 if s >= score_threshold else -2 for s in p["scores"]]
    pairs = []
    for i, bg in enumerate(g["boxes"]):
      for j, br in enumerate(p["boxes"]):
        if match_r[j] == -2 or g["labels"][i] != p["labels"][j]:
          continue
        v = iou(bg, br)
        if v > iou_threshold:
          pairs.append((v, i, j))
    for v, i, j in sorted(pairs, key=lambda x: -x[0]):
      if match_g[i] == -1 and match_r[j] == -1:
        match_g[i], match_r[j] = j, i
    for i, bg in enumerate(g["boxes"]):
      if not lo <= size(bg) < hi:
        if match_g[i] >= 0:
          match_r[match_g[i]] = -2
        match_g[i] = -2
    for j, br in enumerate(p["boxes"]):
      if match_r[j] == -1 and not lo <= size(br) < hi:
        match_r[j] = -2
    matched = sum(1 for m in match_r if m >= 0)
    gt_n += len(match_g) - match_g.count(-2)
    det_n += len(match_r) - match_r.count(-2)
    det_c += matched
    gt_c += matched
  return (det_c / det_n if det_n else 1.0), (gt_c / gt_n if gt_n else 1.0)


@pytest.mark.parametrize("seed", range(4))
def test_precision_recall_match_official_loop(seed):
  rng = np.random.default_rng(seed)
  predictions, ground_truths = [], []
  for _ in range(25):
    n = rng.integers(0, 6)
    xy = rng.integers(0, 300, size=(n, 2)).astype(float)
    side = rng.choice([8, 20, 30, 40, 60, 100, 150, 450], size=(n, 1)).astype(float)
    boxes = np.concatenate([xy, xy + side * rng.uniform(0.7, 1.0, size=(n, 2))], axis=1)
    labels = rng.integers(1, 4, size=n)
    ground_truths.append(dict(boxes=boxes, labels=labels))
    src = rng.integers(0, max(n, 1), size=2 * n) if n else np.zeros(0, int)
    near = boxes[src] + rng.normal(0, 3, size=(len(src), 4)) if n else np.zeros((0, 4))
    near[:, 2:] = np.maximum(near[:, 2:], near[:, :2] + 1)
    k = rng.integers(0, 4)
    cxy = rng.uniform(0, 300, size=(k, 2))
    pboxes = np.concatenate([near, np.concatenate([cxy, cxy + rng.uniform(5, 120, (k, 2))], 1)])
    plabels = np.concatenate([np.where(rng.random(len(src)) < 0.8, labels[src] if n else 0,
                                       rng.integers(1, 4, size=len(src))), rng.integers(1, 4, size=k)])
    predictions.append(dict(boxes=pboxes, scores=rng.random(len(pboxes)), labels=plabels.astype(int)))
  r = tt100k.evaluate(predictions, ground_truths, iou_threshold=0.5, score_threshold=0.3)
  for name, (lo, hi) in [("", (0, 400)), ("_small", (0, 32)), ("_medium", (32, 96)), ("_large", (96, 400))]:
    p, rc = _ref_official_pr(predictions, ground_truths, 0.5, 0.3, lo, hi)
    assert r["precision" + name] == pytest.approx(p), name
    assert r["recall" + name] == pytest.approx(rc), name


def test_evaluator_flat_metrics():
  from mdssd_jax.metrics import make_metric
  import ml_collections
  preds, gts = _hand_case()
  cfg = ml_collections.ConfigDict(dict(type="tt100k", iou_threshold=0.5, use_07_metric=False,
                                       score_threshold=0.5))
  ev = make_metric(cfg, ["pl50", "i2"])
  ev.add(preds, gts)
  m = ev.compute()
  for key in ("mAP", "precision", "recall", "mAP_small", "precision_small", "recall_small",
              "mAP_medium", "mAP_large", "recall_large"):
    assert isinstance(m[key], float), key
  assert m["mAP"] == pytest.approx(0.75) and m["recall_large"] == pytest.approx(0.5)
  table = ev.table()
  assert "pl50" in table and "small" in table
