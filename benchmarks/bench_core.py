"""Times the detection core (match + loss, detect) against a per-image NumPy implementation.

    python -m benchmarks.bench_core [--batch 32] [--slots 50] [--repeats 5]
    python -m benchmarks.bench_core --slots 64,128 --sequential    # before/after of the bipartite stage

Matching is timed for both rules of `loss.matching` (docs/matching.md): "bipartite" (Caffe SSD's,
the default) and "forced" (ssd.pytorch's), on MDSSD300 and MDSSD512 default boxes. The NumPy side
is written here, independently of the library, the way SSD code bases do it: a Python loop over
images (and over ground truths for forced matches, over classes and candidates for NMS), NumPy
vectorised over default boxes inside; it implements the forced rule (the bipartite rule is checked
against a literal NumPy transcription of Caffe's loop in tests/test_matching.py). Both sides are
checked to agree before timing. JAX numbers: jitted, after a warm-up call, median of --repeats runs.
With --sequential the previous implementation of the bipartite rule (`match_sequential.py`: a scan
over the slots with a top_k per slot, then M sequential steps) is timed beside today's, alternating
run by run so that load from other jobs hits both alike, after checking that both give bit-identical
targets; the last column is then previous / today's time.
"""

import argparse
import functools
import os
import platform
import statistics
import time

import numpy as np


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import common  # noqa: E402
from mdssd_jax.core import anchors as anchor_lib  # noqa: E402
from mdssd_jax.core import losses, matching, postprocess  # noqa: E402
from benchmarks import match_sequential  # noqa: E402

VARIANCES = (0.1, 0.2)


# ---- the NumPy reference, one image at a time --------------------------------------------------

def np_iou(a, b):
  """(N, 4) x (M, 4) corner form -> (N, M)."""
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  area_a = np.prod(a[:, 2:] - a[:, :2], axis=-1)
  area_b = np.prod(b[:, 2:] - b[:, :2], axis=-1)
  union = area_a[:, None] + area_b[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0)


def np_corners(c):
  return np.concatenate([c[:, :2] - c[:, 2:] / 2, c[:, :2] + c[:, 2:] / 2], axis=-1)


def np_match(gt_boxes, gt_labels, anchors, threshold=0.5):
  batch, num_anchors = gt_boxes.shape[0], anchors.shape[0]
  loc = np.zeros((batch, num_anchors, 4), np.float32)
  cls = np.zeros((batch, num_anchors), np.int32)
  corners = np_corners(anchors)
  for b in range(batch):
    g, l = gt_boxes[b], gt_labels[b]
    keep = (l > 0) & (g[:, 2] > g[:, 0]) & (g[:, 3] > g[:, 1])
    g, l = g[keep], l[keep]
    if len(g) == 0:
      continue
    ious = np_iou(g, corners)                                   # (M', A)
    best_gt, best_iou = ious.argmax(0), ious.max(0)
    best_anchor = ious.argmax(1)
    for j in range(len(g)):
      best_gt[best_anchor[j]] = j
      best_iou[best_anchor[j]] = 2.0
    pos = best_iou >= threshold
    m = g[best_gt]
    centre = ((m[:, :2] + m[:, 2:]) / 2 - anchors[:, :2]) / (VARIANCES[0] * anchors[:, 2:])
    with np.errstate(divide="ignore"):
      size = np.log((m[:, 2:] - m[:, :2]) / anchors[:, 2:]) / VARIANCES[1]
    loc[b] = np.where(pos[:, None], np.concatenate([centre, size], -1), 0)
    cls[b] = np.where(pos, l[best_gt], 0)
  return loc, cls


