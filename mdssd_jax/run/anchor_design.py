"""Default boxes designed from the data: the search behind `--mode=coverage --suggest`.

It keeps a config's heads (feature sizes and steps) and the number of default boxes per cell of each
head (so the heads keep their shapes and a model stays the same size), or a stated number of aspect
ratios per head, and chooses each head's min_size, max_size and aspect ratios so that as many
ground-truth boxes as possible get a default box at IoU >= the matching threshold, with every size
bucket of config.eval.size_buckets_px counting alike (each non-empty bucket weighs 1 / buckets
in all, shared equally by its boxes: 1000 tiny boxes count as much as 10000 medium ones).

1. Assignment by stride: each box goes to the coarsest head whose grid still reaches the threshold
   for it wherever its centre falls (a default box of exactly its shape, off by half a step in x and
   y); a box too small for every head goes to the finest. Heads that receive no box keep the
   config's values (there is nothing to fit them to, and they still serve larger objects).
2. Start: per head, min_size and sqrt(min_size * max_size) at the 30 % and 70 % quantiles of its
   boxes' sizes sqrt(w h), and the aspect ratios at quantiles of |log(w / h)|.
3. Refinement (AutoAnchor-like, seeded): a (1 + lambda) evolution of the log parameters, the best of
   the config's boxes and the start as parent, lambda mutants per generation with a shrinking step.
   Its fitness, on a seeded sample of boxes, is the weighted share of boxes whose best default box
   reaches the threshold plus 0.1 x the weighted mean best IoU (which breaks ties towards boxes of
   the objects' own shapes). The best IoU of a box with the default boxes of one shape on a grid is
   reached at the grid centre nearest to the box's centre in x and in y (the overlap along each axis
   only falls with the offset), so the proxy is exact for unclipped default boxes at the cost of
   boxes x heads x shapes, not boxes x default boxes.
4. Choice: the project's matching (`matching.match`, the config's rule and threshold) scores the
   config's boxes, the start and the evolution's best few on the images; a box counts as matched
   when it receives a default box at IoU >= the threshold (the bipartite stage's forced match below
   the threshold does not count: a poor start for regression). The best is suggested; the config's
   own boxes when nothing beats them.

Sizes and ratios are rounded (0.1 px, 0.01) before the choice, so the flags printed are what was
scored.
"""

import dataclasses
import functools
import math
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mdssd_jax.core import anchors as anchor_lib
from mdssd_jax.core import boxes as box_lib
from mdssd_jax.core import matching
from mdssd_jax.run import anchor_coverage

TIE_WEIGHT = 0.1          # weight of the mean best IoU next to the matched share in the fitness
MIN_GAP = 1.05            # max_size / min_size at least this
MIN_RATIO, MAX_RATIO = 1.1, 4.0
MAX_GAP = 4.0
IMAGES_PER_MATCH = 64     # images per jitted matching call


@dataclasses.dataclass(frozen=True)
class AnchorSpec:
  """The default-box values of `config.anchors` that the search reads or changes (pixels)."""
  image_size: float
  feature_sizes: Tuple[int, ...]
  steps: Tuple[float, ...]
  min_sizes: Tuple[float, ...]
  max_sizes: Tuple[float, ...]
  aspect_ratios: Tuple[Tuple[float, ...], ...]
  clip: bool = False

  @classmethod
  def from_config(cls, anchors_cfg, image_size):
    return cls(float(image_size), tuple(int(f) for f in anchors_cfg.feature_sizes),
               tuple(float(s) for s in anchors_cfg.steps),
               tuple(float(s) for s in anchors_cfg.min_sizes),
               tuple(float(s) for s in anchors_cfg.max_sizes),
               tuple(tuple(float(r) for r in rs) for rs in anchors_cfg.aspect_ratios),
               bool(anchors_cfg.get("clip", False)))

  def default_boxes(self) -> np.ndarray:
    """(A, 4) centre form, normalised (`anchors.default_boxes`)."""
    return anchor_lib.default_boxes(self.image_size, self.feature_sizes, self.steps, self.min_sizes,
                                    self.max_sizes, self.aspect_ratios, clip=self.clip)

  def flag_list(self) -> List[str]:
    """The `--config.anchors...=VALUE` overrides that give these default boxes (one per list)."""
    fmt = lambda values: "(" + ", ".join(f"{v:g}" for v in values) + ("," if len(values) == 1 else "") + ")"
    ratios = "(" + ", ".join(fmt(r) for r in self.aspect_ratios) + ("," if len(self.aspect_ratios) == 1 else "") + ")"
    return [f"--config.anchors.min_sizes={fmt(self.min_sizes)}",
            f"--config.anchors.max_sizes={fmt(self.max_sizes)}",
            f"--config.anchors.aspect_ratios={ratios}"]

  def flags(self) -> str:
    """`flag_list` for a shell command line."""
    return " ".join(f"{flag.split('=', 1)[0]}='{flag.split('=', 1)[1]}'" for flag in self.flag_list())

  def snippet(self) -> str:
    """Lines to paste into a config's get_config()."""
    fmt = lambda values: "(" + ", ".join(f"{v:g}" for v in values) + ("," if len(values) == 1 else "") + ")"
    ratios = "(" + ", ".join(fmt(r) for r in self.aspect_ratios) + ")"
    return "\n".join([f"  c.anchors.min_sizes = {fmt(self.min_sizes)}",
                      f"  c.anchors.max_sizes = {fmt(self.max_sizes)}",
                      f"  c.anchors.aspect_ratios = {ratios}"])


