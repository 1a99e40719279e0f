"""One evaluation pass: eval batches -> detections -> pixels -> evaluator -> metrics.

Each process runs the model on its own batches and keeps fixed-shape NumPy arrays; with several
processes one all-gather at the end brings every image to every process, which then computes the same
metrics (the evaluators are cheap next to the forward passes; only process 0 needs to write them).
"""

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import numpy as np

from mdssd_jax.core import boxes as box_lib

# The arrays each process keeps per image (fixed shapes, so that they can be all-gathered).
_KEYS = ("boxes_px", "scores", "classes", "keep", "gt_boxes_px", "gt_labels", "gt_difficult",
         "gt_area", "image_id", "batch_mask")


def to_pixels(boxes_xyxy: np.ndarray, orig_size: np.ndarray) -> np.ndarray:
  """(B, K, 4) corner form normalised to the original image -> pixels, given orig_size (B, 2) (h, w)."""
  orig_size = np.asarray(orig_size, np.float32)
  return box_lib.scale_xyxy(np.asarray(boxes_xyxy, np.float32), orig_size[:, 1:2], orig_size[:, 0:1])


def batch_to_arrays(detections: Mapping[str, Any], batch: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Detections of one eval batch + its ground truth -> the fixed-shape arrays of `_KEYS`.

  Args:
    detections: boxes (B, K, 4) xyxy normalised, scores (B, K), classes (B, K) 1..C, valid (B, K).
    batch: an eval batch (docs/data_formats.md): boxes, labels, difficult, image_id, orig_size,
      batch_mask, and optionally area (B, M) in original-image pixels (-1: use the box's area).
  """
  batch_size = np.asarray(batch["orig_size"]).shape[0]
  batch_mask = np.asarray(batch.get("batch_mask", np.ones(batch_size, bool)), bool)
  valid = np.asarray(detections["valid"], bool) & batch_mask[:, None]
  labels = np.asarray(batch["labels"], np.int32)
  return dict(
      boxes_px=to_pixels(detections["boxes"], batch["orig_size"]),
      scores=np.asarray(detections["scores"], np.float32),
      classes=np.asarray(detections["classes"], np.int32),
      keep=valid,
      gt_boxes_px=to_pixels(batch["boxes"], batch["orig_size"]),
      gt_labels=labels,
      gt_difficult=np.asarray(batch.get("difficult", np.zeros(labels.shape, bool)), bool),
      gt_area=np.asarray(batch.get("area", np.full(labels.shape, -1.0)), np.float32),
      image_id=np.asarray(batch.get("image_id", np.full(batch_size, -1)), np.int64),
      batch_mask=batch_mask)


def arrays_to_images(arrays: Mapping[str, np.ndarray]):
  """Fixed-shape arrays (N images) -> (predictions, ground_truths) per-image dicts, in image_id order.

  Drops padding images (batch_mask False), invalid detections and padded ground truth (label 0).
  Images are sorted by image_id (stable) so the result does not depend on how many processes ran.
  """
  mask = arrays["batch_mask"]
  ids = arrays["image_id"][mask]
  real = np.flatnonzero(mask)
  if np.any(ids >= 0):
    unique, counts = np.unique(ids, return_counts=True)
    if np.any(counts > 1):
      raise ValueError(f"image ids {unique[counts > 1][:5].tolist()} reach the evaluator more than "
                       "once; the eval batches of all processes must cover each image once (mark "
                       "repeats with batch_mask=False)")
    real = real[np.argsort(ids, kind="stable")]
  predictions, ground_truths = [], []
  for i in real.tolist():
    keep = arrays["keep"][i]
    predictions.append(dict(boxes=arrays["boxes_px"][i][keep], scores=arrays["scores"][i][keep],
                            labels=arrays["classes"][i][keep]))
    gt = arrays["gt_labels"][i] > 0
    ground_truths.append(dict(boxes=arrays["gt_boxes_px"][i][gt], labels=arrays["gt_labels"][i][gt],
                              difficult=arrays["gt_difficult"][i][gt],
                              area=arrays["gt_area"][i][gt],
                              image_id=int(arrays["image_id"][i]) if arrays["image_id"][i] >= 0
                              else len(ground_truths) + 1))
  return predictions, ground_truths


def evaluate_batches(predict_fn: Callable[[Mapping[str, Any]], Mapping[str, Any]],
                     batches: Iterable[Mapping[str, Any]], evaluator,
                     process_allgather: Optional[Callable[[Any], Any]] = None,
                     on_batch: Optional[Callable[[Mapping[str, Any], Dict[str, np.ndarray]], None]] = None
                     ) -> Dict[str, float]:
  """Runs predict_fn over the eval batches and returns evaluator.compute().

  Args:
    predict_fn: eval batch -> dict of NumPy (or jax) arrays boxes (B, K, 4) xyxy normalised, scores
      (B, K), classes (B, K) int 1..C, valid (B, K) bool (jitted forward + postprocess.detect).
    batches: eval batches (docs/data_formats.md): boxes normalised to the original image, labels (0 =
      padding), difficult, image_id, orig_size (h, w), batch_mask.
    evaluator: a metric accumulator from `metrics.make_metric`; it is reset first.
    process_allgather: None on one process; else a function that takes a pytree of this process's
      NumPy arrays and returns them stacked over processes on a new leading axis, e.g.
      jax.experimental.multihost_utils.process_allgather (tiled=False). Every process must have run
      the same number of batches (make_eval_batches pads with batch_mask=False).
    on_batch: optional callback(batch, arrays) after each batch, with this process's `batch_to_arrays`
      dict (boxes_px, scores, classes, keep, gt_boxes_px, ...): e.g. to draw the first pictures.
  Returns:
    evaluator.compute(), the same on every process.
  """
  evaluator.reset()
  parts: List[Dict[str, np.ndarray]] = []
  for batch in batches:
    detections = {k: np.asarray(v) for k, v in predict_fn(batch).items()}
    parts.append(batch_to_arrays(detections, batch))
    if on_batch is not None:
      on_batch(batch, parts[-1])
  if not parts:
    raise ValueError("evaluate_batches got no eval batches; check the evaluator's split "
                     "(config.evals.<name>.split, default config.data.eval_split) and max_images")
  arrays = {k: np.concatenate([p[k] for p in parts]) for k in _KEYS}
  if process_allgather is not None:
    gathered = process_allgather(arrays)
    arrays = {k: np.asarray(v).reshape((-1,) + arrays[k].shape[1:]) for k, v in gathered.items()}
  predictions, ground_truths = arrays_to_images(arrays)
  evaluator.add(predictions, ground_truths)
  return evaluator.compute()
