"""`--mode=coverage --suggest` (anchor_design) against NumPy IoU loops written here."""

import numpy as np
import pytest

from mdssd_jax.run import anchor_design
from mdssd_jax.core import anchors as anchor_lib

SIZE = 96.0
BUCKETS = (("tiny", 0.0, 16.0), ("small", 16.0, 32.0), ("medium", 32.0, 96.0))


def _spec(min_sizes=(6, 30, 60), max_sizes=(9, 45, 90), ratios=((3,), (3,), (3,))):
  # Three heads at 96 px: strides 4, 8, 16; deliberately poor sizes and ratios for 12 x 24 boxes.
  return anchor_design.AnchorSpec(SIZE, (24, 12, 6), (4.0, 8.0, 16.0), tuple(map(float, min_sizes)),
                                  tuple(map(float, max_sizes)), tuple(tuple(map(float, r)) for r in ratios))


def _boxes(rng, num_images, per_image, w, h):
  """Per image (n, 4) corner form normalised to the square input: w x h pixel boxes, box i anywhere
  in the i-th of n vertical strips (so that no two overlap)."""
  out = []
  strip = SIZE / per_image
  for _ in range(num_images):
    cx = np.arange(per_image) * strip + rng.uniform(w / 2 + 0.5, strip - w / 2 - 0.5, per_image)
    cy = rng.uniform(h / 2 + 1, SIZE - h / 2 - 1, per_image)
    out.append(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1) / SIZE)
  return out


def _cell_shapes_px(spec, k):
  """Head k's default-box (w, h) in pixels: SSD's rule, written out here."""
  s, s_max = spec.min_sizes[k], spec.max_sizes[k]
  shapes = [(s, s), (np.sqrt(s * s_max), np.sqrt(s * s_max))]
  for r in spec.aspect_ratios[k]:
    shapes += [(s * np.sqrt(r), s / np.sqrt(r)), (s / np.sqrt(r), s * np.sqrt(r))]
  return shapes


