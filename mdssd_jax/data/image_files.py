"""Image files checked once at prepare time, so that training never meets one it cannot decode.

Every builder passes each image file through `checked_image` before it stores it: the file is decoded
with the input pipeline's own decoder (core.images.decode_image), so prepare refuses exactly the files
training would have to skip (truncated or empty JPEGs, files that are no image), naming them, through
the builder's bad-annotation policy (report.BadAnnotation). A decode costs 2-4 ms for a VOC-sized JPEG.

A photo whose EXIF orientation tag says it is shown rotated or mirrored is stored as viewers show it
(the pixels turned, re-encoded as a JPEG of quality JPEG_QUALITY), because the annotations of a
labelling tool are drawn on what it showed; every other file is stored byte for byte.
"""

import dataclasses
import io

import cv2
import numpy as np
from PIL import Image

from mdssd_jax.core import images
from mdssd_jax.data import report

JPEG_QUALITY = 95                  # re-encoding of EXIF-rotated photos only
_EXIF_ORIENTATION_TAG = 0x0112     # 1 = as stored; 2..8 = mirrored and/or rotated (EXIF 2.3, 4.6.4)
_FIX = "replace the file with a complete copy (open it in an image viewer to check)"


@dataclasses.dataclass(frozen=True)
class CheckedImage:
  """encoded: the bytes to store; width_px, height_px: the image as stored (and as viewers show it);
  reoriented: True when the EXIF orientation was applied to the pixels."""
  encoded: bytes
  width_px: int
  height_px: int
  reoriented: bool = False


def exif_orientation(encoded: bytes) -> int:
  """The EXIF orientation tag (1..8; 1 when absent or unreadable). Reads the header only."""
  try:
    with Image.open(io.BytesIO(encoded)) as image:
      value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
  except Exception:   # pylint: disable=broad-except  (PIL raises many kinds for a damaged header)
    return 1
  return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


def checked_image(encoded: bytes, file: str) -> CheckedImage:
  """The image bytes to store for `file`, decoded once to prove they can be.

  Raises report.BadAnnotation naming `file` when the bytes are empty, truncated or not an image.
  """
  encoded = bytes(encoded)
  what = "is empty (0 bytes)" if not encoded else None
  pixels = images.decode_image(encoded) if encoded else None
  if pixels is None:
    raise report.BadAnnotation(
        file, what or "the image cannot be decoded (a truncated or damaged file, or not an image)",
        _FIX)
  orientation = exif_orientation(encoded)
  if orientation == 1:
    return CheckedImage(encoded, pixels.shape[1], pixels.shape[0])
  # OpenCV applies the EXIF orientation unless told to ignore it; the pipeline ignores it, so the
  # turned pixels are what is stored.
  turned = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
  ok, jpeg = cv2.imencode(".jpg", turned, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
  if not ok:
    raise report.BadAnnotation(file, "the EXIF-rotated image cannot be re-encoded", _FIX)
  return CheckedImage(jpeg.tobytes(), turned.shape[1], turned.shape[0], reoriented=True)
