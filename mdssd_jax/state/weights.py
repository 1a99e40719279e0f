"""A trained detector for inference: the weights, batch statistics and metadata of one checkpoint.

Evaluation (`--mode=eval`), prediction and export restore only what the model computes with: params,
batch statistics and the checkpoint's metadata (class names, pixel convention, the data set's
category ids). No optimiser is built and no optimiser state is read, so `config.train` may differ
from the one that trained the checkpoint (the optimiser state's structure depends on it), and the
data set need not be registered or prepared on the machine that predicts. The model's fingerprint
(config.model and config.anchors against the checkpoint's) is still checked: a checkpoint of another
model is refused with every differing field named. MaxText's `load_params_from_path` is the
precedent.
"""

import copy
import dataclasses
import os
from typing import Any, Dict, Mapping, Optional, Tuple

from flax import traverse_util
import jax
import numpy as np

from mdssd_jax import models
from mdssd_jax.core import pixels
from mdssd_jax.state import checkpointing


@dataclasses.dataclass(frozen=True)
class TrainedDetector:
  """What inference needs of a checkpoint.

  model: the Flax module (models.build_detector); anchors_cxcywh: (A, 4) np.float32 default boxes;
  variables: {"params", maybe "batch_stats"} (what model.apply takes); convention: the pixel
  convention the weights expect (core/pixels.py); class_names: C names, label l is class_names[l - 1];
  label_to_category_id: our label -> the data set's category id (COCO), {} for identity, None for a
  checkpoint written before the map was saved;
  step: the checkpoint's step; fingerprint: the model's fingerprint (written into exports).
  """
  model: Any
  anchors_cxcywh: np.ndarray
  variables: Dict[str, Any]
  convention: Dict[str, Any]
  class_names: Tuple[str, ...]
  label_to_category_id: Optional[Dict[int, int]]
  step: int
  fingerprint: Dict[str, Any]


def checkpoint_dir_and_step(workdir: str, step: Optional[int] = None) -> Tuple[str, int]:
  """(WORKDIR/checkpoints, the latest or the named complete step).

  Raises FileNotFoundError naming the folder and the fix when there is no such checkpoint; nothing
  is created in the workdir.
  """
  checkpoint_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  available = checkpointing.available_steps(checkpoint_dir)
  if not available:
    raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}; train first with "
                            f"`python main.py --config=... --workdir={workdir}`")
  if step is None:
    return checkpoint_dir, available[-1]
  if step not in available:
    raise FileNotFoundError(f"no checkpoint of step {step} in {checkpoint_dir}; available steps: "
                            f"{', '.join(map(str, available))} (set --step to one of them or leave "
                            "it out for the latest)")
  return checkpoint_dir, int(step)


def label_map_from_meta(meta: Mapping[str, Any]) -> Optional[Dict[int, int]]:
  """The checkpoint's label -> category id map: {} for identity, None when the checkpoint predates
  the key (the caller then asks the data set: run/predict.py, run/export.py)."""
  if "label_to_category_id" not in meta:
    return None
  return {int(label): int(cid) for label, cid in meta["label_to_category_id"]}


def with_num_classes(config, num_classes: int):
  """config itself, or a copy whose model.num_classes is `num_classes` when it says 0 ("from the
  data": configs for a user's own data, docs/your_data.md)."""
  if int(config.model.num_classes) != 0:
    return config
  config = copy.deepcopy(config)
  config.model.num_classes = int(num_classes)
  return config


