"""The optimiser and learning-rate schedule of the SSD recipe, from `config.train`.

SGD with momentum and L2 weight decay (Caffe SSD), a linear warm-up from `warmup_factor * lr`
(lufficc/SSD), steps down by `lr_decay_factor` at `lr_decay_steps`, and the learning rate scaled
linearly with the global batch against `reference_batch_size`.
"""

import jax
import jax.numpy as jnp
import optax


def peak_learning_rate(train_cfg):
  """base_lr scaled linearly with the global batch (Goyal et al.): 1e-3 at 32 -> 2e-3 at 64."""
  return train_cfg.base_lr * train_cfg.global_batch_size / train_cfg.reference_batch_size


def learning_rate_schedule(train_cfg):
  """step -> learning rate: linear warm-up, then piecewise constant decay."""
  peak = peak_learning_rate(train_cfg)
  warmup_steps = int(train_cfg.warmup_steps)
  boundaries = jnp.asarray(sorted(int(s) for s in train_cfg.lr_decay_steps), jnp.int32)
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


def _decay_mask(params):
  """Weight decay on conv kernels only: not on biases, batch-norm or L2Norm scales (all 1-D)."""
  return jax.tree_util.tree_map(lambda leaf: leaf.ndim > 1, params)


def make_optimizer(train_cfg):
  """An optax GradientTransformation for config.train (optimizer: "sgd" | "adamw")."""
  schedule = learning_rate_schedule(train_cfg)
  parts = []
  if train_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip_norm))
  if train_cfg.optimizer == "sgd":
    if train_cfg.weight_decay > 0:
      parts.append(optax.add_decayed_weights(train_cfg.weight_decay, mask=_decay_mask))
    parts.append(optax.sgd(schedule, momentum=train_cfg.momentum))
  elif train_cfg.optimizer == "adamw":
    parts.append(optax.adamw(schedule, weight_decay=train_cfg.weight_decay, mask=_decay_mask))
  else:
    raise ValueError(f"unknown config.train.optimizer={train_cfg.optimizer!r}; known: 'sgd', 'adamw'")
  return optax.chain(*parts), schedule
