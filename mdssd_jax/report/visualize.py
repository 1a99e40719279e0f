"""Pictures of detections: labelled, class-coloured boxes on RGB images (OpenCV drawing).

* `draw_detections`: boxes with "class 0.87" labels; small inputs can be enlarged first
  (`min_side_px`) so that 8 px objects and their labels are readable. Labels are placed greedily,
  the highest score first, at the first free spot around their box (`place_labels`): they never
  overlap each other nor leave the image; a label with no free spot is left out (its box stays).
* `class_color`: a class's colour is a function of its index, the same in every run and picture.
* `evaluation_panel`: prediction beside ground truth for one evaluated image, missed objects marked.
* `PictureCollector`: keeps, while an evaluation runs, the images with the most missed small objects
  and writes them, plus one contact sheet `sheet.jpg` in that order.
"""

import colorsys
import heapq
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

from mdssd_jax.metrics import sizes as size_lib
from mdssd_jax.metrics import voc

# Hue step of the class palette: the golden ratio spreads any number of classes around the wheel.
_GOLDEN_RATIO_CONJUGATE = 0.618033988749895
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_MISSED_MARK = "*"      # appended to the label of a ground truth that no detection found


def class_color(label: int) -> Tuple[int, int, int]:
  """A bright RGB colour for class `label`, the same in every picture and run (no random state)."""
  hue = (label * _GOLDEN_RATIO_CONJUGATE) % 1.0
  r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
  return int(255 * r), int(255 * g), int(255 * b)


def _label_text(label: int, score: Optional[float], class_names: Sequence[str]) -> str:
  name = class_names[label - 1] if 1 <= label <= len(class_names) else f"class {label}"
  return name if score is None else f"{name} {score:.2f}"


def upscale(image: np.ndarray, min_side_px: int) -> Tuple[np.ndarray, float]:
  """Enlarges `image` so its shorter side is at least min_side_px; returns (image, scale).

  Integer-looking pixels (nearest neighbour) from 2x up, so that a tiny object shows the pixels the
  detector saw rather than a blur; linear below 2x. Never shrinks (scale >= 1).
  """
  height, width = image.shape[:2]
  scale = max(1.0, float(min_side_px) / max(1, min(height, width)))
  if scale == 1.0:
    return image, 1.0
  size = (int(round(width * scale)), int(round(height * scale)))
  interpolation = cv2.INTER_NEAREST if scale >= 2 else cv2.INTER_LINEAR
  return cv2.resize(image, size, interpolation=interpolation), scale


def _overlaps(a: Sequence[int], b: Sequence[int]) -> bool:
  """Half-open rectangles (x1, y1, x2, y2): True when they share at least one pixel."""
  return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(boxes_px: np.ndarray, label_sizes: Sequence[Tuple[int, int]], width: int,
                 height: int, search_rows: int = 4) -> List[Optional[Tuple[int, int, int, int]]]:
  """Greedy label placement: each label at the first free spot around its box, in the given order.

  Candidates, in order: above the box's top-left corner, inside its top-left, below its
  bottom-left, inside its bottom-left, the same four right-aligned, then up to `search_rows` label
  heights further above and below. Each candidate is shifted into the image; the first that
  overlaps no label placed before wins.

  Args:
    boxes_px: (K, 4) corner form, pixels, in placement order (put the most important first).
    label_sizes: K (width, height) of each label's rectangle, pixels.
    width, height: the image's size, pixels.
  Returns:
    K rectangles (x1, y1, x2, y2), half-open integer pixels inside [0, width) x [0, height), or None
    where no spot is free (or the label is larger than the image).
  """
  boxes_px = np.asarray(boxes_px, np.float64).reshape(-1, 4)
  if len(label_sizes) != len(boxes_px):
    raise ValueError(f"place_labels got {len(boxes_px)} boxes but {len(label_sizes)} label sizes")
  placed: List[Tuple[int, int, int, int]] = []
  out: List[Optional[Tuple[int, int, int, int]]] = []
  for box, (w, h) in zip(boxes_px, label_sizes):
    w, h = int(w), int(h)
    if w > width or h > height or w <= 0 or h <= 0:
      out.append(None)
      continue
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    corners = []
    for x in (x1, x2 - w):
      corners += [(x, y1 - h), (x, y1), (x, y2), (x, y2 - h)]
    for k in range(1, search_rows + 1):
      corners += [(x1, y1 - h - k * h), (x1, y2 + k * h)]
    chosen = None
    for x, y in corners:
      x = min(max(x, 0), width - w)
      y = min(max(y, 0), height - h)
      rect = (x, y, x + w, y + h)
      if not any(_overlaps(rect, p) for p in placed):
        chosen = rect
        break
    if chosen is not None:
      placed.append(chosen)
    out.append(chosen)
  return out


