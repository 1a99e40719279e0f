"""Inference from a trained workdir: `--mode=predict` (pictures + JSON) and `--mode=coverage`.

The model, its default boxes and its pixel convention all come from the checkpoint's config and
metadata, so predictions use exactly what training used.
"""

import os

from mdssd_jax import anchor_coverage
from mdssd_jax import predict
from mdssd_jax import train


def predict_from_checkpoint(config, workdir, image_patterns, output_dir=None, step=None):
  """Detects objects in image files with the latest (or `step`) checkpoint of `workdir`."""
  setup, state, step = train.load_checkpoint(config, workdir, step)
  output_dir = output_dir or os.path.join(workdir, "predictions")
  paths = predict.expand_image_paths(image_patterns)
  summary = predict.predict_images(
      train.local_image_predictor(setup.model, setup.anchors, config, setup.convention,
                                  train.model_variables(state)), paths, setup.dataset.class_names, output_dir,
      input_size_px=config.model.input_size_px,
      tiled_cfg=config.eval.tiled if config.eval.tiled.enabled else None,
      score_threshold=config.eval.picture_score_threshold, nms_iou=config.eval.nms_iou,
      top_k=config.eval.top_k, batch_size=config.eval.batch_size,
      label_to_category_id=getattr(setup.dataset, "label_to_category_id", None))
  print(f"Predicted {len(paths)} image(s) with the checkpoint of step {step}: detections and "
        f"pictures in {output_dir}", flush=True)
  return summary


def coverage_for_config(config, max_images=None, plot_path=None):
  """The anchor-coverage table of a config's default boxes over its training split's boxes."""
  from mdssd_jax import models  # pylint: disable=g-import-not-at-top
  from mdssd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  _, anchors = models.build_detector(config)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.eval_split = config.data.train_split
    if max_images:
      config.eval.max_images = max_images
  gt_boxes, image_sizes = anchor_coverage.boxes_from_batches(pipeline.make_eval_batches(config))
  report = anchor_coverage.coverage_report(anchors, gt_boxes, image_sizes,
                                           input_size_px=config.model.input_size_px)
  if plot_path:
    anchor_coverage.plot_coverage(report, plot_path)
  return anchor_coverage.format_table(report)
