"""SSD target assignment: ground-truth boxes -> per-default-box regression and class targets.

Runs on the device inside the train step, on fixed shapes (padded ground truth, label 0 = padding),
vectorised over the batch (REFERENCE.md section 2, "Matching").
"""

import jax
import jax.numpy as jnp

from mdssd_jax import boxes as box_lib

# Ground-truth slots handled per loop step (lax.scan unroll): fewer round trips of the (B, A) running
# best through memory; measured 1.5-1.9x faster on CPU than one slot per step. Not a model number.
_SLOTS_PER_STEP = 5


def valid_gt_mask(gt_boxes, gt_labels, min_size=0.0):
  """Which ground-truth slots take part in matching.

  Args:
    gt_boxes: (..., M, 4) corner form.
    gt_labels: (..., M) int, 0 = padding.
    min_size: boxes whose width or height is <= this are degenerate and dropped (log(0) in the
      encoding is where SSD code bases get their NaN losses).
  Returns:
    (..., M) bool: label > 0, finite coordinates, width and height > min_size.
  """
  gt_boxes = jnp.asarray(gt_boxes)
  width = gt_boxes[..., 2] - gt_boxes[..., 0]
  height = gt_boxes[..., 3] - gt_boxes[..., 1]
  finite = jnp.all(jnp.isfinite(gt_boxes), axis=-1)
  # NaN coordinates compare False below, so a NaN box is dropped even before `finite`.
  return (jnp.asarray(gt_labels) > 0) & finite & (width > min_size) & (height > min_size)


def match(gt_boxes, gt_labels, anchors, iou_threshold=0.5, variances=box_lib.DEFAULT_VARIANCES,
          min_size=0.0):
  """Assigns every default box a ground truth or the background.

  Rules (ties resolved as a sequential loop over ground truths would):
    1. each default box takes the valid ground truth of highest IoU (ties: lowest gt index);
    2. each valid ground truth's best default box (ties: lowest default-box index) is forced to that
       ground truth whatever the IoU; when several ground truths share one best default box, the
       highest gt index wins (`for j in range(M): best_gt[best_anchor[j]] = j`);
    3. default boxes not forced and whose best IoU is < iou_threshold are background.
  Padded slots (label 0) and degenerate boxes (see `valid_gt_mask`) never match.

  Args:
    gt_boxes: (B, M, 4) corner form, normalised; padded slots may hold anything finite.
    gt_labels: (B, M) int, 1..C for objects, 0 = padding.
    anchors: (A, 4) default boxes, centre form, normalised.
    iou_threshold: minimum IoU for a positive default box.
    variances: (centre, size) encoding scales.
    min_size: see `valid_gt_mask`.
  Returns:
    loc_targets: (B, A, 4) float32 `boxes.encode` offsets; exactly 0 for background default boxes.
    cls_targets: (B, A) int32, the matched label, 0 = background.
  """
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  gt_labels = jnp.asarray(gt_labels, jnp.int32)
  anchors = jnp.asarray(anchors, jnp.float32)
  if gt_boxes.ndim != 3 or gt_boxes.shape[-1] != 4 or gt_labels.shape != gt_boxes.shape[:2]:
    raise ValueError(f"match wants gt_boxes (B, M, 4) and gt_labels (B, M); got {gt_boxes.shape} "
                     f"and {gt_labels.shape}: add a batch axis for a single image")
  if anchors.ndim != 2 or anchors.shape[-1] != 4:
    raise ValueError(f"match wants anchors (A, 4) centre form, got {anchors.shape}")
  batch, num_gt = gt_labels.shape
  num_anchors = anchors.shape[0]
  if num_gt == 0:                                  # no slots at all: everything is background
    return (jnp.zeros((batch, num_anchors, 4), jnp.float32),
            jnp.zeros((batch, num_anchors), jnp.int32))

  anchors_xyxy = box_lib.cxcywh_to_xyxy(anchors)
  valid = valid_gt_mask(gt_boxes, gt_labels, min_size)                         # (B, M)
  best_gt, best_gt_iou, best_anchor = _best_pairs(gt_boxes, valid, anchors_xyxy)

  # Forcing: scatter-max of the gt index onto its best default box gives "the highest index wins";
  # invalid ground truths scatter -1, which changes nothing.
  gt_index = jnp.where(valid, jnp.arange(num_gt, dtype=jnp.int32)[None, :], -1)
  batch_index = jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, num_gt))
  forced_gt = jnp.full((batch, num_anchors), -1, jnp.int32)
  forced_gt = forced_gt.at[batch_index, best_anchor].max(gt_index)          # (B, A)
  forced = forced_gt >= 0

  matched_gt = jnp.where(forced, forced_gt, best_gt)
  positive = forced | (best_gt_iou >= iou_threshold)

  matched_labels = jnp.take_along_axis(gt_labels, matched_gt, axis=1)        # (B, A)
  cls_targets = jnp.where(positive, matched_labels, 0).astype(jnp.int32)

  matched_boxes = jnp.take_along_axis(gt_boxes, matched_gt[:, :, None], axis=1)   # (B, A, 4)
  # Background default boxes encode themselves (offsets 0) so no log(0) is ever evaluated.
  safe_boxes = jnp.where(positive[:, :, None], matched_boxes, anchors_xyxy[None])
  loc_targets = box_lib.encode(safe_boxes, anchors, variances)
  loc_targets = jnp.where(positive[:, :, None], loc_targets, 0.0).astype(jnp.float32)
  return loc_targets, cls_targets


