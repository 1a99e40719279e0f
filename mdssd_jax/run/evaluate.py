"""Running the evaluators and recording what they found (training, `--mode=eval`, the notebook).

The evaluators (evaluation/) only compute; this module gives them a predict function and writes
their results. Process 0 prints each table, writes the scalars (TensorBoard: eval/<evaluator>/
<metric>), appends one line per evaluator to WORKDIR/eval_results.jsonl, writes the pictures and
their contact sheet to WORKDIR/pictures/step_N/ and the AP-by-size plots to WORKDIR/plots/.
"""

import os
from typing import Any, Callable, Dict, Mapping, Optional

import jax

from mdssd_jax import evaluation
from mdssd_jax.core import multihost
from mdssd_jax.evaluation import EvalResult, Evaluator
from mdssd_jax.inference import predictor
from mdssd_jax.report import history
from mdssd_jax.report import plots
from mdssd_jax.report import progress
from mdssd_jax.run import data_config
from mdssd_jax.run import predict as run_predict
from mdssd_jax.state import weights


def make_batch_predictor(config, model, anchors_cxcywh, convention, mesh
                         ) -> Callable[[Mapping[str, Any]], evaluation.BatchPredictFn]:
  """variables -> (eval batch -> this process's detections), compiled once and reused.

  Whole images: one jit over `mesh` (each process passes its own images). Tiled
  (config.eval.tiled.enabled): tiles of each original image on this process's own devices.
  """
  if config.eval.tiled.enabled:
    local = predictor.LocalPredictor(model, anchors_cxcywh, config, convention)

    def tiled(variables):
      local.set_variables(variables)
      return lambda batch: predictor.tiled_batch_detect(local, batch["original_image"], config)

    return tiled
  jitted = jax.jit(predictor.make_predict_fn(model, anchors_cxcywh, config, convention))
  return lambda variables: predictor.mesh_batch_predict(jitted, variables, mesh)


def record(result: EvalResult, config, workdir: str = "", writer=None, mode: str = "train",
           num_evaluators: int = 1) -> None:
  """Prints and writes one evaluator's result (process 0 only; workdir "" = print only)."""
  if jax.process_index() != 0:
    return
  progress.say(f"Evaluation {result.name!r} at step {result.step}:", result.table)
  if not workdir:
    return
  if result.pictures is not None:
    pictures_dir = os.path.join(workdir, "pictures", f"step_{result.step:08d}")
    result.pictures.write(os.path.join(pictures_dir, result.name) if num_evaluators > 1
                          else pictures_dir)
  results_path = os.path.join(workdir, history.EVAL_RESULTS_FILE)
  history.append_result(results_path, dict(step=result.step, evaluator=result.name, mode=mode,
                                           **result.metrics))
  past = [h for h in history.read_eval_history(results_path)
          if h.get("evaluator", result.name) == result.name]
  plots.write_evaluation_plots(workdir if num_evaluators == 1 else os.path.join(workdir, result.name),
                               result.step, result.size_result, past,
                               config.eval.size_buckets_px, writer=writer,
                               overall_key=result.headline_metric)


def run_evaluators(evaluators: Mapping[str, Evaluator], predict_fn: evaluation.BatchPredictFn,
                   step: int, config, workdir: str = "", writer=None, mode: str = "train"
                   ) -> Dict[str, float]:
  """Runs every evaluator with `predict_fn` and records the results; returns
  {"<evaluator>/<metric>": value}, the same on every process."""
  flat: Dict[str, float] = {}
  for name, evaluator in evaluators.items():
    result = evaluator.run(predict_fn, step, pictures=bool(workdir))
    flat.update({f"{name}/{k}": v for k, v in result.metrics.items()})
    record(result, config, workdir, writer, mode, num_evaluators=len(evaluators))
  if jax.process_index() == 0 and writer is not None:
    writer.write_scalars(step, {f"eval/{k}": v for k, v in flat.items()})
  return flat


def evaluate_checkpoint(config, workdir: str, step: Optional[int] = None) -> Dict[str, float]:
  """--mode=eval: evaluates a checkpoint with every evaluator, prints and records the results.

  Restores only the weights and metadata (state/weights.py): class names and pixel convention come
  from the checkpoint, and no optimiser is built.
  """
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  config, _ = data_config.resolve(config)   # a user's own data: class count and metric from it
  mesh = multihost.data_mesh()
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  detector = weights.load_detector(config, workdir, step, sharding=replicated)
  evaluators = evaluation.make_evaluators(config, detector.class_names,
                                          run_predict.category_ids(config, detector) or None)
  batch_predictor = make_batch_predictor(config, detector.model, detector.anchors_cxcywh,
                                         detector.convention, mesh)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  metrics = run_evaluators(evaluators, batch_predictor(detector.variables), detector.step, config,
                           workdir, writer, mode="eval")
  writer.flush()
  return metrics
