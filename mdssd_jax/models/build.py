"""A detector from a config: `config.model.architecture` picks the builder from the registry.

`build_model(config)` is the module, `build_detector(config)` the module and its default boxes checked
against each other, `feature_sizes(config.model)` each head's map side (no compute). Kept apart from
`ssd.py` (the module) and `registry.py` (the builders, which call ssd.build_ssd_module), so that no two
of these modules import each other.
"""

from typing import Tuple

import numpy as np

from mdssd_jax.core import anchors as anchors_lib
from mdssd_jax.models import registry
from mdssd_jax.models import ssd


def _build(model_cfg, boxes_per_cell) -> ssd.SSD:
  return registry.get_builder(model_cfg.get("architecture", "ssd"))(model_cfg, boxes_per_cell)


def build_model(model_cfg, anchors_cfg=None) -> ssd.SSD:
  """The detector module described by `config.model`, with boxes per cell from `config.anchors`.

  Args:
    model_cfg: `config.model`, or the whole config (then its `anchors` section is used).
    anchors_cfg: `config.anchors` (its aspect_ratios give each head's boxes per cell). Needed unless
      model_cfg is the whole config.
  Returns:
    an `SSD` module: module.apply(variables, images (B, S, S, 3), train) -> (loc_preds, cls_logits).
  """
  model_cfg, anchors_cfg = ssd.model_and_anchor_sections(model_cfg, anchors_cfg)
  if anchors_cfg is None:
    raise ValueError("build_model needs the anchors section for the boxes per cell: call "
                     "build_model(config.model, config.anchors) or build_model(config)")
  heads, ratios = tuple(model_cfg.head_sources), tuple(anchors_cfg.aspect_ratios)
  if len(heads) != len(ratios):
    raise ValueError(f"config.model.head_sources has {len(heads)} heads {list(heads)} but "
                     f"config.anchors.aspect_ratios has {len(ratios)} entries: give one per head")
  return _build(model_cfg, tuple(anchors_lib.num_boxes_per_cell(r) for r in ratios))




def feature_sizes(model_cfg) -> Tuple[int, ...]:
  """Side of each head's map, finest first, for `config.model` (or the whole config); no compute."""
  model_cfg, _ = ssd.model_and_anchor_sections(model_cfg)
  # Map sizes do not depend on the boxes per cell: one box per cell is enough to trace the model.
  model = _build(model_cfg, (1,) * len(model_cfg.head_sources))
  _, _, maps = ssd.abstract_forward(model, int(model_cfg.input_size_px))
  return tuple(int(m.shape[1]) for m in maps)


def build_detector(config) -> Tuple[ssd.SSD, np.ndarray]:
  """The model and its default boxes for a whole config, checked against each other.

  Returns: (model, anchors_cxcywh np.float32 (A, 4)).
  Raises ValueError naming both numbers when the model predicts a different number of boxes per
  image than there are default boxes, and both lists when the head map sizes differ from
  config.anchors.feature_sizes.
  """
  model = build_model(config.model, config.anchors)
  size = int(config.model.input_size_px)
  anchors = anchors_lib.from_config(config.anchors, size)
  _, (loc_preds, _), maps = ssd.abstract_forward(model, size)
  model_sizes = [int(m.shape[1]) for m in maps]
  config_sizes = [int(f) for f in config.anchors.feature_sizes]
  if loc_preds.shape[1] != anchors.shape[0]:
    raise ValueError(
        f"the model predicts {loc_preds.shape[1]} boxes per image but config.anchors gives "
        f"{anchors.shape[0]} default boxes (model head map sizes {model_sizes}, "
        f"config.anchors.feature_sizes {config_sizes}): make config.anchors match the model")
  if model_sizes != config_sizes:
    raise ValueError(
        f"the model's head maps are {model_sizes} but config.anchors.feature_sizes is "
        f"{config_sizes}: set config.anchors.feature_sizes = {tuple(model_sizes)}")
  return model, anchors
