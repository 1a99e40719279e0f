"""The previous implementation of `mdssd_jax.core.matching.match`, frozen as a reference for
`bench_core --sequential` and tests/test_matching.py: same rules and targets, but a `lax.scan` over
the ground-truth slots with a `lax.top_k` over all default boxes per slot, then a `fori_loop` of M
sequential rounds for the bipartite stage (its sequential depth grows with the slot count M). Not
used by training; docs/matching.md describes what replaced it and why the targets are the same.
"""

import jax
import jax.numpy as jnp

from mdssd_jax.core import boxes as box_lib
from mdssd_jax.core.matching import MATCH_RULES, MIN_OVERLAP, valid_gt_mask

# As the previous version had it: ground-truth slots per `lax.scan` step.
_SLOTS_PER_STEP = 5


def match_sequential(gt_boxes, gt_labels, anchors, iou_threshold=0.5,
                     variances=box_lib.DEFAULT_VARIANCES, min_size=0.0, rule="bipartite"):
  """`matching.match` as it was before the round-based bipartite stage (same arguments, same targets).

  rule="bipartite" (Caffe SSD's MatchBBox, BIPARTITE then PER_PREDICTION; the default):
    1. bipartite stage: repeatedly take the (ground truth, default box) pair of highest IoU among
       ground truths not yet matched and default boxes not yet used, IoU > MIN_OVERLAP; match them.
       Ties go to the lowest default-box index, then the lowest ground-truth index (Caffe's loop
       order). Every ground truth that overlaps some free default box gets one, whatever the IoU.
    2. per-prediction stage: every default box still unmatched takes the valid ground truth of
       highest IoU (ties: lowest index) if that IoU is >= iou_threshold (and > MIN_OVERLAP).
  rule="forced" (ssd.pytorch's rule, this project's earlier default):
    1. each default box takes the valid ground truth of highest IoU (ties: lowest gt index);
    2. each valid ground truth's best default box (ties: lowest index) is forced to it whatever the
       IoU; when several share one best default box, the highest gt index wins and the others may
       be left with no default box at all;
    3. default boxes not forced and whose best IoU is < iou_threshold are background.
  Padded slots (label 0) and degenerate or non-finite boxes (see `valid_gt_mask`) never match.

  Args:
    gt_boxes: (B, M, 4) corner form, normalised; padded slots may hold anything.
    gt_labels: (B, M) int, 1..C for objects, 0 = padding.
    anchors: (A, 4) default boxes, centre form, normalised.
    iou_threshold: minimum IoU for a positive default box beyond the forced / bipartite ones.
    variances: (centre, size) encoding scales.
    min_size: see `valid_gt_mask`.
    rule: "bipartite" | "forced" (a Python string: static under jit).
  Returns:
    loc_targets: (B, A, 4) float32 `boxes.encode` offsets; exactly 0 for background default boxes.
    cls_targets: (B, A) int32, the matched label, 0 = background.
  """
  if rule not in MATCH_RULES:
    raise ValueError(f"unknown matching rule {rule!r} (config key loss.matching); known: "
                     f"{', '.join(MATCH_RULES)}")
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
  # IoU in float32 from corners, as Caffe's JaccardOverlap computes it: mathematically equal IoUs
  # (a small object inside several default boxes of equal area) are then told apart by the same
  # rounding, and exact ties go to the lowest index (docs/matching.md).
  anchor_areas = box_lib.area(anchors_xyxy)
  valid = valid_gt_mask(gt_boxes, gt_labels, min_size)                         # (B, M)
  batch_index = jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, num_gt))
  gt_index = jnp.broadcast_to(jnp.arange(num_gt, dtype=jnp.int32)[None, :], (batch, num_gt))

  if rule == "forced":
    best_gt, best_gt_iou, best_anchor = _best_pairs(gt_boxes, valid, anchors_xyxy, anchor_areas)
    # Forcing: scatter-max of the gt index onto its best default box gives "the highest index wins";
    # invalid ground truths scatter -1, which changes nothing.
    forced_gt = jnp.full((batch, num_anchors), -1, jnp.int32)
    forced_gt = forced_gt.at[batch_index, best_anchor].max(jnp.where(valid, gt_index, -1))
    positive_extra = best_gt_iou >= iou_threshold
  else:
    # A ground truth can only lose a default box to another ground truth, so its best free default
    # box is always among its `num_gt` best ones: the bipartite stage works on those alone.
    num_candidates = min(num_gt, num_anchors)
    best_gt, best_gt_iou, (cand_iou, cand_anchor) = _best_pairs(gt_boxes, valid, anchors_xyxy,
                                                                anchor_areas, num_candidates)
    matched_anchor = _bipartite(cand_iou, cand_anchor, num_anchors)             # (B, M), -1 = none
    forced_gt = jnp.full((batch, num_anchors), -1, jnp.int32)
    # Each default box is used at most once, so the scatter has no collisions; unmatched ground
    # truths point past the end and are dropped.
    forced_gt = forced_gt.at[batch_index, jnp.where(matched_anchor >= 0, matched_anchor, num_anchors)
                             ].set(gt_index, mode="drop")
    positive_extra = (best_gt_iou >= iou_threshold) & (best_gt_iou > MIN_OVERLAP)

  forced = forced_gt >= 0
  matched_gt = jnp.where(forced, forced_gt, best_gt)
  positive = forced | positive_extra

  matched_labels = jnp.take_along_axis(gt_labels, matched_gt, axis=1)        # (B, A)
  cls_targets = jnp.where(positive, matched_labels, 0).astype(jnp.int32)

  matched_boxes = jnp.take_along_axis(gt_boxes, matched_gt[:, :, None], axis=1)   # (B, A, 4)
  # Background default boxes encode themselves (offsets 0) so no log(0) is ever evaluated.
  safe_boxes = jnp.where(positive[:, :, None], matched_boxes, anchors_xyxy[None])
  loc_targets = box_lib.encode(safe_boxes, anchors, variances)
  loc_targets = jnp.where(positive[:, :, None], loc_targets, 0.0).astype(jnp.float32)
  return loc_targets, cls_targets


