"""Box formats, IoU and encode/decode against plain Python references (docs/matching.md, "Encoding")."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdssd_jax.core import boxes


def _ref_iou(a, b):
  """IoU of two corner-form boxes, one pair at a time; an empty union gives 0."""
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
  area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
  union = area_a + area_b - inter
  return inter / union if union > 0 else 0.0


def _random_boxes(rng, shape, degenerate_frac=0.2):
  xy = rng.uniform(0, 1, shape + (2,))
  wh = rng.uniform(0, 0.5, shape + (2,))
  wh[rng.uniform(size=shape) < degenerate_frac, 0] = 0.0     # some zero-width boxes
  return np.concatenate([xy, xy + wh], -1).astype(np.float32)


def test_format_round_trip_numpy_and_jax():
  rng = np.random.default_rng(0)
  b = _random_boxes(rng, (3, 7))
  c = boxes.xyxy_to_cxcywh(b)
  assert isinstance(c, np.ndarray) and c.dtype == np.float32
  np.testing.assert_allclose(c[..., 0], (b[..., 0] + b[..., 2]) / 2, rtol=1e-6)
  np.testing.assert_allclose(c[..., 3], b[..., 3] - b[..., 1], rtol=1e-6)
  np.testing.assert_allclose(boxes.cxcywh_to_xyxy(c), b, atol=1e-6)
  cj = boxes.xyxy_to_cxcywh(jnp.asarray(b))
  assert isinstance(cj, jax.Array)
  np.testing.assert_allclose(np.asarray(cj), c, atol=1e-7)


def test_area_clips_negative_sizes():
  b = np.array([[0, 0, 2, 3], [1, 1, 0, 3], [0, 0, 0, 0]], np.float32)
  np.testing.assert_array_equal(boxes.area(b), [6, 0, 0])


def test_iou_hand_values():
  a = np.array([[0, 0, 2, 2]], np.float32)
  b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6], [0, 0, 1, 2]], np.float32)
  np.testing.assert_allclose(boxes.iou(a, b), [[1 / 7, 1.0, 0.0, 0.5]], rtol=1e-6)


@pytest.mark.parametrize("use_jax", [False, True])
def test_iou_matches_loop_reference_batched(use_jax):
  rng = np.random.default_rng(1)
  a, b = _random_boxes(rng, (2, 5)), _random_boxes(rng, (2, 6))
  # Exact duplicates and zero-area pairs, the cases that give NaN in naive code.
  b[0, 0] = a[0, 0]
  a[1, 1] = b[1, 2] = [0.3, 0.3, 0.3, 0.3]
  expected = np.array([[[_ref_iou(a[k, i], b[k, j]) for j in range(6)] for i in range(5)]
                       for k in range(2)])
  xa, xb = (jnp.asarray(a), jnp.asarray(b)) if use_jax else (a, b)
  got = np.asarray(boxes.iou(xa, xb))
  assert got.shape == (2, 5, 6)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, expected, atol=1e-6)
  assert got[1, 1, 2] == 0.0


def test_iou_broadcasts_unbatched_second_argument():
  rng = np.random.default_rng(2)
  a, b = _random_boxes(rng, (3, 4)), _random_boxes(rng, (5,))
  got = boxes.iou(a, b)
  assert got.shape == (3, 4, 5)
  for k in range(3):
    np.testing.assert_allclose(got[k], boxes.iou(a[k], b), atol=1e-7)


def test_iou_gradient_finite_for_empty_union():
  point = jnp.array([[0.5, 0.5, 0.5, 0.5]])
  grad = jax.grad(lambda x: jnp.sum(boxes.iou(x, point)))(point)
  assert np.all(np.isfinite(np.asarray(grad)))
  assert float(jnp.sum(boxes.iou(point, point))) == 0.0


def test_encode_hand_value():
  anchor = np.array([[0.5, 0.5, 0.2, 0.4]], np.float32)
  gt = np.array([[0.42, 0.3, 0.62, 0.9]], np.float32)    # cx 0.52, cy 0.6, w 0.2, h 0.6
  expected = [(0.52 - 0.5) / (0.1 * 0.2), (0.6 - 0.5) / (0.1 * 0.4),
              math.log(0.2 / 0.2) / 0.2, math.log(0.6 / 0.4) / 0.2]
  np.testing.assert_allclose(boxes.encode(gt, anchor), [expected], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variances", [(0.1, 0.2), (1.0, 1.0)])
def test_encode_decode_round_trip(variances):
  rng = np.random.default_rng(3)
  gt = _random_boxes(rng, (2, 9), degenerate_frac=0.0)
  gt[..., 2:] += 0.01                                      # strictly positive sizes
  anchors = boxes.xyxy_to_cxcywh(_random_boxes(rng, (9,), degenerate_frac=0.0) + [0, 0, .05, .05])
  deltas = boxes.encode(gt, anchors, variances)
  np.testing.assert_allclose(boxes.decode(deltas, anchors, variances), gt, atol=1e-5)
  deltas_j = jax.jit(boxes.encode, static_argnums=2)(gt, anchors, variances)
  np.testing.assert_allclose(np.asarray(deltas_j), deltas, rtol=1e-5, atol=1e-5)
  back = jax.jit(boxes.decode, static_argnums=2)(deltas_j, anchors, variances)
  np.testing.assert_allclose(np.asarray(back), gt, atol=1e-5)


def test_decode_max_log_scale_prevents_overflow():
  anchors = np.array([[0.5, 0.5, 0.1, 0.1]], np.float32)
  huge = np.array([[0.0, 0.0, 1e4, 1e4]], np.float32)
  with np.errstate(over="ignore"):
    assert not np.all(np.isfinite(boxes.decode(huge, anchors)))   # the plain formula overflows
  guarded = boxes.decode(huge, anchors, max_log_scale=math.log(10.0))
  np.testing.assert_allclose(guarded, [[0.0, 0.0, 1.0, 1.0]], atol=1e-6)
