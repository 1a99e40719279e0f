"""SSD default boxes (priors) from a spec of feature maps, steps, sizes and aspect ratios.

The order is the one every public SSD checkpoint assumes (docs/default_boxes.md): layers finest
first, cells row-major, and inside a cell: the square of side s_k, the square of side
sqrt(s_k * s'_k), then for each ratio r the box (s_k*sqrt(r), s_k/sqrt(r)) and its transpose.
"""

import math
from typing import Sequence

import numpy as np


def num_boxes_per_cell(aspect_ratios):
  """Default boxes per cell for one layer's ratios: 2 squares + 2 per ratio. E.g. (2, 3) -> 6."""
  return 2 + 2 * len(tuple(aspect_ratios))


def _check_spec(image_size, feature_sizes, steps, min_sizes, max_sizes, aspect_ratios):
  """Raises ValueError naming the problem if the default-box spec is inconsistent."""
  if isinstance(image_size, (tuple, list)) or not image_size > 0:
    raise ValueError(f"image_size must be one positive number (square input), got {image_size!r}")
  lengths = dict(feature_sizes=len(feature_sizes), steps=len(steps), min_sizes=len(min_sizes),
                 max_sizes=len(max_sizes), aspect_ratios=len(aspect_ratios))
  if len(set(lengths.values())) != 1:
    raise ValueError(f"the default-box spec needs one entry per head layer in every list; got "
                     f"lengths {lengths}: make them agree")
  if not feature_sizes:
    raise ValueError("the default-box spec has no layers: give at least one feature size")
  for k, (f, step, s_min, s_max, ratios) in enumerate(
      zip(feature_sizes, steps, min_sizes, max_sizes, aspect_ratios)):
    if int(f) != f or f < 1:
      raise ValueError(f"layer {k}: feature size must be a positive integer, got {f!r}")
    if not step > 0:
      raise ValueError(f"layer {k}: step must be > 0 pixels, got {step!r}")
    if not 0 < s_min < s_max:
      raise ValueError(f"layer {k}: need 0 < min_size < max_size (pixels), got min_size={s_min!r}, "
                       f"max_size={s_max!r}")
    if isinstance(ratios, (int, float)):
      raise ValueError(f"layer {k}: aspect_ratios must be a sequence per layer, e.g. (2,) or (2, 3), "
                       f"got {ratios!r}")
    for r in ratios:
      if not r > 0 or r == 1:
        raise ValueError(f"layer {k}: aspect ratio {r!r} must be > 0 and != 1 (the squares are "
                         f"always included)")


def _cell_sizes(image_size, s_min, s_max, ratios):
  """(boxes per cell, 2) widths and heights of one layer's cell, normalised, in the order above."""
  s_k = s_min / image_size
  s_prime = math.sqrt(s_min * s_max) / image_size
  sizes = [(s_k, s_k), (s_prime, s_prime)]
  for r in ratios:
    root = math.sqrt(r)
    sizes += [(s_k * root, s_k / root), (s_k / root, s_k * root)]
  return np.asarray(sizes, np.float64)


def default_boxes(image_size: float, feature_sizes: Sequence[int], steps: Sequence[float],
                  min_sizes: Sequence[float], max_sizes: Sequence[float],
                  aspect_ratios: Sequence[Sequence[float]], clip: bool = False) -> np.ndarray:
  """All default boxes of a detector.

  Args:
    image_size: input side in pixels (square input).
    feature_sizes: side of each head's (square) feature map, finest first, e.g. (38, 19, ...).
    steps: pixels between neighbouring cell centres, per layer.
    min_sizes, max_sizes: s_k and s_{k+1} in pixels, per layer.
    aspect_ratios: per layer, the ratios r besides 1 (each gives a box and its transpose).
    clip: clip every (cx, cy, w, h) value to [0, 1] (ssd.pytorch does; the final Caffe SSD does not).
  Returns:
    np.float32 (A, 4) centre form (cx, cy, w, h), normalised by image_size, A = sum over layers of
    feature_size**2 * num_boxes_per_cell(ratios).
  """
  _check_spec(image_size, feature_sizes, steps, min_sizes, max_sizes, aspect_ratios)
  layers = []
  for f, step, s_min, s_max, ratios in zip(feature_sizes, steps, min_sizes, max_sizes,
                                           aspect_ratios):
    f = int(f)
    centres_1d = (np.arange(f, dtype=np.float64) + 0.5) * step / image_size
    cy, cx = np.meshgrid(centres_1d, centres_1d, indexing="ij")   # row i is y, column j is x
    centres = np.stack([cx.ravel(), cy.ravel()], axis=-1)         # (f*f, 2), row-major cells
    sizes = _cell_sizes(image_size, s_min, s_max, ratios)         # (P, 2)
    num_cells, per_cell = centres.shape[0], sizes.shape[0]
    layer = np.concatenate([np.repeat(centres[:, None, :], per_cell, axis=1),
                            np.broadcast_to(sizes[None], (num_cells, per_cell, 2))], axis=-1)
    layers.append(layer.reshape(-1, 4))
  out = np.concatenate(layers, axis=0)
  if clip:
    out = np.clip(out, 0.0, 1.0)
  return out.astype(np.float32)


def from_config(anchors_cfg, image_size: float) -> np.ndarray:
  """`default_boxes` from a config's `anchors` section (configs/common.py) and the input size."""
  missing = [key for key in ("feature_sizes", "steps", "min_sizes", "max_sizes", "aspect_ratios")
             if key not in anchors_cfg]
  if missing:
    raise ValueError(f"config.anchors lacks {missing}: see configs/common.py for the keys")
  return default_boxes(image_size, tuple(anchors_cfg["feature_sizes"]), tuple(anchors_cfg["steps"]),
                       tuple(anchors_cfg["min_sizes"]), tuple(anchors_cfg["max_sizes"]),
                       tuple(anchors_cfg["aspect_ratios"]),
                       clip=bool(anchors_cfg.get("clip", False)))


def num_default_boxes(feature_sizes, aspect_ratios) -> int:
  """A, the number of default boxes, without building them."""
  return sum(int(f) ** 2 * num_boxes_per_cell(r) for f, r in zip(feature_sizes, aspect_ratios))