def _bipartite(cand_iou, cand_anchor, num_anchors):
  """Caffe's bipartite stage on each ground truth's best default boxes, batched over images.

  One `fori_loop` step per ground-truth slot; each step takes, per image, the pair of highest IoU
  among unmatched ground truths and unused default boxes (ties: lowest default box, then lowest
  ground truth), as Caffe's loop does, and stops matching in an image once no pair has
  IoU > MIN_OVERLAP.

  Args:
    cand_iou: (B, M, K) float32 IoU of each ground truth's K best default boxes; -1 for invalid slots.
    cand_anchor: (B, M, K) int32 their default-box indices (distinct within a row).
    num_anchors: A, used as "no index".
  Returns:
    (B, M) int32: the default box matched to each ground truth, -1 where none.
  """
  batch, num_gt, _ = cand_iou.shape
  images = jnp.arange(batch)

  def step(_, state):
    used, done, matched = state                       # (B, M, K) bool, (B, M) bool, (B, M) int32
    free = ~used & ~done[:, :, None] & (cand_iou > MIN_OVERLAP)
    score = jnp.where(free, cand_iou, -1.0)
    gt_best = jnp.max(score, axis=-1)                                           # (B, M)
    # Among a ground truth's free default boxes of that IoU, the lowest index.
    gt_anchor = jnp.min(jnp.where(free & (score == gt_best[:, :, None]), cand_anchor, num_anchors),
                        axis=-1)                                                # (B, M)
    top = jnp.max(gt_best, axis=-1)                                             # (B,)
    tied = gt_best == top[:, None]
    anchor = jnp.min(jnp.where(tied, gt_anchor, num_anchors), axis=-1)          # (B,)
    gt = jnp.argmax(tied & (gt_anchor == anchor[:, None]), axis=-1)             # lowest gt index
    found = top > MIN_OVERLAP
    matched = matched.at[images, gt].set(jnp.where(found, anchor, matched[images, gt]))
    done = done.at[images, gt].set(done[images, gt] | found)
    used = used | (found[:, None, None] & (cand_anchor == anchor[:, None, None]))
    return used, done, matched

  state = (jnp.zeros(cand_iou.shape, bool), jnp.zeros((batch, num_gt), bool),
           jnp.full((batch, num_gt), -1, jnp.int32))
  return jax.lax.fori_loop(0, num_gt, step, state)[2]


def _best_pairs(gt_boxes, valid, anchors_xyxy, anchor_areas, num_candidates=None):
  """Best ground truth per default box and best default boxes per ground truth.

  A `lax.scan` over the M ground-truth slots, each step batched over images and default boxes, so
  nothing of size B x M x A is ever materialised (MDSSD512 has 90100 default boxes) and every
  reduction runs along a contiguous axis; on CPU this is several times faster than reducing a
  (B, M, A) IoU tensor along both axes.

  Args:
    gt_boxes: (B, M, 4) corner form; valid: (B, M) bool; anchors_xyxy: (A, 4) corner form;
    anchor_areas: (A,) their areas.
    num_candidates: None, or K: also return each ground truth's K best default boxes.
  Returns:
    best_gt: (B, A) int32, index of the valid ground truth of highest IoU (ties: lowest index);
      0 where an image has no valid ground truth.
    best_gt_iou: (B, A) float32, that IoU; -1 where an image has no valid ground truth.
    third: with num_candidates None, best_anchor (B, M) int32, the default box of highest IoU per
      ground truth (ties: lowest index); else (cand_iou (B, M, K) float32, -1 for invalid slots,
      cand_anchor (B, M, K) int32), sorted by IoU, ties by lowest index (`lax.top_k` is stable).
  """
  batch, num_gt = valid.shape
  num_anchors = anchors_xyxy.shape[0]
  # Default-box coordinates as (A,) planes: the loop body then runs on contiguous vectors.
  ax1, ay1, ax2, ay2 = (anchors_xyxy[:, k] for k in range(4))

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
    if num_candidates is None:
      return carry, jnp.argmax(overlap, axis=-1).astype(jnp.int32)
    values, indices = jax.lax.top_k(overlap, num_candidates)
    return carry, (values, indices.astype(jnp.int32))

  init = (jnp.full((batch, num_anchors), -jnp.inf, jnp.float32),
          jnp.zeros((batch, num_anchors), jnp.int32))
  slots = (jnp.swapaxes(gt_boxes, 0, 1), jnp.swapaxes(valid, 0, 1),
           jnp.arange(num_gt, dtype=jnp.int32))
  (best_gt_iou, best_gt), per_slot = jax.lax.scan(visit, init, slots, unroll=_SLOTS_PER_STEP)
  per_slot = jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1), per_slot)
  return best_gt, best_gt_iou, per_slot
