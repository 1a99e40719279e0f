"""One evaluator per `config.evals.<name>` entry: its data, its predictor, its metric, its pictures.

Training, `--mode=eval` and the notebook call the same `Evaluator.run(state, step)`. Each process
predicts its own slice of the split (whole images: one jit over the global mesh; large images: tiles
on the process's own devices, no collectives), one all-gather at the end brings every image to every
process, and all compute the same metrics; process 0 draws the pictures.
"""

import time
from typing import Any, Dict, Mapping

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from mdssd_jax import experiment
from mdssd_jax import multihost
from mdssd_jax import plots
from mdssd_jax import predict as predict_lib
from mdssd_jax import visualize
from mdssd_jax.data import pipeline
from mdssd_jax.evaluation import loop


# AP by object size is AP@0.5 (VOC's matching), whatever the evaluator's own metric.
SIZE_AP_IOU = 0.5


def _gather_across_processes(arrays):
  """multihost_utils.process_allgather, once every process has finished predicting its share (a
  process slower to compile or predict would otherwise outlast the gather's collective timeout)."""
  multihost.barrier("eval_predictions_ready")
  return multihost_utils.process_allgather(arrays)


class Evaluator:
  """Evaluates a training state on one split with one metric, as `config.evals.<name>` says.

  Args:
    name: the entry's name; metrics are reported as "<name>/<metric>".
    entry: config.evals.<name>: type, split ("" = config.data.eval_split), every_steps (0 = only at
      the end of training), max_images (0 = all), num_pictures, and the metric's own options.
    setup: the experiment's `Setup` (mesh, model, default boxes, data set, pixel convention).
    metric: the metric accumulator (evaluation.make_metric), add() / compute() / table().
  """

  def __init__(self, name: str, entry: Mapping[str, Any], setup, metric):
    self.name = name
    self.entry = entry
    self.setup = setup
    self.metric = metric
    config = setup.config
    self.every_steps = int(entry.every_steps)
    self.split = entry.split or config.data.eval_split
    self.tiled = bool(config.eval.tiled.enabled)
    self.batches = pipeline.make_eval_batches(
        config, split=self.split, process_index=jax.process_index(),
        process_count=jax.process_count(), with_original_images=self.tiled,
        max_images=int(entry.max_images))
    self._predict_fns = {}   # pixel convention -> jitted predict (built once, reused every run)
    self.size_result = None  # plots.size_bucket_metrics of the last run
    self.headline_metric = metric.HEADLINE

  def due(self, step: int, last_step: int) -> bool:
    """Whether training evaluates at `step` (always at the last step)."""
    return step == last_step or (self.every_steps > 0 and step % self.every_steps == 0)

  def _predict_fn(self, variables):
    """eval batch -> this process's fixed-size detections (normalised to the original images)."""
    setup = self.setup
    key = repr(sorted(setup.convention.items()))
    if key not in self._predict_fns:
      if self.tiled:
        self._predict_fns[key] = predict_lib.LocalPredictor(setup.model, setup.anchors, setup.config,
                                                            setup.convention)
      else:
        self._predict_fns[key] = jax.jit(predict_lib.make_predict_fn(
            setup.model, setup.anchors, setup.config, setup.convention))
    fn = self._predict_fns[key]
    if self.tiled:
      fn.set_variables(variables)
      return lambda batch: predict_lib.tiled_batch_detect(fn, batch["original_image"], setup.config)

    def mesh_predict(batch):
      images = setup.global_batch({"image": batch["image"]})["image"]
      return multihost_utils.global_array_to_host_local_array(
          fn(variables, images), setup.mesh, jax.sharding.PartitionSpec("data"))

    return mesh_predict

  def run(self, state, step: int, pictures_dir: str = "") -> Dict[str, float]:
    """The metrics of `state` on this evaluator's split (the same on every process).

    Besides the metric's own numbers: AP@0.5 per object size bucket ("AP_size/<bucket>", VOC rules,
    config.eval.size_buckets_px; docs/evaluation.md). pictures_dir: where process 0 writes the
    `num_pictures` images with the most missed small objects and their contact sheet ("" = none).
    """
    config = self.setup.config
    num_pictures = int(self.entry.num_pictures) if (pictures_dir and jax.process_index() == 0) else 0
    pictures = visualize.PictureCollector(
        num_pictures, self.setup.dataset.class_names,
        score_threshold=config.eval.picture_score_threshold, iou_threshold=SIZE_AP_IOU,
        small_object_px=config.eval.small_object_px, min_side_px=config.eval.picture_min_side_px,
        sheet_columns=config.eval.sheet_columns)
    start = time.time()
    metrics = loop.evaluate_batches(
        self._predict_fn(experiment.model_variables(state)), self.batches, self.metric,
        process_allgather=(_gather_across_processes if jax.process_count() > 1 else None),
        on_batch=pictures.add_batch if num_pictures else None)
    predictions, ground_truths = self.metric.images()
    self.size_result = plots.size_bucket_metrics(
        predictions, ground_truths, config.eval.size_buckets_px, iou_threshold=SIZE_AP_IOU,
        use_07_metric=bool(self.entry.type == "voc" and self.entry.use_07_metric),
        missed_score_threshold=config.eval.picture_score_threshold)
    metrics = dict(metrics, **plots.bucket_scalars(self.size_result))
    logging.info("evaluation %r at step %d took %.1f s", self.name, step, time.time() - start)
    if num_pictures:
      pictures.write(pictures_dir)
    return {k: float(v) for k, v in metrics.items()}

  def table(self) -> str:
    """The per-class report of the last run."""
    return self.metric.table()
