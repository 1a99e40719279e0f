"""The config values that follow the data set: its class count, and the metric of a user's own data.

Configs for a user's own files (configs/*_custom.py, docs/your_data.md) leave both to the data:
`model.num_classes = 0` takes the data set's class count (a count the config sets itself must
equal it: Setup refuses a mismatch, naming both), and an evaluator of type "auto" computes COCO's
metrics when the data set has COCO category ids (a COCO JSON source) and VOC's mAP otherwise;
`eval.best_metric = "<evaluator>/auto"` then names that metric's headline (AP or mAP).
"""

import copy

from mdssd_jax import metrics as metrics_lib
from mdssd_jax.data import registry
from mdssd_jax.state import weights

AUTO = "auto"


def metric_type(info: registry.DatasetInfo) -> str:
  """The metric an "auto" evaluator computes on this data set: "coco" or "voc"."""
  return "coco" if info.label_to_category_id else "voc"


def resolve(config):
  """(config with the data set's class count and auto evaluators resolved, the DatasetInfo).

  The config is copied when anything changes; the caller's stays as it was.
  """
  info = registry.get_dataset(config.data)
  config = weights.with_num_classes(config, info.num_classes)
  auto = [name for name, entry in config.evals.items() if entry.get("type") == AUTO]
  if auto:
    config = copy.deepcopy(config)
    kind = metric_type(info)
    for name in auto:
      config.evals[name].type = kind
      if config.eval.best_metric == f"{name}/{AUTO}":
        config.eval.best_metric = f"{name}/{metrics_lib.METRIC_CLASSES[kind].HEADLINE}"
  return config, info
