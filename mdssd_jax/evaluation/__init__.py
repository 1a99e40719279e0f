"""Evaluation: the evaluators `config.evals` lists, each a name, eval batches and a metric.

A config names its evaluators (big_vision style):

    config.evals.voc = dict(type="voc", split="test", every_steps=10_000, max_images=0,
                            num_pictures=8, iou_threshold=0.5, use_07_metric=True)

`make_evaluators(config, class_names)` builds one `Evaluator` per entry. An evaluator is given a
predict function (eval batch -> detections) and returns an `EvalResult`; it writes nothing. The
callers (run/evaluate.py for training, `--mode=eval` and the notebook) print and record the results.
The metrics themselves are in mdssd_jax/metrics/ (rules in docs/evaluation.md).
"""

import functools
from typing import Dict, Mapping, Optional, Sequence

import jax

from mdssd_jax import metrics as metrics_lib
from mdssd_jax.data import pipeline
from mdssd_jax.evaluation.evaluator import BatchPredictFn, EvalResult, Evaluator
from mdssd_jax.metrics import sizes
from mdssd_jax.report import visualize


def make_evaluators(config, class_names: Sequence[str],
                    label_to_category_id: Optional[Mapping[int, int]] = None) -> Dict[str, Evaluator]:
  """One Evaluator per `config.evals` entry, in the config's order.

  class_names: the C class names (label l is class_names[l - 1]); label_to_category_id: COCO's
  category ids of our labels (None: identity).
  """
  evals = config.evals
  if not evals:
    raise ValueError("config.evals is empty; add an evaluator, e.g. config.evals.voc = "
                     "common.voc_eval(...) (configs/common.py)")
  if config.eval.batch_size <= 0 or config.eval.batch_size % jax.local_device_count():
    raise ValueError(f"config.eval.batch_size={config.eval.batch_size} must be a positive multiple "
                     f"of the {jax.local_device_count()} local devices; set "
                     f"--config.eval.batch_size={max(1, jax.local_device_count()) * 8}")
  buckets = sizes.check_size_buckets(config.eval.size_buckets_px)
  evaluators = {}
  for name, entry in evals.items():
    metric = metrics_lib.make_metric(entry, class_names, label_to_category_id, name=name)
    batches = pipeline.make_eval_batches(
        config, split=entry.split or config.data.eval_split, process_index=jax.process_index(),
        process_count=jax.process_count(), with_original_images=bool(config.eval.tiled.enabled),
        max_images=int(entry.max_images))
    make_pictures = None
    if int(entry.num_pictures) > 0:
      make_pictures = functools.partial(
          visualize.PictureCollector, int(entry.num_pictures), list(class_names),
          score_threshold=config.eval.picture_score_threshold,
          iou_threshold=sizes.SIZE_AP_IOU,
          small_object_px=config.eval.small_object_px, min_side_px=config.eval.picture_min_side_px,
          sheet_columns=config.eval.sheet_columns)
    evaluators[name] = Evaluator(
        name=name, batches=batches, metric=metric, every_steps=int(entry.every_steps),
        size_buckets_px=buckets,
        size_ap_07_metric=bool(entry.type == "voc" and entry.use_07_metric),
        missed_score_threshold=config.eval.picture_score_threshold, make_pictures=make_pictures)
  return evaluators


def check_best_metric(config) -> None:
  """config.eval.best_metric must name '<evaluator>/<metric>' of an evaluator in config.evals."""
  best = config.eval.best_metric
  if not best:
    return
  name = best.split("/", 1)[0]
  if "/" not in best or name not in config.evals:
    raise ValueError(f"config.eval.best_metric={best!r} must be '<evaluator>/<metric>' with an "
                     f"evaluator of config.evals ({', '.join(config.evals.keys())}), e.g. "
                     f"'{next(iter(config.evals.keys()), 'voc')}/mAP'")


__all__ = ["BatchPredictFn", "EvalResult", "Evaluator", "check_best_metric", "make_evaluators"]