def _all_default_boxes_px(spec):
  """(A, 4) corner form in pixels, every cell of every head, by loops."""
  out = []
  for k, (f, step) in enumerate(zip(spec.feature_sizes, spec.steps)):
    for i in range(f):
      for j in range(f):
        cx, cy = (j + 0.5) * step, (i + 0.5) * step
        for w, h in _cell_shapes_px(spec, k):
          out.append((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
  return np.array(out)


def _iou(a, b):
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _reference(spec, per_image, thr):
  """(best IoU per box, default boxes per box at IoU >= thr) by loops over every pair."""
  defaults = _all_default_boxes_px(spec)
  best, count = [], []
  for boxes in per_image:
    for box in boxes * SIZE:
      ious = [_iou(box, d) for d in defaults]
      best.append(max(ious))
      count.append(sum(v >= thr for v in ious))
  return np.array(best), np.array(count)


def test_known_optimum_12x24_goes_to_the_stride_4_head():
  rng = np.random.default_rng(0)
  gt = _boxes(rng, 24, 3, 12.0, 24.0)
  spec = _spec()
  result = anchor_design.suggest(gt, spec, iou_threshold=0.5, buckets=BUCKETS, seed=0,
                                 generations=30, population=16)
  # Only the stride-4 head can reach IoU 0.5 for a 12 x 24 box wherever it lies (half a stride off
  # in x and y: (1 - 4/24)(1 - 4/48) = 0.76 of the area, IoU 0.62; at stride 8, IoU 0.39).
  assert list(result.free) == [True, False, False]
  assert result.spec.min_sizes[1:] == spec.min_sizes[1:] and result.spec.aspect_ratios[1:] == spec.aspect_ratios[1:]
  # A 1:2 default box of about 12 x 24 px on it.
  shapes = _cell_shapes_px(result.spec, 0)
  assert any(abs(w - 12) <= 12 * 0.15 and abs(h - 24) <= 24 * 0.15 for w, h in shapes), shapes
  ratio = result.spec.aspect_ratios[0][0]
  assert ratio == pytest.approx(2.0, rel=0.15)
  # Coverage by the reference loop: every box covered after, not before; the module's figures agree.
  best_before, _ = _reference(spec, gt, 0.5)
  best_after, count_after = _reference(result.spec, gt, 0.5)
  assert np.mean(best_before >= 0.5) < 0.9
  assert np.all(best_after >= 0.5)
  row = result.after["buckets"][0]    # "all"
  assert row["covered_share"] == 1.0 and row["matched_share"] == 1.0
  assert row["mean_best_iou"] == pytest.approx(np.mean(best_after), abs=1e-5)
  # Boxes this far apart never compete for a default box: the matching gives each box every
  # default box at IoU >= 0.5 with it.
  np.testing.assert_array_equal(result.after["matched_count"], count_after)
  assert result.before["buckets"][0]["covered_share"] == pytest.approx(np.mean(best_before >= 0.5))


def test_same_seed_same_suggestion():
  rng = np.random.default_rng(1)
  gt = [np.concatenate([a, b]) for a, b in zip(_boxes(rng, 16, 2, 9.0, 11.0), _boxes(rng, 16, 1, 26.0, 20.0))]
  spec = _spec()
  runs = [anchor_design.suggest(gt, spec, buckets=BUCKETS, seed=3, generations=12, population=8,
                                max_search_boxes=24) for _ in range(2)]
  assert runs[0].spec == runs[1].spec
  assert [c[2] for c in runs[0].candidates] == [c[2] for c in runs[1].candidates]
  np.testing.assert_array_equal(runs[0].after["best_iou"], runs[1].after["best_iou"])
  assert runs[0].spec.flags() == runs[1].spec.flags()


def test_proxy_best_iou_is_exact_for_every_default_box():
  rng = np.random.default_rng(2)
  spec = _spec(min_sizes=(7, 17, 33), max_sizes=(13, 30, 60), ratios=((2,), (2, 3), (1.5,)))
  wh = rng.uniform(4, 60, size=(60, 2))
  xy = rng.uniform(-5, SIZE - 10, size=(60, 2))      # some cross the border
  gt_px = np.concatenate([xy, xy + wh], axis=1)
  counts = [len(r) for r in spec.aspect_ratios]
  p = anchor_design._params_from_spec(spec, counts)
  w, h = anchor_design._cell_shapes(p.log_min[None], p.log_gap[None], p.log_ratio[None])
  best = np.asarray(anchor_design.proxy_best_iou(w, h, anchor_design._shape_mask(counts), gt_px,
                                                 np.asarray(spec.steps), np.asarray(spec.feature_sizes)))[0]
  defaults = _all_default_boxes_px(spec)
  expected = [max(_iou(box, d) for d in defaults) for box in gt_px]
  np.testing.assert_allclose(best, expected, atol=1e-5)


def test_assignment_ratio_budget_and_flags():
  gt_px = np.array([[0, 0, 12, 24], [0, 0, 8, 8], [0, 0, 40, 40]], float)
  # 12 x 24 -> stride 4; 8 x 8 reaches 0.5 nowhere -> the finest; 40 x 40 -> stride 8.
  assert list(anchor_design.assign_heads(gt_px, (4, 8, 16), 0.5)) == [0, 0, 1]
  rng = np.random.default_rng(4)
  gt = _boxes(rng, 8, 2, 12.0, 24.0)
  result = anchor_design.suggest(gt, _spec(), buckets=BUCKETS, ratios_per_head=2, generations=4,
                                 population=4)
  assert [len(r) for r in result.spec.aspect_ratios] == [2, 2, 2]
  assert result.after["num_default_boxes"] == anchor_lib.num_default_boxes((24, 12, 6), result.spec.aspect_ratios)
  flags = result.spec.flags()
  assert "--config.anchors.min_sizes='(" in flags and "--config.anchors.aspect_ratios='((" in flags
  assert "c.anchors.max_sizes = (" in result.spec.snippet()
  text = anchor_design.format_comparison(result.before, result.after)
  assert "small [16, 32)" in text and "->" in text


def test_main_suggest_prints_flags_that_main_accepts(tmp_path):
  import os
  import re
  import shlex
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  base = [sys.executable, "main.py", "--config=configs/tiny_mdssd.py", "--mode=coverage",
          f"--config.data.data_dir={tmp_path / 'tfds'}"]
  run = subprocess.run(base + ["--suggest", f"--plot={tmp_path / 'suggest.png'}"], cwd=root,
                       capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  out = run.stdout
  assert "tiny [0, 16)" in out and "->" in out, out
  assert (tmp_path / "suggest.png").stat().st_size > 1000
  flags_line = next((l for l in out.splitlines() if l.strip().startswith("--config.anchors.min_sizes=")), None)
  if flags_line is None:       # the config's own boxes won: nothing to apply
    assert "keep them" in out, out
    return
  snippet = re.search(r"c\.anchors\.min_sizes = (\(.*\))", out).group(1)
  applied = subprocess.run(base + shlex.split(flags_line), cwd=root, capture_output=True, text=True,
                           timeout=900)
  assert applied.returncode == 0, applied.stderr[-3000:]
  assert "best IoU >= 0.5" in applied.stdout
  assert snippet in flags_line.replace("'", "")