# ---------------------------------------------------------------------------------------------------
# Parameters <-> spec.
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Params:
  """Log parameters of K heads with up to R ratios each (leading population axes allowed).

  log_min: (..., K) log min_size px; log_gap: (..., K) log(max_size / min_size);
  log_ratio: (..., K, R) log aspect ratio (>= log MIN_RATIO); unused slots are ignored.
  """
  log_min: np.ndarray
  log_gap: np.ndarray
  log_ratio: np.ndarray


def _ratio_counts(spec: AnchorSpec, ratios_per_head) -> Tuple[int, ...]:
  if ratios_per_head is None:
    return tuple(len(r) for r in spec.aspect_ratios)
  values = list(ratios_per_head) if isinstance(ratios_per_head, (list, tuple)) else [ratios_per_head]
  counts = tuple(int(n) for n in (values * len(spec.feature_sizes) if len(values) == 1 else values))
  if len(counts) != len(spec.feature_sizes) or min(counts) < 0:
    raise ValueError(f"ratios per head {ratios_per_head!r}: give one count >= 0 per head "
                     f"({len(spec.feature_sizes)} heads), or one count for all")
  return counts


def _params_from_spec(spec: AnchorSpec, counts: Sequence[int]) -> _Params:
  """The spec's values as _Params; a head given more ratios than it has is filled with 2, 3, ..."""
  k, r = len(counts), max(1, max(counts))
  log_ratio = np.full((k, r), math.log(2.0))
  for i, (ratios, n) in enumerate(zip(spec.aspect_ratios, counts)):
    values = [max(x, 1.0 / x) for x in ratios][:n]
    fill = [x for x in (2.0, 3.0, 4.0, 1.5, 2.5, 3.5) if x not in values]
    values += fill[:n - len(values)]
    log_ratio[i, :n] = np.log(values)
  return _Params(np.log(spec.min_sizes), np.log(np.asarray(spec.max_sizes) / np.asarray(spec.min_sizes)),
                 log_ratio)


def _spec_from_params(spec: AnchorSpec, p: _Params, counts: Sequence[int],
                      free: np.ndarray) -> AnchorSpec:
  """Searched heads rounded (0.1 px, 0.01 ratio) and valid for `anchors.default_boxes`; the others
  exactly the config's (with ratios filled by `_params_from_spec` if the budget grew)."""
  mins, maxs, ratios = [], [], []
  for i, n in enumerate(counts):
    if not free[i] and n == len(spec.aspect_ratios[i]):
      mins.append(spec.min_sizes[i])
      maxs.append(spec.max_sizes[i])
      ratios.append(spec.aspect_ratios[i])
      continue
    s_min = round(float(np.exp(p.log_min[i])), 1)
    s_max = max(round(float(np.exp(p.log_min[i] + p.log_gap[i])), 1), round(s_min + 0.1, 1))
    mins.append(s_min)
    maxs.append(s_max)
    ratios.append(tuple(max(round(float(np.exp(x)), 2), 1.01) for x in p.log_ratio[i, :n]))
  return dataclasses.replace(spec, min_sizes=tuple(mins), max_sizes=tuple(maxs),
                             aspect_ratios=tuple(ratios))


