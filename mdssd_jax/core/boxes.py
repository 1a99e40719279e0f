"""Box formats, pairwise IoU and the SSD offset encoding, for NumPy and JAX arrays alike.

Corner form `xyxy` = (x1, y1, x2, y2); centre form `cxcywh` = (cx, cy, w, h); both normalised to
[0, 1] unless a name says `_px`. Every function picks its array module from its inputs, so the host
(NumPy) and the device (jnp, under jit) share one definition.
"""

import jax
import jax.numpy as jnp
import numpy as np

# SSD's variances (docs/matching.md): centre offsets are divided by 0.1, log sizes by 0.2.
DEFAULT_VARIANCES = (0.1, 0.2)


def _xp(*arrays):
  """The array module for `arrays`: jnp if any is a JAX array (or tracer), else np."""
  if any(isinstance(a, jax.Array) for a in arrays):
    return jnp
  return np


def _split(boxes, xp):
  """The four coordinates of (..., 4) boxes as four (...,) arrays."""
  boxes = xp.asarray(boxes)
  return boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]


def xyxy_to_cxcywh(boxes_xyxy):
  """(..., 4) corner form -> (..., 4) centre form."""
  xp = _xp(boxes_xyxy)
  x1, y1, x2, y2 = _split(boxes_xyxy, xp)
  return xp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def cxcywh_to_xyxy(boxes_cxcywh):
  """(..., 4) centre form -> (..., 4) corner form."""
  xp = _xp(boxes_cxcywh)
  cx, cy, w, h = _split(boxes_cxcywh, xp)
  return xp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def scale_xyxy(boxes_xyxy, scale_x, scale_y):
  """(..., 4) corner-form boxes with x multiplied by scale_x and y by scale_y.

  The scales broadcast against boxes[..., 0]: scalars, or e.g. (B, 1) per image for (B, K, 4)
  boxes. Normalised -> pixels: scale by (width, height); pixels -> normalised: by (1/width, 1/height).
  """
  xp = _xp(boxes_xyxy, scale_x, scale_y)
  boxes = xp.asarray(boxes_xyxy)
  sx = xp.asarray(scale_x, boxes.dtype)
  sy = xp.asarray(scale_y, boxes.dtype)
  return boxes * xp.stack(xp.broadcast_arrays(sx, sy, sx, sy), axis=-1)


def area(boxes_xyxy):
  """(..., 4) corner form -> (...,) area; boxes with x2 < x1 or y2 < y1 have area 0 (not negative)."""
  xp = _xp(boxes_xyxy)
  x1, y1, x2, y2 = _split(boxes_xyxy, xp)
  return xp.maximum(x2 - x1, 0) * xp.maximum(y2 - y1, 0)


def iou(a_xyxy, b_xyxy):
  """Pairwise intersection over union.

  Args:
    a_xyxy: (..., N, 4) corner form.
    b_xyxy: (..., M, 4) corner form; leading dimensions broadcast against `a_xyxy`'s.
  Returns:
    (..., N, M) IoU in [0, 1]. A pair whose union is empty (two zero-area boxes) has IoU 0, not NaN,
    and the gradient stays finite there too.
  """
  xp = _xp(a_xyxy, b_xyxy)
  a = xp.asarray(a_xyxy)[..., :, None, :]
  b = xp.asarray(b_xyxy)[..., None, :, :]
  inter_w = xp.maximum(xp.minimum(a[..., 2], b[..., 2]) - xp.maximum(a[..., 0], b[..., 0]), 0)
  inter_h = xp.maximum(xp.minimum(a[..., 3], b[..., 3]) - xp.maximum(a[..., 1], b[..., 1]), 0)
  inter = inter_w * inter_h
  union = area(a) + area(b) - inter
  nonempty = union > 0
  # Divide by 1 where the union is empty, so neither the value nor its gradient becomes NaN.
  return xp.where(nonempty, inter / xp.where(nonempty, union, 1), 0)


def encode(boxes_xyxy, anchors_cxcywh, variances=DEFAULT_VARIANCES):
  """Corner-form boxes -> SSD offsets against centre-form default boxes.

  Args:
    boxes_xyxy: (..., A, 4) corner form, one box per default box. Width and height must be > 0
      (log of the size ratio); `matching.match` never encodes anything else.
    anchors_cxcywh: (A, 4) centre form (or broadcastable to `boxes_xyxy`).
    variances: (centre, size) scales.
  Returns:
    (..., A, 4) offsets ((g_c - d_c) / (v0 * d_wh), log(g_wh / d_wh) / v1).
  """
  xp = _xp(boxes_xyxy, anchors_cxcywh)
  g = xyxy_to_cxcywh(xp.asarray(boxes_xyxy))
  d = xp.asarray(anchors_cxcywh)
  centre = (g[..., :2] - d[..., :2]) / (variances[0] * d[..., 2:])
  size = xp.log(g[..., 2:] / d[..., 2:]) / variances[1]
  return xp.concatenate([centre, size], axis=-1)


def decode(deltas, anchors_cxcywh, variances=DEFAULT_VARIANCES, max_log_scale=None):
  """SSD offsets -> corner-form boxes; the inverse of `encode`.

  Args:
    deltas: (..., A, 4) offsets as `encode` makes them.
    anchors_cxcywh: (A, 4) centre form.
    variances: (centre, size) scales.
    max_log_scale: if not None, log(w / d_w) and log(h / d_h) are clipped to at most this, so a
      wild prediction cannot overflow exp() into an infinite box (and NaN IoUs in NMS).
  Returns:
    (..., A, 4) corner form.
  """
  xp = _xp(deltas, anchors_cxcywh)
  deltas = xp.asarray(deltas)
  d = xp.asarray(anchors_cxcywh)
  centre = d[..., :2] + deltas[..., :2] * variances[0] * d[..., 2:]
  log_scale = deltas[..., 2:] * variances[1]
  if max_log_scale is not None:
    log_scale = xp.minimum(log_scale, max_log_scale)
  size = d[..., 2:] * xp.exp(log_scale)
  return cxcywh_to_xyxy(xp.concatenate([centre, size], axis=-1))