def _text_layout(image_shape: Tuple[int, ...], font_scale: Optional[float] = None):
  height, width = image_shape[:2]
  scale = font_scale or max(0.35, min(height, width) / 1000)
  return scale


def draw_detections(image: np.ndarray, boxes_px: np.ndarray, classes: np.ndarray,
                    scores: Optional[np.ndarray], class_names: Sequence[str],
                    thickness_px: Optional[int] = None, min_side_px: int = 0,
                    marks: Optional[np.ndarray] = None,
                    return_label_rects: bool = False):
  """Draws boxes with "class 0.87" labels.

  Args:
    image: (H, W, 3) uint8 RGB; not modified.
    boxes_px: (K, 4) corner form, pixels of `image`.
    classes: (K,) int, 1..C (class_names[c - 1]).
    scores: (K,) or None (ground truth: labels without a score).
    class_names: C names.
    thickness_px: line width; default scales with the drawn image (1 px per 400 px of the shorter
      side, at least 1; 2 once the image is enlarged).
    min_side_px: enlarge the image first so that its shorter side is at least this (0: never);
      boxes are scaled with it.
    marks: (K,) bool or None; a marked box gets a "*" after its label and a doubled outline (the
      ground-truth panel marks missed objects).
    return_label_rects: also return the K label rectangles (x1, y1, x2, y2) or None (not placed).
  Returns:
    (H', W', 3) uint8 RGB copy with the boxes drawn, the highest score on top (H' = H unless
    enlarged); with return_label_rects, (picture, rects).
  """
  image = np.asarray(image, np.uint8)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"draw_detections needs an (H, W, 3) RGB image, got shape {image.shape}")
  image, scale = upscale(image, min_side_px) if min_side_px else (image, 1.0)
  image = np.ascontiguousarray(image).copy()
  boxes_px = np.asarray(boxes_px, np.float64).reshape(-1, 4) * scale
  classes = np.asarray(classes).reshape(-1).astype(int)
  marks = np.zeros(len(boxes_px), bool) if marks is None else np.asarray(marks, bool).reshape(-1)
  if not len(boxes_px) == len(classes) == len(marks) or (scores is not None and len(scores) != len(boxes_px)):
    raise ValueError(f"draw_detections got {len(boxes_px)} boxes, {len(classes)} classes, "
                     f"{'no' if scores is None else len(scores)} scores, {len(marks)} marks; "
                     "need one each per box")
  height, width = image.shape[:2]
  thickness = thickness_px or max(2 if scale > 1 else 1, round(min(height, width) / 400))
  font_scale = _text_layout(image.shape)
  # Boxes from the lowest score up (the highest on top); labels from the highest down (best spots).
  order = (np.argsort(scores, kind="stable") if scores is not None
           else np.arange(len(boxes_px)))
  clipped = np.round(np.clip(boxes_px, 0, [width - 1, height - 1] * 2)).astype(int)
  for k in order.tolist():
    x1, y1, x2, y2 = clipped[k]
    color = class_color(classes[k])
    if marks[k]:
      cv2.rectangle(image, (x1 - thickness, y1 - thickness), (x2 + thickness, y2 + thickness),
                    (255, 255, 255), thickness)
    cv2.rectangle(image, (x1, y1), (x2, y2), color, thickness)
  label_order = order[::-1]
  texts, sizes = [], []
  for k in label_order.tolist():
    text = _label_text(classes[k], None if scores is None else float(scores[k]), class_names)
    text += _MISSED_MARK if marks[k] else ""
    (tw, th), baseline = cv2.getTextSize(text, _FONT, font_scale, 1)
    texts.append(text)
    sizes.append((tw + 4, th + baseline + 4))
  rects = place_labels(clipped[label_order], sizes, width, height)
  rects_by_box: List[Optional[Tuple[int, int, int, int]]] = [None] * len(boxes_px)
  for k, text, rect in zip(label_order.tolist(), texts, rects):
    rects_by_box[k] = rect
    if rect is None:
      continue
    color = class_color(classes[k])
    rx1, ry1, rx2, ry2 = rect
    cv2.rectangle(image, (rx1, ry1), (rx2 - 1, ry2 - 1), color, -1)
    text_color = (0, 0, 0) if sum(color) > 380 else (255, 255, 255)
    (_, th), baseline = cv2.getTextSize(text, _FONT, font_scale, 1)
    cv2.putText(image, text, (rx1 + 2, ry2 - 2 - baseline), _FONT, font_scale, text_color, 1,
                cv2.LINE_AA)
  if return_label_rects:
    return image, rects_by_box
  return image


