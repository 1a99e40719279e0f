"""Detection metrics (VOC, COCO, TT100K; AP by object size): pure accumulators, looked up by name.

A metric takes per-image dicts with boxes in PIXELS, corner form:
  predictions:   {"boxes": (K, 4), "scores": (K,), "labels": (K,) int 1..C}
  ground truths: {"boxes": (N, 4), "labels": (N,) int 1..C, "difficult": (N,) bool (optional),
                  "area": (N,) float (optional; COCO's annotated area, < 0 = use the box's)}
and offers add(predictions, ground_truths), compute() -> dict[str, float], table() -> str, reset().
`make_metric(config.evals.<name>, class_names)` builds one from a config entry (its `type`); a new
metric is a module here with a class of that interface and one line in METRICS. The rules of each
metric are in docs/evaluation.md.
"""

from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from mdssd_jax.metrics import coco, tt100k, voc


def _option(entry: Mapping[str, Any], key: str, name: str):
  """entry[key], or a clear error naming the config key (config values are the only defaults)."""
  if key not in entry:
    raise ValueError(f"config.evals.{name}.{key} is missing; an evaluator of type "
                     f"{entry['type']!r} needs it (see configs/common.py for a complete entry)")
  return entry[key]


def _voc(entry, name, class_names, label_to_category_id):
  del label_to_category_id   # VOC reports by our own labels
  return voc.VocMetric(class_names, iou_threshold=_option(entry, "iou_threshold", name),
                          use_07_metric=_option(entry, "use_07_metric", name))


def _coco(entry, name, class_names, label_to_category_id):
  return coco.CocoMetric(class_names, label_to_category_id=label_to_category_id,
                            backend=_option(entry, "coco_backend", name))


def _tt100k(entry, name, class_names, label_to_category_id):
  del label_to_category_id
  return tt100k.Tt100kMetric(class_names, iou_threshold=_option(entry, "iou_threshold", name),
                                score_threshold=_option(entry, "score_threshold", name),
                                use_07_metric=_option(entry, "use_07_metric", name))


METRICS: Dict[str, Callable[..., Any]] = {"voc": _voc, "coco": _coco, "tt100k": _tt100k}
# The accumulator class of each type (its HEADLINE names the metric a run is judged by).
METRIC_CLASSES: Dict[str, Any] = {"voc": voc.VocMetric, "coco": coco.CocoMetric,
                                  "tt100k": tt100k.Tt100kMetric}


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
