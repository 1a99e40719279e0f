"""Detections from raw predictions: decode, softmax, per-class greedy NMS, top-k; on the device.

Fixed shapes and no host code, so `detect` can sit inside the jitted eval step. All images and all
classes go through one NMS loop at once (the per-class Python NMS of SSD code bases is the slow
part their users complain of, docs/loss.md, "Inference").

Score ties are broken deterministically: within a class the candidate with the lower default-box
index ranks first, and in the final top-k over classes the lower class comes first (then the
lower default-box index).
"""

import math

import jax
import jax.numpy as jnp

from mdssd_jax.core import boxes as box_lib

# torchvision's guard on exp() in box decoding: a box may grow at most 1000/16 times its default box.
DEFAULT_MAX_LOG_SCALE = math.log(1000.0 / 16)


def nms_mask(boxes_xyxy, valid, iou_threshold=0.45):
  """Greedy non-maximum suppression on candidates already sorted by descending score.

  Candidate i is kept iff it is valid and no kept candidate j < i overlaps it with IoU > iou_threshold,
  exactly as the sequential greedy loop. One `lax.fori_loop` over the P candidates serves every
  leading (batch, class) index at once; each step compares one candidate with all P, so nothing of
  size P x P is materialised.

  Args:
    boxes_xyxy: (..., P, 4) corner form, sorted by descending score along P.
    valid: (..., P) bool; invalid candidates are neither kept nor suppress anything.
    iou_threshold: overlap above which the lower-scored box is suppressed.
  Returns:
    (..., P) bool, True for the kept candidates.
  """
  boxes_xyxy = jnp.asarray(boxes_xyxy, jnp.float32)
  valid = jnp.asarray(valid, bool)
  num = boxes_xyxy.shape[-2]
  later = jnp.arange(num)
  # Coordinates as separate (..., P) planes: the loop body then runs on contiguous vectors
  # (about twice as fast on CPU as slicing the trailing 4 of (..., P, 4)).
  x1, y1, x2, y2 = (boxes_xyxy[..., k] for k in range(4))
  areas = box_lib.area(boxes_xyxy)

  def suppress_by(i, keep):
    at_i = lambda plane: jax.lax.dynamic_slice_in_dim(plane, i, 1, axis=-1)   # (..., 1)
    inter = (jnp.maximum(jnp.minimum(at_i(x2), x2) - jnp.maximum(at_i(x1), x1), 0) *
             jnp.maximum(jnp.minimum(at_i(y2), y2) - jnp.maximum(at_i(y1), y1), 0))
    union = at_i(areas) + areas - inter
    overlap = jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 0)   # as boxes.iou
    # keep[i] is final here: only candidates before i can suppress it, and they are done.
    return keep & ~(at_i(keep) & (overlap > iou_threshold) & (later > i))

  # Candidates after the last valid one anywhere can neither be kept nor suppress: stop there.
  # With a trained model most classes have few candidates above the score threshold.
  num_steps = jnp.max(jnp.where(valid, later + 1, 0), initial=0)
  return jax.lax.fori_loop(0, num_steps, suppress_by, valid)


def detect(loc_preds, cls_logits, anchors, score_threshold=0.01, nms_iou=0.45, top_k=200,
           pre_nms_top_k=200, variances=box_lib.DEFAULT_VARIANCES,
           max_log_scale=DEFAULT_MAX_LOG_SCALE, top_k_fn=None):
  """Final detections per image, with fixed shapes.

  Per image and class (background excluded): scores below score_threshold are dropped, the
  pre_nms_top_k best remain, greedy NMS at nms_iou; then the top_k best over all classes.

  Args:
    loc_preds: (B, A, 4) offsets; cls_logits: (B, A, C+1) logits, column 0 = background.
    anchors: (A, 4) default boxes, centre form, normalised.
    score_threshold: minimum softmax score of a detection.
    nms_iou: NMS overlap threshold (IoU strictly above it suppresses).
    top_k: K, detections per image.
    pre_nms_top_k: candidates per class and image that enter NMS (at most A are used).
    variances: (centre, size) decoding scales.
    max_log_scale: see `boxes.decode`; None decodes without the guard.
    top_k_fn: (operand, k) -> (values, indices) with lax.top_k's results and tie order; None is
      jax.lax.top_k (mdssd_jax/run/export.py passes a sort-based one that TensorFlow can load).
  Returns:
    dict with boxes (B, K, 4) corner form, normalised, unclipped; scores (B, K) float32, descending;
    classes (B, K) int32 in 1..C; valid (B, K) bool. Invalid slots have score 0, class 0, box 0.
  """
  loc_preds = jnp.asarray(loc_preds, jnp.float32)
  cls_logits = jnp.asarray(cls_logits, jnp.float32)
  batch, num_anchors, num_columns = cls_logits.shape
  num_classes = num_columns - 1
  if loc_preds.shape != (batch, num_anchors, 4) or tuple(anchors.shape) != (num_anchors, 4):
    raise ValueError(f"detect wants loc_preds (B, A, 4), cls_logits (B, A, C+1), anchors (A, 4); got "
                     f"{loc_preds.shape}, {cls_logits.shape}, {tuple(anchors.shape)}")
  if num_classes < 1:
    raise ValueError(f"cls_logits has {num_columns} column(s): need background + at least 1 class")
  num_candidates = min(pre_nms_top_k, num_anchors)

  decoded = box_lib.decode(loc_preds, jnp.asarray(anchors, jnp.float32), variances,
                           max_log_scale=max_log_scale)                        # (B, A, 4)
  scores = jax.nn.softmax(cls_logits, axis=-1)[..., 1:]                        # (B, A, C)
  scores = jnp.swapaxes(scores, 1, 2)                                          # (B, C, A)

  # Per class, the best candidates in descending order (lax.top_k: ties -> lower index first).
  top_k_fn = jax.lax.top_k if top_k_fn is None else top_k_fn
  cand_scores, cand_index = top_k_fn(scores, num_candidates)                   # (B, C, P)
  cand_boxes = jnp.take_along_axis(decoded[:, None, :, :], cand_index[..., None], axis=2)
  cand_valid = cand_scores >= score_threshold
  keep = nms_mask(cand_boxes, cand_valid, nms_iou)                             # (B, C, P)

  # Best top_k over classes; flattening (C, P) makes ties go to the lower class, then lower index.
  flat_scores = jnp.where(keep, cand_scores, -1.0).reshape(batch, -1)          # (B, C*P)
  flat_boxes = cand_boxes.reshape(batch, -1, 4)
  flat_classes = jnp.broadcast_to(jnp.arange(1, num_classes + 1, dtype=jnp.int32)[:, None],
                                  (num_classes, num_candidates)).reshape(-1)
  num_out = min(top_k, flat_scores.shape[1])
  out_scores, out_index = top_k_fn(flat_scores, num_out)                       # (B, K')
  valid = out_scores >= 0.0
  out_boxes = jnp.take_along_axis(flat_boxes, out_index[..., None], axis=1)
  out_classes = flat_classes[out_index]

  result = dict(boxes=jnp.where(valid[..., None], out_boxes, 0.0),
                scores=jnp.where(valid, out_scores, 0.0),
                classes=jnp.where(valid, out_classes, 0).astype(jnp.int32),
                valid=valid)
  if num_out < top_k:
    # Fewer candidates in all than K: pad with invalid slots so the shape is always (B, K).
    pad = top_k - num_out
    result = {key: jnp.pad(value, [(0, 0), (0, pad)] + [(0, 0)] * (value.ndim - 2))
              for key, value in result.items()}
  return result
