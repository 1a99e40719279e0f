"""How well the default boxes cover a data set's ground truth, by object size.

For every ground-truth box (warped to the square input, as evaluation and training resize images):
the best IoU any default box reaches. Reported per bucket of the box's longer side in input pixels:
the count, the share whose best default box reaches the IoU threshold (a box below it is matched
only through the forced best-anchor rule, with a poor regression start), and the mean best IoU.
"""

from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import jax
import numpy as np

from mdssd_jax.core import boxes as box_lib

# Longer side in input pixels: COCO's small / medium / large split points (32, 96), applied to the
# resized input, where they say what the detector's feature maps see.
DEFAULT_BUCKETS = ((0.0, 32.0), (32.0, 96.0), (96.0, float("inf")))
# Elements of one (ground truths x default boxes) IoU block; bounds memory at a few hundred MB.
DEFAULT_BLOCK_ELEMENTS = 1 << 22


def _as_per_box(gt_boxes_px, image_sizes) -> Tuple[np.ndarray, np.ndarray]:
  """-> ((N, 4) pixels xyxy, (N, 2) (height, width) of each box's image)."""
  if isinstance(gt_boxes_px, (list, tuple)):
    sizes = np.asarray(image_sizes, np.float64).reshape(-1, 2)
    if len(sizes) != len(gt_boxes_px):
      raise ValueError(f"{len(gt_boxes_px)} per-image box arrays but {len(sizes)} image sizes; "
                       "give one (height, width) per image")
    counts = [np.asarray(b).reshape(-1, 4).shape[0] for b in gt_boxes_px]
    boxes = (np.concatenate([np.asarray(b, np.float64).reshape(-1, 4) for b in gt_boxes_px])
             if gt_boxes_px else np.zeros((0, 4)))
    return boxes, np.repeat(sizes, counts, axis=0)
  boxes = np.asarray(gt_boxes_px, np.float64).reshape(-1, 4)
  sizes = np.asarray(image_sizes, np.float64).reshape(-1, 2)
  if len(sizes) != len(boxes):
    raise ValueError(f"an (N, 4) box array needs (N, 2) image sizes, one per box; got {len(boxes)} "
                     f"boxes and {len(sizes)} sizes (or pass a list of per-image arrays)")
  return boxes, sizes


