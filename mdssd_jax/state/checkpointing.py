"""Orbax checkpoints of everything a resume needs, and a fingerprint that refuses foreign ones.

A checkpoint step holds three items: `state` (params, batch statistics, optimiser state, step, RNG,
the first non-finite step), `data_iter` (the Grain iterator state of each process) and `meta` (JSON:
the model's fingerprint, the pixel convention, the data set's class names and category ids). Orbax writes each step
into a temporary directory and renames it when complete (in a multi-process run, once every process
has written its part), so a crash or a kill -9 mid-save leaves the previous checkpoint as the latest
one; the trainer's next start removes the temporary folder and says so (`make_manager`).
"""

import hashlib
import json
import os
import warnings

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

# The fingerprint is every field of these config sections, flattened to dotted names
# ("model.fusions", "anchors.min_sizes"), so a new model or default-box setting is covered without
# an edit here. config.anchors is all in: the default boxes and variances fix what each head output
# means (docs/default_boxes.md).
FINGERPRINT_SECTIONS = ("model", "anchors")
# config.model fields that do not change what the saved parameters mean, so a resume, an evaluation
# or a prediction may change them: how parameters are first set (init_from, init_source,
# allow_random_trunk, the initial L2Norm scales, the deconv initialisation), how the same function
# is computed (dtype, kernels) or how its backward pass keeps activations (remat, remat_policy).
# `pixel` is the config's default convention, which a weights file overrides; the convention in
# use is passed to model_fingerprint by the caller (`meaning`) instead.
FINGERPRINT_EXEMPT_MODEL_KEYS = ("init_from", "init_source", "allow_random_trunk", "dtype", "kernels",
                                 "remat", "remat_policy", "l2norm_init_scale",
                                 "fusion_l2norm_init_scale", "fusion_deconv_init", "pixel")
FINGERPRINT_VERSION = 2
# Fingerprint fields added after checkpoints were written without them, with the value their
# absence means (the model those checkpoints hold): a config at that value still fits them.
FINGERPRINT_FIELDS_ADDED = {"model.fusion_deep_branch": True}
# Version 1 (no "fingerprint_version" field) held these config.model keys, undotted.
_V1_MODEL_KEYS = ("architecture", "input_size_px", "num_classes", "width_multiplier", "batch_norm",
                  "extras", "fusions", "head_sources")


def model_fingerprint(config, num_default_boxes, params, **meaning):
  """A JSON-able description of the model a checkpoint belongs to.

  Args:
    config: the whole config; its `model` (less FINGERPRINT_EXEMPT_MODEL_KEYS) and `anchors`
      sections go in field by field.
    num_default_boxes: A, the default boxes per image.
    params: the params tree (arrays or ShapeDtypeStructs); only the shapes are used, as a digest.
    meaning: further JSON-able facts that change what the heads mean (the trainer passes the pixel
      convention in use and the class names), compared like the rest.
  Returns:
    {"fingerprint_version", "model.<key>"..., "anchors.<key>"..., "num_default_boxes",
     "param_shapes_sha256", **meaning}
  """
  shapes = jax.tree_util.tree_map(lambda x: list(np.shape(x)), params)
  shapes_digest = hashlib.sha256(json.dumps(_to_jsonable(shapes), sort_keys=True).encode()).hexdigest()
  fingerprint = {"fingerprint_version": FINGERPRINT_VERSION}
  for section in FINGERPRINT_SECTIONS:
    for key, value in _to_jsonable(config[section]).items():
      if section == "model" and key in FINGERPRINT_EXEMPT_MODEL_KEYS:
        continue
      fingerprint.update(_flatten(f"{section}.{key}", value))
  fingerprint["num_default_boxes"] = int(num_default_boxes)
  fingerprint["param_shapes_sha256"] = shapes_digest[:16]
  fingerprint.update({k: _to_jsonable(v) for k, v in meaning.items()})
  return fingerprint


