"""Anchor coverage against a brute-force loop over boxes and default boxes."""

import numpy as np
import pytest

from mdssd_jax.run import anchor_coverage


def _brute_force(anchors_cxcywh, boxes_per_image, sizes, input_size, buckets, thr):
  rows = {}
  best_all, longer_all = [], []
  for boxes, (h, w) in zip(boxes_per_image, sizes):
    for x1, y1, x2, y2 in boxes:
      # Warp to the S x S input in pixels.
      gx1, gy1, gx2, gy2 = x1 * input_size / w, y1 * input_size / h, x2 * input_size / w, y2 * input_size / h
      best = 0.0
      for cx, cy, aw, ah in anchors_cxcywh:
        ax1, ay1 = (cx - aw / 2) * input_size, (cy - ah / 2) * input_size
        ax2, ay2 = (cx + aw / 2) * input_size, (cy + ah / 2) * input_size
        iw = max(0.0, min(gx2, ax2) - max(gx1, ax1))
        ih = max(0.0, min(gy2, ay2) - max(gy1, ay1))
        inter = iw * ih
        union = (gx2 - gx1) * (gy2 - gy1) + (ax2 - ax1) * (ay2 - ay1) - inter
        best = max(best, inter / union)
      best_all.append(best)
      longer_all.append(max(gx2 - gx1, gy2 - gy1))
  best_all, longer_all = np.array(best_all), np.array(longer_all)
  for lo, hi in [(0, np.inf)] + list(buckets):
    inside = (longer_all >= lo) & (longer_all < hi)
    rows[(lo, hi)] = (int(inside.sum()), float(np.mean(best_all[inside] >= thr)) if inside.any() else None,
                      float(np.mean(best_all[inside])) if inside.any() else None)
  return rows


def test_matches_brute_force_on_small_case():
  rng = np.random.default_rng(0)
  # A toy SSD-like set: 4x4 and 2x2 grids, two sizes and ratio 2 (~100 default boxes).
  anchors = []
  for f, s in ((4, 0.2), (2, 0.5)):
    for i in range(f):
      for j in range(f):
        for w, h in ((s, s), (s * 1.3, s * 1.3), (s * 1.41, s / 1.41), (s / 1.41, s * 1.41)):
          anchors.append(((j + 0.5) / f, (i + 0.5) / f, w, h))
  anchors = np.array(anchors, np.float32)
  sizes = rng.integers(100, 800, size=(12, 2)).astype(float)
  boxes_per_image = []
  for h, w in sizes:
    n = rng.integers(0, 5)
    xy = rng.uniform(0, 0.7, size=(n, 2)) * [w, h]
    wh = rng.uniform(0.02, 0.3, size=(n, 2)) * [w, h]
    boxes_per_image.append(np.concatenate([xy, xy + wh], axis=1))
  buckets = ((0, 16), (16, 48), (48, np.inf))
  # A small block forces several IoU blocks.
  report = anchor_coverage.coverage_report(anchors, boxes_per_image, sizes, 160, buckets=buckets,
                                           iou_threshold=0.4, block_elements=3 * len(anchors))
  expected = _brute_force(anchors, boxes_per_image, sizes, 160, buckets, 0.4)
  assert [r["range"] for r in report["buckets"]] == [(0.0, np.inf)] + [(float(a), float(b)) for a, b in buckets]
  for row in report["buckets"]:
    count, share, mean = expected[row["range"]]
    assert row["count"] == count
    if count:
      assert row["covered_share"] == pytest.approx(share)
      assert row["mean_best_iou"] == pytest.approx(mean, abs=1e-5)
  assert sum(r["count"] for r in report["buckets"][1:]) == report["buckets"][0]["count"] > 0
  # The same boxes as one (N, 4) array with per-box sizes.
  flat = np.concatenate(boxes_per_image)
  per_box_sizes = np.repeat(sizes, [len(b) for b in boxes_per_image], axis=0)
  again = anchor_coverage.coverage_report(anchors, flat, per_box_sizes, 160, buckets=buckets, iou_threshold=0.4)
  np.testing.assert_allclose(again["best_iou"], report["best_iou"])


def test_exact_default_box_is_fully_covered_and_table(tmp_path):
  anchors = np.array([[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.05, 0.05]], np.float32)
  # Image 1000 x 500 (h x w) warped to 100: the box [200, 400, 300, 600] px becomes the first anchor.
  report = anchor_coverage.coverage_report(anchors, [np.array([[200.0, 400.0, 300.0, 600.0]])],
                                           [(1000, 500)], 100)
  assert report["best_iou"][0] == pytest.approx(1.0)
  assert report["longer_side_px"][0] == pytest.approx(20.0)
  small = report["buckets"][1]
  assert small["count"] == 1 and small["covered_share"] == 1.0
  assert report["buckets"][2]["count"] == 0 and np.isnan(report["buckets"][2]["mean_best_iou"])
  table = anchor_coverage.format_table(report)
  assert "[0, 32)" in table and "100.0%" in table
  path = anchor_coverage.plot_coverage(report, str(tmp_path / "coverage.png"))
  assert (tmp_path / "coverage.png").stat().st_size > 1000 and path.endswith(".png")


def test_boxes_from_batches_drops_padding():
  batch = dict(boxes=np.array([[[0.1, 0.1, 0.5, 0.5], [0, 0, 0, 0]], [[0.2, 0.2, 0.4, 0.4], [0, 0, 0, 0]]]),
               labels=np.array([[3, 0], [1, 0]]), orig_size=np.array([[200, 400], [10, 10]]),
               batch_mask=np.array([True, False]))
  boxes, sizes = anchor_coverage.boxes_from_batches([batch])
  assert len(boxes) == 1
  np.testing.assert_allclose(boxes[0], [[40, 20, 200, 100]])
  np.testing.assert_allclose(sizes, [[200, 400]])