def side_by_side(pred_image: np.ndarray, gt_image: np.ndarray, gap_px: int = 8) -> np.ndarray:
  """Predictions left, ground truth right, on one (H, W1 + gap + W2, 3) uint8 canvas.

  The right image is resized to the left one's height (keeping its aspect ratio) if they differ.
  """
  pred_image = np.asarray(pred_image, np.uint8)
  gt_image = np.asarray(gt_image, np.uint8)
  height = pred_image.shape[0]
  if gt_image.shape[0] != height:
    new_width = max(1, round(gt_image.shape[1] * height / gt_image.shape[0]))
    gt_image = cv2.resize(gt_image, (new_width, height), interpolation=cv2.INTER_AREA)
  gap = np.full((height, gap_px, 3), 255, np.uint8)
  return np.concatenate([pred_image, gap, gt_image], axis=1)


def _with_title(image: np.ndarray, title: str) -> np.ndarray:
  """A white strip with `title` above the image."""
  font_scale = max(0.45, min(image.shape[:2]) / 1000)
  (_, th), baseline = cv2.getTextSize(title, _FONT, font_scale, 1)
  strip = np.full((th + baseline + 10, image.shape[1], 3), 255, np.uint8)
  cv2.putText(strip, title, (4, th + 4), _FONT, font_scale, (0, 0, 0), 1, cv2.LINE_AA)
  return np.concatenate([strip, image], axis=0)


def evaluation_panel(image: np.ndarray, boxes_px: np.ndarray, classes: np.ndarray,
                     scores: np.ndarray, gt_boxes_px: np.ndarray, gt_labels: np.ndarray,
                     class_names: Sequence[str], missed: Optional[np.ndarray] = None,
                     min_side_px: int = 512, title: str = "",
                     score_threshold: Optional[float] = None) -> np.ndarray:
  """Prediction (left) beside ground truth (right) for one image, both enlarged to min_side_px.

  Args:
    image: (H, W, 3) uint8 RGB.
    boxes_px, classes, scores: the detections to draw, pixels of `image`.
    gt_boxes_px, gt_labels: (N, 4) pixels of `image`, (N,) 1..C.
    missed: (N,) bool or None: ground truths to mark "*" (no detection found them).
    title: text above the pair (e.g. which image, how many small objects were missed).
    score_threshold: shown in the left panel's title, when given.
  Returns:
    (H', W', 3) uint8 RGB.
  """
  shown = f" (score >= {score_threshold:g})" if score_threshold is not None else ""
  left = _with_title(draw_detections(image, boxes_px, classes, scores, class_names,
                                     min_side_px=min_side_px), f"prediction{shown}")
  num_missed = int(np.sum(missed)) if missed is not None else 0
  right = _with_title(draw_detections(image, gt_boxes_px, gt_labels, None, class_names,
                                      min_side_px=min_side_px, marks=missed),
                      f"ground truth ({len(np.asarray(gt_labels).reshape(-1))} objects, "
                      f"{num_missed} missed {_MISSED_MARK})")
  both = side_by_side(left, right)
  return _with_title(both, title) if title else both


