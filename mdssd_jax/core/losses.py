"""The SSD MultiBox loss: Smooth-L1 on positives + softmax cross-entropy with hard negative mining.

Fixed shapes, no Python loop over images: each image's hard negatives are those above its exact k-th
largest background loss, found by bisection (no sort). Everything is computed in float32, whatever
the prediction dtype (docs/loss.md).
"""

import jax
import jax.numpy as jnp


def smooth_l1(x, beta=1.0):
  """Elementwise Smooth-L1 (Huber with slope 1): 0.5 x^2 / beta where |x| < beta, else |x| - beta/2."""
  abs_x = jnp.abs(x)
  return jnp.where(abs_x < beta, 0.5 * x * x / beta, abs_x - 0.5 * beta)


def hard_negative_mask(background_loss, positive, neg_pos_ratio=3.0):
  """Per image, the negatives with the largest background loss.

  Each image keeps k = min(floor(neg_pos_ratio * P), A - P) negatives, P its positives: an image
  without objects keeps none (as in SSD). Equal losses are broken deterministically: the lower
  default-box index is taken first (what a stable descending sort would give).

  Args:
    background_loss: (B, A) -log p(background); the selection is not differentiated through.
    positive: (B, A) bool.
    neg_pos_ratio: negatives per positive.
  Returns:
    (B, A) bool, True for the chosen negatives (never a positive).
  """
  background_loss = jax.lax.stop_gradient(background_loss.astype(jnp.float32))
  num_anchors = background_loss.shape[-1]
  num_pos = jnp.sum(positive, axis=-1, dtype=jnp.int32)                       # (B,)
  num_neg = jnp.minimum(jnp.floor(neg_pos_ratio * num_pos).astype(jnp.int32),
                        num_anchors - num_pos)                                  # (B,)
  # A loss is >= 0 (a -0.0 or rounding below 0 becomes 0), so its float32 bit pattern read as an
  # int32 orders like the loss itself; positives get -1, below every negative.
  nonneg = jnp.where(background_loss > 0, background_loss, 0.0)
  keys = jnp.where(positive, -1, jax.lax.bitcast_convert_type(nonneg, jnp.int32))
  # The k-th largest key per image: everything above it is in, and of the ties at it the first
  # (k - #above) by index. Found by bisection rather than a sort: sorting is slow on CPU and TPU.
  kth = _kth_largest_nonneg(keys, jnp.maximum(num_neg, 1))[:, None]           # (B, 1)
  above = keys > kth
  ties = keys == kth
  num_above = jnp.sum(above, axis=-1, dtype=jnp.int32)
  tie_rank = jnp.cumsum(ties, axis=-1, dtype=jnp.int32)                       # 1-based among ties
  chosen = above | (ties & (tie_rank <= (num_neg - num_above)[:, None]))
  return chosen & (num_neg > 0)[:, None] & ~positive


def _kth_largest_nonneg(keys, k):
  """Per row, the k-th largest of the non-negative int32 keys (negative keys never count).

  Bisection over the int32 range: 31 passes of one compare-and-count each, exact.

  Args:
    keys: (B, A) int32.
    k: (B,) int32, 1 <= k <= number of non-negative keys in the row.
  Returns:
    (B,) int32, the largest t with #(keys >= t) >= k.
  """
  def step(_, bounds):
    low, high = bounds                                   # invariant: answer in [low, high]
    mid = high - (high - low) // 2                       # upper midpoint, no int32 overflow
    enough = jnp.sum(keys >= mid[:, None], axis=-1, dtype=jnp.int32) >= k
    return jnp.where(enough, mid, low), jnp.where(enough, high, mid - 1)

  low = jnp.zeros(keys.shape[:1], jnp.int32)
  high = jnp.full(keys.shape[:1], jnp.iinfo(jnp.int32).max, jnp.int32)
  num_bits = 31                                          # 2**31 candidate values, halved each step
  low, _ = jax.lax.fori_loop(0, num_bits, step, (low, high))
  return low