def check_fingerprint(saved, current, checkpoint_dir):
  """Raises ValueError naming every field where a checkpoint's model differs from the config's.

  A version-1 fingerprint (written before default boxes were part of it) is compared on the
  fields it has.
  """
  if "fingerprint_version" not in saved:
    renamed = {(f"model.{k}" if k in _V1_MODEL_KEYS else k): v for k, v in saved.items()
               if k != "fusion_deconv_channels"}   # its format changed; the shapes digest covers it
    saved, current = renamed, {k: current.get(k) for k in renamed}
  saved = {**{k: v for k, v in FINGERPRINT_FIELDS_ADDED.items() if k in current}, **saved}
  diffs = [f"  {k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
           for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
  if diffs:
    raise ValueError(
        f"the checkpoint in {checkpoint_dir} belongs to another model:\n" + "\n".join(diffs) +
        "\nUse a new --workdir for this config, or the config that trained this checkpoint.")


def _flatten(name, value):
  """{"a.b.c": leaf} for nested dicts; lists and scalars are leaves."""
  if isinstance(value, dict):
    out = {}
    for key, sub in value.items():
      out.update(_flatten(f"{name}.{key}", sub))
    return out
  return {name: value}


def available_steps(directory):
  """Sorted steps of the complete checkpoints in `directory` ([] if it does not exist).

  Orbax writes a step into a temporary folder and renames it to the bare step number when the save
  is complete, so only such folders count.
  """
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def make_manager(directory, train_cfg, best_metric=None, best_mode="max", create=True):
  """CheckpointManager keeping the last `keep_checkpoints` steps, plus the best by `best_metric`.

  best_metric: a key of the metrics saved with a checkpoint, e.g. "voc/mAP". create=False for
  readers (eval, predict, export), which must not leave an empty folder behind.
  """
  if create:
    _say_leftovers(directory)
  policies = [checkpoint_managers.LatestN(n=max(1, int(train_cfg.keep_checkpoints)))]
  if best_metric:
    policies.append(checkpoint_managers.BestN(
        get_metric_fn=lambda metrics: metrics[best_metric], reverse=(best_mode == "min"), n=1,
        keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=True,
      cleanup_tmp_directories=True,   # leftovers of a save that a crash interrupted
      create=create)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "data_iter", "meta"))


# How Orbax names a step folder while it is being written (renamed to the bare step once complete).
TMP_MARKER = ".orbax-checkpoint-tmp"


def leftover_tmp_folders(directory):
  """The temporary step folders in `directory`: saves that a crash, a kill -9 or a dead peer
  process interrupted. None is a checkpoint (available_steps skips them, so nothing restores one)."""
  if not os.path.isdir(directory):
    return []
  return sorted(name for name in os.listdir(directory) if TMP_MARKER in name)


def _say_leftovers(directory):
  """Says (process 0) which interrupted saves the trainer's manager is about to remove: Orbax's
  cleanup_tmp_directories deletes them silently, and a user who saw a folder go wants to know why."""
  leftovers = leftover_tmp_folders(directory)
  if leftovers and jax.process_index() == 0:
    logging.warning("removing %d incomplete checkpoint folder(s) of an interrupted save in %s: %s "
                    "(never restored; training resumes from the last complete checkpoint)",
                    len(leftovers), directory, ", ".join(leftovers))


def save(manager, step, state, data_iterator, meta, metrics=None):
  """Starts an asynchronous save of one step; returns at once (the arrays are copied first).

  data_iterator: None, or the input pipeline's iterator, which says how Orbax stores its position
  (`checkpoint_save_args()` / `checkpoint_restore_args()`: data/pipeline.py's TrainIterator), so
  that this module needs no input-pipeline library.
  """
  items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
  if data_iterator is not None:
    items["data_iter"] = data_iterator.checkpoint_save_args()
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def restore(manager, step, abstract_state, data_iterator):
  """Restores `state` (with the shardings of `abstract_state`) and the data iterator in place."""
  items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
  if data_iterator is not None:
    items["data_iter"] = data_iterator.checkpoint_restore_args()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"], restored["meta"]


def restore_meta(manager, step):
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def make_reader(directory):
  """A CheckpointManager that only reads (eval, predict, export): no retention policy, no folder
  created, so neither `config.train` nor a missing folder can change what is on disk."""
  options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "data_iter", "meta"))


def restore_as_saved(manager, step):
  """The `state` item of checkpoint `step` as it was saved (host arrays), whatever model wrote it:
  no target structure, so a checkpoint of another class count can be read (fine-tuning)."""
  with warnings.catch_warnings():
    # "Sharding info not provided when restoring": the arrays become host arrays anyway.
    warnings.filterwarnings("ignore", message="Sharding info not provided")
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]


def restore_variables(manager, step, abstract_variables, sharding):
  """The model's variables of checkpoint `step` and nothing else of its state.

  abstract_variables: {"params", maybe "batch_stats"} of ShapeDtypeStructs (models.abstract_forward).
  The optimiser state, step counter and RNG saved beside them are not read (a partial restore), so
  their structure, which depends on config.train, does not matter here.
  """
  restore_args = jax.tree_util.tree_map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding),
                                        abstract_variables)
  item = ocp.args.PyTreeRestore(item=abstract_variables, restore_args=restore_args,
                                partial_restore=True)
  restored = manager.restore(step, args=ocp.args.Composite(state=item))["state"]
  variables = {"params": restored["params"]}
  if restored.get("batch_stats"):
    variables["batch_stats"] = restored["batch_stats"]
  return variables


def _to_jsonable(value):
  if isinstance(value, dict):
    return {str(k): _to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_jsonable(v) for v in value]
  if hasattr(value, "to_dict"):
    return _to_jsonable(value.to_dict())
  if isinstance(value, (np.generic,)):
    return value.item()
  return value
