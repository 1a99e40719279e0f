"""What a config builds for training.

`Setup(config)` holds the device mesh, the data set's description, the model, its default boxes, the
optimiser and the pixel convention; it makes a fresh training state or restores one from a checkpoint
(refusing a checkpoint of another model). Only training (and tools that continue training) build it:
eval, predict and export restore weights and metadata alone (state/weights.py).
"""

import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mdssd_jax import models
from mdssd_jax.core import pixels
from mdssd_jax.core.multihost import DATA_AXIS, data_mesh  # pylint: disable=unused-import  (re-exported)
from mdssd_jax.data import coco
from mdssd_jax.data import registry
from mdssd_jax.state import checkpointing
from mdssd_jax.state import optim
from mdssd_jax.state import weights

# The three ImageNet VGG16 files the trunk can start from (docs/pretrained_weights.md).
WEIGHT_SOURCES = (
    "timm 'vgg16.tv_in1k' model.safetensors (RGB, 0-1, ImageNet mean/std)",
    "torchvision vgg16-397923af.pth (RGB, 0-1, ImageNet mean/std)",
    "ssd.pytorch vgg16_reducedfc.pth (BGR, 0-255, mean subtraction)",
)


def init_variables(model, config, rng):
  """Flax variables {"params", maybe "batch_stats"} for one (1, S, S, 3) input."""
  size = config.model.input_size_px
  return model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32), train=False)


def create_state(variables, tx, rng):
  """The training state: a plain dict, so Orbax and jit see an ordinary pytree."""
  params = variables["params"]
  return dict(step=jnp.zeros((), jnp.int32), params=params,
              batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params), rng=rng,
              # The first step whose loss, gradient or updated state was not finite (-1: none). Such
              # a step leaves params and optimiser state untouched, so the state stays fit to save.
              first_nonfinite_step=jnp.full((), -1, jnp.int32))


def model_variables(state):
  """The Flax variables of a training state (what model.apply takes)."""
  variables = {"params": state["params"]}
  if state["batch_stats"]:
    variables["batch_stats"] = state["batch_stats"]
  return variables


def _init_rngs(seed):
  """(key for parameter initialisation, key carried in the state).

  Initialisation uses the "rbg" generator: XLA compiles the threefry generator's many calls (one
  per parameter) about 8x slower on CPU, which dominated start-up of small models.
  """
  return jax.random.key(seed, impl="rbg"), jax.random.PRNGKey(seed)


def check_trunk_init(config):
  """Refuses a config that would train the VGG16 trunk from random weights by accident.

  The paper (like every published SSD) starts the trunk from ImageNet weights; without them the
  paper configs (no batch norm, lr 1e-3) do not train to anything near its numbers.
  """
  model_cfg = config.model
  if model_cfg.init_from or model_cfg.get("allow_random_trunk", False):
    return
  sources = "\n".join(f"  - {s}" for s in WEIGHT_SOURCES)
  raise ValueError(
      "config.model.init_from is empty: this config would train the VGG16 trunk from random weights, "
      "which the paper's recipe does not do. Download one of the ImageNet VGG16 files\n"
      f"{sources}\nand pass it with --config.model.init_from=/path/to/file (the format is detected). "
      "To train from scratch on purpose, set --config.model.allow_random_trunk=True (and consider "
      "--config.model.batch_norm=True).")


