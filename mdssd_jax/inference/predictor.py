"""The one prediction path: a trained detector on image arrays, whole-image or tiled.

`make_predict_fn` is the jitted forward + decode + NMS that evaluation, `--mode=predict` and the
export all run. `LocalPredictor` runs it on this process's devices (no collectives: each process may
handle a different number of images or tiles). Tiled inference keeps small objects at their real
pixel size on large images (TT100K's 2048 px photos): tiles of the model's input size with a given
overlap cover the image, the last one flush with the border; tile detections are shifted to image
pixels and merged with class-wise NMS.

Both paths call one `predict_fn(images_uint8 (N, S, S, 3)) -> {boxes (N, K, 4) xyxy normalised,
scores (N, K), classes (N, K) 1..C, valid (N, K)}`; N is always `batch_size` (short batches are
padded), so the function compiles once.
"""

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from mdssd_jax.core import boxes as box_lib
from mdssd_jax.core import images
from mdssd_jax.core import multihost
from mdssd_jax.core import pixels
from mdssd_jax.core import postprocess

PredictFn = Callable[[np.ndarray], Mapping[str, Any]]

# How close (px) a box edge must come to a tile's inner border to count as cut by it: regressed
# boxes of a cut object end about on the border, not exactly.
DEFAULT_EDGE_TOLERANCE_PX = 2.0


def make_predict_fn(model, anchors_cxcywh, config, convention, top_k_fn=None):
  """(variables, uint8 images (B, S, S, 3)) -> postprocess.detect's fixed-size detections.

  The pixel normalisation of the weights' convention runs inside, so callers pass raw uint8 RGB.
  top_k_fn: see postprocess.detect (None: jax.lax.top_k).
  """
  anchors = jnp.asarray(anchors_cxcywh, jnp.float32)
  compute_dtype = jnp.dtype(config.model.dtype)

  def predict(variables, images_uint8):
    images = pixels.normalize(images_uint8, convention, compute_dtype)
    loc_preds, cls_logits = model.apply(variables, images, train=False)
    return postprocess.detect(loc_preds, cls_logits, anchors,
                              score_threshold=config.eval.score_threshold,
                              nms_iou=config.eval.nms_iou, top_k=config.eval.top_k,
                              pre_nms_top_k=config.eval.pre_nms_top_k,
                              variances=tuple(config.anchors.variances), top_k_fn=top_k_fn)

  return predict


class LocalPredictor:
  """uint8 images (N, S, S, 3) -> NumPy detections, on this process's devices alone.

  The jitted function is built once (variables are an argument, so new weights never recompile);
  N must be a multiple of the local device count and is split over the local devices. No
  collective runs, so processes never wait for each other (tiles of large pictures, image files).
  """

  def __init__(self, model, anchors_cxcywh, config, convention):
    devices = np.asarray(jax.local_devices())
    mesh = jax.sharding.Mesh(devices, ("data",))
    self._replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self._split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    self._num_devices = len(devices)
    self._predict = jax.jit(make_predict_fn(model, anchors_cxcywh, config, convention))
    self._variables = None

  def set_variables(self, variables):
    """Copies (replicated, possibly global) variables to this process's devices."""
    local = jax.tree_util.tree_map(
        lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, variables)
    self._variables = jax.device_put(local, self._replicated)
    return self

  def __call__(self, images_uint8):
    if self._variables is None:
      raise RuntimeError("LocalPredictor.set_variables must be called before predicting")
    images = np.asarray(images_uint8, np.uint8)
    if len(images) % self._num_devices:
      raise ValueError(f"{len(images)} images cannot be split over {self._num_devices} local "
                       "devices; config.eval.batch_size must be a multiple of the local device count")
    out = self._predict(self._variables, jax.device_put(images, self._split))
    return {k: np.asarray(v) for k, v in jax.device_get(out).items()}


def mesh_batch_predict(jitted_predict_fn, variables, mesh) -> Callable[[Mapping[str, Any]], Dict]:
  """eval batch -> this process's detections, the batch's images split over `mesh`'s data axis.

  jitted_predict_fn: jax.jit(make_predict_fn(...)); variables: replicated over `mesh`. Each process
  passes its own images (batch["image"], uint8 (B, S, S, 3)) and gets its own rows back.
  """
  spec = jax.sharding.PartitionSpec(multihost.DATA_AXIS)
  sharding = jax.sharding.NamedSharding(mesh, spec)

  def predict(batch):
    images = jax.make_array_from_process_local_data(sharding, np.asarray(batch["image"]))
    return multihost_utils.global_array_to_host_local_array(
        jitted_predict_fn(variables, images), mesh, spec)

  return predict