def contact_sheet(panels: Sequence[np.ndarray], columns: int = 2, gap_px: int = 12) -> np.ndarray:
  """Panels tiled row by row, `columns` per row, each resized to the first panel's size.

  Returns: (rows * (H + gap) - gap, columns * (W + gap) - gap, 3) uint8 RGB on white.
  """
  if not panels:
    raise ValueError("contact_sheet needs at least one panel")
  if columns < 1:
    raise ValueError(f"contact_sheet needs columns >= 1, got {columns} (config.eval.sheet_columns)")
  height, width = panels[0].shape[:2]
  columns = min(columns, len(panels))
  rows = -(-len(panels) // columns)
  sheet = np.full((rows * (height + gap_px) - gap_px, columns * (width + gap_px) - gap_px, 3), 255,
                  np.uint8)
  for i, panel in enumerate(panels):
    if panel.shape[:2] != (height, width):
      panel = cv2.resize(panel, (width, height), interpolation=cv2.INTER_AREA)
    r, c = divmod(i, columns)
    y, x = r * (height + gap_px), c * (width + gap_px)
    sheet[y:y + height, x:x + width] = panel
  return sheet


def missed_small_order(missed_small_counts: Sequence[int]) -> List[int]:
  """Indices ordered by missed small objects, most first; ties keep the given (evaluation) order."""
  counts = np.asarray(missed_small_counts, np.int64).reshape(-1)
  return np.lexsort((np.arange(len(counts)), -counts)).tolist()


class PictureCollector:
  """Keeps the `num_pictures` evaluated images with the most missed small objects; writes them.

  A small object is missed when its longer side (pixels of the original image) is under
  `small_object_px` and no detection of its class scoring >= `score_threshold` overlaps it by
  IoU > `iou_threshold` (size_lib.missed_ground_truths). Only the kept images are held in memory (a
  heap), so a whole evaluation split can be scanned. Ties go to the image seen first, so with no
  misses at all the pictures are the first images of the split.

  Use: `collector.add(...)` per image (or `on_batch=collector.add_batch` in
  evaluation.loop.evaluate_batches), then `collector.write(WORKDIR/pictures/step_N)`.
  """

  def __init__(self, num_pictures: int, class_names: Sequence[str], score_threshold: float = 0.3,
               iou_threshold: float = 0.5, small_object_px: float = 32.0, min_side_px: int = 512,
               sheet_columns: int = 2, pixel_offset: float = 1.0):
    self.num_pictures = int(num_pictures)
    self.class_names = list(class_names)
    self.score_threshold = score_threshold
    self.iou_threshold = iou_threshold
    self.small_object_px = small_object_px
    self.min_side_px = min_side_px
    self.sheet_columns = sheet_columns
    self.pixel_offset = pixel_offset
    self._heap: List[Tuple[int, int, Dict[str, Any]]] = []   # (missed small, -arrival, picture)
    self._seen = 0

  def add(self, image: np.ndarray, boxes_px: np.ndarray, classes: np.ndarray, scores: np.ndarray,
          gt_boxes_px: np.ndarray, gt_labels: np.ndarray, orig_size_hw: Optional[Sequence[int]] = None,
          image_id: Optional[int] = None) -> None:
    """One evaluated image.

    Args:
      image: (h, w, 3) uint8 RGB, what is drawn (e.g. the input-size image the model saw).
      boxes_px, classes, scores: (K, 4), (K,), (K,) detections, pixels of the ORIGINAL image.
      gt_boxes_px, gt_labels: (N, 4), (N,) ground truth, pixels of the original image (label 0 =
        padding, dropped).
      orig_size_hw: the original image's (height, width); None = the same as `image`.
    """
    if self.num_pictures <= 0:
      return
    arrival = self._seen
    self._seen += 1
    gt_labels = np.asarray(gt_labels).reshape(-1)
    real = gt_labels > 0
    gt_boxes_px = np.asarray(gt_boxes_px, np.float64).reshape(-1, 4)[real]
    gt_labels = gt_labels[real]
    scores = np.asarray(scores, np.float64).reshape(-1)
    shown = scores >= self.score_threshold
    prediction = dict(boxes=np.asarray(boxes_px, np.float64).reshape(-1, 4)[shown],
                      scores=scores[shown], labels=np.asarray(classes).reshape(-1)[shown])
    missed = size_lib.missed_ground_truths(prediction, dict(boxes=gt_boxes_px, labels=gt_labels),
                                        self.iou_threshold, self.score_threshold, self.pixel_offset)
    small = voc.longer_side_px(gt_boxes_px) < self.small_object_px
    count = int(np.sum(missed & small))
    key = (count, -arrival)
    if len(self._heap) >= self.num_pictures and key <= self._heap[0][:2]:
      return
    height, width = np.asarray(image).shape[:2]
    orig_h, orig_w = orig_size_hw if orig_size_hw is not None else (height, width)
    to_image = np.array([width / orig_w, height / orig_h] * 2)
    picture = dict(image=np.array(image, np.uint8), boxes_px=prediction["boxes"] * to_image,
                   classes=prediction["labels"], scores=prediction["scores"],
                   gt_boxes_px=gt_boxes_px * to_image, gt_labels=gt_labels, missed=missed,
                   missed_small=count, arrival=arrival, image_id=image_id)
    item = (count, -arrival, picture)
    if len(self._heap) < self.num_pictures:
      heapq.heappush(self._heap, item)
    else:
      heapq.heapreplace(self._heap, item)

  def add_batch(self, batch: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """evaluation.loop.evaluate_batches's on_batch(batch, arrays): every real image of the batch."""
    for i in np.flatnonzero(arrays["batch_mask"]).tolist():
      keep = arrays["keep"][i]
      self.add(batch["image"][i], arrays["boxes_px"][i][keep], arrays["classes"][i][keep],
               arrays["scores"][i][keep], arrays["gt_boxes_px"][i], arrays["gt_labels"][i],
               orig_size_hw=np.asarray(batch["orig_size"][i]).tolist(),
               image_id=int(arrays["image_id"][i]) if "image_id" in arrays else None)

  def pictures(self) -> List[Dict[str, Any]]:
    """The kept pictures, most missed small objects first (ties: evaluation order)."""
    items = sorted(self._heap, key=lambda item: (-item[0], -item[1]))
    return [item[2] for item in items]

  def write(self, directory: str) -> Dict[str, Any]:
    """Writes NNN.jpg (one panel per picture, in sheet order) and sheet.jpg into `directory`.

    Returns: {"pictures": [paths], "sheet": path or None (nothing kept)}.
    """
    pictures = self.pictures()
    if not pictures:
      return {"pictures": [], "sheet": None}
    os.makedirs(directory, exist_ok=True)
    panels, paths = [], []
    for rank, pic in enumerate(pictures):
      name = f"image {pic['image_id']}" if pic["image_id"] is not None else f"image #{pic['arrival']}"
      objects = "object" if pic["missed_small"] == 1 else "objects"
      title = (f"{rank + 1}. {name}: {pic['missed_small']} small {objects} "
               f"(< {self.small_object_px:g} px) missed")
      panel = evaluation_panel(pic["image"], pic["boxes_px"], pic["classes"], pic["scores"],
                               pic["gt_boxes_px"], pic["gt_labels"], self.class_names,
                               missed=pic["missed"], min_side_px=self.min_side_px, title=title,
                               score_threshold=self.score_threshold)
      path = os.path.join(directory, f"{rank:03d}.jpg")
      _write_rgb(path, panel)
      panels.append(panel)
      paths.append(path)
    sheet_path = os.path.join(directory, "sheet.jpg")
    _write_rgb(sheet_path, contact_sheet(panels, self.sheet_columns))
    return {"pictures": paths, "sheet": sheet_path}


def _write_rgb(path: str, image: np.ndarray) -> None:
  if not cv2.imwrite(path, np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 92]):
    raise OSError(f"could not write picture {path}; check that the folder is writable")
