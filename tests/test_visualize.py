"""Pictures: label placement, stable colours, enlarged drawing, the evaluation panel and contact sheet."""

import itertools
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from mdssd_jax.report import visualize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _disjoint_and_inside(rects, width, height):
  placed = [r for r in rects if r is not None]
  for x1, y1, x2, y2 in placed:
    assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, (x1, y1, x2, y2)
  for a, b in itertools.combinations(placed, 2):
    # Half-open rectangles share a pixel when both their x and y ranges intersect.
    shared = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
    assert not shared, (a, b)
  return len(placed)


def test_place_labels_crowded_boxes_never_overlap_or_leave_the_image():
  rng = np.random.default_rng(0)
  width, height = 200, 150
  xy = rng.uniform(-10, 190, (40, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (40, 2))], axis=1)
  sizes = [(int(rng.integers(20, 60)), int(rng.integers(10, 16))) for _ in range(40)]
  rects = visualize.place_labels(boxes, sizes, width, height)
  assert len(rects) == 40
  placed = _disjoint_and_inside(rects, width, height)
  assert 10 <= placed < 40          # crowded: many placed, some left out rather than overlapped
  for rect, (w, h) in zip(rects, sizes):
    if rect is not None:
      assert (rect[2] - rect[0], rect[3] - rect[1]) == (w, h)


def test_place_labels_first_choice_above_left_and_shifted_into_the_image():
  rects = visualize.place_labels(np.array([[50, 40, 90, 80], [0, 0, 30, 30], [180, 100, 199, 140]]),
                                 [(30, 12), (30, 12), (40, 12)], 200, 150)
  assert rects[0] == (50, 28, 80, 40)       # above the top-left corner
  assert rects[1] == (0, 0, 30, 12)         # no room above: clamped to the top edge (inside the box)
  assert rects[2] == (160, 88, 200, 100)    # shifted left so it does not run off the right edge


def test_draw_detections_enlarges_and_labels_do_not_overlap():
  image = np.full((96, 96, 3), 40, np.uint8)
  boxes = np.array([[10, 10, 18, 18], [12, 12, 20, 20], [14, 10, 22, 18], [60, 60, 90, 90],
                    [0, 80, 10, 95]], float)
  classes = np.array([1, 2, 3, 1, 2])
  scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
  drawn, rects = visualize.draw_detections(image, boxes, classes, scores, ["circle", "square", "ring"],
                                           min_side_px=512, return_label_rects=True)
  assert drawn.shape == (512, 512, 3) and image.max() == 40
  assert _disjoint_and_inside(rects, 512, 512) == 5
  # The 60..90 box (class 1) is drawn at 512/96 scale in its class colour: its left edge, halfway.
  x1 = int(round(60 * 512 / 96))
  y_mid = int(round(75 * 512 / 96))
  assert not any(r[0] <= x1 < r[2] and r[1] <= y_mid < r[3] for r in rects)
  assert tuple(drawn[y_mid, x1]) == visualize.class_color(1)


def test_class_colours_stable_across_calls_and_processes():
  first = [visualize.class_color(c) for c in range(1, 21)]
  assert first == [visualize.class_color(c) for c in range(1, 21)]
  assert len(set(first)) == 20
  code = ("from mdssd_jax.report import visualize; "
          "print([visualize.class_color(c) for c in range(1, 21)])")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == str(first)


def _sq(x, y, s):
  return [x, y, x + s, y + s]


def test_contact_sheet_orders_by_missed_small_objects(tmp_path):
  """4 images; the collector keeps 3, most missed small objects (< 32 px) first, ties by order."""
  collector = visualize.PictureCollector(3, ["a", "b"], score_threshold=0.3, iou_threshold=0.5,
                                         small_object_px=32, min_side_px=128, sheet_columns=2)
  image = np.zeros((64, 64, 3), np.uint8)
  # Image 0: its one small object found (right class, score 0.9): 0 missed.
  collector.add(image, np.array([_sq(5, 5, 10)]), np.array([1]), np.array([0.9]),
                np.array([_sq(5, 5, 10)]), np.array([1]), image_id=10)
  # Image 1: two small objects; one hit by the wrong class, one by a score under 0.3: 2 missed.
  collector.add(image, np.array([_sq(5, 5, 10), _sq(30, 30, 12)]), np.array([2, 1]),
                np.array([0.9, 0.2]), np.array([_sq(5, 5, 10), _sq(30, 30, 12)]), np.array([1, 1]),
                image_id=11)
  # Image 2: one small missed, one large (40 px) missed: 1 missed small. Padding label 0 ignored.
  collector.add(image, np.zeros((0, 4)), np.zeros(0, int), np.zeros(0),
                np.array([_sq(0, 0, 20), _sq(10, 10, 40), _sq(0, 0, 0)]), np.array([2, 1, 0]),
                image_id=12)
  # Image 3: two small objects missed (tie with image 1, seen later); boxes given in pixels of a
  # 128x128 original, so 2x the drawn image: 24 px objects, small in the original.
  collector.add(image, np.zeros((0, 4)), np.zeros(0, int), np.zeros(0),
                np.array([_sq(0, 0, 24), _sq(60, 60, 24)]), np.array([1, 2]),
                orig_size_hw=(128, 128), image_id=13)
  kept = collector.pictures()
  assert [p["image_id"] for p in kept] == [11, 13, 12]
  assert [p["missed_small"] for p in kept] == [2, 2, 1]
  np.testing.assert_allclose(kept[1]["gt_boxes_px"], [_sq(0, 0, 12), _sq(30, 30, 12)])
  assert visualize.missed_small_order([0, 2, 1, 2]) == [1, 3, 2, 0]

  written = collector.write(str(tmp_path / "step_4"))
  assert [os.path.basename(p) for p in written["pictures"]] == ["000.jpg", "001.jpg", "002.jpg"]
  sheet = cv2.imread(written["sheet"])
  panel = cv2.imread(written["pictures"][0])
  # 3 panels in 2 columns: 2 rows.
  assert sheet.shape[1] == 2 * panel.shape[1] + 12 and sheet.shape[0] == 2 * panel.shape[0] + 12


def test_evaluation_panel_and_errors():
  image = np.zeros((48, 64, 3), np.uint8)
  panel = visualize.evaluation_panel(image, np.array([_sq(4, 4, 8)]), np.array([1]), np.array([0.5]),
                                     np.array([_sq(4, 4, 8), _sq(30, 20, 8)]), np.array([1, 1]), ["a"],
                                     missed=np.array([False, True]), min_side_px=256, title="x")
  # Two 256-row panels (enlarged 48 -> 256) side by side, titles above.
  assert panel.shape[0] > 256 and panel.shape[1] == 2 * round(64 * 256 / 48) + 8
  with pytest.raises(ValueError, match="need one each per box"):
    visualize.draw_detections(image, np.zeros((2, 4)), np.array([1]), None, ["a"])
  with pytest.raises(ValueError, match="at least one panel"):
    visualize.contact_sheet([])
