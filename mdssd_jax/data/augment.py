"""Caffe SSD's training augmentation and the eval resize, one example at a time (NumPy + OpenCV).

Stages, in the order `train_transform` applies them (docs/augmentation.md): photometric distortion,
expand (zoom out), random IoU crop, horizontal flip, resize (warp). Every stage is a small public
function so it can be tested and benchmarked on its own. All randomness comes from the
`np.random.Generator` passed in, so an example's augmentation is a pure function of its seed.

Formats: images are uint8 (H, W, 3) RGB; boxes are float (N, 4) corner form (x1, y1, x2, y2),
normalised to the image they belong to; labels are int (N,) 1..C. N may be 0.
"""

from typing import Any, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

from mdssd_jax.core import images

# Default canvas colour of `expand`: the ImageNet mean pixel, RGB, on the 0..255 scale (the mean of
# configs/common.py IMAGENET_RGB times 255). Caffe fills with its BGR mean pixel (104, 117, 123).
IMAGENET_MEAN_RGB_255 = (123.675, 116.28, 103.53)

# Names accepted by `resize` and the `resize_interpolations` config key.
DEFAULT_INTERPOLATIONS = ("linear",)

# `augment.crop_sampler`: "caffe" runs every sampler and picks one of the successes (Caffe SSD's
# batch_sampler); "single_mode" draws one sampler and keeps the whole image when it fails.
CROP_SAMPLERS = ("caffe", "single_mode")
# `augment.hue_overflow`: what happens to a hue pushed past 0 or 360 degrees (docs/augmentation.md).
HUE_OVERFLOWS = ("caffe", "wrap")

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_BELOW_360 = float(np.nextafter(360.0, 0.0))  # cv2.threshold keeps values > thresh: this keeps >= 360


# ---- input checks ------------------------------------------------------------------------------

def _as_boxes(boxes_xyxy: Any, where: str) -> np.ndarray:
  """(N, 4) float64 copy, clipped to [0, 1]: the caller clips, but a stray 1.0000001 must not crash us."""
  boxes = np.asarray(boxes_xyxy, dtype=np.float64)
  if boxes.size == 0:
    boxes = boxes.reshape(0, 4)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f"{where}: boxes_xyxy must have shape (N, 4), got {boxes.shape}.")
  if not np.all(np.isfinite(boxes)):
    raise ValueError(f"{where}: boxes_xyxy contains NaN or inf; fix the annotation source.")
  return np.clip(boxes, 0.0, 1.0)


def _as_labels(labels: Any, num_boxes: int, where: str) -> np.ndarray:
  labels = np.asarray(labels).reshape(-1).astype(np.int32)
  if labels.shape[0] != num_boxes:
    raise ValueError(f"{where}: {labels.shape[0]} labels for {num_boxes} boxes; they must be equal.")
  return labels


def _check_range(name: str, value: Sequence[float], lowest: float, highest: float) -> Tuple[float, float]:
  low, high = float(value[0]), float(value[1])
  if not lowest <= low <= high <= highest:
    raise ValueError(f"augment.{name} = {tuple(value)} must be (low, high) with "
                     f"{lowest} <= low <= high <= {highest}.")
  return low, high


# ---- 1. photometric distortion -----------------------------------------------------------------