def _best_pairs(gt_boxes, valid, anchors_xyxy):
  """Best ground truth per default box and best default box per ground truth.

  A `lax.scan` over the M ground-truth slots, each step batched over images and default boxes, so
  nothing of size B x M x A is ever materialised (MDSSD512 has 90100 default boxes) and every
  reduction runs along a contiguous axis; on CPU this is several times faster than reducing a
  (B, M, A) IoU tensor along both axes.

  Args:
    gt_boxes: (B, M, 4) corner form; valid: (B, M) bool; anchors_xyxy: (A, 4) corner form.
  Returns:
    best_gt: (B, A) int32, index of the valid ground truth of highest IoU (ties: lowest index);
      0 where an image has no valid ground truth.
    best_gt_iou: (B, A) float32, that IoU; -1 where an image has no valid ground truth.
    best_anchor: (B, M) int32, default box of highest IoU per ground truth (ties: lowest index).
  """
  batch, num_gt = valid.shape
  num_anchors = anchors_xyxy.shape[0]
  # Default-box coordinates as (A,) planes: the loop body then runs on contiguous vectors.
  ax1, ay1, ax2, ay2 = (anchors_xyxy[:, k] for k in range(4))
  anchor_areas = box_lib.area(anchors_xyxy)

  def visit(carry, slot):
    best_iou, best_index = carry
    box, is_valid, j = slot                                                  # (B, 4), (B,), ()
    gx1, gy1, gx2, gy2 = (box[:, k:k + 1] for k in range(4))                 # (B, 1) each
    inter = (jnp.maximum(jnp.minimum(gx2, ax2) - jnp.maximum(gx1, ax1), 0) *
             jnp.maximum(jnp.minimum(gy2, ay2) - jnp.maximum(gy1, ay1), 0))  # (B, A)
    union = box_lib.area(box)[:, None] + anchor_areas - inter
    overlap = jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 0)   # as boxes.iou
    # An invalid slot scores -1, below any real IoU, so it can never be any default box's best.
    overlap = jnp.where(is_valid[:, None], overlap, -1.0)
    better = overlap > best_iou                  # strict: an equal later slot does not win
    carry = (jnp.where(better, overlap, best_iou), jnp.where(better, j, best_index))
    return carry, jnp.argmax(overlap, axis=-1).astype(jnp.int32)

  init = (jnp.full((batch, num_anchors), -jnp.inf, jnp.float32),
          jnp.zeros((batch, num_anchors), jnp.int32))
  slots = (jnp.swapaxes(gt_boxes, 0, 1), jnp.swapaxes(valid, 0, 1),
           jnp.arange(num_gt, dtype=jnp.int32))
  (best_gt_iou, best_gt), best_anchor = jax.lax.scan(visit, init, slots, unroll=_SLOTS_PER_STEP)
  return best_gt, best_gt_iou, jnp.swapaxes(best_anchor, 0, 1)