def _cell_shapes(p_log_min, p_log_gap, p_log_ratio):
  """(P, K), (P, K), (P, K, R) -> widths, heights (P, K, 2 + 2R) px, in `anchors`' cell order."""
  s = jnp.exp(p_log_min)[..., None]
  s_prime = jnp.exp(p_log_min + 0.5 * p_log_gap)[..., None]
  root = jnp.exp(0.5 * p_log_ratio)
  widths = jnp.concatenate([s, s_prime, s * root, s / root], axis=-1)
  heights = jnp.concatenate([s, s_prime, s / root, s * root], axis=-1)
  return widths, heights


def _shape_mask(counts: Sequence[int]) -> np.ndarray:
  """(K, 2 + 2R) bool: which cell shapes of `_cell_shapes` a head has."""
  r = max(1, max(counts))
  mask = np.zeros((len(counts), 2 + 2 * r), bool)
  for i, n in enumerate(counts):
    mask[i, :2] = True
    mask[i, 2:2 + n] = True
    mask[i, 2 + r:2 + r + n] = True
  return mask


# ---------------------------------------------------------------------------------------------------
# The proxy: best IoU per box from the nearest grid centre of each head.
# ---------------------------------------------------------------------------------------------------

@jax.jit
def proxy_best_iou(widths, heights, shape_mask, gt_px, steps, feature_sizes):
  """Best IoU of each box with the unclipped default boxes of each candidate.

  Args:
    widths, heights: (P, K, Q) default-box sizes in pixels of P candidates, K heads, Q shapes.
    shape_mask: (K, Q) bool, the shapes each head has.
    gt_px: (N, 4) corner form in input pixels.
    steps: (K,) pixels between cell centres; feature_sizes: (K,) cells per side.
  Returns:
    (P, N) float32: max over heads and shapes of the IoU at the grid centre nearest the box's centre
    (which is the max over all of that head's default boxes of that shape).
  """
  gt_px = gt_px.astype(jnp.float32)
  gw, gh = gt_px[:, 2] - gt_px[:, 0], gt_px[:, 3] - gt_px[:, 1]
  gcx, gcy = (gt_px[:, 0] + gt_px[:, 2]) / 2, (gt_px[:, 1] + gt_px[:, 3]) / 2
  last = (feature_sizes - 1).astype(jnp.float32)
  nearest = lambda c: (jnp.clip(jnp.floor(c[:, None] / steps), 0, last) + 0.5) * steps   # (N, K)
  dx = jnp.abs(gcx[:, None] - nearest(gcx))[None, :, :, None]                            # (1, N, K, 1)
  dy = jnp.abs(gcy[:, None] - nearest(gcy))[None, :, :, None]
  aw, ah = widths[:, None], heights[:, None]                                             # (P, 1, K, Q)
  gw4, gh4 = gw[None, :, None, None], gh[None, :, None, None]
  ox = jnp.clip((gw4 + aw) / 2 - dx, 0.0, jnp.minimum(gw4, aw))
  oy = jnp.clip((gh4 + ah) / 2 - dy, 0.0, jnp.minimum(gh4, ah))
  inter = ox * oy
  union = gw4 * gh4 + aw * ah - inter
  overlap = jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)
  overlap = jnp.where(shape_mask[None, None], overlap, -1.0)
  return jnp.max(overlap, axis=(2, 3))


@jax.jit
def _proxy_fitness(log_min, log_gap, log_ratio, shape_mask, gt_px, weights, steps, feature_sizes,
                   iou_threshold, floor):
  """(P,) fitness of P candidates for the searched heads; floor: (N,) best IoU of the kept heads."""
  widths, heights = _cell_shapes(log_min, log_gap, log_ratio)
  best = proxy_best_iou(widths, heights, shape_mask, gt_px, steps, feature_sizes)        # (P, N)
  best = jnp.maximum(best, floor[None])
  covered = (best >= iou_threshold).astype(jnp.float32)
  return jnp.sum(weights[None] * (covered + TIE_WEIGHT * best), axis=1)                 # (P,)