def photometric_distort(image: np.ndarray, rng: np.random.Generator, *, prob: float,
                        brightness_delta: float, contrast_range: Sequence[float],
                        saturation_range: Sequence[float], hue_delta_deg: float,
                        channel_swap_prob: float, hue_overflow: str = "caffe") -> np.ndarray:
  """Caffe SSD's `DistortImage`: random brightness, contrast, saturation, hue, channel order.

  Brightness (add U(-brightness_delta, +brightness_delta)) comes first; then, with even odds, either
  contrast (multiply by U(contrast_range)) before the HSV part or after it. The HSV part scales the
  saturation by U(saturation_range) and shifts the hue by U(-hue_delta_deg, +hue_delta_deg) degrees
  (Caffe's hue_delta 18 is in OpenCV's 8-bit hue unit of 2 degrees: 36 degrees). hue_overflow:
  "caffe" stops a hue pushed below 0 at 0 (Caffe adds the delta to the 8-bit hue plane with a
  saturating convertTo) and wraps one pushed past 360 (OpenCV's HSV->RGB reads hues modulo 360);
  "wrap" turns the colour wheel both ways. Each of the four fires independently with probability
  `prob`; last, the channels are shuffled with probability `channel_swap_prob`. Values are clipped
  to 0..255 after every step, as Caffe's saturating uint8 arithmetic does, but kept in float (float32
  through the HSV part, so hue is not quantised to 2 degrees as in Caffe) and rounded to uint8 once
  at the end.

  image: (H, W, 3) uint8 RGB. Returns a new (H, W, 3) uint8 image (a copy when nothing fires).
  """
  contrast_low, contrast_high = contrast_range
  saturation_low, saturation_high = saturation_range
  # Draw every decision up front, in a fixed order, so the draws do not depend on the pixels.
  brightness = rng.uniform(-brightness_delta, brightness_delta) if rng.random() < prob else None
  contrast_first = rng.random() < 0.5
  contrast = rng.uniform(contrast_low, contrast_high) if rng.random() < prob else None
  saturation = rng.uniform(saturation_low, saturation_high) if rng.random() < prob else None
  hue = rng.uniform(-hue_delta_deg, hue_delta_deg) if rng.random() < prob else None
  order = rng.permutation(3) if rng.random() < channel_swap_prob else None

  if brightness is None and contrast is None and saturation is None and hue is None:
    return _reorder_channels(image, order) if order is not None else image.copy()

  # Brightness and a leading contrast act on each value alone: one 256-entry table, built in float
  # with Caffe's clip after each step, maps the uint8 pixels in a single pass.
  table = np.arange(256, dtype=np.float64)
  if brightness is not None:
    table = np.clip(table + brightness, 0.0, 255.0)
  if contrast is not None and (contrast_first or (saturation is None and hue is None)):
    table = np.clip(table * contrast, 0.0, 255.0)
    post_contrast = 1.0
  else:
    post_contrast = 1.0 if contrast is None else float(contrast)

  if saturation is None and hue is None:
    distorted = cv2.LUT(image, np.floor(table + 0.5).astype(np.uint8))
  else:
    pixels = cv2.LUT(image, table.astype(np.float32))
    # Float HSV in OpenCV: H in degrees [0, 360), S in [0, 1], V on the input's scale (0..255).
    hsv = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV)
    saturation_scale = 1.0 if saturation is None else float(saturation)
    hue_shift = 0.0 if hue is None else float(hue)
    if hue_overflow == "wrap":
      hue_shift %= 360.0  # a turn of -5 is one of +355
    elif hue_overflow != "caffe":
      raise ValueError(f"augment.hue_overflow = {hue_overflow!r}; known: {', '.join(HUE_OVERFLOWS)}.")
    # One pass scales S and shifts H: numpy ops on one channel of an (H, W, 3) array, or on a
    # (3,)-broadcast, are several times slower than these whole-array OpenCV calls.
    hsv = cv2.transform(hsv, np.array([[1.0, 0.0, 0.0, hue_shift], [0.0, saturation_scale, 0.0, 0.0],
                                       [0.0, 0.0, 1.0, 0.0]], np.float32))
    if saturation_scale > 1.0:
      hsv = cv2.min(hsv, (_FLOAT32_MAX, 1.0, _FLOAT32_MAX, 0.0))
    if hue_shift < 0.0:
      # Caffe's saturating uint8 add: hues below 0 stop at 0 (red). S and V are >= 0 already.
      hsv = cv2.max(hsv, (0.0, 0.0, 0.0, 0.0))
    elif hue_shift > 0.0:
      # Hues are now in [0, 720). Wrap them ourselves (OpenCV versions differ on hues out of range).
      # S <= 1 and V <= 255, so a threshold at 360 over all three planes picks exactly those hues.
      _, turns = cv2.threshold(hsv, _BELOW_360, 360.0, cv2.THRESH_BINARY)
      hsv -= turns
    pixels = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    # A trailing contrast, the clip to 0..255 and the rounding to uint8 in one saturating pass
    # (the values are >= 0, up to float error, so the absolute value it takes changes nothing).
    distorted = cv2.convertScaleAbs(pixels, alpha=post_contrast)
  return _reorder_channels(distorted, order) if order is not None else distorted


