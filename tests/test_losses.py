"""MultiBox loss against a per-image, per-box loop that follows docs/loss.md literally."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdssd_jax.core import losses

# Jitted with the ratio and weight traced: eager dispatch or one compilation per setting would
# dominate the test time.
LOSS = jax.jit(losses.multibox_loss)
HARD_NEGATIVES = jax.jit(losses.hard_negative_mask)


def _reference_loss(loc_preds, cls_logits, loc_targets, cls_targets, neg_pos_ratio=3.0,
                    num_pos_total=None, loc_weight=1.0):
  """Returns (loss, loc_loss, cls_loss, chosen negatives as a (B, A) bool array), in float64."""
  loc_preds, cls_logits, loc_targets = (np.asarray(x, np.float64)
                                        for x in (loc_preds, cls_logits, loc_targets))
  batch, num_anchors = cls_targets.shape
  loc_sum = cls_sum = 0.0
  total_pos = 0
  chosen = np.zeros((batch, num_anchors), bool)
  for b in range(batch):
    positives = [a for a in range(num_anchors) if cls_targets[b, a] > 0]
    negatives = [a for a in range(num_anchors) if cls_targets[b, a] == 0]
    total_pos += len(positives)
    ce = []
    for a in range(num_anchors):
      logits = cls_logits[b, a].tolist()
      top = max(logits)
      log_z = top + math.log(sum(math.exp(v - top) for v in logits))
      ce.append([log_z - v for v in logits])      # ce[a][c] = -log p(c)
    for a in positives:
      for d in range(4):
        x = abs(loc_preds[b, a, d] - loc_targets[b, a, d])
        loc_sum += 0.5 * x * x if x < 1.0 else x - 0.5
      cls_sum += ce[a][cls_targets[b, a]]
    k = min(int(math.floor(neg_pos_ratio * len(positives))), num_anchors - len(positives))
    ranked = sorted(negatives, key=lambda a: (-ce[a][0], a))   # loss descending, then index
    for a in ranked[:k]:
      chosen[b, a] = True
      cls_sum += ce[a][0]
  n = max(1, total_pos if num_pos_total is None else num_pos_total)
  return loc_weight * loc_sum / n + cls_sum / n, loc_sum / n, cls_sum / n, chosen


def _random_inputs(seed, batch=3, num_anchors=40, num_classes=4, pos_frac=0.1):
  rng = np.random.default_rng(seed)
  loc_preds = rng.normal(0, 1.5, (batch, num_anchors, 4)).astype(np.float32)
  loc_targets = rng.normal(0, 1.5, (batch, num_anchors, 4)).astype(np.float32)
  cls_logits = rng.normal(0, 2, (batch, num_anchors, num_classes + 1)).astype(np.float32)
  cls_targets = np.where(rng.uniform(size=(batch, num_anchors)) < pos_frac,
                         rng.integers(1, num_classes + 1, (batch, num_anchors)), 0).astype(np.int32)
  loc_targets[cls_targets == 0] = 0.0
  return loc_preds, cls_logits, loc_targets, cls_targets


def _check(inputs, **kwargs):
  loss, aux = LOSS(*inputs, **dict(dict(neg_pos_ratio=3.0, loc_weight=1.0), **kwargs))
  ref_loss, ref_loc, ref_cls, _ = _reference_loss(*inputs, **kwargs)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(aux["loc_loss"]), ref_loc, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(aux["cls_loss"]), ref_cls, rtol=1e-5, atol=1e-6)
  assert float(aux["num_pos"]) == float((inputs[3] > 0).sum())
  return loss, aux


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(seed):
  inputs = _random_inputs(seed)
  inputs[3][1] = 0                               # one image without objects
  inputs[2][1] = 0
  _check(inputs)


@pytest.mark.parametrize("ratio,weight", [(1.0, 2.0), (2.5, 1.0), (100.0, 1.0)])
def test_ratio_and_weight(ratio, weight):
  _check(_random_inputs(2, pos_frac=0.2), neg_pos_ratio=ratio, loc_weight=weight)


def test_num_pos_total_overrides_normalizer():
  inputs = _random_inputs(3)
  _, aux = _check(inputs, num_pos_total=1000)
  assert float(aux["normalizer"]) == 1000.0


def test_hard_negative_selection_with_ties():
  inputs = _random_inputs(4, num_anchors=30)
  cls_logits = inputs[1]
  cls_logits[0, :12] = 0.0                       # equal background losses: ties by index
  cls_logits[2] = np.round(cls_logits[2])        # many coarse ties
  positive = inputs[3] > 0
  background = -np.asarray(jax.nn.log_softmax(cls_logits))[..., 0]
  got = np.asarray(HARD_NEGATIVES(background, positive))
  expected = _reference_loss(*inputs)[3]
  np.testing.assert_array_equal(got, expected)
  k = np.minimum(3 * positive.sum(1), 30 - positive.sum(1))
  np.testing.assert_array_equal(got.sum(1), k)
  assert not (got & positive).any()


def test_all_zero_logits_pick_the_first_negatives():
  cls_targets = np.zeros((1, 10), np.int32)
  cls_targets[0, [2, 7]] = 1
  mask = HARD_NEGATIVES(jnp.zeros((1, 10)), jnp.asarray(cls_targets > 0))
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(mask)[0]), [0, 1, 3, 4, 5, 6])


def test_empty_batch_gives_zero_and_finite_gradients():
  loc_preds, cls_logits, loc_targets, cls_targets = _random_inputs(5)
  cls_targets[:] = 0
  loss_fn = lambda lp, cl: losses.multibox_loss(lp, cl, loc_targets, cls_targets)[0]
  loss, grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(loc_preds, cls_logits)
  assert float(loss) == 0.0
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_gradients_finite_and_match_finite_differences():
  loc_preds, cls_logits, loc_targets, cls_targets = _random_inputs(6, batch=2, num_anchors=12)
  loss_fn = lambda lp, cl: losses.multibox_loss(lp, cl, loc_targets, cls_targets)[0]
  g_loc, g_cls = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(loc_preds, cls_logits)
  assert np.all(np.isfinite(np.asarray(g_loc))) and np.all(np.isfinite(np.asarray(g_cls)))
  # Background-only boxes that are not hard negatives get no gradient.
  chosen = _reference_loss(loc_preds, cls_logits, loc_targets, cls_targets)[3]
  ignored = (cls_targets == 0) & ~chosen
  assert np.all(np.asarray(g_cls)[ignored] == 0) and np.all(np.asarray(g_loc)[cls_targets == 0] == 0)
  # One directional finite difference in float64 through the reference.
  rng = np.random.default_rng(0)
  direction = rng.normal(size=cls_logits.shape)
  eps = 1e-4
  plus = _reference_loss(loc_preds, cls_logits + eps * direction, loc_targets, cls_targets)[0]
  minus = _reference_loss(loc_preds, cls_logits - eps * direction, loc_targets, cls_targets)[0]
  np.testing.assert_allclose(np.sum(np.asarray(g_cls) * direction), (plus - minus) / (2 * eps),
                             rtol=1e-3)


def test_non_finite_background_targets_do_not_leak():
  loc_preds, cls_logits, loc_targets, cls_targets = _random_inputs(10)
  clean = float(LOSS(loc_preds, cls_logits, loc_targets, cls_targets)[0])
  loc_targets[cls_targets == 0] = np.nan
  loc_targets[0, 0] = np.inf if cls_targets[0, 0] == 0 else loc_targets[0, 0]
  loss_fn = lambda lp: losses.multibox_loss(lp, cls_logits, loc_targets, cls_targets)[0]
  loss, grad = jax.jit(jax.value_and_grad(loss_fn))(loc_preds)
  assert float(loss) == pytest.approx(clean, rel=1e-6)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_bfloat16_inputs_computed_in_float32():
  loc_preds, cls_logits, loc_targets, cls_targets = _random_inputs(7)
  lp16, cl16 = jnp.asarray(loc_preds, jnp.bfloat16), jnp.asarray(cls_logits, jnp.bfloat16)
  loss, aux = LOSS(lp16, cl16, loc_targets, cls_targets)
  assert loss.dtype == jnp.float32 and aux["cls_loss"].dtype == jnp.float32
  ref = _reference_loss(np.asarray(lp16, np.float32), np.asarray(cl16, np.float32), loc_targets,
                        cls_targets)[0]
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_large_logits_stay_finite():
  loc_preds, cls_logits, loc_targets, cls_targets = _random_inputs(8)
  loss, aux = LOSS(loc_preds * 1e4, cls_logits * 1e4, loc_targets, cls_targets)
  assert np.isfinite(float(loss)) and np.isfinite(float(aux["cls_loss"]))


def test_shape_mismatch_raises():
  inputs = list(_random_inputs(9))
  inputs[3] = inputs[3][:, :-1]
  with pytest.raises(ValueError, match="same"):
    losses.multibox_loss(*inputs)