# ---------------------------------------------------------------------------------------------------
# The real matching rule.
# ---------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("rule",))
def _matched_counts(gt_boxes, valid, anchors_cxcywh, iou_threshold, rule):
  """Default boxes the matching gives each ground truth at IoU >= iou_threshold.

  Args:
    gt_boxes: (B, M, 4) corner form, normalised; valid: (B, M) bool.
    anchors_cxcywh: (A, 4) centre form, normalised.
  Returns:
    (B, M) int32 (0 for invalid slots).
  """
  batch, num_gt = valid.shape
  # One label per slot: the matched label of a default box then names its ground truth.
  labels = jnp.where(valid, jnp.arange(1, num_gt + 1, dtype=jnp.int32)[None], 0)
  _, cls = matching.match(gt_boxes, labels, anchors_cxcywh, iou_threshold=iou_threshold, rule=rule)
  index = jnp.maximum(cls - 1, 0)                                                       # (B, A)
  gt_of = jnp.take_along_axis(gt_boxes, index[:, :, None], axis=1)                      # (B, A, 4)
  a = box_lib.cxcywh_to_xyxy(anchors_cxcywh)[None]
  inter = (jnp.maximum(jnp.minimum(gt_of[..., 2], a[..., 2]) - jnp.maximum(gt_of[..., 0], a[..., 0]), 0) *
           jnp.maximum(jnp.minimum(gt_of[..., 3], a[..., 3]) - jnp.maximum(gt_of[..., 1], a[..., 1]), 0))
  union = box_lib.area(gt_of) + box_lib.area(a) - inter
  overlap = jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)
  good = (cls > 0) & (overlap >= iou_threshold)
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], index.shape)
  return jnp.zeros((batch, num_gt), jnp.int32).at[rows, index].add(good.astype(jnp.int32))