def _reorder_channels(image: np.ndarray, order: np.ndarray) -> np.ndarray:
  planes = cv2.split(image)
  return cv2.merge([planes[int(k)] for k in order])


# ---- 2. expand (zoom out) ----------------------------------------------------------------------

def expand(image: np.ndarray, boxes_xyxy: np.ndarray, rng: np.random.Generator, *,
           max_ratio: float, fill_rgb: Sequence[float] = IMAGENET_MEAN_RGB_255
           ) -> Tuple[np.ndarray, np.ndarray]:
  """Places the image at a random position on a canvas U(1, max_ratio) times larger per side.

  image: (H, W, 3) uint8; boxes_xyxy: (N, 4) normalised to the image. fill_rgb: canvas colour on the
  0..255 scale (rounded to uint8), normally the model's mean pixel. Returns (canvas (H', W', 3)
  uint8, boxes (N, 4) float64 normalised to the canvas). The image's pixels are copied unchanged.
  """
  height, width = image.shape[:2]
  ratio = rng.uniform(1.0, max_ratio)
  canvas_h, canvas_w = int(height * ratio), int(width * ratio)
  top = int(rng.integers(0, canvas_h - height + 1))
  left = int(rng.integers(0, canvas_w - width + 1))
  fill = [int(v) for v in np.clip(np.rint(np.asarray(fill_rgb, np.float64)), 0, 255)]
  canvas = cv2.copyMakeBorder(image, top, canvas_h - height - top, left, canvas_w - width - left,
                              cv2.BORDER_CONSTANT, value=fill)
  scale = np.array([width, height, width, height], np.float64)
  offset = np.array([left, top, left, top], np.float64)
  canvas_size = np.array([canvas_w, canvas_h, canvas_w, canvas_h], np.float64)
  return canvas, (np.asarray(boxes_xyxy, np.float64) * scale + offset) / canvas_size


# ---- 3. random IoU crop ------------------------------------------------------------------------

def _iou_rects_boxes(rects_px: np.ndarray, boxes_px: np.ndarray) -> np.ndarray:
  """(T, N) IoU of (T, 4) rectangles with (N, 4) boxes, all xyxy pixels; 0 where the union is empty."""
  rects, boxes = rects_px[:, None, :], boxes_px[None, :, :]
  low = np.maximum(rects[..., :2], boxes[..., :2])
  high = np.minimum(rects[..., 2:], boxes[..., 2:])
  inter = np.prod(np.clip(high - low, 0.0, None), axis=-1)
  area_rects = (rects[..., 2] - rects[..., 0]) * (rects[..., 3] - rects[..., 1])
  area_boxes = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
  union = area_rects + area_boxes - inter
  return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _centres_inside(rects_px: np.ndarray, boxes_px: np.ndarray) -> np.ndarray:
  """(T, N) bool: centre of box n inside rectangle t, edges included (Caffe's CENTER emit constraint)."""
  cx = 0.5 * (boxes_px[None, :, 0] + boxes_px[None, :, 2])
  cy = 0.5 * (boxes_px[None, :, 1] + boxes_px[None, :, 3])
  rects = rects_px[:, None, :]
  return (cx >= rects[..., 0]) & (cx <= rects[..., 2]) & (cy >= rects[..., 1]) & (cy <= rects[..., 3])


