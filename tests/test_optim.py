"""The optimiser of config.train against plain arithmetic of Caffe's SGD rules (docs/training_recipe.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from mdssd_jax.state import optim


def train_cfg(**overrides):
  c = common.base_config().train
  for key, value in overrides.items():
    c[key] = value
  return c


# ---- batch scaling -------------------------------------------------------------------------------

def test_lr_and_schedule_keeps_the_number_of_epochs():
  cfg = train_cfg(global_batch_size=256, reference_batch_size=32, base_lr=1e-3, num_steps=120_000,
                  lr_decay_steps=(80_000, 100_000), warmup_steps=500, warmup_factor=1 / 3)
  plan = optim.scaled_schedule(cfg)
  assert plan.num_steps == 15_000 == optim.schedule_steps(cfg)
  assert plan.lr_decay_steps == (10_000, 12_500)
  assert plan.warmup_steps == 63                        # 62.5 rounded up
  assert plan.peak_lr == pytest.approx(8e-3)
  assert plan.num_steps * 256 == 120_000 * 32           # the same examples seen
  schedule = optim.learning_rate_schedule(cfg)
  for step, expected in [(0, 8e-3 / 3), (63, 8e-3), (9_999, 8e-3), (10_000, 8e-4), (12_499, 8e-4),
                         (12_500, 8e-5), (14_999, 8e-5)]:
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5), step
  # warm-up: linear from 1/3 of the peak to the peak over 63 steps
  assert float(schedule(21)) == pytest.approx(8e-3 * (1 / 3 + (2 / 3) * 21 / 63), rel=1e-5)


def test_smaller_batch_stretches_the_schedule():
  cfg = train_cfg(global_batch_size=8, reference_batch_size=32, num_steps=1_000,
                  lr_decay_steps=(600, 900), warmup_steps=0)
  plan = optim.scaled_schedule(cfg)
  assert (plan.num_steps, plan.lr_decay_steps, plan.peak_lr) == (4_000, (2_400, 3_600), pytest.approx(2.5e-4))


def test_lr_only_and_none():
  cfg = train_cfg(global_batch_size=64, reference_batch_size=32, num_steps=1_000,
                  lr_decay_steps=(600,), warmup_steps=10, batch_scaling="lr_only")
  plan = optim.scaled_schedule(cfg)
  assert (plan.num_steps, plan.lr_decay_steps, plan.warmup_steps) == (1_000, (600,), 10)
  assert plan.peak_lr == pytest.approx(2e-3)
  cfg.batch_scaling = "none"
  plan = optim.scaled_schedule(cfg)
  assert plan.num_steps == 1_000 and plan.peak_lr == pytest.approx(1e-3)


def test_reference_batch_changes_nothing():
  cfg = train_cfg()
  plan = optim.scaled_schedule(cfg)
  assert (plan.num_steps, plan.lr_decay_steps, plan.warmup_steps, plan.peak_lr) == (
      cfg.num_steps, tuple(cfg.lr_decay_steps), cfg.warmup_steps, cfg.base_lr)


def test_bad_choices_name_their_key():
  with pytest.raises(ValueError, match="train.batch_scaling"):
    optim.scaled_schedule(train_cfg(batch_scaling="sqrt"))
  with pytest.raises(ValueError, match="train.momentum_form"):
    optim.make_optimizer(train_cfg(momentum_form="nesterov"))
  with pytest.raises(ValueError, match="train.optimizer"):
    optim.make_optimizer(train_cfg(optimizer="lamb"))
  with pytest.raises(ValueError, match="bias_lr_multiplier"):
    optim.make_optimizer(train_cfg(bias_lr_multiplier=0.0))


# ---- per-parameter learning rate and decay ----------------------------------------------------------

def params_tree():
  rng = np.random.default_rng(0)
  leaf = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {"conv": {"kernel": leaf(3, 3, 2, 4), "bias": leaf(4)},
          "conv4_3_norm": {"scale": leaf(4)},
          "block": {"conv": {"kernel": leaf(1, 1, 4, 2)}, "bn": {"scale": leaf(2), "bias": leaf(2)}}}


def test_param_groups():
  groups = optim.param_groups(params_tree())
  assert groups == {"conv": {"kernel": "kernel", "bias": "bias"}, "conv4_3_norm": {"scale": "l2norm_scale"},
                    "block": {"conv": {"kernel": "kernel"}, "bn": {"scale": "other", "bias": "other"}}}


def _two_updates(cfg, params, grads1, grads2):
  tx, _ = optim.make_optimizer(cfg)
  state = tx.init(params)
  update1, state = tx.update(grads1, state, params)
  params1 = jax.tree_util.tree_map(lambda p, u: p + u, params, update1)
  update2, _ = tx.update(grads2, state, params1)
  return params1, update1, update2


@pytest.mark.parametrize("form", ["caffe", "optax"])
def test_caffe_recipe_updates_by_plain_arithmetic(form):
  lr0, lr1, mu, wd = 1e-3, 1e-4, 0.9, 5e-4        # a decay between the two steps
  cfg = train_cfg(optimizer="sgd", base_lr=lr0, momentum=mu, weight_decay=wd, warmup_steps=0,
                  lr_decay_steps=(1,), lr_decay_factor=0.1, bias_lr_multiplier=2.0,
                  bias_weight_decay=False, l2norm_scale_weight_decay=True, momentum_form=form)
  params = params_tree()
  rng = np.random.default_rng(1)
  grads1 = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  grads2 = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  params1, update1, update2 = _two_updates(cfg, params, grads1, grads2)
  f = lambda tree, *path: np.asarray(tree[path[0]][path[1]] if len(path) == 2 else tree[path[0]][path[1]][path[2]],
                                     np.float64)
  # (path, lr multiplier, decay multiplier): Caffe's lr_mult / decay_mult per parameter.
  cases = [(("conv", "kernel"), 1.0, 1.0), (("conv", "bias"), 2.0, 0.0),
           (("conv4_3_norm", "scale"), 1.0, 1.0), (("block", "bn", "scale"), 1.0, 0.0),
           (("block", "bn", "bias"), 1.0, 0.0)]
  for path, lr_mult, decay_mult in cases:
    w0, w1 = f(params, *path), f(params1, *path)
    g1, g2 = f(grads1, *path), f(grads2, *path)
    d1 = g1 + wd * decay_mult * w0
    d2 = g2 + wd * decay_mult * w1
    expected1 = -lr_mult * lr0 * d1
    if form == "caffe":     # v2 = mu * v1 + lr1 * lr_mult * d2: the old lr stays in the velocity
      expected2 = -(mu * lr_mult * lr0 * d1 + lr_mult * lr1 * d2)
    else:                   # optax.sgd: the current lr times the velocity of raw gradients
      expected2 = -lr_mult * lr1 * (mu * d1 + d2)
    np.testing.assert_allclose(f(update1, *path), expected1, rtol=1e-5, atol=1e-9, err_msg=str(path))
    np.testing.assert_allclose(f(update2, *path), expected2, rtol=1e-5, atol=1e-9, err_msg=str(path))
  # The bias's first step is exactly 2 x lr x its gradient: no decay in it.
  np.testing.assert_allclose(f(update1, "conv", "bias"), -2 * lr0 * f(grads1, "conv", "bias"), rtol=1e-6)


def test_neutral_defaults_keep_the_earlier_rule():
  """Base config: biases at 1x lr and, like L2Norm scales and batch norm, without decay."""
  cfg = train_cfg(optimizer="sgd", base_lr=1e-2, momentum=0.0, weight_decay=0.1, warmup_steps=0)
  params = params_tree()
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  _, update1, _ = _two_updates(cfg, params, zeros, zeros)
  np.testing.assert_allclose(update1["conv"]["kernel"], -1e-2 * 0.1 * params["conv"]["kernel"], rtol=1e-5)
  for leaf in (update1["conv"]["bias"], update1["conv4_3_norm"]["scale"], update1["block"]["bn"]["bias"]):
    assert not np.asarray(leaf).any()


def test_adamw_scales_biases_and_masks_decay():
  cfg = train_cfg(optimizer="adamw", base_lr=1e-3, weight_decay=0.1, warmup_steps=0,
                  bias_lr_multiplier=2.0)
  params = params_tree()
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  _, update1, _ = _two_updates(cfg, params, grads, grads)
  # Adam's first step is -lr * sign(g) (g / |g|, up to eps) for a unit gradient; biases twice that.
  np.testing.assert_allclose(update1["conv"]["bias"], -2e-3, rtol=1e-4)
  np.testing.assert_allclose(update1["conv"]["kernel"], -1e-3 * (1 + 0.1 * np.asarray(params["conv"]["kernel"])),
                             rtol=1e-4)


def test_paper_configs_take_caffe_values():
  from configs import mdssd300_voc, mdssd512_tt100k, mdssd300_coco
  for module in (mdssd300_voc, mdssd512_tt100k, mdssd300_coco):
    c = module.get_config()
    assert (c.train.bias_lr_multiplier, c.train.bias_weight_decay, c.train.l2norm_scale_weight_decay,
            c.train.momentum_form, c.train.batch_scaling) == (2.0, False, True, "caffe", "lr_and_schedule")
    assert c.eval.pre_nms_top_k == 400 and c.eval.top_k == 200


def test_groups_of_the_mdssd_model():
  """On the real MDSSD parameter tree (shapes only): every L2Norm scale, conv bias and kernel found."""
  from configs import tiny_mdssd
  from mdssd_jax import models
  c = tiny_mdssd.get_config()
  c.model.batch_norm = False
  model, _ = models.build_detector(c)
  size = c.model.input_size_px
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                                                train=False))
  flat = jax.tree_util.tree_flatten_with_path(optim.param_groups(variables["params"]))[0]
  by_group = {}
  for path, group in flat:
    by_group.setdefault(group, []).append(jax.tree_util.keystr(path))
  # conv4_3 is not a head in MDSSD: the L2Norms are the two of each Fusion Block.
  assert sorted(by_group["l2norm_scale"]) == sorted(
      f"['fusion{k}']['{branch}_norm']['scale']" for k in (1, 2, 3) for branch in ("deep", "shallow"))
  assert len(by_group["bias"]) == len(by_group["kernel"]) and "other" not in by_group
