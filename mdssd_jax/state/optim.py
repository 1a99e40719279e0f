"""The optimiser and learning-rate schedule of the SSD recipe, from `config.train`.

SGD with momentum and L2 weight decay (Caffe SSD), a linear warm-up from `warmup_factor * lr`
(lufficc/SSD), steps down by `lr_decay_factor` at `lr_decay_steps`, and a global batch other than
`reference_batch_size` handled by `batch_scaling`. Per-parameter learning rates and decay follow
Caffe's lr_mult / decay_mult: `bias_lr_multiplier`, `bias_weight_decay`, `l2norm_scale_weight_decay`.
The recipe and its sources are in docs/training_recipe.md.
"""

import collections
from typing import Mapping

import jax
import jax.numpy as jnp
import optax

# `train.batch_scaling`: what a global batch B other than the reference batch R changes.
#   "lr_and_schedule": lr x B/R and every step count (num_steps, lr_decay_steps, warmup_steps)
#                      x R/B (rounded up), so the run sees the same number of epochs;
#   "lr_only":         lr x B/R, step counts as written (B/R times as many epochs);
#   "none":            lr and step counts as written.
BATCH_SCALINGS = ("lr_and_schedule", "lr_only", "none")
# `train.momentum_form`: "optax" = optax.sgd (velocity of gradients, times the current lr);
# "caffe" = Caffe's SGDSolver (velocity of lr-scaled gradients).
MOMENTUM_FORMS = ("optax", "caffe")
OPTIMIZERS = ("sgd", "adamw")

# Parameter groups (see `param_groups`).
KERNEL, BIAS, L2NORM_SCALE, OTHER = "kernel", "bias", "l2norm_scale", "other"

ScaledSchedule = collections.namedtuple(
    "ScaledSchedule", ["peak_lr", "num_steps", "lr_decay_steps", "warmup_steps"])


def _choice(train_cfg, key, known):
  value = train_cfg.get(key, known[0]) if hasattr(train_cfg, "get") else getattr(train_cfg, key)
  if value not in known:
    raise ValueError(f"config.train.{key} = {value!r}; known: {', '.join(map(repr, known))}")
  return value


