"""The plots every evaluation writes (WORKDIR/plots/ and TensorBoard), from metrics/sizes.py's result.

Plots (matplotlib's Agg canvas, nothing shown on screen, pyplot's backend untouched):
  ap_by_size.png     AP of each size bucket (and mAP) against the training step
  pr_by_size.png     precision-recall curve per size bucket at the latest evaluation
  missed_by_size.png histogram of ground-truth sizes, found and missed, with the bucket edges
"""

import math
import os
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from mdssd_jax.metrics.sizes import AP_KEY_PREFIX, SIZE_BUCKETS_PX, check_size_buckets

PLOTS_DIR = "plots"


# ---------------------------------------------------------------------------------------------------
# Figures.
# ---------------------------------------------------------------------------------------------------

def new_figure(figsize, dpi):
  """(figure, axes) drawn by the Agg canvas: files and arrays only, never a window, and without
  pyplot's global backend, which a notebook showing its own plots must keep."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=figsize, dpi=dpi)
  FigureCanvasAgg(fig)
  return fig, fig.add_subplot()


def _colors(count):
  import matplotlib  # pylint: disable=g-import-not-at-top
  return matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, count))


def _bucket_label(name: str, lo: float, hi: float) -> str:
  return f"{name} (>= {lo:g} px)" if math.isinf(hi) else f"{name} ({lo:g}-{hi:g} px)"


def _finish(fig, path: Optional[str]) -> np.ndarray:
  """Saves `fig` to path (if any) and returns it as an (H, W, 3) uint8 RGB array."""
  fig.tight_layout()
  fig.canvas.draw()
  rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
  return rgb


def plot_ap_by_size(history: Sequence[Mapping[str, Any]], size_buckets=SIZE_BUCKETS_PX,
                    path: Optional[str] = None, overall_key: str = "mAP") -> np.ndarray:
  """AP of each size bucket (and the overall metric, dashed) against the step.

  Args:
    history: eval results, each with "step" and "AP_size/<bucket>" (and `overall_key`); results
      without a bucket's key leave a gap.
  Returns: the figure as (H, W, 3) uint8 RGB.
  """
  buckets = check_size_buckets(size_buckets, "size_buckets")
  rows = sorted((r for r in history if "step" in r), key=lambda r: r["step"])
  fig, ax = new_figure((7, 4.2), 100)
  colors = _colors(len(buckets))
  for (name, lo, hi), color in zip(buckets, colors):
    points = [(r["step"], r[AP_KEY_PREFIX + name]) for r in rows
              if r.get(AP_KEY_PREFIX + name) is not None and r[AP_KEY_PREFIX + name] == r[AP_KEY_PREFIX + name]]
    if points:
      steps, values = zip(*points)
      ax.plot(steps, values, "o-", color=color, label=_bucket_label(name, lo, hi))
  overall = [(r["step"], r[overall_key]) for r in rows if r.get(overall_key) is not None]
  if overall:
    steps, values = zip(*overall)
    ax.plot(steps, values, "k--", label=f"{overall_key} (all sizes)")
  ax.set_xlabel("training step")
  ax.set_ylabel("AP@0.5")
  ax.set_ylim(0.0, 1.0)
  ax.grid(alpha=0.3)
  ax.set_title("AP by object size (longer side)")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(loc="lower right", fontsize=8)
  else:
    ax.text(0.5, 0.5, "no evaluation with size buckets yet", ha="center", transform=ax.transAxes)
  return _finish(fig, path)


def plot_pr_by_size(result: Mapping[str, Any], step: int, size_buckets=SIZE_BUCKETS_PX,
                    path: Optional[str] = None) -> np.ndarray:
  """The precision-recall curve of each size bucket (all classes pooled) from `size_bucket_metrics`."""
  buckets = check_size_buckets(size_buckets, "size_buckets")
  fig, ax = new_figure((6, 4.5), 100)
  colors = _colors(len(buckets))
  for (name, lo, hi), color in zip(buckets, colors):
    pr = result["pr"].get(name)
    if pr is None or len(pr["recall"]) == 0:
      continue
    ap = result["AP"].get(name, float("nan"))
    ax.plot(pr["recall"], pr["precision"], color=color, label=f"{_bucket_label(name, lo, hi)}: AP {ap:.3f}, {result['num_gt'][name]} objects")
  ax.set_xlabel("recall")
  ax.set_ylabel("precision")
  ax.set_xlim(0.0, 1.0)
  ax.set_ylim(0.0, 1.02)
  ax.grid(alpha=0.3)
  ax.set_title(f"Precision-recall by object size, step {step}")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(loc="lower left", fontsize=8)
  return _finish(fig, path)


def plot_missed_by_size(result: Mapping[str, Any], step: int, size_buckets=SIZE_BUCKETS_PX,
                        path: Optional[str] = None, max_bins: int = 40) -> np.ndarray:
  """Histogram of ground-truth sizes: all objects and the missed ones, bucket edges marked."""
  buckets = check_size_buckets(size_buckets, "size_buckets")
  sizes = np.asarray(result["gt_sizes_px"], np.float64)
  missed = np.asarray(result["missed_sizes_px"], np.float64)
  fig, ax = new_figure((7, 4.2), 100)
  if len(sizes):
    top = float(sizes.max()) + 1.0
    width = max(1.0, math.ceil(top / max_bins))
    edges = np.arange(0.0, top + width, width)
    ax.hist(sizes, bins=edges, color="#9ecae1", label=f"all objects ({len(sizes)})")
    ax.hist(missed, bins=edges, color="#d62728", label=f"missed ({len(missed)})")
    for _, lo, _ in buckets[1:]:
      if lo < top:
        ax.axvline(lo, color="k", lw=0.8, ls=":")
    for name, lo, hi in buckets:
      centre = (lo + min(hi, top)) / 2
      if lo < top:
        ax.text(centre, 1.0, name, ha="center", va="bottom", fontsize=8,
                transform=ax.get_xaxis_transform())
    ax.legend(fontsize=8)
  else:
    ax.text(0.5, 0.5, "no ground truth", ha="center", transform=ax.transAxes)
  ax.set_xlabel("object size: longer side (px)")
  ax.set_ylabel("objects")
  ax.set_title(f"Missed objects by size, step {step}", pad=16)
  return _finish(fig, path)


def write_evaluation_plots(workdir: str, step: int, result: Mapping[str, Any],
                           history: Sequence[Mapping[str, Any]], size_buckets=SIZE_BUCKETS_PX,
                           writer=None, overall_key: str = "mAP") -> Dict[str, str]:
  """Writes the three plots to WORKDIR/plots/ (overwritten by each evaluation) and TensorBoard.

  Args:
    workdir: the run's folder.
    step: the evaluated step.
    result: `size_bucket_metrics` of this evaluation.
    history: every evaluation so far including this one (e.g. `read_eval_history`), for AP by step.
    writer: a clu MetricWriter or None; gets the figures as images "plots/<name>" at `step`.
  Returns:
    {name: path} of the PNG files.
  """
  directory = os.path.join(workdir, PLOTS_DIR)
  paths = {name: os.path.join(directory, f"{name}.png")
           for name in ("ap_by_size", "pr_by_size", "missed_by_size")}
  images = {
      "ap_by_size": plot_ap_by_size(history, size_buckets, paths["ap_by_size"], overall_key),
      "pr_by_size": plot_pr_by_size(result, step, size_buckets, paths["pr_by_size"]),
      "missed_by_size": plot_missed_by_size(result, step, size_buckets, paths["missed_by_size"]),
  }
  if writer is not None:
    writer.write_images(step, {f"plots/{name}": image[None] for name, image in images.items()})
  return paths
