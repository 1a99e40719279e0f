"""SSD and MDSSD detectors: VGG16 trunk, extra layers, optional Fusion Blocks, prediction heads.

Everything comes from `config.model` (layers, widths, dtype) and `config.anchors` (boxes per cell);
the heads' outputs are concatenated in exactly the default-box order of `mdssd_jax.core.anchors`.
`config.model.architecture` picks the builder from `mdssd_jax.models.registry` (models/build.py); every field of
`SSD` whose name is a key of `config.model` is taken from the config, so a new model setting is one
field here and one config key (docs/model.md, "Adding a model setting").
"""

import dataclasses
from typing import Any, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mdssd_jax.models import fusion as fusion_lib
from mdssd_jax.models import kernels as kernels_lib
from mdssd_jax.models import vgg

# The trunk map an SSD head L2-normalises before predicting (conv4_3's activations are much larger
# than the deeper maps'; ParseNet's fix, used by every SSD). The Fusion Blocks take the raw map.
NORMALISED_HEAD_SOURCE = "conv4_3"
# The trunk map the extra layers start from.
EXTRAS_INPUT = "conv7"
# Sown head maps (collection "intermediates"), used to read the head sizes without computing.
HEAD_MAPS = "head_maps"


class SSD(nn.Module):
  """An SSD / MDSSD detector.

  Attributes:
    num_classes: object classes C, without background.
    head_sources: map names with a prediction head, finest first (the default-box layer order).
    boxes_per_cell: default boxes per cell k of each head (2 + 2 * number of aspect ratios).
    extras: (name, mid, out, kernel, stride, padding) blocks after conv7, giving `<name>_2` maps.
    fusions: (name, shallow source, deep source, out channels) Fusion Blocks, giving `<name>` maps.
    width_multiplier: scales trunk, extra and fusion widths (not the heads' outputs).
    batch_norm: BatchNorm after every trunk, extra and Fusion Block conv ("batch_stats").
    l2norm_init_scale: initial scale of conv4_3's L2Norm when conv4_3 has a head.
    fusion_deconv_channels: width of each Fusion Block's deconvs and branch convs: one entry for
      all blocks, or one per entry of `fusions`.
    fusion_l2norm_init_scale, fusion_deconv_init: Fusion Block settings (see FusionBlock).
    fusion_batch_norm: batch norm inside the Fusion Blocks; None = as `batch_norm`.
    fusion_deep_branch: False: Fusion Blocks without their deconvolution branch (a control; see
      FusionBlock.deep_branch).
    kernels: "auto" | "native" | "cpu" | "portable" deconv / 2x2 pool implementations (models/kernels.py).
    remat: "none" | "blocks" (each VGG stage and Fusion Block rematerialised), with the
      jax.checkpoint policy named `remat_policy`.
    dtype: compute dtype (params float32).
  Call: images (B, S, S, 3) float (already normalised), train ->
    loc_preds (B, A, 4) float32 offsets, cls_logits (B, A, C + 1) float32 (class 0 = background),
    A = sum over heads of h * w * k, ordered (head, row, column, box in cell).
  """
  num_classes: int
  head_sources: Tuple[str, ...]
  boxes_per_cell: Tuple[int, ...]
  extras: Tuple[Tuple[Any, ...], ...] = ()
  fusions: Tuple[Tuple[Any, ...], ...] = ()
  width_multiplier: float = 1.0
  batch_norm: bool = False
  l2norm_init_scale: float = 20.0
  fusion_deconv_channels: Union[int, Tuple[int, ...]] = (256,)
  fusion_l2norm_init_scale: float = 20.0
  fusion_deconv_init: str = "xavier"
  fusion_batch_norm: Optional[bool] = None
  fusion_deep_branch: bool = True
  kernels: str = "auto"
  remat: str = "none"
  remat_policy: str = "nothing_saveable"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool):
    width = lambda c: vgg.scaled_width(c, self.width_multiplier)
    maps = dict(vgg.VGG16Trunk(self.width_multiplier, self.batch_norm, self.dtype, self.kernels,
                               self.remat, self.remat_policy, name="vgg")(images, train))

    x = maps[EXTRAS_INPUT]
    for name, mid, out, kernel, stride, padding in self.extras[:_num_extras_needed(self)]:
      x = vgg.ConvReLU(width(mid), kernel_size=1, padding=0, batch_norm=self.batch_norm,
                       dtype=self.dtype, kernels=self.kernels, name=f"{name}_1")(x, train)
      x = vgg.ConvReLU(width(out), kernel_size=kernel, stride=stride, padding=padding,
                       batch_norm=self.batch_norm, dtype=self.dtype, kernels=self.kernels,
                       name=f"{name}_2")(x, train)
      maps[f"{name}_2"] = x

    block = vgg.maybe_remat(fusion_lib.FusionBlock, self.remat, self.remat_policy,
                            static_argnums=(3,))
    for (name, shallow, deep, out), deconv_width in zip(self.fusions,
                                                        fusion_widths(self.fusion_deconv_channels,
                                                                      len(self.fusions))):
      maps[name] = block(
          width(deconv_width), width(out), self.fusion_l2norm_init_scale,
          batch_norm=(self.batch_norm if self.fusion_batch_norm is None
                      else bool(self.fusion_batch_norm)),
          deconv_init=self.fusion_deconv_init, kernels=self.kernels,
          deep_branch=bool(self.fusion_deep_branch), dtype=self.dtype,
          name=name)(maps[shallow], maps[deep], train)

    locs, logits = [], []
    for source, k in zip(self.head_sources, self.boxes_per_cell):
      x = maps[source]
      if source == NORMALISED_HEAD_SOURCE:
        x = vgg.L2Norm(self.l2norm_init_scale, dtype=self.dtype, name=f"{source}_norm")(x)
      self.sow("intermediates", HEAD_MAPS, x)
      head = lambda features, suffix: nn.Conv(
          features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=jnp.float32,
          kernel_init=vgg.KERNEL_INIT, bias_init=vgg.BIAS_INIT,
          conv_general_dilated=kernels_lib.conv_fn(self.kernels), name=f"{source}_{suffix}")(x)
      batch = x.shape[0]
      # (B, h, w, k * 4) -> (B, h * w * k, 4): channel index = box_in_cell * 4 + coordinate, so a
      # row-major reshape gives the (row, column, box in cell) order of the default boxes.
      locs.append(head(k * 4, "loc").reshape(batch, -1, 4))
      logits.append(head(k * (self.num_classes + 1), "conf").reshape(batch, -1,
                                                                      self.num_classes + 1))
    return (jnp.concatenate(locs, axis=1).astype(jnp.float32),
            jnp.concatenate(logits, axis=1).astype(jnp.float32))


