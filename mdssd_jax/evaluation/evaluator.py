"""One evaluator per `config.evals.<name>` entry: a name, its eval batches, its metric; it is given a
predict function and returns its results, which the caller writes (run/evaluate.py).

Training, `--mode=eval` and the notebook call the same `Evaluator.run(predict_fn, step)`. Each process
predicts its own slice of the split, one all-gather at the end brings every image to every process,
and all compute the same metrics; the pictures with the most missed small objects are collected in
memory (process 0 only) for the caller to write.
"""

import dataclasses
import time
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils

from mdssd_jax.core import multihost
from mdssd_jax.evaluation import loop
from mdssd_jax.metrics import sizes
from mdssd_jax.report import visualize

# eval batch -> this process's detections: boxes (B, K, 4) xyxy normalised to the original image,
# scores (B, K), classes (B, K) 1..C, valid (B, K) (NumPy or jax arrays).
BatchPredictFn = Callable[[Mapping[str, Any]], Mapping[str, Any]]


def _gather_across_processes(arrays):
  """multihost_utils.process_allgather, once every process has finished predicting its share (a
  process slower to compile or predict would otherwise outlast the gather's collective timeout)."""
  multihost.barrier("eval_predictions_ready")
  return multihost_utils.process_allgather(arrays)


@dataclasses.dataclass
class EvalResult:
  """What one evaluator's run found.

  metrics: {name: value}, the metric's own plus "AP_size/<bucket>"; table: the per-class report;
  size_result: metrics/sizes.py's size_bucket_metrics (for the plots); pictures: the collected
  pictures (report/visualize.py's PictureCollector; empty unless asked for, and on process 0 only).
  """
  name: str
  step: int
  metrics: Dict[str, float]
  table: str
  size_result: Mapping[str, Any]
  headline_metric: str
  pictures: Optional[visualize.PictureCollector] = None


@dataclasses.dataclass
class Evaluator:
  """Evaluates detections on one split with one metric.

  name: the entry's name; metrics are reported as "<name>/<metric>".
  batches: the split's eval batches (re-iterable; data/pipeline.py's make_eval_batches).
  metric: a metric accumulator (metrics.make_metric): add() / compute() / table() / images().
  every_steps: training evaluates at multiples of it and at the last step (0: only at the end).
  size_buckets_px: ((name, lowest, highest), ...) of the AP-by-size buckets.
  size_ap_07_metric: the AP-by-size uses VOC2007's 11-point AP (as a VOC07 metric does).
  missed_score_threshold: a ground truth counts as missed unless a detection of at least this
    score finds it (pictures and the missed-objects histogram).
  make_pictures: () -> a visualize.PictureCollector, or None for no pictures.
  """
  name: str
  batches: Iterable[Mapping[str, Any]]
  metric: Any
  every_steps: int = 0
  size_buckets_px: Any = sizes.SIZE_BUCKETS_PX
  size_ap_07_metric: bool = False
  missed_score_threshold: float = 0.3
  make_pictures: Optional[Callable[[], visualize.PictureCollector]] = None

  def due(self, step: int, last_step: int) -> bool:
    """Whether training evaluates at `step` (always at the last step)."""
    return step == last_step or (self.every_steps > 0 and step % self.every_steps == 0)

  @property
  def headline_metric(self) -> str:
    return self.metric.HEADLINE

  def run(self, predict_fn: BatchPredictFn, step: int, pictures: bool = False) -> EvalResult:
    """The results of `predict_fn` on this evaluator's split (the same metrics on every process).

    pictures: collect the pictures with the most missed small objects (process 0 only).
    """
    collector = None
    if pictures and self.make_pictures is not None and jax.process_index() == 0:
      collector = self.make_pictures()
    start = time.time()
    metrics = loop.evaluate_batches(
        predict_fn, self.batches, self.metric,
        process_allgather=(_gather_across_processes if jax.process_count() > 1 else None),
        on_batch=collector.add_batch if collector is not None else None)
    predictions, ground_truths = self.metric.images()
    size_result = sizes.size_bucket_metrics(
        predictions, ground_truths, self.size_buckets_px, iou_threshold=sizes.SIZE_AP_IOU,
        use_07_metric=self.size_ap_07_metric, missed_score_threshold=self.missed_score_threshold)
    metrics = dict(metrics, **sizes.bucket_scalars(size_result))
    logging.info("evaluation %r at step %d took %.1f s", self.name, step, time.time() - start)
    return EvalResult(name=self.name, step=int(step),
                      metrics={k: float(v) for k, v in metrics.items()}, table=self.metric.table(),
                      size_result=size_result, headline_metric=self.headline_metric,
                      pictures=collector)
