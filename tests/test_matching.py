"""Target assignment against a per-image, per-box loop that follows REFERENCE.md section 2 literally."""

import math

import jax
import numpy as np
import pytest

from mdssd_jax import anchors as anchor_lib
from mdssd_jax import matching

# A tiny SSD-like spec: 64 px input, 4 layers, 336 default boxes.
TINY = dict(image_size=64, feature_sizes=(8, 4, 2, 1), steps=(8, 16, 32, 64),
            min_sizes=(8, 20, 36, 52), max_sizes=(20, 36, 52, 68),
            aspect_ratios=((2,), (2, 3), (2,), (2,)))
ANCHORS = anchor_lib.default_boxes(**TINY)
# Jitted, thresholds traced, inputs padded to one shape: a single compilation serves every test.
MATCH = jax.jit(matching.match)
BATCH, SLOTS = 4, 6


def _match(gt, labels, **kwargs):
  """MATCH on inputs padded to (BATCH, SLOTS) with label-0 slots (garbage boxes), then cropped."""
  batch, num_gt = labels.shape
  padded_gt = np.full((BATCH, SLOTS, 4), 0.25, np.float32)
  padded_labels = np.zeros((BATCH, SLOTS), np.int32)
  padded_gt[:batch, :num_gt], padded_labels[:batch, :num_gt] = gt, labels
  kwargs = dict(dict(iou_threshold=0.5, min_size=0.0), **kwargs)   # same call signature each time
  loc, cls = MATCH(padded_gt, padded_labels, ANCHORS, **kwargs)
  return np.asarray(loc)[:batch], np.asarray(cls)[:batch]


def _pair_iou(a, b):
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def _reference_match(gt_boxes, gt_labels, anchors, iou_threshold=0.5, variances=(0.1, 0.2)):
  """Per image, per box loops: best gt per default box, forced best default box per gt."""
  batch, num_gt = gt_labels.shape
  num_anchors = len(anchors)
  loc = np.zeros((batch, num_anchors, 4))
  cls = np.zeros((batch, num_anchors), np.int64)
  corners = [(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2) for cx, cy, w, h in anchors.tolist()]
  for b in range(batch):
    g = gt_boxes[b].astype(np.float64).tolist()
    valid = [j for j in range(num_gt)
             if gt_labels[b, j] > 0 and g[j][2] - g[j][0] > 0 and g[j][3] - g[j][1] > 0]
    if not valid:
      continue
    ious = {j: [_pair_iou(g[j], corners[a]) for a in range(num_anchors)] for j in valid}
    best_gt, best_iou = [None] * num_anchors, [-1.0] * num_anchors
    for a in range(num_anchors):
      for j in valid:                            # ascending j, strict >: ties keep the lowest j
        if ious[j][a] > best_iou[a]:
          best_gt[a], best_iou[a] = j, ious[j][a]
    forced = set()
    for j in valid:                              # later j overwrite earlier ones
      best_a = max(range(num_anchors), key=lambda a: (ious[j][a], -a))   # ties: lowest anchor
      best_gt[best_a] = j
      forced.add(best_a)
    for a in range(num_anchors):
      if a not in forced and best_iou[a] < iou_threshold:
        continue
      j = best_gt[a]
      x1, y1, x2, y2 = g[j]
      cx, cy, w, h = anchors[a].astype(np.float64)
      cls[b, a] = gt_labels[b, j]
      loc[b, a] = [((x1 + x2) / 2 - cx) / (variances[0] * w), ((y1 + y2) / 2 - cy) / (variances[0] * h),
                   math.log((x2 - x1) / w) / variances[1], math.log((y2 - y1) / h) / variances[1]]
  return loc, cls


def _random_batch(rng, batch=4, num_gt=6):
  xy = rng.uniform(0, 0.85, (batch, num_gt, 2))
  wh = rng.uniform(0.03, 0.6, (batch, num_gt, 2))
  gt = np.concatenate([xy, np.minimum(xy + wh, 1.0)], -1).astype(np.float32)
  labels = rng.integers(1, 6, (batch, num_gt))
  for b in range(batch):                         # padding at the end, as the pipeline pads
    labels[b, rng.integers(1, num_gt + 1):] = 0
  return gt, labels


def _check(gt, labels, **kwargs):
  loc, cls = _match(gt, labels, **kwargs)
  ref_loc, ref_cls = _reference_match(gt, labels, ANCHORS, **kwargs)
  assert loc.dtype == np.float32 and cls.dtype == np.int32
  assert np.all(np.isfinite(loc))
  np.testing.assert_array_equal(cls, ref_cls)
  np.testing.assert_allclose(loc, ref_loc, rtol=1e-4, atol=1e-4)
  return loc, cls


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_batches_with_padding(seed):
  rng = np.random.default_rng(seed)
  gt, labels = _random_batch(rng)
  labels[0, :] = 0                               # one image without objects
  # Padded slots keep garbage boxes (even overlapping real ones): they must still never match.
  gt[labels == 0] = rng.uniform(0, 1, (int((labels == 0).sum()), 4)) * [0.5, 0.5, 1, 1]
  _, cls = _check(gt, labels)
  assert np.all(cls[0] == 0)
  assert np.all(cls[1:].max(axis=1) > 0)