def _pack(gt_boxes_norm: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
  """Per-image (N_i, 4) -> ((B, M, 4) padded to whole IMAGES_PER_MATCH batches, (B, M) valid)."""
  num_gt = max([1] + [len(b) for b in gt_boxes_norm])
  num_images = max(1, math.ceil(len(gt_boxes_norm) / IMAGES_PER_MATCH)) * IMAGES_PER_MATCH
  boxes = np.zeros((num_images, num_gt, 4), np.float32)
  valid = np.zeros((num_images, num_gt), bool)
  for i, b in enumerate(gt_boxes_norm):
    boxes[i, :len(b)] = b
    valid[i, :len(b)] = True
  return boxes, valid


def matched_by_rule(anchors_cxcywh: np.ndarray, packed: Tuple[np.ndarray, np.ndarray],
                    iou_threshold: float, rule: str) -> np.ndarray:
  """(N,) int: default boxes the matching rule gives each valid box (in packing order) at IoU >=
  iou_threshold; `packed` is `_pack`'s output."""
  boxes, valid = packed
  anchors = jnp.asarray(anchors_cxcywh, jnp.float32)
  out = []
  for lo in range(0, len(boxes), IMAGES_PER_MATCH):
    counts = _matched_counts(jnp.asarray(boxes[lo:lo + IMAGES_PER_MATCH]),
                             jnp.asarray(valid[lo:lo + IMAGES_PER_MATCH]), anchors,
                             jnp.float32(iou_threshold), rule)
    out.append(np.asarray(counts)[valid[lo:lo + IMAGES_PER_MATCH]])
  return np.concatenate(out) if out else np.zeros((0,), np.int32)


# ---------------------------------------------------------------------------------------------------
# The search.
# ---------------------------------------------------------------------------------------------------

def bucket_weights(longer_px: np.ndarray, buckets) -> Tuple[np.ndarray, np.ndarray]:
  """(N,) weights summing to 1, equal per non-empty bucket, and (N,) bucket index (-1: none).

  buckets: ((name, lo, hi), ...) of the longer side in input pixels (config.eval.size_buckets_px).
  """
  index = np.full(len(longer_px), -1)
  for i, (_, lo, hi) in enumerate(buckets):
    index[(longer_px >= lo) & (longer_px < hi) & (index < 0)] = i
  weights = np.zeros(len(longer_px))
  present = [i for i in range(len(buckets)) if np.any(index == i)]
  for i in present:
    weights[index == i] = 1.0 / (len(present) * np.sum(index == i))
  return weights, index


def assign_heads(gt_px: np.ndarray, steps: Sequence[float], iou_threshold: float) -> np.ndarray:
  """(N,) head index per box: the coarsest head whose grid reaches iou_threshold for the box
  wherever its centre falls (a default box of its shape, off by step / 2 in x and y: IoU p / (2 - p)
  with p = (1 - step / 2w)(1 - step / 2h)); boxes too small for every head go to the finest."""
  w = np.maximum(gt_px[:, 2] - gt_px[:, 0], 1e-6)[:, None]
  h = np.maximum(gt_px[:, 3] - gt_px[:, 1], 1e-6)[:, None]
  step = np.asarray(steps, np.float64)[None]
  p = np.clip(1 - step / (2 * w), 0, 1) * np.clip(1 - step / (2 * h), 0, 1)
  reaches = p / (2 - p) >= iou_threshold                                     # (N, K)
  order = np.argsort(step[0], kind="stable")                                 # finest first
  head = np.full(len(gt_px), int(order[0]))
  for k in order:
    head[reaches[:, k]] = k
  return head


def _start(spec: AnchorSpec, counts, gt_px, head) -> Tuple[_Params, np.ndarray]:
  """The quantile start and (K,) bool: heads that received boxes (the others stay as configured)."""
  base = _params_from_spec(spec, counts)
  p = _Params(base.log_min.copy(), base.log_gap.copy(), base.log_ratio.copy())
  free = np.zeros(len(counts), bool)
  size = np.sqrt((gt_px[:, 2] - gt_px[:, 0]) * (gt_px[:, 3] - gt_px[:, 1]))
  log_aspect = np.abs(np.log((gt_px[:, 2] - gt_px[:, 0]) / (gt_px[:, 3] - gt_px[:, 1])))
  for k, n in enumerate(counts):
    mine = head == k
    if not np.any(mine):
      continue
    free[k] = True
    lo, hi = np.quantile(np.log(size[mine]), [0.3, 0.7])
    p.log_min[k] = lo
    p.log_gap[k] = 2 * (hi - lo)
    if n:
      p.log_ratio[k, :n] = np.quantile(log_aspect[mine], (np.arange(n) + 1) / (n + 1))
  return _clamp(p, spec, free, base), free


def _clamp(p: _Params, spec: AnchorSpec, free: np.ndarray, base: _Params) -> _Params:
  """Searched heads (free, (K,) bool) inside the search's bounds; the others exactly `base`'s."""
  steps = np.asarray(spec.steps)
  return _Params(np.where(free, np.clip(p.log_min, np.log(0.5 * steps), np.log(spec.image_size)), base.log_min),
                 np.where(free, np.clip(p.log_gap, np.log(MIN_GAP), np.log(MAX_GAP)), base.log_gap),
                 np.where(free[:, None], np.clip(p.log_ratio, np.log(MIN_RATIO), np.log(MAX_RATIO)),
                          base.log_ratio))


@dataclasses.dataclass
class Suggestion:
  """What `suggest` found.

  spec: the suggested default boxes (the config's when nothing beat them); before / after:
  `evaluate`'s dicts for the config's and the suggested boxes; candidates: [(name, spec, score)]
  scored with the matching rule; assigned: (K,) boxes per head; free: (K,) heads searched.
  """
  spec: AnchorSpec
  before: Dict[str, Any]
  after: Dict[str, Any]
  candidates: List[Tuple[str, AnchorSpec, float]]
  assigned: np.ndarray
  free: np.ndarray


def evaluate(spec: AnchorSpec, gt_norm: Sequence[np.ndarray], iou_threshold: float, rule: str,
             buckets, packed=None) -> Dict[str, Any]:
  """Coverage (anchor_coverage.coverage_report: best IoU) and the matching rule's share per bucket.

  gt_norm: per image (N_i, 4) corner form normalised to the square input.
  Returns the coverage report (buckets named by config.eval.size_buckets_px) with, per bucket row,
  "matched_share" (boxes given a default box at IoU >= threshold by the rule) and "mean_positives"
  (default boxes per box at IoU >= threshold), and "score": the weighted matched share plus
  TIE_WEIGHT x the weighted mean best IoU (the search's fitness).
  """
  anchors = spec.default_boxes()
  size = spec.image_size
  sizes = np.full((len(gt_norm), 2), size)
  report = anchor_coverage.coverage_report(anchors, [np.asarray(b) * size for b in gt_norm], sizes,
                                           size, buckets=buckets, iou_threshold=iou_threshold)
  counts = matched_by_rule(anchors, packed or _pack(gt_norm), iou_threshold, rule)
  longer = report["longer_side_px"]
  weights, _ = bucket_weights(longer, buckets)
  for row in report["buckets"]:
    lo, hi = row["range"]
    inside = (longer >= lo) & (longer < hi)
    row["matched_share"] = float(np.mean(counts[inside] > 0)) if np.any(inside) else float("nan")
    row["mean_positives"] = float(np.mean(counts[inside])) if np.any(inside) else float("nan")
  report["matched_count"] = counts
  report["score"] = float(np.sum(weights * ((counts > 0) + TIE_WEIGHT * report["best_iou"])))
  return report


def suggest(gt_norm: Sequence[np.ndarray], spec: AnchorSpec, *, iou_threshold: float = 0.5,
            rule: str = "bipartite", buckets=(("tiny", 0.0, 16.0), ("small", 16.0, 32.0),
                                              ("medium", 32.0, 96.0), ("large", 96.0, float("inf"))),
            ratios_per_head=None, seed: int = 0, generations: int = 60, population: int = 32,
            max_search_boxes: int = 8192, finalists: int = 3, max_score_images: int = 500,
            log=None) -> Suggestion:
  """Searches default boxes for the boxes `gt_norm` (module docstring).

  Args:
    gt_norm: per image (N_i, 4) corner form, normalised to the square input (as training sees it).
    spec: the config's default boxes; heads, feature sizes and steps are kept.
    iou_threshold, rule: the config's matching (loss.iou_threshold, loss.matching).
    buckets: ((name, lo, hi), ...) of the longer side in input pixels; each non-empty one weighs alike.
    ratios_per_head: None (the config's count per head), one count, or one per head.
    seed: the evolution's and the box sample's seed (same inputs and seed: same result).
    generations, population: the evolution's size; max_search_boxes: its box sample.
    finalists: the evolution's best distinct candidates scored with the matching rule, on a seeded
      sample of max_score_images images (the before / after reports use all images).
    log: a callable taking a line of progress, or None.
  """
  counts = _ratio_counts(spec, ratios_per_head)
  size = spec.image_size
  gt_px = np.concatenate([np.asarray(b, np.float64).reshape(-1, 4) for b in gt_norm] + [np.zeros((0, 4))]) * size
  keep = (gt_px[:, 2] > gt_px[:, 0]) & (gt_px[:, 3] > gt_px[:, 1])
  if not np.any(keep):
    raise ValueError("no ground-truth boxes to design default boxes for (is the training split empty?)")
  gt_px = gt_px[keep]
  head = assign_heads(gt_px, spec.steps, iou_threshold)
  start, free = _start(spec, counts, gt_px, head)
  base = _params_from_spec(spec, counts)
  configured = _clamp(base, spec, free, base)

  rng = np.random.default_rng(seed)
  longer = np.maximum(gt_px[:, 2] - gt_px[:, 0], gt_px[:, 3] - gt_px[:, 1])
  weights, bucket = bucket_weights(longer, buckets)
  sample_px, sample_w = gt_px, weights
  if len(gt_px) > max_search_boxes:   # the same number of boxes from each bucket, re-weighted
    present = [i for i in np.unique(bucket) if i >= 0]
    per_bucket = max_search_boxes // max(1, len(present))
    sample = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(bucket == i), min(per_bucket, int(np.sum(bucket == i))), replace=False)
        for i in present]))
    sample_px = gt_px[sample]
    sample_w, _ = bucket_weights(longer[sample], buckets)
  # The kept heads' best IoU is the same for every candidate: computed once, the search then runs
  # over the searched heads alone.
  shape_mask = _shape_mask(counts)
  sample_px32 = jnp.asarray(sample_px, jnp.float32)
  steps, fsizes = np.asarray(spec.steps, np.float32), np.asarray(spec.feature_sizes, np.int32)
  floor = jnp.full((len(sample_px),), -1.0, jnp.float32)
  if not np.all(free):
    kept = ~free
    w, h = _cell_shapes(jnp.asarray(configured.log_min[kept][None], jnp.float32),
                        jnp.asarray(configured.log_gap[kept][None], jnp.float32),
                        jnp.asarray(configured.log_ratio[kept][None], jnp.float32))
    floor = proxy_best_iou(w, h, jnp.asarray(shape_mask[kept]), sample_px32, jnp.asarray(steps[kept]),
                           jnp.asarray(fsizes[kept]))[0]
  consts = (jnp.asarray(shape_mask[free]), sample_px32, jnp.asarray(sample_w, jnp.float32),
            jnp.asarray(steps[free]), jnp.asarray(fsizes[free]), jnp.float32(iou_threshold), floor)
  ratio_free = free[:, None] & (np.arange(configured.log_ratio.shape[1])[None] < np.asarray(counts)[:, None])

  def fitness(stack: List[_Params]) -> np.ndarray:
    return np.asarray(_proxy_fitness(
        jnp.asarray(np.stack([p.log_min[free] for p in stack]), jnp.float32),
        jnp.asarray(np.stack([p.log_gap[free] for p in stack]), jnp.float32),
        jnp.asarray(np.stack([p.log_ratio[free] for p in stack]), jnp.float32), *consts), np.float64)

  first = fitness([configured, start])
  archive = [(float(first[0]), "config", configured), (float(first[1]), "start", start)]
  parent = start if first[1] > first[0] else configured
  best = float(max(first))
  for g in range(generations):
    sigma = 0.2 * (0.1 ** (g / max(1, generations - 1)))       # 0.2 -> 0.02 in log units
    mutants = []
    for _ in range(population):
      change = lambda shape, allowed: allowed * (rng.random(shape) < 0.5) * rng.normal(0, sigma, shape)
      mutants.append(_clamp(_Params(parent.log_min + change(free.shape, free),
                                    parent.log_gap + change(free.shape, free),
                                    parent.log_ratio + change(ratio_free.shape, ratio_free)),
                              spec, free, base))
    scores = fitness(mutants)
    top = int(np.argmax(scores))
    archive.extend((float(s), f"generation {g + 1}", m) for s, m in zip(scores, mutants))
    archive = sorted(archive, key=lambda t: -t[0])[:4 * finalists + 2]
    if scores[top] > best:
      best, parent = float(scores[top]), mutants[top]
    if log and (g + 1) % 20 == 0:
      log(f"  generation {g + 1}/{generations}: proxy fitness {best:.4f}")

  # The finalists, rounded, scored with the real matching rule on a seeded sample of images.
  images = np.arange(len(gt_norm))
  if len(images) > max_score_images:
    images = np.sort(rng.choice(len(gt_norm), max_score_images, replace=False))
  score_gt = [gt_norm[i] for i in images]
  packed = _pack(score_gt)
  candidates, seen = [], set()
  for name, params in [("config", None), ("start", start)] + [(n, p) for _, n, p in archive]:
    cand = spec if params is None else _spec_from_params(spec, params, counts, free)
    key = (cand.min_sizes, cand.max_sizes, cand.aspect_ratios)
    if key in seen:
      continue
    seen.add(key)
    candidates.append((name, cand))
    if len(candidates) >= finalists + 2:
      break
  scored = []
  for name, cand in candidates:
    scored.append((name, cand, evaluate(cand, score_gt, iou_threshold, rule, buckets, packed)["score"]))
    if log:
      log(f"  {name}: score with the matching rule {scored[-1][2]:.4f} ({len(score_gt)} images)")
  # The config's boxes win ties (and keep their own ratio count only when the budget is unchanged).
  same_budget = tuple(len(r) for r in spec.aspect_ratios) == tuple(counts)
  choice = max((c for c in scored if same_budget or c[0] != "config"), key=lambda c: c[2])
  if log:
    log(f"  chose {choice[0]}; the table below: all {len(gt_norm)} images")
  packed = _pack(gt_norm)
  before = evaluate(spec, gt_norm, iou_threshold, rule, buckets, packed)
  after = before if choice[1] == spec else evaluate(choice[1], gt_norm, iou_threshold, rule, buckets, packed)
  return Suggestion(choice[1], before, after, scored, np.bincount(head, minlength=len(counts)), free)


