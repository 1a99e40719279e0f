"""Detection metrics (VOC, COCO, TT100K) behind one Evaluator interface, picked by `config.eval.metric`.

Every evaluator takes per-image dicts with boxes in PIXELS, corner form:
  predictions:   {"boxes": (K, 4), "scores": (K,), "labels": (K,) int 1..C}
  ground truths: {"boxes": (N, 4), "labels": (N,) int 1..C, "difficult": (N,) bool (optional)}
and offers add(predictions, ground_truths), compute() -> dict[str, float], table() -> str, reset().
"""

from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from mdssd_jax.evaluation import coco, tt100k, voc


def _voc(eval_cfg, class_names, label_to_category_id):
  del label_to_category_id   # VOC reports by our own labels
  return voc.VocEvaluator(class_names, iou_threshold=eval_cfg.get("iou_threshold", 0.5),
                          use_07_metric=eval_cfg.get("use_07_metric", True))


def _coco(eval_cfg, class_names, label_to_category_id):
  return coco.CocoEvaluator(class_names, label_to_category_id=label_to_category_id,
                            backend=eval_cfg.get("coco_backend", coco.DEFAULT_BACKEND))


def _tt100k(eval_cfg, class_names, label_to_category_id):
  del label_to_category_id
  return tt100k.Tt100kEvaluator(
      class_names, iou_threshold=eval_cfg.get("iou_threshold", 0.5),
      score_threshold=eval_cfg.get("tt100k_score_threshold", tt100k.DEFAULT_SCORE_THRESHOLD),
      use_07_metric=eval_cfg.get("use_07_metric", False))


_EVALUATORS: Dict[str, Callable[..., Any]] = {"voc": _voc, "coco": _coco, "tt100k": _tt100k}


def make_evaluator(eval_cfg: Mapping[str, Any], class_names: Sequence[str],
                   label_to_category_id: Optional[Mapping[int, int]] = None):
  """The evaluator `eval_cfg.metric` names.

  Args:
    eval_cfg: config.eval (metric, iou_threshold, use_07_metric, tt100k_score_threshold,
      coco_backend; missing keys take the REFERENCE.md defaults).
    class_names: C names; label l (1..C) is class_names[l - 1].
    label_to_category_id: COCO only: our label -> the data set's category id (identity if None).
  """
  metric = eval_cfg.get("metric", "voc")
  if metric not in _EVALUATORS:
    raise ValueError(f"unknown eval metric '{metric}'; known: {', '.join(sorted(_EVALUATORS))} "
                     "(set config.eval.metric)")
  return _EVALUATORS[metric](eval_cfg, class_names, label_to_category_id)


__all__ = ["make_evaluator", "voc", "coco", "tt100k"]
