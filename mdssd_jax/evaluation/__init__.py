"""Evaluation: metrics (VOC, COCO, TT100K) looked up by name, and the evaluators `config.evals` lists.

A config names its evaluators (big_vision style):

    config.evals.voc = dict(type="voc", split="test", every_steps=10_000, max_images=0,
                            num_pictures=8, iou_threshold=0.5, use_07_metric=True)

`make_evaluators(setup)` builds one `Evaluator` per entry; training, `--mode=eval` and the notebook all
call `run_evaluators`. Every metric accumulator takes per-image dicts with boxes in PIXELS, corner form:
  predictions:   {"boxes": (K, 4), "scores": (K,), "labels": (K,) int 1..C}
  ground truths: {"boxes": (N, 4), "labels": (N,) int 1..C, "difficult": (N,) bool (optional),
                  "area": (N,) float (optional; COCO's annotated area, < 0 = use the box's)}
and offers add(predictions, ground_truths), compute() -> dict[str, float], table() -> str, reset().
The rules of each metric are in docs/evaluation.md.
"""

import json
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import jax

from mdssd_jax import console
from mdssd_jax import plots
from mdssd_jax.evaluation import coco, tt100k, voc
from mdssd_jax.evaluation.evaluator import Evaluator

EVAL_RESULTS_FILE = "eval_results.jsonl"


def _option(entry: Mapping[str, Any], key: str, name: str):
  """entry[key], or a clear error naming the config key (config values are the only defaults)."""
  if key not in entry:
    raise ValueError(f"config.evals.{name}.{key} is missing; an evaluator of type "
                     f"{entry['type']!r} needs it (see configs/common.py for a complete entry)")
  return entry[key]


def _voc(entry, name, class_names, label_to_category_id):
  del label_to_category_id   # VOC reports by our own labels
  return voc.VocEvaluator(class_names, iou_threshold=_option(entry, "iou_threshold", name),
                          use_07_metric=_option(entry, "use_07_metric", name))


def _coco(entry, name, class_names, label_to_category_id):
  return coco.CocoEvaluator(class_names, label_to_category_id=label_to_category_id,
                            backend=_option(entry, "coco_backend", name))


def _tt100k(entry, name, class_names, label_to_category_id):
  del label_to_category_id
  return tt100k.Tt100kEvaluator(class_names, iou_threshold=_option(entry, "iou_threshold", name),
                                score_threshold=_option(entry, "score_threshold", name),
                                use_07_metric=_option(entry, "use_07_metric", name))


METRICS: Dict[str, Callable[..., Any]] = {"voc": _voc, "coco": _coco, "tt100k": _tt100k}


def make_metric(entry: Mapping[str, Any], class_names: Sequence[str],
                label_to_category_id: Optional[Mapping[int, int]] = None, name: str = "?"):
  """The metric accumulator of one `config.evals.<name>` entry (its `type` picks it).

  Args:
    entry: the config entry (type and the metric's options).
    class_names: C names; label l (1..C) is class_names[l - 1].
    label_to_category_id: COCO only: our label -> the data set's category id (identity if None).
    name: the entry's name, for error messages.
  """
  kind = entry.get("type")
  if kind not in METRICS:
    raise ValueError(f"config.evals.{name}.type={kind!r} is not a known metric; known: "
                     f"{', '.join(sorted(METRICS))}")
  return METRICS[kind](entry, name, class_names, label_to_category_id)


def make_evaluators(setup) -> Dict[str, Evaluator]:
  """One Evaluator per `config.evals` entry, in the config's order."""
  evals = setup.config.evals
  if not evals:
    raise ValueError("config.evals is empty; add an evaluator, e.g. config.evals.voc = "
                     "common.voc_eval(...) (configs/common.py)")
  mapping = getattr(setup.dataset, "label_to_category_id", None)
  return {name: Evaluator(name, entry, setup,
                          make_metric(entry, setup.dataset.class_names, mapping, name=name))
          for name, entry in evals.items()}


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


def run_evaluators(evaluators: Mapping[str, Evaluator], state, step: int, workdir: str = "",
                   writer=None, mode: str = "train") -> Dict[str, float]:
  """Runs the evaluators on `state`; returns {"<evaluator>/<metric>": value} on every process.

  Process 0 prints each table, writes the scalars (TensorBoard: eval/<evaluator>/<metric>), appends
  one line per evaluator to WORKDIR/eval_results.jsonl, draws pictures and a contact sheet in
  WORKDIR/pictures/step_N/ and the AP-by-size plots in WORKDIR/plots/ (workdir "" = report only).
  """
  flat: Dict[str, float] = {}
  lead = jax.process_index() == 0
  for name, evaluator in evaluators.items():
    pictures_dir = os.path.join(workdir, "pictures", f"step_{int(step):08d}") if workdir else ""
    if pictures_dir and len(evaluators) > 1:
      pictures_dir = os.path.join(pictures_dir, name)
    metrics = evaluator.run(state, step, pictures_dir=pictures_dir)
    flat.update({f"{name}/{k}": v for k, v in metrics.items()})
    if lead:
      console.say(f"Evaluation {name!r} at step {step}:", evaluator.table())
      if workdir:
        results_path = os.path.join(workdir, EVAL_RESULTS_FILE)
        append_result(results_path, dict(step=int(step), evaluator=name, mode=mode, **metrics))
        history = [h for h in plots.read_eval_history(results_path)
                   if h.get("evaluator", name) == name]
        plots.write_evaluation_plots(workdir if len(evaluators) == 1 else os.path.join(workdir, name),
                                     step, evaluator.size_result, history,
                                     evaluator.setup.config.eval.size_buckets_px, writer=writer,
                                     overall_key=evaluator.headline_metric)
  if lead and writer is not None:
    writer.write_scalars(step, {f"eval/{k}": v for k, v in flat.items()})
  return flat


def append_result(path: str, record: Mapping[str, Any]) -> bool:
  """Appends `record` as one JSON line unless a line of the same step, evaluator and mode exists.

  A run killed between its evaluation and its checkpoint evaluates that step again on resume: the
  second, identical line is not written. Returns whether a line was written.
  """
  key = (record["step"], record["evaluator"], record["mode"])
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          old = json.loads(line)
        except ValueError:
          continue   # a line cut by a crash mid-write: ignored, the next append is whole
        if (old.get("step"), old.get("evaluator"), old.get("mode")) == key:
          return False
  with open(path, "a+") as f:
    f.seek(0, os.SEEK_END)
    if f.tell():   # after a line cut by a crash, start a new one
      f.seek(f.tell() - 1)
      cut = f.read(1) != "\n"
      f.seek(0, os.SEEK_END)
      if cut:
        f.write("\n")
    f.write(json.dumps(record) + "\n")
  return True


def evaluate_checkpoint(config, workdir, step=None):
  """--mode=eval: evaluates a checkpoint with every evaluator, prints and records the results."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from mdssd_jax import experiment  # pylint: disable=g-import-not-at-top
  setup, state, step = experiment.load_checkpoint(config, workdir, step)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  metrics = run_evaluators(make_evaluators(setup), state, step, workdir, writer, mode="eval")
  writer.flush()
  return metrics


__all__ = ["EVAL_RESULTS_FILE", "Evaluator", "METRICS", "append_result", "check_best_metric",
           "coco", "evaluate_checkpoint", "make_evaluators", "make_metric", "run_evaluators",
           "tt100k", "voc"]
