"""detect / nms_mask against a per-image, per-class greedy NMS loop in plain NumPy."""

import math

import jax
import numpy as np
import pytest

from mdssd_jax.core import postprocess

DETECT = jax.jit(postprocess.detect, static_argnames=(
    "score_threshold", "nms_iou", "top_k", "pre_nms_top_k", "variances", "max_log_scale"))
NMS = jax.jit(postprocess.nms_mask, static_argnames="iou_threshold")


def _iou(a, b):
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def _greedy_nms(boxes, iou_threshold):
  """Indices (into `boxes`, already in score order) that greedy NMS keeps."""
  kept = []
  for i, box in enumerate(boxes):
    if all(_iou(box, boxes[k]) <= iou_threshold for k in kept):
      kept.append(i)
  return kept


def _reference_detect(loc_preds, cls_logits, anchors, score_threshold=0.01, nms_iou=0.45, top_k=200,
                      pre_nms_top_k=200, variances=(0.1, 0.2)):
  """Per image, per class; score ties: lower default-box index first, then lower class overall."""
  batch, num_anchors, num_columns = cls_logits.shape
  out = dict(boxes=np.zeros((batch, top_k, 4)), scores=np.zeros((batch, top_k)),
             classes=np.zeros((batch, top_k), np.int64), valid=np.zeros((batch, top_k), bool))
  for b in range(batch):
    decoded = []
    for a in range(num_anchors):
      cx, cy, w, h = anchors[a].astype(np.float64)
      dx, dy, dw, dh = loc_preds[b, a].astype(np.float64)
      bcx, bcy = cx + dx * variances[0] * w, cy + dy * variances[0] * h
      bw, bh = w * math.exp(dw * variances[1]), h * math.exp(dh * variances[1])
      decoded.append([bcx - bw / 2, bcy - bh / 2, bcx + bw / 2, bcy + bh / 2])
    logits = cls_logits[b].astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    detections = []
    for c in range(1, num_columns):
      order = sorted(range(num_anchors), key=lambda a: (-probs[a, c], a))[:pre_nms_top_k]
      order = [a for a in order if probs[a, c] >= score_threshold]
      for i in _greedy_nms([decoded[a] for a in order], nms_iou):
        a = order[i]
        detections.append((-probs[a, c], c, a))
    for slot, (neg_score, c, a) in enumerate(sorted(detections)[:top_k]):
      out["boxes"][b, slot] = decoded[a]
      out["scores"][b, slot] = -neg_score
      out["classes"][b, slot] = c
      out["valid"][b, slot] = True
  return out


def _compare(got, expected):
  np.testing.assert_array_equal(np.asarray(got["valid"]), expected["valid"])
  np.testing.assert_array_equal(np.asarray(got["classes"]), expected["classes"])
  np.testing.assert_allclose(np.asarray(got["scores"]), expected["scores"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got["boxes"]), expected["boxes"], rtol=1e-5, atol=1e-5)
  assert got["classes"].dtype == np.int32 and got["valid"].dtype == bool
  for key in ("boxes", "scores"):
    assert np.all(np.isfinite(np.asarray(got[key])))


def _random_problem(seed, batch=2, num_anchors=60, num_classes=3):
  rng = np.random.default_rng(seed)
  # Default boxes clustered in a few places so NMS has real work to do.
  centres = rng.uniform(0.2, 0.8, (6, 2))[rng.integers(0, 6, num_anchors)]
  centres += rng.normal(0, 0.03, (num_anchors, 2))
  anchors = np.concatenate([centres, rng.uniform(0.1, 0.3, (num_anchors, 2))], -1).astype(np.float32)
  loc_preds = rng.normal(0, 0.5, (batch, num_anchors, 4)).astype(np.float32)
  cls_logits = rng.normal(0, 2, (batch, num_anchors, num_classes + 1)).astype(np.float32)
  return loc_preds, cls_logits, anchors


@pytest.mark.parametrize("seed,kwargs", [
    (0, dict()),
    (1, dict(score_threshold=0.2, nms_iou=0.3, top_k=10, pre_nms_top_k=15)),
    (2, dict(nms_iou=0.6, top_k=25, pre_nms_top_k=8)),
])
def test_detect_matches_reference(seed, kwargs):
  loc_preds, cls_logits, anchors = _random_problem(seed)
  got = DETECT(loc_preds, cls_logits, anchors, **kwargs)
  expected = _reference_detect(loc_preds, cls_logits, anchors, **kwargs)
  assert got["boxes"].shape == (2, kwargs.get("top_k", 200), 4)
  _compare(got, expected)
  assert np.asarray(got["valid"]).sum() > 0