def test_threshold_argument():
  gt, labels = _random_batch(np.random.default_rng(3))
  _, loose = _check(gt, labels, iou_threshold=0.3)
  _, strict = _check(gt, labels, iou_threshold=0.7)
  assert (loose > 0).sum() > (strict > 0).sum()


def test_forced_match_of_low_iou_box():
  # A thin sliver has IoU < 0.5 with every default box but must still get its best one.
  gt = np.array([[[0.50, 0.10, 0.52, 0.9]]], np.float32)
  labels = np.array([[3]])
  _, cls = _check(gt, labels)
  assert (cls == 3).sum() == 1


def test_shared_best_default_box_goes_to_higher_index():
  box = [0.5, 0.5, 0.625, 0.625]                # one 8x8 cell: several default boxes reach 0.5
  gt = np.array([[box, box, [0, 0, 0, 0]]], np.float32)
  labels = np.array([[1, 2, 0]])
  _, cls = _check(gt, labels)
  corners = np.concatenate([ANCHORS[:, :2] - ANCHORS[:, 2:] / 2, ANCHORS[:, :2] + ANCHORS[:, 2:] / 2], 1)
  best = int(np.argmax([_pair_iou(box, c) for c in corners.tolist()]))
  assert cls[0, best] == 2                       # forced: the later ground truth wins
  others = np.delete(cls[0], best)
  assert set(np.unique(others)) <= {0, 1}        # ties elsewhere: the lower index wins
  assert (others == 1).sum() > 0


def test_padding_cannot_undo_a_forced_match_on_the_first_default_box():
  # A small box in the top-left corner whose best default box is box 0 (IoU 0.23, next best 0.15);
  # the padded slots after it all point at box 0 too and must not take it back.
  gt = np.array([[[0.0, 0.0, 0.06, 0.06]]], np.float32)
  _, cls = _check(gt, np.array([[7]]))
  assert cls[0, 0] == 7 and (cls == 7).sum() == 1


def test_degenerate_and_padded_boxes_never_match():
  rng = np.random.default_rng(4)
  gt, labels = _random_batch(rng, batch=2, num_gt=5)
  labels[:] = [[1, 2, 3, 4, 0], [5, 5, 5, 5, 5]]
  gt[0, 1] = [0.3, 0.3, 0.3, 0.6]               # zero width, labelled
  gt[0, 2] = [0.5, 0.5, 0.4, 0.4]               # negative size, labelled
  gt[0, 4] = gt[0, 0]                            # padding that copies a real box
  gt[1, :] = [0.2, 0.2, 0.2, 0.2]               # an image of points only
  _, cls = _check(gt, labels)
  assert not np.isin(cls[0], [2, 3]).any()
  assert np.all(cls[1] == 0)


def test_min_size_drops_tiny_boxes():
  gt = np.array([[[0.5, 0.5, 0.5 + 1e-4, 0.6], [0.1, 0.1, 0.4, 0.4]]], np.float32)
  labels = np.array([[1, 2]])
  loc, cls = _match(gt, labels, min_size=1e-3)
  assert not np.isin(np.asarray(cls), [1]).any() and np.isin(np.asarray(cls), [2]).any()
  _, cls_default = _match(gt, labels)
  assert np.isin(np.asarray(cls_default), [1]).any()


def test_nan_boxes_are_dropped_and_targets_stay_finite():
  gt = np.array([[[np.nan, 0.1, 0.4, 0.4], [0.1, 0.1, 0.4, 0.4]]], np.float32)
  loc, cls = _match(gt, np.array([[1, 2]]))
  assert np.all(np.isfinite(np.asarray(loc)))
  assert set(np.unique(np.asarray(cls))) == {0, 2}


def test_empty_batch():
  loc, cls = _match(np.zeros((3, 4, 4), np.float32), np.zeros((3, 4), np.int32))
  assert np.all(np.asarray(cls) == 0) and np.all(np.asarray(loc) == 0)


def test_shape_errors():
  with pytest.raises(ValueError, match="gt_boxes"):
    matching.match(np.zeros((4, 4)), np.zeros((4,)), ANCHORS)
  with pytest.raises(ValueError, match="anchors"):
    matching.match(np.zeros((1, 4, 4)), np.zeros((1, 4)), ANCHORS.T)


def test_no_slots():
  loc, cls = matching.match(np.zeros((2, 0, 4), np.float32), np.zeros((2, 0), np.int32), ANCHORS)
  assert loc.shape == (2, len(ANCHORS), 4) and not np.asarray(cls).any()