def np_loss(loc_preds, cls_logits, loc_targets, cls_targets, ratio=3.0):
  loc_sum = cls_sum = 0.0
  num_pos_total = 0
  for b in range(cls_targets.shape[0]):
    pos = cls_targets[b] > 0
    num_pos = int(pos.sum())
    num_pos_total += num_pos
    d = np.abs(loc_preds[b][pos] - loc_targets[b][pos])
    loc_sum += np.sum(np.where(d < 1, 0.5 * d * d, d - 0.5))
    z = cls_logits[b] - cls_logits[b].max(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce = -log_p[np.arange(len(z)), cls_targets[b]]
    background = np.where(pos, -np.inf, -log_p[:, 0])
    k = min(int(ratio * num_pos), len(z) - num_pos)
    hard = np.argsort(-background, kind="stable")[:k]
    cls_sum += ce[pos].sum() + ce[hard].sum()
  n = max(1, num_pos_total)
  return (loc_sum + cls_sum) / n


def np_nms(boxes, iou_threshold):
  order, kept = np.arange(len(boxes)), []
  while len(order):
    i, order = order[0], order[1:]
    kept.append(i)
    order = order[np_iou(boxes[i:i + 1], boxes[order])[0] <= iou_threshold]
  return kept


def np_detect(loc_preds, cls_logits, anchors, score_threshold=0.01, nms_iou=0.45, top_k=200,
              pre_nms_top_k=200):
  batch = loc_preds.shape[0]
  out_boxes = np.zeros((batch, top_k, 4), np.float32)
  out_scores = np.zeros((batch, top_k), np.float32)
  out_classes = np.zeros((batch, top_k), np.int32)
  for b in range(batch):
    centre = anchors[:, :2] + loc_preds[b, :, :2] * VARIANCES[0] * anchors[:, 2:]
    size = anchors[:, 2:] * np.exp(loc_preds[b, :, 2:] * VARIANCES[1])
    boxes = np.concatenate([centre - size / 2, centre + size / 2], -1)
    z = np.exp(cls_logits[b] - cls_logits[b].max(-1, keepdims=True))
    probs = z / z.sum(-1, keepdims=True)
    found = []
    for c in range(1, probs.shape[1]):
      order = np.argsort(-probs[:, c], kind="stable")[:pre_nms_top_k]
      order = order[probs[order, c] >= score_threshold]
      for i in np_nms(boxes[order], nms_iou):
        found.append((-probs[order[i], c], c, order[i]))
    found.sort()
    for slot, (neg_score, c, a) in enumerate(found[:top_k]):
      out_boxes[b, slot], out_scores[b, slot], out_classes[b, slot] = boxes[a], -neg_score, c
  return out_boxes, out_scores, out_classes


# ---- timing ------------------------------------------------------------------------------------

def median_seconds(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def cpu_model():
  """'model name (avx512 flags, amx flags)' from /proc/cpuinfo, or the platform's word for it."""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return platform.processor() or platform.machine()
  model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                if line.startswith("model name")), platform.machine())
  flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                if line.startswith("flags")), [])
  wide = sorted({f for f in flags if f.startswith(("avx512", "amx"))})
  return f"{model} ({' '.join(wide) if wide else 'no avx512/amx'})"


def paired_median_seconds(fn, other, repeats):
  """(median of fn, median of other), timed alternately: fn, other, fn, other, ..."""
  times, other_times = [], []
  for _ in range(repeats):
    times.append(median_seconds(fn, 1))
    other_times.append(median_seconds(other, 1))
  return statistics.median(times), statistics.median(other_times)


def anchors_for(variant):
  c = common.base_config()
  variant(c)
  return anchor_lib.from_config(c.anchors, c.model.input_size_px)