# ---------------------------------------------------------------------------------------------------
# Output and the --mode=coverage --suggest entry point.
# ---------------------------------------------------------------------------------------------------

def format_comparison(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
  """Per bucket: boxes, best IoU >= threshold, matched by the rule, default boxes per box, before -> after."""
  thr = before["iou_threshold"]
  arrow = lambda a, b, f: "-" if math.isnan(a) else f"{f(a)} -> {f(b)}"
  pct = lambda x: f"{100 * x:.1f}%"
  lines = [f"default boxes: {before['num_default_boxes']} -> {after['num_default_boxes']}; sizes: "
           f"longer side in input pixels; matched: the matching rule gives the box a default box at "
           f"IoU >= {thr:g}",
           f"{'size':<16} {'boxes':>7} {f'best IoU >= {thr:g}':>18} {'matched':>18} "
           f"{'default boxes / box':>20} {'mean best IoU':>16}"]
  for b, a in zip(before["buckets"], after["buckets"]):
    lines.append(f"{b['name']:<16} {b['count']:>7d} {arrow(b['covered_share'], a['covered_share'], pct):>18} "
                 f"{arrow(b['matched_share'], a['matched_share'], pct):>18} "
                 f"{arrow(b['mean_positives'], a['mean_positives'], lambda x: f'{x:.2f}'):>20} "
                 f"{arrow(b['mean_best_iou'], a['mean_best_iou'], lambda x: f'{x:.3f}'):>16}")
  return "\n".join(lines)


def plot_comparison(before: Mapping[str, Any], after: Mapping[str, Any], path: str) -> str:
  """Two panels (`anchor_coverage.draw_coverage`): the config's default boxes and the suggested."""
  from mdssd_jax.report import plots  # pylint: disable=g-import-not-at-top  (matplotlib only when plotting)
  fig, ax = plots.new_figure((12, 4.5), 110)
  ax.remove()
  for i, (report, title) in enumerate(((before, "as configured"), (after, "suggested"))):
    anchor_coverage.draw_coverage(fig.add_subplot(1, 2, i + 1), report, prefix=f"{title}: ")
  fig.tight_layout()
  fig.savefig(path)
  return path


def suggest_for_config(config, ratios_per_head=None, seed=0, max_images=None, plot_path=None,
                       log=print) -> str:
  """`--mode=coverage --suggest`: the text to print (table, flags, snippet)."""
  import time  # pylint: disable=g-import-not-at-top
  from mdssd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  start = time.time()
  spec = AnchorSpec.from_config(config.anchors, config.model.input_size_px)
  gt_boxes, image_sizes = anchor_coverage.boxes_from_batches(pipeline.make_eval_batches(
      config, split=config.data.train_split, max_images=max_images or 0))
  # Normalised by the image: the warp to the square input (as training and evaluation resize).
  gt_norm = [np.asarray(b, np.float64).reshape(-1, 4) / np.array([w, h, w, h])
             for b, (h, w) in zip(gt_boxes, image_sizes)]
  loaded = time.time()
  log(f"{sum(len(b) for b in gt_norm)} boxes in {len(gt_norm)} images of split "
      f"'{config.data.train_split}' read in {loaded - start:.0f} s; searching (seed {seed})")
  result = suggest(gt_norm, spec, iou_threshold=float(config.loss.iou_threshold),
                   rule=str(config.loss.matching), buckets=anchor_coverage.buckets_from_config(config),
                   ratios_per_head=ratios_per_head, seed=seed, log=log)
  lines = [format_comparison(result.before, result.after), ""]
  heads = ", ".join(f"{n}" + ("" if f else " (kept)") for n, f in zip(result.assigned, result.free))
  lines.append(f"boxes assigned per head (by stride): {heads}")
  if result.spec == spec:
    lines.append("No candidate beat the configured default boxes: keep them.")
  else:
    lines += ["Suggested default boxes (flags):", "  " + result.spec.flags(), "",
              "or in the config's get_config():", result.spec.snippet()]
  lines.append(f"(search: {time.time() - loaded:.0f} s after reading the boxes)")
  if plot_path:
    plot_comparison(result.before, result.after, plot_path)
    lines.append(f"plot: {plot_path}")
  return "\n".join(lines)