def sample_crop_px(height_px: int, width_px: int, boxes_xyxy: np.ndarray, rng: np.random.Generator, *,
                   min_ious: Sequence[Optional[float]], scale_range: Sequence[float],
                   aspect_range: Sequence[float], max_trials: int) -> Tuple[np.ndarray, Optional[float]]:
  """Chooses a crop mode, then the first of `max_trials` random crops that meets it.

  Modes (one drawn uniformly from `min_ious`): None keeps the whole image; a negative value (-1.0)
  accepts any crop; a value in [0, 1] needs IoU >= it with at least one box. A trial draws each side
  as a fraction U(scale_range) of the image side (rounded to whole pixels, at least 1), fails if the
  crop's width / height in pixels is outside `aspect_range`, and is placed uniformly. When the image
  has boxes, an accepted crop must also keep at least one box centre (so an image with objects never
  becomes pure background). With no boxes, the any-crop mode takes the first trial of a valid aspect
  and the IoU modes cannot be met. When no trial succeeds the whole image is kept. All trials are
  drawn at once (a fixed number of draws per call) and tested together, which is ~30x faster than a
  Python loop over them.

  boxes_xyxy: (N, 4) normalised. Returns (rect_px int64 (4,) = (x1, y1, x2, y2) in pixels, end
  exclusive, the mode drawn).
  """
  whole = np.array([0, 0, width_px, height_px], np.int64)
  mode = min_ious[int(rng.integers(len(min_ious)))]
  if mode is None or max_trials < 1:
    return whole, mode
  sides = np.array([width_px, height_px], np.float64)
  crop_sizes = np.maximum(1.0, np.rint(rng.uniform(scale_range[0], scale_range[1], (max_trials, 2)) * sides))
  # floor(U[0, 1) * (slack + 1)) is a uniform integer offset in 0..slack.
  offsets = np.floor(rng.random((max_trials, 2)) * (sides - crop_sizes + 1.0))
  rects = np.concatenate([offsets, offsets + crop_sizes], axis=1)
  aspect = crop_sizes[:, 0] / crop_sizes[:, 1]
  ok = (aspect >= aspect_range[0]) & (aspect <= aspect_range[1])
  boxes_px = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4) * np.concatenate([sides, sides])
  if len(boxes_px) == 0:
    ok &= mode < 0  # an IoU bound cannot hold without boxes
  else:
    ok &= _centres_inside(rects, boxes_px).any(axis=1)
    if mode >= 0:
      ok &= (_iou_rects_boxes(rects, boxes_px) >= mode).any(axis=1)
  if not ok.any():
    return whole, mode
  return rects[int(np.argmax(ok))].astype(np.int64), mode


def sample_crop_caffe_px(height_px: int, width_px: int, boxes_xyxy: np.ndarray, rng: np.random.Generator,
                         *, min_ious: Sequence[Optional[float]], scale_range: Sequence[float],
                         aspect_range: Sequence[float], max_trials: int
                         ) -> Tuple[np.ndarray, Optional[float]]:
  """Caffe SSD's batch_sampler (sampler.cpp GenerateBatchSamples, annotated_data_layer.cpp).

  Every sampler in `min_ious` is run: None is the whole image (Caffe's first, constraint-free
  sampler: always a sample); -1.0 is Caffe's max_jaccard_overlap 1.0 sampler, met by any crop as
  long as the image has at least one box (Caffe tests the constraint box by box, so an image without
  boxes never meets it); a value v in [0, 1] needs IoU >= v with at least one box. Each runs up to
  `max_trials` trials and keeps its first success (Caffe's max_sample 1); one of the collected
  samples is then picked uniformly. A trial draws scale s ~ U(scale_range) and aspect
  a ~ U(aspect_range) clamped to [s^2, 1/s^2], so width = s*sqrt(a) and height = s/sqrt(a) (as
  fractions of the image's sides) stay <= 1, and places the crop uniformly. IoUs are measured on
  normalised coordinates, as in Caffe. A chosen crop is not rejected when it keeps no box centre
  (Caffe keeps it; the example then trains on background only). With no sample at all (only when
  `min_ious` lacks None) the whole image is kept. All trials are drawn at once: a fixed number of
  draws per call.

  boxes_xyxy: (N, 4) normalised. Returns (rect_px int64 (4,) = (x1, y1, x2, y2) in pixels, end
  exclusive: Caffe's truncation of the normalised crop to pixels; the chosen sampler's min_ious
  entry, or None for the whole image).
  """
  whole = np.array([0, 0, width_px, height_px], np.int64)
  samplers = [m for m in min_ious if m is not None]
  trials = max(int(max_trials), 0)
  shape = (len(samplers), trials)
  scale = rng.uniform(scale_range[0], scale_range[1], shape)
  aspect = np.clip(rng.uniform(aspect_range[0], aspect_range[1], shape), scale ** 2, 1.0 / scale ** 2)
  crop_w, crop_h = scale * np.sqrt(aspect), scale / np.sqrt(aspect)
  x1 = rng.random(shape) * (1.0 - crop_w)
  y1 = rng.random(shape) * (1.0 - crop_h)
  rects = np.stack([x1, y1, x1 + crop_w, y1 + crop_h], axis=-1)                # (S, T, 4) normalised
  boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
  # (bound, normalised rect) per sampler that succeeded; the whole image as rect None.
  collected = [(None, None)] * sum(m is None for m in min_ious)
  if len(boxes) and trials:
    ious = _iou_rects_boxes(rects.reshape(-1, 4), boxes).reshape(shape + (len(boxes),))
    best_iou = ious.max(axis=-1)                                                # (S, T)
    for k, bound in enumerate(samplers):
      ok = best_iou[k] >= float(bound) if float(bound) >= 0 else np.ones(trials, bool)
      if ok.any():
        collected.append((bound, rects[k, int(np.argmax(ok))]))  # the first success
  choice = int(rng.integers(len(collected))) if collected else -1
  if choice < 0 or collected[choice][1] is None:
    return whole, None
  bound, rect = collected[choice]
  # Caffe's CropImage: offsets and sizes truncated to whole pixels (at least one pixel here).
  x1_px, y1_px = int(rect[0] * width_px), int(rect[1] * height_px)
  x2_px = min(width_px, x1_px + max(1, int((rect[2] - rect[0]) * width_px)))
  y2_px = min(height_px, y1_px + max(1, int((rect[3] - rect[1]) * height_px)))
  return np.array([x1_px, y1_px, x2_px, y2_px], np.int64), bound