def random_ground_truth(rng, batch, slots):
  xy = rng.uniform(0, 0.8, (batch, slots, 2))
  wh = rng.uniform(0.02, 0.4, (batch, slots, 2))
  boxes = np.concatenate([xy, np.minimum(xy + wh, 1.0)], -1).astype(np.float32)
  labels = rng.integers(1, 21, (batch, slots)).astype(np.int32)
  for b in range(batch):                                # 1..slots objects, the rest padding
    labels[b, rng.integers(1, slots + 1):] = 0
  boxes[labels == 0] = 0.0
  return boxes, labels


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--slots", default="50",
                      help="ground-truth slots per image; a comma-separated list runs each")
  parser.add_argument("--classes", type=int, default=20, help="object classes (+1 background)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--detect", type=int, default=1, help="0: skip the NMS row")
  parser.add_argument("--numpy", type=int, default=1,
                      help="0: check against NumPy once but time the JAX side only")
  parser.add_argument("--sequential", action="store_true",
                      help="also time the previous bipartite implementation (match_sequential.py)")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  rows = []

  match_jit = jax.jit(matching.match, static_argnames=("rule",))
  sequential_jit = jax.jit(match_sequential.match_sequential)
  loss_jit = jax.jit(losses.multibox_loss)

  @functools.partial(jax.jit, static_argnames=("rule", "sequential"))
  def match_and_loss(gt_boxes, gt_labels, anchors, loc_preds, cls_logits, rule="bipartite",
                     sequential=False):
    match_fn = match_sequential.match_sequential if sequential else matching.match
    loc_targets, cls_targets = match_fn(gt_boxes, gt_labels, anchors, rule=rule)
    return losses.multibox_loss(loc_preds, cls_logits, loc_targets, cls_targets)[0]

  settings = [(name, variant, int(slots)) for name, variant in
              (("MDSSD300", common.mdssd300), ("MDSSD512", common.mdssd512))
              for slots in args.slots.split(",")]
  for name, variant, num_slots in settings:
    anchors = anchors_for(variant)
    num_anchors = anchors.shape[0]
    gt_boxes, gt_labels = random_ground_truth(rng, args.batch, num_slots)
    loc_preds = rng.normal(0, 1, (args.batch, num_anchors, 4)).astype(np.float32)
    cls_logits = rng.normal(0, 1, (args.batch, num_anchors, args.classes + 1)).astype(np.float32)
    device_inputs = [jnp.asarray(x) for x in (gt_boxes, gt_labels, anchors, loc_preds, cls_logits)]

    # Agreement first: the same targets and the same loss.
    loc_t, cls_t = (np.asarray(x) for x in match_jit(*device_inputs[:3], rule="forced"))
    ref_loc_t, ref_cls_t = np_match(gt_boxes, gt_labels, anchors)
    assert np.array_equal(cls_t, ref_cls_t), "match disagrees with the NumPy reference"
    assert np.allclose(loc_t, ref_loc_t, atol=1e-3), "loc targets disagree"
    loss = float(match_and_loss(*device_inputs, rule="forced"))
    ref_loss = np_loss(loc_preds, cls_logits, ref_loc_t, ref_cls_t)
    assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss), (loss, ref_loss)

    loc_t_dev, cls_t_dev = jnp.asarray(loc_t), jnp.asarray(cls_t)
    jax.block_until_ready(loss_jit(device_inputs[3], device_inputs[4], loc_t_dev, cls_t_dev))
    cases = [
        ("match forced", lambda: match_jit(*device_inputs[:3], rule="forced"),
         lambda: np_match(gt_boxes, gt_labels, anchors)),
        ("match bipartite", lambda: match_jit(*device_inputs[:3], rule="bipartite"), None),
        ("loss", lambda: loss_jit(device_inputs[3], device_inputs[4], loc_t_dev, cls_t_dev),
         lambda: np_loss(loc_preds, cls_logits, ref_loc_t, ref_cls_t)),
        ("match forced + loss", lambda: match_and_loss(*device_inputs, rule="forced"),
         lambda: np_loss(loc_preds, cls_logits, *np_match(gt_boxes, gt_labels, anchors))),
        ("match bipartite + loss", lambda: match_and_loss(*device_inputs, rule="bipartite"), None),
    ]
    for case, jax_fn, np_fn in cases:
      np_fn = np_fn if args.numpy else None
      jax.block_until_ready(jax_fn())                 # compile outside the timing
      rows.append((f"{case}, {name} (A={num_anchors}, M={num_slots})",
                   median_seconds(jax_fn, args.repeats),
                   median_seconds(np_fn, args.repeats) if np_fn is not None else None, None))
      print("measured:", rows[-1], flush=True)          # a later failure keeps what was measured
    if args.sequential:
      # Bit-identical targets first (docs/matching.md: why they must be), then alternate the two.
      new_targets = match_jit(*device_inputs[:3], rule="bipartite")
      for new, old in zip(new_targets, sequential_jit(*device_inputs[:3])):
        assert np.array_equal(np.asarray(new), np.asarray(old)), "match != match_sequential"
      pairs = [
          ("match bipartite", lambda: match_jit(*device_inputs[:3], rule="bipartite"),
           lambda: sequential_jit(*device_inputs[:3])),
          ("match bipartite + loss", lambda: match_and_loss(*device_inputs, rule="bipartite"),
           lambda: match_and_loss(*device_inputs, rule="bipartite", sequential=True)),
      ]
      for case, jax_fn, previous_fn in pairs:
        jax.block_until_ready(previous_fn())
        now_s, previous_s = paired_median_seconds(jax_fn, previous_fn, args.repeats)
        rows.append((f"{case} today / previous, {name} (A={num_anchors}, M={num_slots})",
                     now_s, None, previous_s))
        print("measured:", rows[-1], flush=True)

  if args.detect:
    detect_row(args, rng, rows)
  print_table(args, rows)


