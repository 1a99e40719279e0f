"""SSD target assignment: ground-truth boxes -> per-default-box regression and class targets.

Runs on the device inside the train step, on fixed shapes (padded ground truth, label 0 = padding),
vectorised over the batch. The rules, Caffe SSD's and the older "forced" one, are described in
docs/matching.md.
"""

import functools

import jax
import jax.numpy as jnp

from mdssd_jax.core import boxes as box_lib

# Ground-truth slots handled per loop step (lax.scan unroll): fewer round trips of the (B, A) running
# best through memory; measured 1.5-1.9x faster on CPU than one slot per step. Not a model number.
_SLOTS_PER_STEP = 5

# Ground truths per image whose best free default box one bipartite round searches again over all
# default boxes (those whose candidate another ground truth took): a round then costs an IoU pass
# over B x this x A pairs, not B x M x A. More stale ground truths than this wait for the next
# round, which stays exact (docs/matching.md). Not a model number.
_REFRESH_SLOTS = 8

# Caffe's MatchBBox only records a (ground truth, default box) pair whose IoU is > 1e-6: pairs at or
# below it can never be matched, by either stage (docs/matching.md).
MIN_OVERLAP = 1e-6

# Names accepted by `match(rule=...)` and the `loss.matching` config key.
MATCH_RULES = ("bipartite", "forced")


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
          min_size=0.0, rule="bipartite"):
  """Assigns every default box a ground truth or the background (docs/matching.md).

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

  best_gt, best_gt_iou, best_anchor = _best_pairs(gt_boxes, valid, anchors_xyxy, anchor_areas)
  if rule == "forced":
    # Forcing: scatter-max of the gt index onto its best default box gives "the highest index wins";
    # invalid ground truths scatter -1, which changes nothing.
    forced_gt = jnp.full((batch, num_anchors), -1, jnp.int32)
    forced_gt = forced_gt.at[batch_index, best_anchor].max(jnp.where(valid, gt_index, -1))
    positive_extra = best_gt_iou >= iou_threshold
  else:
    matched_anchor, _ = _bipartite(gt_boxes, valid, anchors_xyxy, anchor_areas,
                                   best_anchor)                                 # (B, M), -1 = none
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



def _first_argmax(values, axis):
  """(max, index of its first occurrence) along `axis` of a NaN-free array: the lowest index wins
  a tie, as in Caffe's loops. A max and a masked min rather than `jnp.argmax`, whose two-operand
  reduction XLA's CPU backend does not vectorise (1.7x slower in `_best_pairs`' scan there)."""
  top = jnp.max(values, axis=axis, keepdims=True)
  size = values.shape[axis]
  index = jax.lax.broadcasted_iota(jnp.int32, values.shape, axis % values.ndim)
  first = jnp.min(jnp.where(values == top, index, size), axis=axis)
  return jnp.squeeze(top, axis), first


def _overlap(g_x1, g_y1, g_x2, g_y2, g_area, d_x1, d_y1, d_x2, d_y2, d_area):
  """Caffe's JaccardOverlap in float32 of broadcastable corner planes: ground truths g, default boxes d.

  Every IoU in this module comes from this one expression (the same operations in the same order),
  so an IoU computed twice, in different passes, is the same float: the bipartite rounds compare
  values from the per-ground-truth pass with values recomputed for a few pairs (docs/matching.md).
  Returns the broadcast shape; 0 where the union is 0.
  """
  inter = (jnp.maximum(jnp.minimum(g_x2, d_x2) - jnp.maximum(g_x1, d_x1), 0) *
           jnp.maximum(jnp.minimum(g_y2, d_y2) - jnp.maximum(g_y1, d_y1), 0))
  union = g_area + d_area - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 0)   # as boxes.iou


def _bipartite(gt_boxes, valid, anchors_xyxy, anchor_areas, best_anchor):
  """Caffe's bipartite stage, in rounds of locally dominant pairs, batched over images.

  Caffe takes, one at a time, the free (ground truth, default box) pair that is first in the strict
  order "higher IoU, then lower default-box index, then lower ground-truth index". A free pair that
  is first among the free pairs of both its ground truth and its default box ("locally dominant")
  is taken by that loop whatever happens elsewhere, so each round takes all of them at once; the
  globally first free pair is always one, so every round makes progress (docs/matching.md). A
  round needs each ground truth's best free default box ("candidate"): the first round's come from
  `_best_pairs`; a candidate stays exact until its default box is taken, and only those "stale"
  ground truths are searched again, `_REFRESH_SLOTS` per image per round, over all default boxes
  (an argmax, no top_k or sort). The loop ends when no ground truth still unmatched has a free
  default box of IoU > MIN_OVERLAP; usually after 2-4 rounds, whatever the slot count.

  Args:
    gt_boxes: (B, M, 4) float32 corner form; valid: (B, M) bool (`valid_gt_mask`);
    anchors_xyxy: (A, 4) float32 corner form; anchor_areas: (A,) float32 (`boxes.area`).
    best_anchor: (B, M) int32, each ground truth's default box of highest IoU, lowest index first.
  Returns:
    matched: (B, M) int32, the default box matched to each ground truth, -1 where none.
    rounds: () int32, rounds run (>= 1; diagnostics and tests).
  """
  batch, num_gt = valid.shape
  num_anchors = anchors_xyxy.shape[0]
  refresh_slots = min(num_gt, _REFRESH_SLOTS)
  images = jnp.arange(batch)[:, None]
  gt_area = box_lib.area(gt_boxes)                                              # (B, M)
  gt_planes = tuple(gt_boxes[:, :, k] for k in range(4))                        # (B, M) each
  anchor_planes = tuple(anchors_xyxy[:, k] for k in range(4))                   # (A,) each
  # earlier[i, j]: slot i comes before slot j, so wins a tie of IoU with it on the same default box.
  slots = jnp.arange(num_gt)
  earlier = slots[:, None] < slots[None, :]                                     # (M, M)

  def contest(state):
    """Takes every locally dominant pair among the fresh candidates (one round)."""
    matched, used, free, cand, stale, rounds = state
    # IoU of every ground truth i (axis 1) with ground truth j's candidate (axis 2): (B, M, M).
    cand_planes = tuple(anchors_xyxy[cand, k][:, None, :] for k in range(4))
    cross = _overlap(*(p[:, :, None] for p in gt_planes), gt_area[:, :, None],
                     *cand_planes, anchor_areas[cand][:, None, :])
    own = jnp.diagonal(cross, axis1=1, axis2=2)                                  # (B, M)
    # A fresh candidate is free, except when every default box is used (then `refresh` finds none).
    contender = (free & ~stale & ~jnp.take_along_axis(used, cand, axis=1) & (own > MIN_OVERLAP))
    # j's candidate prefers another free ground truth i: higher IoU, or equal IoU and i < j.
    beaten = jnp.any(free[:, :, None] & ((cross > own[:, None, :]) |
                                         ((cross == own[:, None, :]) & earlier[None])), axis=1)
    win = contender & ~beaten                       # winners' default boxes are distinct
    matched = jnp.where(win, cand, matched)
    used = used.at[images, jnp.where(win, cand, num_anchors)].set(True, mode="drop")
    taken = jnp.any(win[:, None, :] & (cand[:, :, None] == cand[:, None, :]), axis=2)
    free = free & ~win
    # A candidate taken by a winner must be searched again. A fresh ground truth that is no
    # contender has no free default box of IoU > MIN_OVERLAP left, and only loses default boxes:
    # it is out for good.
    stale = free & (stale | (taken & contender))
    live = jnp.any(free & (stale | contender))
    return (matched, used, free, cand, stale, rounds + 1), live

  def refresh(state):
    """Re-searches the candidates of the first `refresh_slots` stale ground truths of each image."""
    matched, used, free, cand, stale, rounds = state
    rank = jnp.cumsum(stale, axis=1, dtype=jnp.int32) - 1                       # (B, M)
    pick = stale[:, None, :] & (rank[:, None, :] == jnp.arange(refresh_slots)[None, :, None])
    chosen = jnp.argmax(pick, axis=2)                                          # (B, P) slot
    overlap = _overlap(*(jnp.take_along_axis(p, chosen, axis=1)[:, :, None] for p in gt_planes),
                       jnp.take_along_axis(gt_area, chosen, axis=1)[:, :, None],
                       *anchor_planes, anchor_areas)                            # (B, P, A)
    overlap = jnp.where(used[:, None, :], -1.0, overlap)
    _, found = _first_argmax(overlap, axis=2)                                 # lowest index first
    refreshed = jnp.any(pick, axis=1)                                          # (B, M)
    cand = jnp.where(refreshed, jnp.sum(jnp.where(pick, found[:, :, None], 0), axis=1), cand)
    return matched, used, free, cand, stale & ~refreshed, rounds

  state = (jnp.full((batch, num_gt), -1, jnp.int32), jnp.zeros((batch, num_anchors), bool), valid,
           best_anchor.astype(jnp.int32), jnp.zeros((batch, num_gt), bool), jnp.int32(0))
  state, live = contest(state)                      # round 1 on the candidates of `_best_pairs`

  def next_round(carry):
    state = carry[0]
    # A round whose ground truths all hold fresh candidates needs no search (often the last one).
    return contest(jax.lax.cond(jnp.any(state[4]), refresh, lambda s: s, state))

  state, _ = jax.lax.while_loop(lambda carry: carry[1], next_round, (state, live))
  return state[0], state[5]


def _best_pairs(gt_boxes, valid, anchors_xyxy, anchor_areas, form=None):
  """Best ground truth per default box and best default box per ground truth, one IoU pass.

  Two forms give the same values (the same `_overlap` and exact max / argmax reductions): "dense",
  one (B, M, A) IoU expression reduced over both axes, with no loop over the slots (what GPUs and
  TPUs run: the reductions fuse with the IoU and nothing is sequential in M), and "scan", a
  `lax.scan` over the slots, each step batched over images and default boxes (what the CPU runs:
  several times faster there, nothing of size B x M x A is materialised). form=None picks by the
  platform the function is lowered for.

  Args:
    gt_boxes: (B, M, 4) corner form; valid: (B, M) bool; anchors_xyxy: (A, 4) corner form;
      anchor_areas: (A,) their areas.
    form: None | "dense" | "scan".
  Returns:
    best_gt: (B, A) int32, index of the valid ground truth of highest IoU (ties: lowest index);
      0 where an image has no valid ground truth.
    best_gt_iou: (B, A) float32, that IoU; -1 where an image has no valid ground truth.
    best_anchor: (B, M) int32, the default box of highest IoU per ground truth (ties: lowest index).
  """
  if form is None:
    return jax.lax.platform_dependent(
        gt_boxes, valid, anchors_xyxy, anchor_areas,
        cpu=functools.partial(_best_pairs, form="scan"),
        default=functools.partial(_best_pairs, form="dense"))
  gt_area = box_lib.area(gt_boxes)                                              # (B, M)
  anchor_planes = tuple(anchors_xyxy[:, k] for k in range(4))                   # (A,) each
  if form == "dense":
    overlap = _overlap(*(gt_boxes[:, :, k, None] for k in range(4)), gt_area[:, :, None],
                       *anchor_planes, anchor_areas)                            # (B, M, A)
    # An invalid slot scores -1, below any real IoU, so it can never be any default box's best.
    overlap = jnp.where(valid[:, :, None], overlap, -1.0)
    best_gt_iou, best_gt = _first_argmax(overlap, axis=1)
    return best_gt, best_gt_iou, _first_argmax(overlap, axis=2)[1]
  if form != "scan":
    raise ValueError(f"unknown form {form!r}")
  batch, num_gt = valid.shape
  num_anchors = anchors_xyxy.shape[0]

  def visit(carry, slot):
    best_iou, best_index = carry
    box, area, is_valid, j = slot                                            # (B, 4), (B,), (B,), ()
    overlap = _overlap(*(box[:, k:k + 1] for k in range(4)), area[:, None],
                       *anchor_planes, anchor_areas)                          # (B, A)
    overlap = jnp.where(is_valid[:, None], overlap, -1.0)
    better = overlap > best_iou                  # strict: an equal later slot does not win
    carry = (jnp.where(better, overlap, best_iou), jnp.where(better, j, best_index))
    return carry, _first_argmax(overlap, axis=-1)[1]

  init = (jnp.full((batch, num_anchors), -jnp.inf, jnp.float32),
          jnp.zeros((batch, num_anchors), jnp.int32))
  slots = (jnp.swapaxes(gt_boxes, 0, 1), jnp.swapaxes(gt_area, 0, 1), jnp.swapaxes(valid, 0, 1),
           jnp.arange(num_gt, dtype=jnp.int32))
  (best_gt_iou, best_gt), best_anchor = jax.lax.scan(visit, init, slots, unroll=_SLOTS_PER_STEP)
  return best_gt, best_gt_iou, jnp.swapaxes(best_anchor, 0, 1)