def crop(image: np.ndarray, boxes_xyxy: np.ndarray, labels: np.ndarray, rect_px: np.ndarray
         ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Cuts `rect_px` (x1, y1, x2, y2 pixels, end exclusive) out of the image and its boxes.

  Boxes whose centre lies outside the rectangle (edges count as inside) are dropped; the others are
  clipped to it and renormalised to it. Returns (image (y2-y1, x2-x1, 3) uint8 view, boxes (N', 4)
  float64, labels (N',)). Clipping can leave zero-width boxes on the edge; `drop_small_boxes` removes
  them after the resize.
  """
  height, width = image.shape[:2]
  x1, y1, x2, y2 = (int(v) for v in rect_px)
  if not 0 <= x1 < x2 <= width or not 0 <= y1 < y2 <= height:
    raise ValueError(f"crop rectangle {tuple(rect_px)} is not inside the {width}x{height} image.")
  size = np.array([width, height, width, height], np.float64)
  boxes_px = np.asarray(boxes_xyxy, np.float64) * size
  keep = _centres_inside(np.array([[x1, y1, x2, y2]], np.float64), boxes_px)[0]
  kept = boxes_px[keep]
  low = np.array([x1, y1, x1, y1], np.float64)
  high = np.array([x2, y2, x2, y2], np.float64)
  crop_size = np.array([x2 - x1, y2 - y1, x2 - x1, y2 - y1], np.float64)
  boxes = (np.clip(kept, low, high) - low) / crop_size
  return image[y1:y2, x1:x2], boxes, np.asarray(labels)[keep]


def random_crop(image: np.ndarray, boxes_xyxy: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                *, min_ious: Sequence[Optional[float]], scale_range: Sequence[float],
                aspect_range: Sequence[float], max_trials: int, sampler: str = "single_mode"
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """A crop rectangle (`sample_crop_caffe_px` for sampler "caffe", `sample_crop_px` for
  "single_mode"), then `crop`. Returns (image, boxes (N', 4), labels (N',), rect_px (4,))."""
  height, width = image.shape[:2]
  sample = _CROP_SAMPLE_FNS[_check_choice("crop_sampler", sampler, CROP_SAMPLERS)]
  rect, _ = sample(height, width, boxes_xyxy, rng, min_ious=min_ious, scale_range=scale_range,
                   aspect_range=aspect_range, max_trials=max_trials)
  if rect[0] == 0 and rect[1] == 0 and rect[2] == width and rect[3] == height:
    return image, np.asarray(boxes_xyxy, np.float64), np.asarray(labels), rect
  return (*crop(image, boxes_xyxy, labels, rect), rect)


_CROP_SAMPLE_FNS = {"caffe": sample_crop_caffe_px, "single_mode": sample_crop_px}


def _check_choice(key: str, value: Any, known: Sequence[str]) -> str:
  if value not in known:
    raise ValueError(f"augment.{key} = {value!r}; known: {', '.join(map(repr, known))}.")
  return value


# ---- 4. horizontal flip ------------------------------------------------------------------------

def horizontal_flip(image: np.ndarray, boxes_xyxy: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Mirrors left-right: pixel column j -> W-1-j and x1' = 1 - x2, x2' = 1 - x1. Always flips."""
  boxes = np.asarray(boxes_xyxy, np.float64)
  flipped = np.stack([1.0 - boxes[:, 2], boxes[:, 1], 1.0 - boxes[:, 0], boxes[:, 3]], axis=1)
  return cv2.flip(image, 1), flipped


def resolve_flip_labels(aug_cfg: Mapping[str, Any], class_names: Sequence[str]) -> dict:
  """aug_cfg plus the flip rules as label ids, for `train_transform`; the pipeline calls it once.

  aug_cfg["flip_swap_labels"]: pairs of class names that are each other's mirror image (a flip
  turns one into the other, e.g. "no left turn" / "no right turn"); aug_cfg["flip_never_labels"]:
  class names whose mirror image is not a real sign of the same class (digits, text, or the mirror
  of a class outside the list): an example holding any of them is never flipped.
  class_names[k] is the name of label k + 1 (0 = background). Returns a copy of aug_cfg with
  "flip_swap_label_ids" ((a, b) label pairs) and "flip_never_label_ids" (labels) added. Raises
  ValueError naming the key for a name that is not a class, a class in two pairs, or a pair (a, a).
  """
  label_of = {str(name): k + 1 for k, name in enumerate(class_names)}

  def label(key, name):
    if str(name) not in label_of:
      raise ValueError(f"augment.{key} names {name!r}, which is not a class of this data set "
                       f"({len(label_of)} classes: {', '.join(label_of)}); fix the spelling or "
                       "remove it.")
    return label_of[str(name)]

  pairs, seen = [], set()
  for pair in aug_cfg.get("flip_swap_labels", ()):
    if len(pair) != 2 or pair[0] == pair[1]:
      raise ValueError(f"augment.flip_swap_labels: {tuple(pair)!r} must be a pair of two different "
                       "class names.")
    ids = (label("flip_swap_labels", pair[0]), label("flip_swap_labels", pair[1]))
    if seen & set(ids):
      raise ValueError(f"augment.flip_swap_labels: {tuple(pair)!r} repeats a class of another pair.")
    seen |= set(ids)
    pairs.append(ids)
  never = tuple(sorted({label("flip_never_labels", n) for n in aug_cfg.get("flip_never_labels", ())}))
  if seen & set(never):
    raise ValueError("augment.flip_swap_labels and augment.flip_never_labels share classes "
                     f"{sorted(class_names[k - 1] for k in seen & set(never))}; keep each in one.")
  return dict(aug_cfg, flip_swap_label_ids=tuple(pairs), flip_never_label_ids=never)


def _flip_label_rules(aug_cfg: Mapping[str, Any]) -> Tuple[dict, frozenset]:
  """(label -> mirrored label, labels never flipped) from a `resolve_flip_labels` result."""
  named = bool(aug_cfg.get("flip_swap_labels")) or bool(aug_cfg.get("flip_never_labels"))
  if named and "flip_swap_label_ids" not in aug_cfg:
    raise ValueError("augment.flip_swap_labels / flip_never_labels name classes, but train_transform "
                     "got no label ids for them: pass the config through "
                     "augment.resolve_flip_labels(aug_cfg, class_names) first.")
  swap = {}
  for a, b in aug_cfg.get("flip_swap_label_ids", ()):
    swap[int(a)], swap[int(b)] = int(b), int(a)
  return swap, frozenset(int(k) for k in aug_cfg.get("flip_never_label_ids", ()))


# ---- 5. resize (warp) --------------------------------------------------------------------------

def drop_small_boxes(boxes_xyxy: np.ndarray, labels: np.ndarray, size_px: int,
                     min_box_size_px: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
  """Drops boxes narrower or shorter than `min_box_size_px` on a size_px x size_px image.

  Zero-size boxes would give log(0) in the box encoding (docs/matching.md).
  """
  boxes = np.asarray(boxes_xyxy, np.float64)
  keep = ((boxes[:, 2] - boxes[:, 0]) * size_px >= min_box_size_px) & \
         ((boxes[:, 3] - boxes[:, 1]) * size_px >= min_box_size_px)
  return boxes[keep], np.asarray(labels)[keep]


# ---- the whole recipe --------------------------------------------------------------------------

def fill_rgb_from_pixel_convention(pixel: Mapping[str, Any]) -> Tuple[float, float, float]:
  """The mean pixel of a `config.model.pixel` convention as an RGB 0..255 fill colour for `expand`.

  pixel: dict(channel_order "RGB"|"BGR", input_range, mean (3,) listed in channel_order, std).
  """
  mean = np.asarray(pixel["mean"], np.float64) * (255.0 / float(pixel["input_range"]))
  if pixel["channel_order"] == "BGR":
    mean = mean[::-1]
  elif pixel["channel_order"] != "RGB":
    raise ValueError(f"pixel.channel_order must be 'RGB' or 'BGR', got {pixel['channel_order']!r}.")
  return tuple(float(v) for v in mean)


def validate_config(aug_cfg: Mapping[str, Any]) -> None:
  """Raises ValueError naming the bad `augment.*` key; train_transform calls it on every example."""
  for key in ("photometric_prob", "channel_swap_prob", "expand_prob", "flip_prob"):
    if not 0.0 <= float(aug_cfg[key]) <= 1.0:
      raise ValueError(f"augment.{key} = {aug_cfg[key]} must be a probability in [0, 1].")
  for key in ("brightness_delta", "hue_delta_deg"):
    if float(aug_cfg[key]) < 0:
      raise ValueError(f"augment.{key} = {aug_cfg[key]} must be >= 0 (it is a +- bound).")
  if float(aug_cfg["hue_delta_deg"]) > 180:
    raise ValueError(f"augment.hue_delta_deg = {aug_cfg['hue_delta_deg']} must be <= 180 degrees "
                     "(Caffe's hue_delta 18 is 36 degrees: OpenCV's 8-bit hue unit is 2 degrees).")
  _check_choice("hue_overflow", aug_cfg.get("hue_overflow", "caffe"), HUE_OVERFLOWS)
  _check_choice("crop_sampler", aug_cfg.get("crop_sampler", "caffe"), CROP_SAMPLERS)
  _check_range("contrast_range", aug_cfg["contrast_range"], 0.0, np.inf)
  _check_range("saturation_range", aug_cfg["saturation_range"], 0.0, np.inf)
  _check_range("crop_scale_range", aug_cfg["crop_scale_range"], np.finfo(float).tiny, 1.0)
  _check_range("crop_aspect_range", aug_cfg["crop_aspect_range"], np.finfo(float).tiny, np.inf)
  if float(aug_cfg["expand_max_ratio"]) < 1.0:
    raise ValueError(f"augment.expand_max_ratio = {aug_cfg['expand_max_ratio']} must be >= 1 "
                     "(1 = no zoom out).")
  modes = tuple(aug_cfg["crop_min_ious"])
  if not modes or any(m is not None and float(m) > 1.0 for m in modes):
    raise ValueError(f"augment.crop_min_ious = {modes} must be a non-empty tuple of None (whole "
                     "image), -1.0 (any crop) or minimum IoUs in [0, 1].")
  if int(aug_cfg["crop_max_trials"]) < 0:
    raise ValueError(f"augment.crop_max_trials = {aug_cfg['crop_max_trials']} must be >= 0.")
  for name in aug_cfg.get("resize_interpolations", DEFAULT_INTERPOLATIONS):
    if name not in images.INTERPOLATIONS:
      raise ValueError(f"augment.resize_interpolations has {name!r}; known: {sorted(images.INTERPOLATIONS)}.")


def train_transform(image: np.ndarray, boxes_xyxy: np.ndarray, labels: np.ndarray,
                    rng: np.random.Generator, aug_cfg: Mapping[str, Any], size_px: int, *,
                    fill_rgb: Sequence[float] = IMAGENET_MEAN_RGB_255, min_box_size_px: float = 1.0,
                    return_info: bool = False):
  """Caffe SSD's training augmentation of one example, every parameter from `aug_cfg` (config.augment).

  photometric_distort -> expand (prob expand_prob) -> random crop (aug_cfg.crop_sampler: "caffe" =
  sample_crop_caffe_px, "single_mode" = sample_crop_px) -> horizontal_flip (prob flip_prob; never
  when a remaining box has a label of flip_never_labels; mirrored labels of flip_swap_labels are
  swapped: pass aug_cfg through `resolve_flip_labels` when those name classes) -> resize to size_px
  (interpolation drawn from aug_cfg.resize_interpolations, default linear) -> drop boxes under
  min_box_size_px on the output.

  image: (H, W, 3) uint8 RGB; boxes_xyxy: (N, 4) normalised (clipped to [0, 1] here as well); labels:
  (N,) int; N may be 0. fill_rgb: expand's canvas colour (see fill_rgb_from_pixel_convention).
  Returns (image (size_px, size_px, 3) uint8, boxes (N', 4) float32 normalised, labels (N',) int32),
  plus, with return_info, a dict of what happened (expand_ratio, crop_mode (the chosen sampler's
  min IoU, None for the whole image), crop_rect_px, flipped, flip_blocked (a flip drawn but refused by
  flip_never_labels), interpolation, num_dropped_by_crop, num_dropped_small).
  """
  where = "train_transform"
  image = images.check_image(image, where)
  boxes = _as_boxes(boxes_xyxy, where)
  labels = _as_labels(labels, len(boxes), where)
  validate_config(aug_cfg)
  swap_labels, never_flip = _flip_label_rules(aug_cfg)

  image = photometric_distort(
      image, rng, prob=float(aug_cfg["photometric_prob"]),
      brightness_delta=float(aug_cfg["brightness_delta"]),
      contrast_range=tuple(aug_cfg["contrast_range"]), saturation_range=tuple(aug_cfg["saturation_range"]),
      hue_delta_deg=float(aug_cfg["hue_delta_deg"]), channel_swap_prob=float(aug_cfg["channel_swap_prob"]),
      hue_overflow=str(aug_cfg.get("hue_overflow", "caffe")))

  expand_ratio = 1.0
  if rng.random() < float(aug_cfg["expand_prob"]):
    height, width = image.shape[:2]
    image, boxes = expand(image, boxes, rng, max_ratio=float(aug_cfg["expand_max_ratio"]),
                          fill_rgb=fill_rgb)
    expand_ratio = image.shape[1] / width

  num_before_crop = len(boxes)
  crop_height, crop_width = image.shape[:2]
  sample_crop = _CROP_SAMPLE_FNS[aug_cfg.get("crop_sampler", "caffe")]
  rect, crop_mode = sample_crop(
      crop_height, crop_width, boxes, rng, min_ious=tuple(aug_cfg["crop_min_ious"]),
      scale_range=tuple(aug_cfg["crop_scale_range"]), aspect_range=tuple(aug_cfg["crop_aspect_range"]),
      max_trials=int(aug_cfg["crop_max_trials"]))
  if not (rect[0] == 0 and rect[1] == 0 and rect[2] == crop_width and rect[3] == crop_height):
    image, boxes, labels = crop(image, boxes, labels, rect)
  num_dropped_by_crop = num_before_crop - len(boxes)

  wants_flip = bool(rng.random() < float(aug_cfg["flip_prob"]))
  flip_blocked = wants_flip and any(int(k) in never_flip for k in labels)
  flipped = wants_flip and not flip_blocked
  if flipped:
    image, boxes = horizontal_flip(image, boxes)
    if swap_labels:
      labels = np.array([swap_labels.get(int(k), int(k)) for k in labels], np.int32)

  interpolations = tuple(aug_cfg.get("resize_interpolations", DEFAULT_INTERPOLATIONS))
  interpolation = interpolations[int(rng.integers(len(interpolations)))] if len(interpolations) > 1 \
      else interpolations[0]
  image = images.resize(image, size_px, interpolation)

  num_before_small = len(boxes)
  boxes, labels = drop_small_boxes(boxes, labels, size_px, min_box_size_px)
  outputs = (image, boxes.astype(np.float32).reshape(-1, 4), labels.astype(np.int32))
  if not return_info:
    return outputs
  info = dict(expand_ratio=expand_ratio, crop_mode=crop_mode, crop_rect_px=rect, flipped=flipped,
              flip_blocked=flip_blocked, interpolation=interpolation, num_dropped_by_crop=num_dropped_by_crop,
              num_dropped_small=num_before_small - len(boxes))
  return (*outputs, info)
