"""What the VOC, COCO and TT100K evaluators share: per-image dicts gathered over add() calls, then one
evaluation of all of them, kept until the next add() or reset()."""

import abc
from typing import Any, Dict, List, Mapping, Sequence


class AccumulatingMetric(abc.ABC):
  """Accumulates per-image predictions and ground truths; a subclass says how to evaluate them.

  Subclasses implement `_evaluate_all` (the whole result from all images), `compute()` and `table()`;
  both of the latter read the result through `_evaluate()`, so they share one evaluation.
  """

  # The metric a run's summary and plots lead with (a key of compute()).
  HEADLINE = "mAP"

  def __init__(self, class_names: Sequence[str]):
    self.class_names = list(class_names)
    self.reset()

  def reset(self) -> None:
    self._predictions: List[Mapping[str, Any]] = []
    self._ground_truths: List[Mapping[str, Any]] = []
    self._result = None

  def add(self, predictions: Sequence[Mapping[str, Any]],
          ground_truths: Sequence[Mapping[str, Any]]) -> None:
    """One dict per image each (see the package docstring), boxes in pixels xyxy."""
    if len(predictions) != len(ground_truths):
      raise ValueError(f"add() got {len(predictions)} prediction dicts and {len(ground_truths)} "
                       "ground-truth dicts; need one of each per image")
    self._predictions.extend(predictions)
    self._ground_truths.extend(ground_truths)
    self._result = None

  @property
  def num_images(self) -> int:
    return len(self._predictions)

  def images(self):
    """(predictions, ground_truths): the per-image dicts added so far (for AP by size, plots)."""
    return list(self._predictions), list(self._ground_truths)

  def _evaluate(self):
    # Cached: an evaluation pass usually asks for compute() and table(), and COCOeval is slow.
    if self._result is None:
      self._result = self._evaluate_all(self._predictions, self._ground_truths)
    return self._result

  @abc.abstractmethod
  def _evaluate_all(self, predictions: Sequence[Mapping[str, Any]],
                    ground_truths: Sequence[Mapping[str, Any]]):
    """The full result (whatever compute() and table() read) for these images."""

  @abc.abstractmethod
  def compute(self) -> Dict[str, float]:
    """The scalar metrics, by name."""

  @abc.abstractmethod
  def table(self) -> str:
    """A human-readable report, per class."""