def _steps_scaled(steps, global_batch, reference_batch):
  """ceil(steps * reference / global) in integers: never fewer examples than the written recipe."""
  return -(-int(steps) * int(reference_batch) // int(global_batch))


def scaled_schedule(train_cfg) -> ScaledSchedule:
  """The learning rate and step counts the run uses, after `train.batch_scaling`.

  Example: base_lr 1e-3 at reference batch 32, 120k steps, decays at 80k/100k, 500 warm-up steps,
  on a global batch of 256 with "lr_and_schedule": lr 8e-3, 15000 steps, decays at 10000/12500,
  63 warm-up steps.
  """
  global_batch, reference = int(train_cfg.global_batch_size), int(train_cfg.reference_batch_size)
  if global_batch < 1 or reference < 1:
    raise ValueError(f"config.train.global_batch_size = {global_batch} and reference_batch_size = "
                     f"{reference} must both be >= 1")
  scaling = _choice(train_cfg, "batch_scaling", BATCH_SCALINGS)
  peak = float(train_cfg.base_lr)
  if scaling in ("lr_and_schedule", "lr_only"):
    peak *= global_batch / reference       # linear scaling (Goyal et al.)
  steps = lambda s: int(s)
  if scaling == "lr_and_schedule":
    steps = lambda s: _steps_scaled(s, global_batch, reference)
  return ScaledSchedule(peak_lr=peak, num_steps=max(1, steps(train_cfg.num_steps)),
                        lr_decay_steps=tuple(sorted(steps(s) for s in train_cfg.lr_decay_steps)),
                        warmup_steps=steps(train_cfg.warmup_steps))


def schedule_steps(train_cfg) -> int:
  """The number of training steps the loop must run (config.train.num_steps after batch_scaling)."""
  return scaled_schedule(train_cfg).num_steps


def peak_learning_rate(train_cfg):
  """base_lr after batch_scaling: 1e-3 at batch 32 -> 2e-3 at 64 unless batch_scaling is "none"."""
  return scaled_schedule(train_cfg).peak_lr


def learning_rate_schedule(train_cfg):
  """step -> learning rate: linear warm-up, then piecewise constant decay (after batch_scaling)."""
  plan = scaled_schedule(train_cfg)
  peak = plan.peak_lr
  warmup_steps = plan.warmup_steps
  boundaries = jnp.asarray(plan.lr_decay_steps, jnp.int32)
  factor = float(train_cfg.lr_decay_factor)
  start = float(train_cfg.warmup_factor)

  def schedule(step):
    step = jnp.asarray(step)
    decays = jnp.sum(step >= boundaries) if boundaries.size else 0
    lr = peak * factor ** decays
    if warmup_steps > 0:
      alpha = jnp.minimum(step / warmup_steps, 1.0)
      lr = lr * (start + (1.0 - start) * alpha)
    return lr

  return schedule


def param_groups(params):
  """The pytree of params with each leaf replaced by its group name.

  KERNEL: a leaf named "kernel" (conv, deconv, head weights). BIAS: a "bias" next to a "kernel"
  (the bias of that conv). L2NORM_SCALE: a "scale" alone in its module (the L2Norm layers of conv4_3
  and the Fusion Blocks). OTHER: anything else (batch-norm scale and bias).
  """

  def label(node):
    if isinstance(node, Mapping):
      keys = set(node)
      out = {}
      for key, value in node.items():
        if isinstance(value, Mapping):
          out[key] = label(value)
        elif key == "kernel":
          out[key] = KERNEL
        elif key == "bias" and "kernel" in keys:
          out[key] = BIAS
        elif key == "scale" and keys == {"scale"}:
          out[key] = L2NORM_SCALE
        else:
          out[key] = OTHER
      return type(node)(out) if not isinstance(node, dict) else out
    raise TypeError(f"param_groups wants a nested dict of parameters, got {type(node).__name__}")

  return label(params)


def _decay_mask(train_cfg):
  """params -> bool pytree: which leaves get weight decay."""
  decays = {KERNEL: True, BIAS: bool(train_cfg.get("bias_weight_decay", False)),
            L2NORM_SCALE: bool(train_cfg.get("l2norm_scale_weight_decay", False))}

  def mask(params):
    return jax.tree_util.tree_map(
        lambda group, leaf: decays.get(group, jnp.ndim(leaf) > 1), param_groups(params), params)

  return mask


def _bias_mask(params):
  return jax.tree_util.tree_map(lambda group: group == BIAS, param_groups(params))


def make_optimizer(train_cfg):
  """An optax GradientTransformation for config.train, and its schedule (step -> lr).

  optimizer "sgd": weight decay added to the gradient of the decayed leaves (see `_decay_mask`),
  momentum in `momentum_form`, biases' step times `bias_lr_multiplier`. "adamw": AdamW with the
  same decay mask and bias multiplier.
  """
  schedule = learning_rate_schedule(train_cfg)
  optimizer = _choice(train_cfg, "optimizer", OPTIMIZERS)
  form = _choice(train_cfg, "momentum_form", MOMENTUM_FORMS)
  bias_multiplier = float(train_cfg.get("bias_lr_multiplier", 1.0))
  if bias_multiplier <= 0:
    raise ValueError(f"config.train.bias_lr_multiplier = {bias_multiplier} must be > 0 (Caffe SSD: 2)")
  decay_mask = _decay_mask(train_cfg)
  scale_biases = (optax.masked(optax.scale(bias_multiplier), _bias_mask) if bias_multiplier != 1.0
                  else optax.identity())
  parts = []
  if train_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip_norm))
  if optimizer == "sgd":
    if train_cfg.weight_decay > 0:
      parts.append(optax.add_decayed_weights(train_cfg.weight_decay, mask=decay_mask))
    if form == "caffe":
      # v <- momentum * v + lr_mult * lr * (g + decay * w); w <- w - v (Caffe's SGDSolver).
      parts += [scale_biases, optax.scale_by_learning_rate(schedule), optax.trace(train_cfg.momentum)]
    else:
      parts += [optax.sgd(schedule, momentum=train_cfg.momentum), scale_biases]
  else:
    parts += [optax.adamw(schedule, weight_decay=train_cfg.weight_decay, mask=decay_mask),
              scale_biases]
  return optax.chain(*parts), schedule