def load_detector(config, workdir: str, step: Optional[int] = None,
                  sharding: Optional[jax.sharding.Sharding] = None) -> TrainedDetector:
  """The trained detector of the latest (or `step`) checkpoint of `workdir`.

  Args:
    config: the config the checkpoint was trained with; only config.model and config.anchors are
      read (and must match the checkpoint's fingerprint).
    workdir: the training run's folder (its checkpoints/ subfolder is read, never written).
    step: a checkpoint step, None for the latest.
    sharding: where the restored arrays live: this process's first device by default; a replicated
      NamedSharding over a mesh for a multi-process evaluation.
  Raises:
    FileNotFoundError: no such checkpoint (message names the folder and the available steps).
    ValueError: the checkpoint belongs to another model (every differing field named).
  """
  checkpoint_dir, step = checkpoint_dir_and_step(workdir, step)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  reader = checkpointing.make_reader(checkpoint_dir)
  try:
    meta = checkpointing.restore_meta(reader, step)
    class_names = tuple(meta["class_names"])
    config = with_num_classes(config, len(class_names))
    model, anchors = models.build_detector(config)
    abstract, _, _ = models.abstract_forward(model, int(config.model.input_size_px))
    abstract = {k: v for k, v in abstract.items() if k in ("params", "batch_stats")}
    convention = pixels.as_convention(meta["pixel_convention"])
    # Class names and the convention come from the checkpoint, so they agree with the saved ones by
    # construction; what is checked is the model (config.model, config.anchors, parameter shapes).
    fingerprint = checkpointing.model_fingerprint(config, len(anchors), abstract["params"],
                                                  pixel_convention=convention,
                                                  class_names=list(class_names))
    checkpointing.check_fingerprint(meta["fingerprint"], fingerprint, checkpoint_dir)
    variables = checkpointing.restore_variables(reader, step, abstract, sharding)
  finally:
    reader.close()
  return TrainedDetector(model=model, anchors_cxcywh=anchors, variables=variables,
                         convention=convention, class_names=class_names,
                         label_to_category_id=label_map_from_meta(meta), step=step,
                         fingerprint=fingerprint)


# ---- fine-tuning: a checkpoint of this project as the starting point of another run ---------------

def _step_folder(path: str) -> Tuple[str, int]:
  """(checkpoints folder, step) of a workdir, its checkpoints/ folder or one step's folder."""
  path = os.path.abspath(path)
  name = os.path.basename(path.rstrip("/"))
  if name.isdigit() and os.path.isdir(os.path.join(path, "state")):
    return os.path.dirname(path), int(name)
  for folder in (os.path.join(path, "checkpoints"), path):
    steps = checkpointing.available_steps(folder)
    if steps:
      return folder, steps[-1]
  raise FileNotFoundError(f"config.model.init_from={path}: no checkpoint there. Name a workdir of "
                          "this project, its checkpoints/ folder or one step's folder "
                          "(checkpoints/<step>/), or a weights file")


def init_from_checkpoint(path: str, variables: Mapping[str, Any]):
  """Fresh variables with every array of a trained checkpoint that fits loaded into them.

  Args:
    path: a workdir of this project, its checkpoints/ folder, or one step's folder.
    variables: {"params", maybe "batch_stats"} of the new model (host arrays).
  Returns:
    (variables, the checkpoint's pixel convention, {"loaded": [layer, ...], "fresh": {layer: why},
    "step": the checkpoint's step, "class_names": its classes}). A layer is loaded when every array
    of it exists in the checkpoint at the same shape (the class heads start fresh when the class
    count differs); its batch statistics come with it.
  """
  checkpoint_dir, step = _step_folder(path)
  reader = checkpointing.make_reader(checkpoint_dir)
  try:
    meta = checkpointing.restore_meta(reader, step)
    saved = checkpointing.restore_as_saved(reader, step)
  finally:
    reader.close()
  collections = [c for c in ("params", "batch_stats") if c in variables]
  saved_flat = {p: np.asarray(v) for p, v in traverse_util.flatten_dict(
      {c: saved.get(c) or {} for c in collections}).items()}
  new_flat = traverse_util.flatten_dict({c: variables[c] for c in collections})
  # ("params", "vgg", "conv1_1", "conv", "kernel") -> "conv1_1": a conv and its batch norm together.
  layer_of = lambda p: "/".join(k for k in p[1:-1] if k not in ("vgg", "conv", "bn"))
  layers = {}
  for p in new_flat:
    layers.setdefault(layer_of(p), []).append(p)
  loaded, fresh = [], {}
  for layer, paths in sorted(layers.items()):
    misfit = [p for p in paths if p not in saved_flat
              or tuple(saved_flat[p].shape) != tuple(np.shape(new_flat[p]))]
    if misfit:
      p = misfit[0]
      fresh[layer] = ("not in the checkpoint" if p not in saved_flat else
                      f"{p[-1]} {tuple(saved_flat[p].shape)} there, {tuple(np.shape(new_flat[p]))} here")
      continue
    for p in paths:
      new_flat[p] = saved_flat[p].astype(np.asarray(new_flat[p]).dtype)
    loaded.append(layer)
  return traverse_util.unflatten_dict(new_flat), pixels.as_convention(meta["pixel_convention"]), dict(
      loaded=loaded, fresh=fresh, step=step, class_names=list(meta.get("class_names", [])))
