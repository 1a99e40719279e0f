"""Images on the host: decode image files, check and resize arrays (uint8 RGB, (H, W, 3)).

The one home of the decode and the eval warp that training's input pipeline (data/), prediction
(run/predict.py) and export's reference resize share, so that prediction sees exactly the pixels
evaluation saw, without importing the training input pipeline (Grain, TFDS).
"""

from typing import Optional

import cv2
import numpy as np

INTERPOLATIONS = {
    "linear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "nearest": cv2.INTER_NEAREST,
    "cubic": cv2.INTER_CUBIC,
    "lanczos4": cv2.INTER_LANCZOS4,
}

def check_image(image: np.ndarray, where: str) -> np.ndarray:
  """The image itself, made C-contiguous (OpenCV rejects views with negative strides)."""
  if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
    raise TypeError(f"{where}: image must be a uint8 numpy array (H, W, 3) RGB, got "
                    f"{type(image).__name__} of dtype {getattr(image, 'dtype', None)}; "
                    "decode it with cv2/PIL and convert to uint8 first.")
  if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f"{where}: image must have shape (H, W, 3) with H, W >= 1, got {image.shape}; "
                     "convert grey or RGBA images to RGB first.")
  return np.ascontiguousarray(image)


def resize(image: np.ndarray, size_px: int, interpolation: str = "linear") -> np.ndarray:
  """Warps (H, W, 3) uint8 to (size_px, size_px, 3) uint8, ignoring the aspect ratio, as SSD does.

  Normalised boxes need no change. interpolation: a key of INTERPOLATIONS.
  """
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f"unknown interpolation {interpolation!r}; known: {sorted(INTERPOLATIONS)}.")
  size_px = int(size_px)
  if size_px < 1:
    raise ValueError(f"size_px must be a positive number of pixels, got {size_px}.")
  if image.shape[0] == size_px and image.shape[1] == size_px:
    return np.ascontiguousarray(image)
  return cv2.resize(image, (size_px, size_px), interpolation=INTERPOLATIONS[interpolation])


def eval_transform(image: np.ndarray, size_px: int, interpolation: str = "linear") -> np.ndarray:
  """Eval preprocessing: warp (H, W, 3) uint8 RGB to (size_px, size_px, 3) uint8; boxes stay as they are."""
  image = check_image(image, "eval_transform")
  return resize(image, size_px, interpolation)


_JPEG_START_OF_SCAN = b"\xff\xda"
_JPEG_END_OF_IMAGE = b"\xff\xd9"


def decode_image(encoded):
  """Encoded image bytes -> uint8 (H, W, 3) RGB, or None when they are not a complete image.

  Pixels in the file's own orientation (EXIF ignored), as the annotations' coordinates are.
  """
  encoded = bytes(encoded)
  if encoded[:2] == b"\xff\xd8" and encoded.rfind(_JPEG_END_OF_IMAGE) < encoded.rfind(_JPEG_START_OF_SCAN):
    return None  # a truncated JPEG: libjpeg would fill the rest with grey and only warn
  buffer = np.frombuffer(encoded, np.uint8)
  if buffer.size == 0:
    return None
  image = cv2.imdecode(buffer, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
  if image is None or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
    return None
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image_rgb(path: str) -> Optional[np.ndarray]:
  """(H, W, 3) uint8 RGB, or None when the file is missing, unreadable or not a complete image.

  Decoded exactly as the data pipeline decodes (a truncated JPEG is refused, not grey-filled).
  """
  try:
    with open(path, "rb") as f:
      encoded = f.read()
  except OSError:
    return None
  return decode_image(encoded)