def detect_row(args, rng, rows):
  """Times on-device NMS (postprocess.detect) against np_detect, after checking they agree."""
  anchors = anchors_for(common.ssd300)
  num_anchors = anchors.shape[0]
  loc_preds = rng.normal(0, 0.5, (args.batch, num_anchors, 4)).astype(np.float32)
  cls_logits = rng.normal(0, 1, (args.batch, num_anchors, args.classes + 1)).astype(np.float32)
  detect_jit = jax.jit(postprocess.detect)
  device_inputs = [jnp.asarray(x) for x in (loc_preds, cls_logits, anchors)]
  got = detect_jit(*device_inputs)
  ref_boxes, ref_scores, ref_classes = np_detect(loc_preds, cls_logits, anchors)
  assert np.array_equal(np.asarray(got["classes"]), ref_classes), "detect disagrees (classes)"
  assert np.allclose(np.asarray(got["scores"]), ref_scores, atol=1e-6), "detect disagrees (scores)"
  assert np.allclose(np.asarray(got["boxes"]), ref_boxes, atol=1e-5), "detect disagrees (boxes)"
  rows.append((f"detect, SSD300 (A={num_anchors}, {args.classes + 1} classes, random logits)",
               median_seconds(lambda: detect_jit(*device_inputs), args.repeats),
               median_seconds(lambda: np_detect(loc_preds, cls_logits, anchors), args.repeats), None))


def print_table(args, rows):
  print(f"batch {args.batch}; {cpu_model()}, {os.cpu_count()} CPU "
        f"cores, jax {jax.__version__} on {jax.devices()[0].platform}; median of {args.repeats} runs; "
        f"outputs of both sides checked equal; load average now {os.getloadavg()[0]:.1f} "
        f"(other work on a shared machine slows both sides)")
  width = max(len(r[0]) for r in rows)
  print(f"{'work':<{width}}  {'JAX jit ms':>10}  {'NumPy ms':>10}  {'speed-up':>8}  "
        f"{'previous ms':>11}  {'previous / today':>16}")
  for label, jax_s, np_s, previous_s in rows:
    numpy_cells = (f"{'-':>10}  {'-':>8}" if np_s is None else
                   f"{np_s * 1e3:>10.1f}  {np_s / jax_s:>7.1f}x")
    previous_cells = (f"{'-':>11}  {'-':>16}" if previous_s is None else
                      f"{previous_s * 1e3:>11.1f}  {previous_s / jax_s:>15.2f}x")
    print(f"{label:<{width}}  {jax_s * 1e3:>10.1f}  {numpy_cells}  {previous_cells}")


if __name__ == "__main__":
  main()
