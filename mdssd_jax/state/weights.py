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

import dataclasses
import os
from typing import Any, Dict, Mapping, Optional, Tuple

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
  model, anchors = models.build_detector(config)
  abstract, _, _ = models.abstract_forward(model, int(config.model.input_size_px))
  abstract = {k: v for k, v in abstract.items() if k in ("params", "batch_stats")}
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  reader = checkpointing.make_reader(checkpoint_dir)
  try:
    meta = checkpointing.restore_meta(reader, step)
    class_names = tuple(meta["class_names"])
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
