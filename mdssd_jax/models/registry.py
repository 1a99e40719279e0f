"""The detector builders that `config.model.architecture` selects.

A builder takes (config.model, boxes per cell of each head) and returns a Flax module whose
apply(variables, images (B, S, S, 3), train) gives (loc_preds (B, A, 4), cls_logits (B, A, C + 1)).
Register a new one with `@register("name")`; `get_builder` names the known ones when asked for
another.
"""

from typing import Callable, Dict, Tuple

from mdssd_jax.models import ssd

_BUILDERS: Dict[str, Callable] = {}


def register(name: str):
  """Decorator: registers `builder(model_cfg, boxes_per_cell) -> module` under `name`."""
  def add(builder):
    if name in _BUILDERS:
      raise ValueError(f"architecture {name!r} is registered twice")
    _BUILDERS[name] = builder
    return builder
  return add


def known_architectures() -> Tuple[str, ...]:
  return tuple(sorted(_BUILDERS))


def get_builder(name: str) -> Callable:
  if name not in _BUILDERS:
    raise ValueError(f"config.model.architecture={name!r} is unknown; known architectures: "
                     f"{list(known_architectures())} (mdssd_jax/models/registry.py)")
  return _BUILDERS[name]


@register("ssd")
def build_ssd(model_cfg, boxes_per_cell):
  """SSD (Liu et al. 2016): heads on trunk and extra maps, no Fusion Blocks."""
  if tuple(model_cfg.fusions):
    raise ValueError(f"config.model.architecture='ssd' has no Fusion Blocks but "
                     f"config.model.fusions lists {len(model_cfg.fusions)}: set "
                     f"config.model.architecture='mdssd', or config.model.fusions=()")
  return ssd.build_ssd_module(model_cfg, boxes_per_cell)


@register("mdssd")
def build_mdssd(model_cfg, boxes_per_cell):
  """MDSSD (Cui et al. 2018): SSD plus Fusion Blocks joining deep maps to shallow ones."""
  if not tuple(model_cfg.fusions):
    raise ValueError("config.model.architecture='mdssd' needs Fusion Blocks but config.model.fusions "
                     "is empty: set it (configs/common.py MDSSD_FUSIONS), or architecture='ssd'")
  return ssd.build_ssd_module(model_cfg, boxes_per_cell)