def best_iou_per_box(anchors_cxcywh: np.ndarray, gt_boxes_xyxy: np.ndarray,
                     block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> np.ndarray:
  """(N,) max over the A default boxes of IoU, in blocks of ground truths (jitted, float32).

  Args:
    anchors_cxcywh: (A, 4) centre form, normalised.
    gt_boxes_xyxy: (N, 4) corner form, normalised to the (square) input.
  """
  anchors_xyxy = box_lib.cxcywh_to_xyxy(np.asarray(anchors_cxcywh, np.float32))
  gt = np.asarray(gt_boxes_xyxy, np.float32).reshape(-1, 4)
  best = np.zeros(len(gt), np.float32)
  block = max(1, min(len(gt), block_elements // max(1, len(anchors_xyxy))))
  for lo in range(0, len(gt), block):
    part = gt[lo:lo + block]
    # Every block padded to the same shape: one compile per (block, A).
    padded = np.concatenate([part, np.zeros((block - len(part), 4), np.float32)])
    best[lo:lo + block] = np.asarray(_best_iou_block(padded, anchors_xyxy))[:len(part)]
  return best


@jax.jit
def _best_iou_block(gt_xyxy, anchors_xyxy):
  """(n, 4), (A, 4) corner form -> (n,) max IoU (`boxes.iou`)."""
  return box_lib.iou(gt_xyxy, anchors_xyxy).max(axis=1)


def _bucket_name(lo: float, hi: float) -> str:
  return f"[{lo:g}, {'inf' if np.isinf(hi) else f'{hi:g}'})"


def coverage_report(anchors_cxcywh: np.ndarray, gt_boxes_px, image_sizes, input_size_px: float,
                    buckets: Sequence[Tuple[float, float]] = DEFAULT_BUCKETS,
                    iou_threshold: float = 0.5,
                    block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> Dict[str, Any]:
  """Coverage of ground truth by default boxes, per size bucket.

  Args:
    anchors_cxcywh: (A, 4) default boxes, centre form, normalised (anchors.from_config).
    gt_boxes_px: a list of (N_i, 4) per image, or one (N, 4) array; corner form, original pixels.
    image_sizes: (num_images, 2) (height, width) for a list, else (N, 2) per box.
    input_size_px: S; images are warped to S x S, so a box's input size is (w * S / W, h * S / H).
    buckets: (lo, hi) ranges of the longer side in input pixels, or (name, lo, hi) as
      config.eval.size_buckets_px (`buckets_from_config`); unnamed rows are named by their range.
    iou_threshold: "covered" means the best default box reaches (>=) this IoU.
  Returns:
    {"buckets": [{"name", "range", "count", "covered_share", "mean_best_iou"}, ...] with an "all"
    row first, "iou_threshold", "num_default_boxes", "longer_side_px" (N,), "best_iou" (N,)}.
    Shares and means are NaN for an empty bucket.
  """
  boxes, sizes = _as_per_box(gt_boxes_px, image_sizes)
  scale = np.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], axis=1)
  normalised = boxes / scale
  longer = np.maximum(normalised[:, 2] - normalised[:, 0], normalised[:, 3] - normalised[:, 1]) * input_size_px
  best = best_iou_per_box(anchors_cxcywh, normalised, block_elements)
  rows = []
  named = [(_bucket_name(*b[-2:]) if len(b) == 2 else f"{b[0]} {_bucket_name(*b[1:])}", tuple(b[-2:]))
           for b in buckets]
  for name, (lo, hi) in [("all", (0.0, float("inf")))] + named:
    inside = (longer >= lo) & (longer < hi)
    count = int(np.sum(inside))
    rows.append({"name": name, "range": (float(lo), float(hi)), "count": count,
                 "covered_share": float(np.mean(best[inside] >= iou_threshold)) if count else float("nan"),
                 "mean_best_iou": float(np.mean(best[inside])) if count else float("nan")})
  return {"buckets": rows, "iou_threshold": float(iou_threshold),
          "num_default_boxes": int(len(anchors_cxcywh)), "longer_side_px": longer, "best_iou": best}


def format_table(report: Mapping[str, Any]) -> str:
  """A plain-text table of `coverage_report`'s buckets."""
  thr = report["iou_threshold"]
  lines = [f"default boxes: {report['num_default_boxes']}; longer side in input pixels",
           f"{'size':<18} {'boxes':>8} {f'best IoU >= {thr:g}':>16} {'mean best IoU':>14}"]
  for row in report["buckets"]:
    share = "-" if row["count"] == 0 else f"{100 * row['covered_share']:.1f}%"
    mean = "-" if row["count"] == 0 else f"{row['mean_best_iou']:.3f}"
    lines.append(f"{row['name']:<18} {row['count']:>8d} {share:>16} {mean:>14}")
  return "\n".join(lines)


def plot_coverage(report: Mapping[str, Any], path: str) -> str:
  """Best IoU against the box's longer side (log scale), with bucket borders; written as PNG."""
  from mdssd_jax.report import plots  # pylint: disable=g-import-not-at-top  (matplotlib only when plotting)
  fig, ax = plots.new_figure((7, 4.5), 110)
  draw_coverage(ax, report)
  fig.tight_layout()
  fig.savefig(path)
  return path


def draw_coverage(ax, report: Mapping[str, Any], prefix: str = ""):
  """`plot_coverage`'s scatter on a matplotlib Axes; `prefix` starts the title."""
  longer = np.maximum(report["longer_side_px"], 1e-3)
  ax.scatter(longer, report["best_iou"], s=3, alpha=0.3)
  ax.axhline(report["iou_threshold"], color="red", linewidth=1, label=f"IoU {report['iou_threshold']:g}")
  for row in report["buckets"][1:]:
    lo = row["range"][0]
    if lo > 0:
      ax.axvline(lo, color="gray", linestyle="--", linewidth=0.8)
  ax.set_xscale("log")
  ax.set_xlabel("longer side of the ground-truth box in input pixels")
  ax.set_ylabel("best IoU with any default box")
  ax.set_ylim(0, 1)
  ax.legend(loc="lower right")
  ax.set_title(prefix + "; ".join(f"{r['name']}: {100 * r['covered_share']:.0f}%" for r in report["buckets"]
                                  if r["count"]), fontsize=8)


def boxes_from_batches(batches: Iterable[Mapping[str, Any]],
                       max_images: int = 0) -> Tuple[List[np.ndarray], np.ndarray]:
  """Ground truth of eval batches -> (per-image (N_i, 4) pixel boxes, (num_images, 2) (h, w)).

  Uses boxes (normalised to the original image), labels (0 = padding), orig_size and batch_mask;
  max_images > 0 stops after that many images.
  """
  boxes, sizes = [], []
  for batch in batches:
    mask = np.asarray(batch.get("batch_mask", np.ones(len(batch["orig_size"]), bool)), bool)
    for i in np.flatnonzero(mask).tolist():
      h, w = np.asarray(batch["orig_size"][i], np.float64)
      keep = np.asarray(batch["labels"][i]) > 0
      boxes.append(np.asarray(batch["boxes"][i], np.float64)[keep] * np.array([w, h, w, h]))
      sizes.append((h, w))
      if max_images and len(boxes) >= max_images:
        return boxes, np.asarray(sizes)
  return boxes, np.asarray(sizes, np.float64).reshape(-1, 2)


def buckets_from_config(config) -> Tuple[Tuple[str, float, float], ...]:
  """config.eval.size_buckets_px (the project's size buckets) as ((name, lo, hi), ...)."""
  return tuple((str(n), float(lo), float(hi)) for n, lo, hi in config.eval.size_buckets_px)


def coverage_for_config(config, max_images=None, plot_path=None):
  """`--mode=coverage`: the coverage table of a config's default boxes over its training split."""
  from mdssd_jax import models  # pylint: disable=g-import-not-at-top  (flax; only this entry point)
  from mdssd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  _, anchors = models.build_detector(config)
  gt_boxes, image_sizes = boxes_from_batches(pipeline.make_eval_batches(
      config, split=config.data.train_split, max_images=max_images or 0))
  report = coverage_report(anchors, gt_boxes, image_sizes, input_size_px=config.model.input_size_px,
                           buckets=buckets_from_config(config),
                           iou_threshold=float(config.loss.iou_threshold))
  if plot_path:
    plot_coverage(report, plot_path)
  return format_table(report)