class Setup:
  """The mesh, data set info, model, default boxes, optimiser and initial state of a config."""

  def __init__(self, config, devices=None):
    """`devices`: the mesh's devices, all of them by default (a subset, or a TPU topology's devices
    for ahead-of-time compilation without a TPU: benchmarks/aot_compile.py)."""
    self.dataset = registry.get_dataset(config.data)
    config = weights.with_num_classes(config, self.dataset.num_classes)   # 0 = from the data
    self.config = config
    # A plain Mesh (Auto axes): XLA propagates the "data" sharding through the model; matching and
    # the loss run per device under shard_map (train.make_train_step).
    self.mesh = data_mesh(devices)
    self.batch_sharding = jax.sharding.NamedSharding(self.mesh,
                                                     jax.sharding.PartitionSpec(DATA_AXIS))
    self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    if self.dataset.num_classes != config.model.num_classes:
      raise ValueError(
          f"config.model.num_classes={config.model.num_classes} but data set {config.data.name!r} "
          f"has {self.dataset.num_classes} classes; set --config.model.num_classes="
          f"{self.dataset.num_classes}")
    self.model, self.anchors = models.build_detector(config)
    self.tx, self.schedule = optim.make_optimizer(config.train)
    self.convention = pixels.as_convention(config.model.pixel)

  def initial_state(self):
    """A fresh state, replicated over the mesh; ImageNet VGG16 weights if the config names a file."""
    init_rng, state_rng = _init_rngs(self.config.seed)
    variables = jax.jit(lambda r: init_variables(self.model, self.config, r),
                        out_shardings=self.replicated)(init_rng)
    if self.config.model.init_from:
      variables, convention = self._init_from(jax.device_get(variables))
      self.convention = pixels.as_convention(convention)
      variables = jax.device_put(variables, self.replicated)
    return jax.jit(lambda v, r: create_state(v, self.tx, r),
                   out_shardings=self.replicated)(variables, state_rng)

  def _init_from(self, variables):
    """(variables, pixel convention) started from config.model.init_from: a checkpoint of this
    project (fine-tuning: what fits is loaded), torchvision's SSD300 file, or ImageNet VGG16."""
    from mdssd_jax.models import pretrained  # pylint: disable=g-import-not-at-top  (reads files; rarely used)
    path, model_cfg = self.config.model.init_from, self.config.model
    if os.path.isdir(path):
      variables, convention, what = weights.init_from_checkpoint(path, variables)
      _say_what_was_loaded(f"the checkpoint of step {what['step']} in {path} (classes "
                           f"{what['class_names']})", what["loaded"], what["fresh"])
      return variables, convention
    if not os.path.isfile(path):
      raise FileNotFoundError(f"config.model.init_from={path}: no such file or folder (a weights "
                              "file, or a workdir / checkpoint folder of this project)")
    state = pretrained.read_state_dict(path)   # once: a weights file is 100-500 MB
    if model_cfg.init_source in ("auto", "torchvision_ssd300") and pretrained.is_torchvision_ssd300(
        state.keys()):
      params, convention, loaded, fresh = pretrained.load_torchvision_ssd300(
          path, variables["params"], tuple(model_cfg.head_sources),
          coco_category_ids=coco_ids_of(self.dataset.class_names), state=state)
      _say_what_was_loaded(f"torchvision's SSD300 {path}", loaded, fresh)
      return dict(variables, params=params), convention
    params, convention = pretrained.load_vgg16(path, variables["params"],
                                               source=model_cfg.init_source, state=state)
    logging.info("initialised the VGG16 trunk from %s (pixel convention %s)", path, convention)
    return dict(variables, params=params), convention

  def abstract_state(self):
    """Shapes, dtypes and shardings of the state, without computing it."""
    init_rng, state_rng = _init_rngs(self.config.seed)
    shapes = jax.eval_shape(
        lambda r, s: create_state(init_variables(self.model, self.config, r), self.tx, s),
        init_rng, state_rng)
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated), shapes)

  def fingerprint(self, params):
    """What a checkpoint must agree on with this config (from parameter shapes; no host copy)."""
    return checkpointing.model_fingerprint(self.config, len(self.anchors), params,
                                           pixel_convention=self.convention,
                                           class_names=list(self.dataset.class_names))

  def meta(self, state):
    """The JSON metadata saved beside every checkpoint."""
    return dict(fingerprint=self.fingerprint(state["params"]),
                pixel_convention=self.convention,
                class_names=list(self.dataset.class_names),
                # [[label, category id], ...] (COCO's ids are not 1..C), so that prediction and
                # export need not open the data set (state/weights.py); [] = identity.
                label_to_category_id=sorted(
                    [int(k), int(v)] for k, v in
                    (getattr(self.dataset, "label_to_category_id", None) or {}).items()),
                data_set=self.config.data.name)

  def global_batch(self, local_batch):
    """Per-process numpy batch -> global jax arrays sharded on "data"."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}

  def restore(self, manager, step, data_iterator=None):
    """The state of checkpoint `step`; refuses a checkpoint of another model."""
    meta = checkpointing.restore_meta(manager, step)
    # The convention is part of what the heads mean: the checkpoint's own one is compared (a
    # weights file may have set it at the start of training) and then used.
    self.convention = pixels.as_convention(meta["pixel_convention"])
    abstract = self.abstract_state()
    checkpointing.check_fingerprint(meta["fingerprint"], self.fingerprint(abstract["params"]),
                                    manager.directory)
    state, meta = checkpointing.restore(manager, step, abstract, data_iterator)
    return state


def coco_ids_of(class_names):
  """COCO's category id of each class name when every one is a COCO class (any case), else None."""
  ids = {name.lower(): cid for cid, name in coco.COCO_CATEGORIES}
  found = [ids.get(str(name).strip().lower()) for name in class_names]
  return None if None in found else found


def _say_what_was_loaded(source, loaded, fresh):
  logging.info("initialised %d layers from %s: %s", len(loaded), source, ", ".join(loaded) or "none")
  if fresh:
    logging.info("%d layers start fresh: %s", len(fresh),
                 "; ".join(f"{name} ({why})" for name, why in fresh.items()))


def load_checkpoint(config, workdir, step=None):
  """(setup, state, step) of the latest (or a named) checkpoint in workdir: the whole training state
  (optimiser state included), for tools that continue training from it (the study's trained-trunk
  runs). Eval, predict and export restore only the weights: state/weights.py.

  Raises FileNotFoundError (naming the folder and the fix) when there is no such checkpoint; nothing
  is created in the workdir.
  """
  checkpoint_dir, step = weights.checkpoint_dir_and_step(workdir, step)
  setup = Setup(config)
  manager = checkpointing.make_manager(checkpoint_dir, config.train, create=False)
  try:
    state = setup.restore(manager, step)
  finally:
    manager.close()
  return setup, state, step


def flat_hparams(config):
  """The config as {"section.key": scalar} (TensorBoard's hyperparameters); tuples as strings."""
  flat = {}

  def walk(prefix, node):
    for k, v in node.items():
      key = f"{prefix}{k}"
      if hasattr(v, "items"):
        walk(key + ".", v)
      elif isinstance(v, (int, float, str, bool)):
        flat[key] = v
      else:
        flat[key] = str(v)
  walk("", config)
  return flat
