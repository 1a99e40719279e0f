"""--mode=predict: a trained detector on image files, to a COCO-style JSON and one picture per image.

Restores only what prediction needs from a checkpoint (weights, batch statistics, class names and
pixel convention: state/weights.py), runs inference/predictor.py's one prediction path on each image
(whole, or tiled for large images) and draws with report/visualize.py.
"""

import glob
import json
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import cv2

from mdssd_jax.core import images
from mdssd_jax.inference import predictor
from mdssd_jax.report import progress
from mdssd_jax.report import visualize
from mdssd_jax.state import weights

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def expand_image_paths(patterns: Sequence[str]) -> List[str]:
  """Files, folders (their image files) and glob patterns -> sorted unique file paths, in order given.

  Raises ValueError for a folder or pattern that matches no image.
  """
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split(",") if p]
  paths: List[str] = []
  for pattern in patterns:
    if os.path.isdir(pattern):
      found = sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                     if f.lower().endswith(IMAGE_EXTENSIONS))
    elif glob.has_magic(pattern):
      found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    else:
      found = [pattern]
    if not found:
      extensions = ", ".join(IMAGE_EXTENSIONS)
      if os.path.isdir(pattern):
        raise ValueError(f"the folder '{pattern}' holds no image files (extensions {extensions}); "
                         "pass a folder with images, image files or a glob such as 'photos/*.jpg'")
      raise ValueError(f"no image files match '{pattern}' (extensions {extensions})")
    paths.extend(found)
  return list(dict.fromkeys(paths))


def _picture_name(path: str, used: set, extension: str) -> str:
  stem = os.path.splitext(os.path.basename(path))[0]
  name, n = f"{stem}.{extension}", 1
  while name in used:
    name, n = f"{stem}_{n}.{extension}", n + 1
  used.add(name)
  return name


