"""Orbax checkpoints of everything a resume needs, and a fingerprint that refuses foreign ones.

A checkpoint step holds three items: `state` (params, batch statistics, optimiser state, step, RNG,
the first non-finite step), `data_iter` (the Grain iterator state of each process) and `meta` (JSON:
the model's fingerprint, the pixel convention, the data set's class names). Orbax writes each step
into a temporary directory and renames it when complete, so a crash or a kill -9 mid-save leaves the
previous checkpoint as the latest one.
"""

import hashlib
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

# What must agree between a checkpoint and the config that resumes from it.
_FINGERPRINT_MODEL_KEYS = ("architecture", "input_size_px", "num_classes", "width_multiplier",
                           "batch_norm", "extras", "fusions", "fusion_deconv_channels", "head_sources")


def model_fingerprint(config, num_default_boxes, params):
  """A JSON-able description of the model a checkpoint belongs to."""
  shapes = jax.tree_util.tree_map(lambda x: list(np.shape(x)), params)
  shapes_digest = hashlib.sha256(json.dumps(_to_jsonable(shapes), sort_keys=True).encode()).hexdigest()
  fingerprint = {k: _to_jsonable(config.model[k]) for k in _FINGERPRINT_MODEL_KEYS}
  fingerprint["num_default_boxes"] = int(num_default_boxes)
  fingerprint["param_shapes_sha256"] = shapes_digest[:16]
  return fingerprint


def check_fingerprint(saved, current, checkpoint_dir):
  """Raises ValueError naming every field where a checkpoint's model differs from the config's."""
  diffs = [f"  {k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
           for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
  if diffs:
    raise ValueError(
        f"the checkpoint in {checkpoint_dir} belongs to another model:\n" + "\n".join(diffs) +
        "\nUse a new --workdir for this config, or the config that trained this checkpoint.")


def make_manager(directory, train_cfg, best_metric=None, best_mode="max"):
  """CheckpointManager keeping the last `keep_checkpoints` steps, plus the best by `best_metric`."""
  policies = [checkpoint_managers.LatestN(n=max(1, int(train_cfg.keep_checkpoints)))]
  if best_metric:
    policies.append(checkpoint_managers.BestN(
        get_metric_fn=lambda metrics: metrics[best_metric], reverse=(best_mode == "min"), n=1,
        keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=True,
      cleanup_tmp_directories=True,   # leftovers of a save that a crash interrupted
      create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "data_iter", "meta"))


def save(manager, step, state, data_iterator, meta, metrics=None):
  """Starts an asynchronous save of one step; returns at once (the arrays are copied first)."""
  items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
  if data_iterator is not None:
    items["data_iter"] = _grain_save(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def restore(manager, step, abstract_state, data_iterator):
  """Restores `state` (with the shardings of `abstract_state`) and the data iterator in place."""
  items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
  if data_iterator is not None:
    items["data_iter"] = _grain_restore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"], restored["meta"]


def restore_meta(manager, step):
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def _grain_save(iterator):
  import grain  # pylint: disable=g-import-not-at-top
  return grain.checkpoint.CheckpointSave(iterator)


def _grain_restore(iterator):
  import grain  # pylint: disable=g-import-not-at-top
  return grain.checkpoint.CheckpointRestore(iterator)


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
