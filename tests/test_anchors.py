"""Default boxes against a literal loop over the recipe of docs/default_boxes.md, plus hand-checked boxes."""

import math

import ml_collections
import numpy as np
import pytest

from configs import common
from mdssd_jax.core import anchors

SSD300 = dict(image_size=300, feature_sizes=(38, 19, 10, 5, 3, 1), steps=(8, 16, 32, 64, 100, 300),
              min_sizes=(30, 60, 111, 162, 213, 264), max_sizes=(60, 111, 162, 213, 264, 315),
              aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)))
SSD512 = dict(image_size=512, feature_sizes=(64, 32, 16, 8, 4, 2, 1),
              steps=(8, 16, 32, 64, 128, 256, 512),
              min_sizes=(35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8),
              max_sizes=(76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6),
              aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)))


def _reference(image_size, feature_sizes, steps, min_sizes, max_sizes, aspect_ratios, clip=False):
  """The recipe of docs/default_boxes.md (Caffe SSD's PriorBox), one box at a time."""
  out = []
  for k, f in enumerate(feature_sizes):
    for i in range(f):            # rows (y)
      for j in range(f):          # columns (x)
        cx = (j + 0.5) * steps[k] / image_size
        cy = (i + 0.5) * steps[k] / image_size
        s = min_sizes[k] / image_size
        out.append([cx, cy, s, s])
        s2 = math.sqrt(min_sizes[k] * max_sizes[k]) / image_size
        out.append([cx, cy, s2, s2])
        for r in aspect_ratios[k]:
          out.append([cx, cy, s * math.sqrt(r), s / math.sqrt(r)])
          out.append([cx, cy, s / math.sqrt(r), s * math.sqrt(r)])
  out = np.array(out)
  return np.clip(out, 0, 1) if clip else out


@pytest.mark.parametrize("spec,count", [(SSD300, 8732), (SSD512, 24564)])
def test_ssd_counts_and_reference(spec, count):
  got = anchors.default_boxes(**spec)
  assert got.shape == (count, 4) and got.dtype == np.float32
  np.testing.assert_allclose(got, _reference(**spec), rtol=1e-6, atol=1e-7)
  assert anchors.num_default_boxes(spec["feature_sizes"], spec["aspect_ratios"]) == count


def test_ssd300_hand_checked_boxes():
  a = anchors.default_boxes(**SSD300)
  c = 4 / 300                                   # first cell centre: 0.5 * step 8 / 300
  np.testing.assert_allclose(a[0], [c, c, 0.1, 0.1], rtol=1e-6)
  np.testing.assert_allclose(a[1], [c, c, math.sqrt(1800) / 300, math.sqrt(1800) / 300], rtol=1e-6)
  np.testing.assert_allclose(a[2], [c, c, 0.1 * math.sqrt(2), 0.1 / math.sqrt(2)], rtol=1e-6)
  np.testing.assert_allclose(a[3], [c, c, 0.1 / math.sqrt(2), 0.1 * math.sqrt(2)], rtol=1e-6)
  # The next cell is to the right (row-major): x moves, y does not.
  np.testing.assert_allclose(a[4], [12 / 300, c, 0.1, 0.1], rtol=1e-6)
  # First cell of the second row.
  np.testing.assert_allclose(a[38 * 4], [c, 12 / 300, 0.1, 0.1], rtol=1e-6)
  # First box of the 19x19 layer: 6 boxes per cell there.
  first19 = 38 * 38 * 4
  np.testing.assert_allclose(a[first19], [8 / 300, 8 / 300, 0.2, 0.2], rtol=1e-6)
  np.testing.assert_allclose(a[first19 + 4], [8 / 300, 8 / 300, 0.2 * math.sqrt(3), 0.2 / math.sqrt(3)],
                             rtol=1e-6)
  # The last box: the 1x1 map, centre 0.5, the transposed ratio-2 box of s = 264/300.
  s = 264 / 300
  np.testing.assert_allclose(a[-1], [0.5, 0.5, s / math.sqrt(2), s * math.sqrt(2)], rtol=1e-6)
  assert a[-1, 3] > 1.0                          # not clipped by default (final Caffe SSD)


def test_clip_flag():
  clipped = anchors.default_boxes(**SSD300, clip=True)
  np.testing.assert_allclose(clipped, _reference(**SSD300, clip=True), rtol=1e-6, atol=1e-7)
  assert clipped.max() == 1.0


@pytest.mark.parametrize("variant,count", [(common.ssd300, 8732), (common.ssd512, 24564),
                                           (common.mdssd300, 31232)])
def test_from_config(variant, count):
  c = common.base_config()
  variant(c)
  got = anchors.from_config(c.anchors, c.model.input_size_px)
  assert got.shape == (count, 4)
  spec = {k: c.anchors[k] for k in ("feature_sizes", "steps", "min_sizes", "max_sizes",
                                     "aspect_ratios")}
  np.testing.assert_allclose(got, _reference(c.model.input_size_px, **spec), rtol=1e-6, atol=1e-7)
  as_dict = anchors.from_config(dict(c.anchors), c.model.input_size_px)
  np.testing.assert_array_equal(as_dict, got)


def test_num_boxes_per_cell():
  assert anchors.num_boxes_per_cell((2,)) == 4
  assert anchors.num_boxes_per_cell((2, 3)) == 6
  assert anchors.num_boxes_per_cell(()) == 2


@pytest.mark.parametrize("change,message", [
    (dict(steps=(8, 16)), "lengths"),
    (dict(min_sizes=(60, 60, 111, 162, 213, 264)), "min_size < max_size"),
    (dict(aspect_ratios=(2, (2, 3), (2, 3), (2, 3), (2,), (2,))), "sequence per layer"),
    (dict(aspect_ratios=((1,), (2, 3), (2, 3), (2, 3), (2,), (2,))), "!= 1"),
    (dict(feature_sizes=(38.5, 19, 10, 5, 3, 1)), "positive integer"),
    (dict(image_size=(300, 300)), "one positive number"),
])
def test_invalid_specs_raise_clear_errors(change, message):
  with pytest.raises(ValueError, match=message):
    anchors.default_boxes(**{**SSD300, **change})


def test_from_config_missing_key():
  cfg = ml_collections.ConfigDict(dict(feature_sizes=(1,), steps=(300,)))
  with pytest.raises(ValueError, match="min_sizes"):
    anchors.from_config(cfg, 300)
