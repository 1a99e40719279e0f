"""Pictures of detections: labelled, class-coloured boxes on RGB images (OpenCV drawing)."""

import colorsys
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

# Hue step of the class palette: the golden ratio spreads any number of classes around the wheel.
_GOLDEN_RATIO_CONJUGATE = 0.618033988749895


def class_color(label: int) -> Tuple[int, int, int]:
  """A bright RGB colour for class `label`, the same in every picture."""
  hue = (label * _GOLDEN_RATIO_CONJUGATE) % 1.0
  r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
  return int(255 * r), int(255 * g), int(255 * b)


def _label_text(label: int, score: Optional[float], class_names: Sequence[str]) -> str:
  name = class_names[label - 1] if 1 <= label <= len(class_names) else f"class {label}"
  return name if score is None else f"{name} {score:.2f}"


def draw_detections(image: np.ndarray, boxes_px: np.ndarray, classes: np.ndarray,
                    scores: Optional[np.ndarray], class_names: Sequence[str],
                    thickness_px: Optional[int] = None) -> np.ndarray:
  """Draws boxes with "class 0.87" labels.

  Args:
    image: (H, W, 3) uint8 RGB; not modified.
    boxes_px: (K, 4) corner form, pixels.
    classes: (K,) int, 1..C (class_names[c - 1]).
    scores: (K,) or None (ground truth: labels without a score).
    class_names: C names.
    thickness_px: line width; default scales with the image (1 px per 400 px of the shorter side).
  Returns:
    (H, W, 3) uint8 RGB copy with the boxes drawn, the highest score last (on top).
  """
  image = np.ascontiguousarray(np.asarray(image, np.uint8)).copy()
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"draw_detections needs an (H, W, 3) RGB image, got shape {image.shape}")
  boxes_px = np.asarray(boxes_px, np.float64).reshape(-1, 4)
  classes = np.asarray(classes).reshape(-1).astype(int)
  height, width = image.shape[:2]
  thickness = thickness_px or max(1, round(min(height, width) / 400))
  font_scale = max(0.35, min(height, width) / 1000)
  order = np.argsort(scores, kind="stable") if scores is not None else np.arange(len(boxes_px))
  for k in order.tolist():
    x1, y1, x2, y2 = np.round(np.clip(boxes_px[k], 0, [width - 1, height - 1] * 2)).astype(int)
    color = class_color(classes[k])
    cv2.rectangle(image, (x1, y1), (x2, y2), color, thickness)
    text = _label_text(classes[k], None if scores is None else float(scores[k]), class_names)
    (tw, th), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    # Above the box when there is room, else inside its top edge.
    ty = y1 - 2 if y1 - th - baseline - 2 >= 0 else y1 + th + 2
    tx = min(x1, max(0, width - tw - 2))
    cv2.rectangle(image, (tx, ty - th - 2), (tx + tw + 2, ty + baseline), color, -1)
    text_color = (0, 0, 0) if sum(color) > 380 else (255, 255, 255)
    cv2.putText(image, text, (tx + 1, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, text_color, 1,
                cv2.LINE_AA)
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