def tile_origins(length_px: int, tile_px: int, overlap_px: int) -> List[int]:
  """Start coordinates of tiles covering [0, length_px): stride tile - overlap, the last flush.

  An image shorter than a tile gets one tile at 0 (padded by the caller).
  """
  if not 0 <= overlap_px < tile_px:
    raise ValueError(f"tile overlap {overlap_px} px must be in [0, tile size {tile_px} px); set "
                     "config.eval.tiled.overlap_px")
  if length_px <= tile_px:
    return [0]
  stride = tile_px - overlap_px
  return list(range(0, length_px - tile_px, stride)) + [length_px - tile_px]


def _run_batched(predict_fn: PredictFn, images: np.ndarray, batch_size: int) -> Dict[str, np.ndarray]:
  """predict_fn over (N, S, S, 3) in fixed batches of batch_size (the last padded with black)."""
  out: Dict[str, List[np.ndarray]] = {}
  for lo in range(0, len(images), batch_size):
    chunk = images[lo:lo + batch_size]
    real = len(chunk)
    if real < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - real,) + chunk.shape[1:], np.uint8)])
    dets = predict_fn(chunk)
    for key in ("boxes", "scores", "classes", "valid"):
      out.setdefault(key, []).append(np.asarray(dets[key])[:real])
  return {k: np.concatenate(v) for k, v in out.items()}


def class_wise_nms(boxes_px: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                   iou_threshold: float, top_k: int) -> np.ndarray:
  """Greedy NMS per class; returns indices of the kept boxes, best score first, at most top_k.

  Ties in score: the lower index ranks first.
  """
  order = np.lexsort((np.arange(len(scores)), -np.asarray(scores)))
  suppressed = np.zeros(len(scores), bool)
  keep = []
  for label in np.unique(classes).tolist():
    members = order[classes[order] == label]
    for pos, i in enumerate(members.tolist()):
      if suppressed[i]:
        continue
      keep.append(i)
      rest = members[pos + 1:]
      overlap = box_lib.iou(boxes_px[i][None], boxes_px[rest])[0]
      suppressed[rest[overlap > iou_threshold]] = True
  keep = np.asarray(keep, np.int64)
  keep = keep[np.lexsort((keep, -np.asarray(scores)[keep]))] if len(keep) else keep
  return keep[:top_k]