def predict_images(predict_fn: predictor.PredictFn, image_paths: Sequence[str], class_names: Sequence[str],
                   out_dir: str, input_size_px: int, tiled_cfg: Optional[Mapping[str, Any]] = None,
                   score_threshold: float = 0.5, nms_iou: float = 0.45, top_k: int = 200,
                   batch_size: int = 8,
                   label_to_category_id: Optional[Mapping[int, int]] = None,
                   picture_format: str = "jpg") -> Dict[str, Any]:
  """Detects objects in image files; writes out_dir/detections.json and one picture per image.

  Args:
    predict_fn: images/tiles uint8 (batch_size, S, S, 3) -> normalised detections (module doc).
    image_paths: files, folders or glob patterns (a comma-separated string is accepted too).
    class_names: C names, for the pictures and the JSON's category_name.
    out_dir: created if missing.
    input_size_px: S.
    tiled_cfg: config.eval.tiled (enabled, overlap_px); tiles of S px when enabled, else each image
      is warped to S x S.
    score_threshold: only detections scoring at least this are DRAWN; the JSON has them all.
    nms_iou, top_k: merging of tile detections (tiled only).
    batch_size: images or tiles per predict_fn call.
    label_to_category_id: category_id written to the JSON (identity if None).
    picture_format: "jpg" or "png" (lossless, for exact colours).
  Unreadable or missing files are SKIPPED with a warning naming each; if none is readable, ValueError.
  Returns:
    {"json_path", "picture_paths", "skipped" (paths), "num_images", "num_detections"}.
  JSON: a COCO results list [{"image_id": index in the file list, "file_name", "category_id",
  "category_name", "bbox": [x, y, w, h] px, "score"}].
  """
  paths = expand_image_paths(image_paths)
  os.makedirs(out_dir, exist_ok=True)
  tiled = bool(tiled_cfg is not None and tiled_cfg.get("enabled", False))
  results: List[Dict[str, Any]] = []
  pictures: List[str] = []
  skipped: List[str] = []
  used_names: set = set()

  def emit(index, path, image, det):
    for box, score, label in zip(det["boxes_px"], det["scores"], det["classes"]):
      label = int(label)
      results.append({
          "image_id": index, "file_name": path,
          "category_id": int(label_to_category_id[label]) if label_to_category_id else label,
          "category_name": class_names[label - 1] if 1 <= label <= len(class_names) else str(label),
          "bbox": [round(float(v), 2) for v in (box[0], box[1], box[2] - box[0], box[3] - box[1])],
          "score": round(float(score), 5)})
    shown = det["scores"] >= score_threshold
    picture = visualize.draw_detections(image, det["boxes_px"][shown], det["classes"][shown],
                                        det["scores"][shown], class_names)
    picture_path = os.path.join(out_dir, _picture_name(path, used_names, picture_format))
    if not cv2.imwrite(picture_path, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
      raise OSError(f"could not write picture {picture_path}")
    pictures.append(picture_path)

  pending: List[tuple] = []     # (index, path, image) waiting for a whole-image batch

  def flush():
    if pending:
      dets = predictor.whole_image_detect(predict_fn, [p[2] for p in pending], input_size_px, batch_size)
      for (index, path, image), det in zip(pending, dets):
        emit(index, path, image, det)
      pending.clear()

  for index, path in enumerate(paths):
    image = images.read_image_rgb(path)
    if image is None:
      logging.warning("skipping %s: missing, unreadable, or not a complete image (a truncated "
                      "file?)", path)
      skipped.append(path)
      continue
    if tiled:
      emit(index, path, image, predictor.tiled_detect(predict_fn, image, input_size_px, tiled_cfg.get("overlap_px", 0),
                                            nms_iou, top_k, batch_size))
    else:
      pending.append((index, path, image))
      if len(pending) == batch_size:
        flush()
  flush()
  if not pictures:
    raise ValueError(f"none of the {len(paths)} image files could be read (first: {paths[0]})")
  json_path = os.path.join(out_dir, "detections.json")
  with open(json_path, "w") as f:
    json.dump(results, f)
  return {"json_path": json_path, "picture_paths": pictures, "skipped": skipped,
          "num_images": len(pictures), "num_detections": len(results)}


def category_ids(config, detector) -> Dict[int, int]:
  """The detector's label -> category id map ({} = identity). Checkpoints written before the map was
  saved with them get it from the data set's registry entry (the only case that opens it)."""
  if detector.label_to_category_id is not None:
    return detector.label_to_category_id
  from mdssd_jax.data import registry  # pylint: disable=g-import-not-at-top  (old checkpoints only)
  return dict(getattr(registry.get_dataset(config.data), "label_to_category_id", None) or {})


def predict_from_checkpoint(config, workdir, image_patterns, output_dir=None, step=None):
  """--mode=predict: detections in image files with the latest (or `step`) checkpoint of `workdir`.

  Only the weights and metadata are restored (state/weights.py): the class names and pixel
  convention come from the checkpoint, so predictions use exactly what training used, and a changed
  config.train does not matter.
  """
  expand_image_paths(image_patterns)   # a folder or glob without images: said before any loading
  detector = weights.load_detector(config, workdir, step)
  output_dir = output_dir or os.path.join(workdir, "predictions")
  predict_fn = predictor.LocalPredictor(detector.model, detector.anchors_cxcywh, config,
                                        detector.convention)
  predict_fn.set_variables(detector.variables)
  summary = predict_images(
      predict_fn, image_patterns, detector.class_names, output_dir,
      input_size_px=config.model.input_size_px,
      tiled_cfg=config.eval.tiled if config.eval.tiled.enabled else None,
      score_threshold=config.eval.picture_score_threshold, nms_iou=config.eval.nms_iou,
      top_k=config.eval.top_k, batch_size=config.eval.batch_size,
      label_to_category_id=category_ids(config, detector))
  skipped = summary["skipped"]
  line = (f"Predicted {summary['num_images']} image(s) with the checkpoint of step {detector.step}: "
          f"detections and pictures in {output_dir}")
  if skipped:
    line += (f"\nSkipped {len(skipped)} of {summary['num_images'] + len(skipped)} file(s) that could "
             f"not be read: {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
  progress.say(line)
  return summary