def multibox_loss(loc_preds, cls_logits, loc_targets, cls_targets, neg_pos_ratio=3.0,
                  num_pos_total=None, loc_weight=1.0, axis_name=None):
  """SSD's MultiBox loss, normalised by the number of positives.

  Inside `shard_map`, where each device holds part of the batch, pass the mesh axis of the batch as
  `axis_name`: matching and hard-negative mining stay per device (they are per image), and the
  Smooth-L1 and cross-entropy sums and the positive count are summed over the devices (`psum`)
  before the division, so the loss is the global batch's, normalised by the global positives: the
  same number as this function on the whole batch at once, up to the order of the float sums.

  Args:
    loc_preds: (B, A, 4) predicted offsets (any float dtype; computed in float32).
    cls_logits: (B, A, C+1) class logits, column 0 = background.
    loc_targets: (B, A, 4) from `matching.match`.
    cls_targets: (B, A) int, 0 = background, 1..C.
    neg_pos_ratio: hard negatives per positive, per image.
    num_pos_total: the normaliser N if given (e.g. the positives over all devices); by default the
      positives of this batch. Either way it is guarded with max(1, N), so an empty batch gives 0,
      not NaN.
    loc_weight: weight of the localisation term.
    axis_name: None, or the mesh axis over which the batch is split (inside `shard_map`): the sums
      and counts are then over all devices along it, and every device returns the same values.
  Returns:
    loss: scalar float32, loc_weight * loc_loss + cls_loss.
    aux: dict of float32 scalars: loc_loss and cls_loss (each already divided by max(1, N)),
      num_pos (positives in this batch; over all devices with axis_name), num_neg (hard negatives
      chosen, likewise), normalizer (max(1, N)).
  """
  loc_preds = jnp.asarray(loc_preds, jnp.float32)
  cls_logits = jnp.asarray(cls_logits, jnp.float32)
  loc_targets = jnp.asarray(loc_targets, jnp.float32)
  cls_targets = jnp.asarray(cls_targets, jnp.int32)
  if cls_logits.shape[:2] != cls_targets.shape or loc_preds.shape != loc_targets.shape:
    raise ValueError(f"multibox_loss shapes disagree: loc_preds {loc_preds.shape} vs loc_targets "
                     f"{loc_targets.shape}, cls_logits {cls_logits.shape} vs cls_targets "
                     f"{cls_targets.shape}: predictions and targets need the same (B, A)")

  positive = cls_targets > 0                                                  # (B, A)
  num_pos = jnp.sum(positive, dtype=jnp.float32)

  # Background targets are 0 by construction; masking the difference before Smooth-L1 (not after)
  # also keeps a NaN/Inf target of a background box out of the sum and the gradient.
  diff = jnp.where(positive[..., None], loc_preds - loc_targets, 0.0)
  loc_sum = jnp.sum(smooth_l1(diff))

  # -log p(c) = logsumexp - logit_c: one (B, A) logsumexp, no (B, A, C+1) log-probabilities kept.
  log_norm = jax.nn.logsumexp(cls_logits, axis=-1)                            # (B, A)
  classes = jnp.arange(cls_logits.shape[-1], dtype=jnp.int32)
  target_logit = jnp.sum(jnp.where(classes == cls_targets[..., None], cls_logits, 0.0), axis=-1)
  cross_entropy = log_norm - target_logit                                     # (B, A)
  negatives = hard_negative_mask(log_norm - cls_logits[..., 0], positive, neg_pos_ratio)
  cls_sum = jnp.sum(jnp.where(positive | negatives, cross_entropy, 0.0))
  num_neg = jnp.sum(negatives, dtype=jnp.float32)
  if axis_name is not None:
    # This device's images only: add up the other devices' sums and counts (one all-reduce of four
    # scalars), so that the normaliser is the global number of positives, as on one device.
    num_pos, loc_sum, cls_sum, num_neg = jax.lax.psum((num_pos, loc_sum, cls_sum, num_neg),
                                                      axis_name)

  total = num_pos if num_pos_total is None else jnp.asarray(num_pos_total, jnp.float32)
  normalizer = jnp.maximum(total, 1.0)
  loc_loss = loc_sum / normalizer
  cls_loss = cls_sum / normalizer
  loss = loc_weight * loc_loss + cls_loss
  aux = dict(loc_loss=loc_loss, cls_loss=cls_loss, num_pos=num_pos,
             num_neg=num_neg, normalizer=normalizer)
  return loss, aux