def tiled_detect(predict_tiles_fn: PredictFn, image_uint8: np.ndarray, tile_size_px: int,
                 overlap_px: int, nms_iou: float, top_k: int, batch_size: int,
                 drop_cut_boxes: bool = True,
                 edge_tolerance_px: float = DEFAULT_EDGE_TOLERANCE_PX) -> Dict[str, np.ndarray]:
  """Detections on a large image from tiles of the model's input size.

  Args:
    predict_tiles_fn: tiles uint8 (N, S, S, 3) -> normalised detections per tile (see module doc).
    image_uint8: (H, W, 3) uint8 RGB; a side shorter than S is padded with black.
    tile_size_px: S, the model's input size.
    overlap_px: overlap of neighbouring tiles; objects up to this size are whole in some tile.
    nms_iou: IoU above which the lower-scored of two same-class boxes is dropped (across tiles).
    top_k: the most detections kept.
    batch_size: tiles per predict_tiles_fn call.
    drop_cut_boxes: drop a box that touches a tile border inside the image (within
      edge_tolerance_px) and is narrower than overlap_px across it: that object is whole in the
      neighbouring tile, and the cut box would survive NMS as a second, partial detection.
  Returns:
    dict boxes_px (K, 4) xyxy image pixels, scores (K,), classes (K,) int32, best first.
  """
  image = np.asarray(image_uint8, np.uint8)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"tiled_detect needs an (H, W, 3) uint8 image, got shape {image.shape}")
  height, width = image.shape[:2]
  size = tile_size_px
  xs = tile_origins(width, size, overlap_px)
  ys = tile_origins(height, size, overlap_px)
  origins = np.array([(x, y) for y in ys for x in xs], np.float32)
  tiles = np.zeros((len(origins), size, size, 3), np.uint8)
  for t, (x, y) in enumerate(origins.astype(int)):
    crop = image[y:y + size, x:x + size]
    tiles[t, :crop.shape[0], :crop.shape[1]] = crop
  dets = _run_batched(predict_tiles_fn, tiles, batch_size)
  shift = np.concatenate([origins, origins], axis=1)[:, None, :]              # (T, 1, 4)
  boxes = np.asarray(dets["boxes"], np.float32) * size + shift               # (T, K, 4) image px
  keep = np.asarray(dets["valid"], bool)
  if drop_cut_boxes:
    x0, y0 = origins[:, 0:1], origins[:, 1:2]                                 # (T, 1)
    cut = np.zeros_like(keep)
    box_w = boxes[..., 2] - boxes[..., 0]
    box_h = boxes[..., 3] - boxes[..., 1]
    # Inner borders only: a tile side on the image border cuts nothing.
    cut |= (x0 > 0) & (boxes[..., 0] <= x0 + edge_tolerance_px) & (box_w < overlap_px)
    cut |= (x0 + size < width) & (boxes[..., 2] >= x0 + size - edge_tolerance_px) & (box_w < overlap_px)
    cut |= (y0 > 0) & (boxes[..., 1] <= y0 + edge_tolerance_px) & (box_h < overlap_px)
    cut |= (y0 + size < height) & (boxes[..., 3] >= y0 + size - edge_tolerance_px) & (box_h < overlap_px)
    keep &= ~cut
  boxes = boxes[keep]
  boxes = np.clip(boxes, 0, np.array([width, height, width, height], np.float32))
  scores = np.asarray(dets["scores"], np.float32)[keep]
  classes = np.asarray(dets["classes"], np.int32)[keep]
  kept = class_wise_nms(boxes, scores, classes, nms_iou, top_k)
  return dict(boxes_px=boxes[kept], scores=scores[kept], classes=classes[kept])


def tiled_batch_detect(predict_tiles_fn: PredictFn, original_images: Sequence[Optional[np.ndarray]],
                       config) -> Dict[str, np.ndarray]:
  """Tiled detection of each original image of an eval batch (None = padding example).

  Returns the fixed-size arrays of `postprocess.detect` (boxes normalised to each original image),
  so evaluation handles tiled and whole-image detections alike.
  """
  top_k = config.eval.top_k
  size = len(original_images)
  out = dict(boxes=np.zeros((size, top_k, 4), np.float32), scores=np.zeros((size, top_k), np.float32),
             classes=np.zeros((size, top_k), np.int32), valid=np.zeros((size, top_k), bool))
  for i, image in enumerate(original_images):
    if image is None:
      continue
    found = tiled_detect(predict_tiles_fn, image, config.model.input_size_px,
                         config.eval.tiled.overlap_px, config.eval.nms_iou, top_k,
                         config.eval.batch_size)
    n = len(found["scores"])
    height, width = image.shape[:2]
    out["boxes"][i, :n] = box_lib.scale_xyxy(found["boxes_px"], 1.0 / width, 1.0 / height)
    out["scores"][i, :n], out["classes"][i, :n], out["valid"][i, :n] = (
        found["scores"], found["classes"], True)
  return out


def whole_image_detect(predict_fn: PredictFn, images_uint8: Sequence[np.ndarray], input_size_px: int,
                       batch_size: int) -> List[Dict[str, np.ndarray]]:
  """Each image warped to S x S (as in evaluation), detections scaled back to its pixels."""
  inputs = np.stack([images.eval_transform(im, input_size_px) for im in images_uint8])
  dets = _run_batched(predict_fn, inputs, batch_size)
  out = []
  for i, im in enumerate(images_uint8):
    h, w = im.shape[:2]
    keep = np.asarray(dets["valid"][i], bool)
    out.append(dict(boxes_px=box_lib.scale_xyxy(np.asarray(dets["boxes"][i], np.float32)[keep], w, h),
                    scores=np.asarray(dets["scores"][i], np.float32)[keep],
                    classes=np.asarray(dets["classes"][i], np.int32)[keep]))
  return out