def test_score_ties_are_deterministic():
  # Six default boxes, two identical pairs; equal logits for classes 1 and 2 everywhere.
  anchors = np.array([[0.2, 0.2, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1],
                      [0.8, 0.8, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1], [0.5, 0.2, 0.1, 0.1]], np.float32)
  cls_logits = np.zeros((1, 6, 3), np.float32)
  cls_logits[0, :, 1:] = 2.0
  cls_logits[0, 5, 1:] = 1.0
  loc_preds = np.zeros((1, 6, 4), np.float32)
  got = DETECT(loc_preds, cls_logits, anchors, top_k=10)
  _compare(got, _reference_detect(loc_preds, cls_logits, anchors, top_k=10))
  # Class 1 boxes 0, 2, 3 (1 and 4 are duplicates of 0 and 3), then class 2 the same; box 5 last.
  expected_boxes = [0, 2, 3, 0, 2, 3, 5, 5]
  np.testing.assert_array_equal(np.asarray(got["classes"])[0, :8], [1, 1, 1, 2, 2, 2, 1, 2])
  centres = (np.asarray(got["boxes"])[0, :8, :2] + np.asarray(got["boxes"])[0, :8, 2:]) / 2
  np.testing.assert_allclose(centres, anchors[expected_boxes, :2], atol=1e-6)
  assert not np.asarray(got["valid"])[0, 8:].any()


def test_nms_mask_matches_greedy_loop():
  rng = np.random.default_rng(3)
  xy = rng.uniform(0, 0.7, (3, 2, 40, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(0.05, 0.3, xy.shape)], -1).astype(np.float32)
  valid = rng.uniform(size=(3, 2, 40)) < 0.8
  keep = np.asarray(NMS(boxes, valid, iou_threshold=0.3))
  for b in range(3):
    for c in range(2):
      order = np.flatnonzero(valid[b, c])
      kept = {order[i] for i in _greedy_nms(boxes[b, c, order].tolist(), 0.3)}
      np.testing.assert_array_equal(keep[b, c], [i in kept for i in range(40)])


def test_nms_suppresses_only_above_the_threshold():
  boxes = np.array([[[0, 0, 1, 1], [0, 0, 1, 0.5], [0, 0.5, 1, 1]]], np.float32)  # IoU 0.5, 0.5, 0
  valid = np.ones((1, 3), bool)
  np.testing.assert_array_equal(NMS(boxes, valid, iou_threshold=0.5), [[True, True, True]])
  np.testing.assert_array_equal(NMS(boxes, valid, iou_threshold=0.49), [[True, False, False]])
  valid[0, 0] = False                            # an invalid box suppresses nothing
  np.testing.assert_array_equal(NMS(boxes, valid, iou_threshold=0.49), [[False, True, True]])


def test_all_below_threshold_gives_invalid_zero_slots():
  loc_preds, cls_logits, anchors = _random_problem(4)
  cls_logits[..., 0] = 50.0                      # background wins everywhere
  got = DETECT(loc_preds, cls_logits, anchors, score_threshold=0.01, top_k=7)
  assert not np.asarray(got["valid"]).any()
  assert np.all(np.asarray(got["scores"]) == 0) and np.all(np.asarray(got["boxes"]) == 0)
  assert np.all(np.asarray(got["classes"]) == 0)


def test_top_k_larger_than_candidates_is_padded():
  loc_preds, cls_logits, anchors = _random_problem(5, num_anchors=5, num_classes=2)
  got = DETECT(loc_preds, cls_logits, anchors, score_threshold=0.0, top_k=30, pre_nms_top_k=50)
  assert got["scores"].shape == (2, 30)
  _compare(got, _reference_detect(loc_preds, cls_logits, anchors, score_threshold=0.0, top_k=30,
                                  pre_nms_top_k=50))
  assert not np.asarray(got["valid"])[:, 10:].any()


def test_wild_predictions_stay_finite():
  loc_preds, cls_logits, anchors = _random_problem(6)
  got = DETECT(loc_preds * 1e4, cls_logits * 1e3, anchors)
  for key in ("boxes", "scores"):
    assert np.all(np.isfinite(np.asarray(got[key])))
  assert np.asarray(got["valid"]).any()


def test_shape_errors():
  loc_preds, cls_logits, anchors = _random_problem(7)
  with pytest.raises(ValueError, match="anchors"):
    postprocess.detect(loc_preds, cls_logits, anchors[:-1])
  with pytest.raises(ValueError, match="at least 1 class"):
    postprocess.detect(loc_preds, cls_logits[..., :1], anchors)