def fusion_widths(fusion_deconv_channels, num_fusions: int) -> Tuple[int, ...]:
  """config.model.fusion_deconv_channels -> one width per fusion.

  An int or a 1-tuple applies to every block; otherwise one entry per entry of config.model.fusions.
  """
  if isinstance(fusion_deconv_channels, (int, np.integer)):
    fusion_deconv_channels = (fusion_deconv_channels,)
  widths = tuple(int(w) for w in fusion_deconv_channels)
  if len(widths) == 1 or num_fusions == 0:
    return widths[:1] * num_fusions
  if len(widths) != num_fusions:
    raise ValueError(f"config.model.fusion_deconv_channels={widths} has {len(widths)} entries but "
                     f"config.model.fusions has {num_fusions} blocks: give one width per block, or "
                     f"a single width (e.g. (256,)) for all")
  return widths


def _num_extras_needed(model) -> int:
  """How many extra blocks the heads and fusions reach (a config may drop the last ones)."""
  used = set(model.head_sources) | {s for f in model.fusions for s in f[1:3]}
  needed = 0
  for i, block in enumerate(model.extras):
    if f"{block[0]}_2" in used:
      needed = i + 1
  return needed


def model_and_anchor_sections(config, anchors_cfg=None):
  """(model_cfg, anchors_cfg) from either a full config or a model section (+ anchors section)."""
  if "model" in config:
    return config["model"], config["anchors"] if anchors_cfg is None else anchors_cfg
  return config, anchors_cfg


def _check_sources(model_cfg):
  """Raises ValueError if a head or fusion names a map the model does not make."""
  known = list(vgg.map_names()) + [f"{e[0]}_2" for e in model_cfg.extras]
  for name, shallow, deep, _ in model_cfg.fusions:
    for source in (shallow, deep):
      if source not in known:
        raise ValueError(f"fusion {name!r} takes map {source!r}, which the model does not make "
                         f"before it; known maps: {known} (config.model.fusions)")
    known.append(name)
  for source in model_cfg.head_sources:
    if source not in known:
      raise ValueError(f"head source {source!r} is not a map of the model; known maps: {known} "
                       f"(config.model.head_sources)")


# SSD fields that do not come from config.model under their own name.
_DERIVED_FIELDS = ("boxes_per_cell", "parent", "name")


def _freeze(value):
  """Config values -> hashable module attributes (lists become tuples, NumPy scalars Python)."""
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  if isinstance(value, np.generic):
    return value.item()
  return value


def module_kwargs(module_cls, model_cfg, **explicit):
  """Keyword arguments of `module_cls` from `config.model`: every dataclass field whose name is a
  config key, converted to the field's default type (dtype names to jnp.dtype); `explicit` wins."""
  kwargs = {}
  for field in dataclasses.fields(module_cls):
    if field.name in _DERIVED_FIELDS or field.name in explicit or field.name not in model_cfg:
      continue
    value = _freeze(model_cfg[field.name])
    default = field.default
    if field.name == "dtype":
      value = jnp.dtype(value)
    elif isinstance(default, bool):
      value = bool(value)
    elif isinstance(default, float):
      value = float(value)
    kwargs[field.name] = value
  kwargs.update(explicit)
  return kwargs


def check_model_config(model_cfg):
  """Raises ValueError naming the config key for a value the model cannot be built from."""
  _check_sources(model_cfg)
  if not model_cfg.width_multiplier > 0:
    raise ValueError(f"config.model.width_multiplier must be > 0, got {model_cfg.width_multiplier}")
  fusion_widths(_freeze(model_cfg.get("fusion_deconv_channels", (256,))), len(model_cfg.fusions))
  from mdssd_jax.models import kernels as kernels_lib  # pylint: disable=g-import-not-at-top
  kernels_lib.check_choice(model_cfg.get("kernels", "auto"))
  vgg.maybe_remat(lambda: None, model_cfg.get("remat", "none"),
                  model_cfg.get("remat_policy", "nothing_saveable"))
  init = model_cfg.get("fusion_deconv_init", "xavier")
  if init not in fusion_lib.DECONV_INITS:
    raise ValueError(f"config.model.fusion_deconv_init={init!r} is not one of "
                     f"{fusion_lib.DECONV_INITS}")


def build_ssd_module(model_cfg, boxes_per_cell) -> SSD:
  """An `SSD` from a checked `config.model` and the boxes per cell of each head."""
  check_model_config(model_cfg)
  return SSD(**module_kwargs(SSD, model_cfg, boxes_per_cell=tuple(int(k) for k in boxes_per_cell)))


def abstract_forward(model: SSD, image_size: int, batch_size: int = 1):
  """Shapes of a forward pass, computed with jax.eval_shape (no FLOPs, no memory).

  Returns: (variables, (loc_preds, cls_logits), head_maps) as ShapeDtypeStructs; variables holds
    "params" (and "batch_stats" with batch norm); head_maps is a tuple in head order.
  """
  images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)

  def init(rng, x):
    # mutable=True: init leaves "intermediates" out by default, and the sown head maps are wanted.
    outputs, variables = model.init_with_output(rng, x, train=False, mutable=True)
    return variables, outputs

  variables, outputs = jax.eval_shape(init, jax.random.key(0), images)
  variables = dict(variables)
  head_maps = variables.pop("intermediates")[HEAD_MAPS]
  return variables, outputs, tuple(head_maps)


def count_params(params) -> int:
  """Number of scalars in a params tree (arrays or ShapeDtypeStructs)."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
