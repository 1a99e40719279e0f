"""Training, top to bottom: `train_and_evaluate(config, workdir)`.

One `jax.jit` train step over a device `Mesh` with the batch sharded on "data" (1 CPU, 8 GPUs or a TPU
pod alike); matching and the MultiBox loss run inside the step on padded ground truth, each device on
its own images (`shard_map`). Orbax saves everything a resume needs; clu writes TensorBoard
summaries; the evaluators of `config.evals` run every so many steps. What a config builds (model,
default boxes, optimiser, state) is in experiment.py, prediction in predict.py, evaluation in
evaluation/.
"""

import contextlib
import os
import shutil
import signal
import sys
import time

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mdssd_jax import evaluation
from mdssd_jax.core import losses
from mdssd_jax.core import matching
from mdssd_jax.core import multihost
from mdssd_jax.core import pixels
from mdssd_jax.data import pipeline
from mdssd_jax.report import history
from mdssd_jax.report import plots
from mdssd_jax.report import progress as progress_lib
from mdssd_jax.run import data_config
from mdssd_jax.run import evaluate
from mdssd_jax.state import checkpointing
from mdssd_jax.state import experiment
from mdssd_jax.state import optim
from mdssd_jax.state import workdir_lock


# ---------------------------------------------------------------------------------------------------
# The update step.
# ---------------------------------------------------------------------------------------------------

def _finite_norm(tree):
  """One bool: the global L2 norm of `tree` is finite, i.e. no leaf holds inf or NaN.

  A norm, not a per-leaf isfinite: the per-leaf form made XLA's compile of the step 4x larger in
  memory. Its only false alarm is a state whose squared norm overflows float32 (|w| ~ 1e19), a run
  that has diverged anyway.
  """
  # Floating leaves only: an optimiser's int32 step count squared would overflow after 46k steps.
  leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.isfinite(optax.global_norm(leaves)) if leaves else jnp.bool_(True)


def _shard_map(f, mesh, in_specs, out_specs):
  """`jax.shard_map` (jax >= 0.6.1) or, on the older jax that requirements.txt allows (>= 0.5),
  `jax.experimental.shard_map.shard_map`; without the replication check in either.

  Unchecked because matching's and mining's loops start their carries from constants (replicated)
  and update them with this device's images (varying), which the check refuses without
  version-specific casts inside matching.py and losses.py. What the check would guarantee holds by
  construction: every output is a psum, equal on all devices. Autodiff stays exact: for an output
  not split over the mesh, shard_map's transpose divides its cotangent by the number of devices and
  psum's transpose (a psum) adds the shares back; on one device nothing is divided.
  """
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map  # pylint: disable=g-import-not-at-top
  return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def make_matching_and_loss(anchors_cxcywh, config, mesh):
  """(loc_preds, cls_logits, gt_boxes, gt_labels) -> (loss, aux) of the global batch, per device.

  Matching and hard-negative mining are per image, so each device matches and mines its own images
  (`shard_map` over the mesh's data axis). Left to the partitioner, the loops of both (the bipartite
  `fori_loop`, the bisection of `losses.hard_negative_mask`) made it all-gather the whole global
  batch onto every device, so that every chip matched every image of the pod. The only traffic
  left is one all-reduce of four scalars: the Smooth-L1 and cross-entropy sums, the positive count
  that normalises them and the hard-negative count (`losses.multibox_loss(axis_name=...)`), so the
  loss is the same number as on one device. The arguments are split along the batch over the data
  axis, the results are replicated; the gradient flows back through `shard_map` to the model's
  outputs (the model's forward and backward stay under the plain jit around it, whose partitioner
  handles them: batch-norm statistics and the gradient all-reduce).
  """
  anchors = jnp.asarray(anchors_cxcywh, jnp.float32)
  variances = tuple(config.anchors.variances)

  def per_device(loc_preds, cls_logits, gt_boxes, gt_labels):   # this device's images only
    loc_targets, cls_targets = matching.match(gt_boxes, gt_labels, anchors,
                                              iou_threshold=config.loss.iou_threshold,
                                              variances=variances, rule=config.loss.matching)
    return losses.multibox_loss(loc_preds, cls_logits, loc_targets, cls_targets,
                                neg_pos_ratio=config.loss.neg_pos_ratio,
                                loc_weight=config.loss.loc_weight, axis_name=experiment.DATA_AXIS)

  batch_split = jax.sharding.PartitionSpec(experiment.DATA_AXIS)
  # Out: the loss and the aux scalars, equal on every device after the psums.
  return _shard_map(per_device, mesh=mesh, in_specs=(batch_split,) * 4,
                    out_specs=jax.sharding.PartitionSpec())


def make_train_step(model, tx, schedule, anchors_cxcywh, config, convention, mesh=None):
  """(state, batch) -> (new state, metrics); batch as the input pipeline gives it (uint8 images).

  `mesh`: the training mesh (experiment.Setup's; by default all devices along "data"), over whose
  data axis matching and the loss run per device (`make_matching_and_loss`).

  A step whose loss, gradient, or updated parameters / optimiser state is not finite, or whose
  update multiplies the parameters' global norm by more than config.train.max_param_norm_growth (a
  blow-up), leaves the state as it was (and records the step), so that whatever is checkpointed is
  finite and from before the blow-up: an lr of 1e38 overflows the parameters while the loss and
  gradient of that step are still finite; an lr of 1e12 makes finite weights of 1e13.
  """
  compute_dtype = jnp.dtype(config.model.dtype)
  max_param_norm_growth = float(config.train.get("max_param_norm_growth", 0.0))
  matching_and_loss = make_matching_and_loss(
      anchors_cxcywh, config, experiment.data_mesh() if mesh is None else mesh)

  def train_step(state, batch):
    images = pixels.normalize(batch["image"], convention, compute_dtype)

    def loss_fn(params):
      variables = dict(experiment.model_variables(state), params=params)
      mutable = ["batch_stats"] if state["batch_stats"] else []
      (loc_preds, cls_logits), new_vars = model.apply(variables, images, train=True, mutable=mutable)
      loss, aux = matching_and_loss(loc_preds, cls_logits, batch["boxes"], batch["labels"])
      return loss, (aux, new_vars)

    (loss, (aux, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    batch_stats = new_vars.get("batch_stats", {})
    # A blow-up: one update multiplying the parameters' norm by more than max_param_norm_growth.
    # The state it makes is still finite (an lr of 1e12 gives weights of 1e13), so the finiteness
    # test alone would let it be saved, and a resume from it diverges again.
    param_norm_before, param_norm = optax.global_norm(state["params"]), optax.global_norm(params)
    growth = param_norm / jnp.maximum(param_norm_before, jnp.finfo(jnp.float32).tiny)
    blown_up = (growth > max_param_norm_growth) if max_param_norm_growth > 0 else jnp.bool_(False)
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & _finite_norm((params, opt_state, batch_stats)) & ~blown_up)

    def keep_if_finite(new, old):
      return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = dict(
        step=state["step"] + 1,
        params=keep_if_finite(params, state["params"]),
        batch_stats=keep_if_finite(batch_stats, state["batch_stats"]),
        opt_state=keep_if_finite(opt_state, state["opt_state"]),
        rng=jax.random.fold_in(state["rng"], state["step"]),
        first_nonfinite_step=jnp.where((state["first_nonfinite_step"] < 0) & ~finite,
                                       state["step"], state["first_nonfinite_step"]))
    metrics = dict(loss=loss, loc_loss=aux["loc_loss"], cls_loss=aux["cls_loss"],
                   num_pos=aux["num_pos"].astype(jnp.float32), grad_norm=grad_norm,
                   learning_rate=schedule(state["step"]), param_norm=param_norm,
                   param_norm_growth=growth)
    return new_state, metrics

  return train_step


def jit_train_step(setup, state_sharding):
  """The train step exactly as `train_and_evaluate` compiles it, for `setup`'s mesh.

  The state (donated) keeps `state_sharding` (replicated), the batch is split over the mesh's data
  axis. Also what the compile-only tests and benchmarks/aot_compile.py compile, for simulated CPU
  devices or a TPU topology's devices.
  """
  step = make_train_step(setup.model, setup.tx, setup.schedule, setup.anchors, setup.config,
                         setup.convention, mesh=setup.mesh)
  return jax.jit(step, in_shardings=(state_sharding, setup.batch_sharding),
                 out_shardings=(state_sharding, None), donate_argnums=0)


# ---------------------------------------------------------------------------------------------------
# The training run.
# ---------------------------------------------------------------------------------------------------

class _Preemption:
  """SIGTERM (a preemption notice) asks the loop to checkpoint and stop at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() > 1:
      # Several processes must stop at the same step: JAX's coordination service notices the
      # signal and CheckpointManager.reached_preemption agrees on the step; a local flag could not.
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. inside a notebook worker): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class NonFiniteLossError(FloatingPointError):
  pass


@contextlib.contextmanager
def _closing(manager):
  """Finishes the asynchronous saves under way, however the loop ends (an error included).

  A save that failed in the background (a full disk, say) raises its own error here, from
  wait_until_finished: it is the first cause, so it is what propagates, with the loop's error (if
  any) as its context. An error of close() after that is logged, never raised over the first one.
  """
  try:
    yield manager
  finally:
    try:
      manager.wait_until_finished()
    finally:
      failing = sys.exc_info()[1] is not None   # the loop's or the save's error is on its way out
      try:
        manager.close()
      except Exception as close_error:  # pylint: disable=broad-except
        if not failing:
          raise
        logging.warning("closing the checkpoint manager after an error also failed: %s", close_error)


def check_config(config):
  """Refuses settings that cannot train, naming the key and the fix, before anything is built."""
  train_cfg = config.train
  for key in ("global_batch_size", "num_steps", "log_every_steps", "checkpoint_every_steps"):
    if int(train_cfg[key]) <= 0:
      raise ValueError(f"config.train.{key}={train_cfg[key]} must be a positive integer; set "
                       f"--config.train.{key}=N")
  if train_cfg.global_batch_size % jax.device_count():
    raise ValueError(f"config.train.global_batch_size={train_cfg.global_batch_size} is not divisible "
                     f"by the {jax.device_count()} devices; choose a multiple of {jax.device_count()}")
  evaluation.check_best_metric(config)
  experiment.check_trunk_init(config)


def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final metrics."""
  workdir = os.path.abspath(workdir)
  config, _ = data_config.resolve(config)   # a user's own data: class count and metric from it
  check_config(config)
  first = jax.process_index() == 0
  found = _contents(workdir)
  workdir_lock.make_workdir(workdir)
  started = []   # the steps this run took (its first, once taken)
  try:
    # One trainer per workdir (process 0 holds the lock for a multi-host run).
    with workdir_lock.WorkdirLock(workdir) if first else contextlib.nullcontext():
      return _train(config, workdir, started)
  except BaseException:
    if first and not started:
      _leave_as_found(workdir, found)
    raise


def _contents(workdir):
  """The names in `workdir` (None when it does not exist), and the path of its topmost missing
  ancestor, for `_leave_as_found`."""
  top_missing = None
  path = workdir
  while not os.path.exists(path) and os.path.dirname(path) != path:
    top_missing, path = path, os.path.dirname(path)
  return (set(os.listdir(workdir)) if os.path.isdir(workdir) else None), top_missing


def _leave_as_found(workdir, found):
  """After a run that failed before its first step: removes what it created in the workdir (the
  lock file, TensorBoard's event file, folders without files such as an empty checkpoints/), and the
  workdir and the parents it made when they hold nothing else. What was there before stays."""
  names, top_missing = found
  if not os.path.isdir(workdir):
    return
  for name in set(os.listdir(workdir)) - (names or set()):
    path = os.path.join(workdir, name)
    if os.path.isfile(path) and (name == workdir_lock.LOCK_FILE
                                 or name.startswith("events.out.tfevents.")):
      os.remove(path)
    elif os.path.isdir(path) and not any(files for _, _, files in os.walk(path)):
      shutil.rmtree(path, ignore_errors=True)
  if top_missing is not None:
    path = workdir
    while True:
      try:
        os.rmdir(path)   # only an empty folder
      except OSError:
        break
      if path == top_missing:
        break
      path = os.path.dirname(path)


def _already_complete(config, workdir, num_steps):
  """The message for a workdir whose latest checkpoint is at or past num_steps, else None."""
  directory = os.path.join(workdir, "checkpoints")
  steps = checkpointing.available_steps(directory)
  if not steps or steps[-1] < num_steps:
    return None
  train_cfg = config.train
  scaled = (f" ({num_steps} steps at global batch {train_cfg.global_batch_size})"
            if num_steps != train_cfg.num_steps else "")
  return (f"Nothing to train: the run is already complete. The latest checkpoint in {directory} is "
          f"at step {steps[-1]} and config.train.num_steps={train_cfg.num_steps}{scaled}. To train "
          f"further, raise --config.train.num_steps above {steps[-1]}; --mode=eval evaluates it.")


def _train(config, workdir, started):
  train_cfg = config.train
  num_steps = optim.schedule_steps(train_cfg)
  complete = _already_complete(config, workdir, num_steps)
  if complete:
    if jax.process_index() == 0:
      progress_lib.say(complete)
    started.append(0)   # nothing of this run to undo
    return {}

  # ---- Model, data and optimiser. ----------------------------------------------------------------
  setup = experiment.Setup(config)
  train_iter = pipeline.make_train_iterator(config, process_index=jax.process_index(),
                                            process_count=jax.process_count())

  # ---- State: resume from the latest checkpoint, or start fresh. ----------------------------------
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"), train_cfg,
                                       best_metric=config.eval.best_metric)
  latest = manager.latest_step()
  if latest is not None:
    state = setup.restore(manager, latest, data_iterator=train_iter)
    logging.info("resumed from the checkpoint of step %d in %s", latest, manager.directory)
  else:
    state = setup.initial_state()
  meta = setup.meta(state)
  step = int(jax.device_get(state["step"]))

  # ---- The jitted update step. --------------------------------------------------------------------
  train_step = jit_train_step(setup, jax.tree_util.tree_map(lambda x: x.sharding, state))

  # ---- Evaluators, writers and periodic actions. --------------------------------------------------
  evaluators = evaluation.make_evaluators(
      config, setup.dataset.class_names, getattr(setup.dataset, "label_to_category_id", None))
  # Built once the state is there: a checkpoint or weights file may have set the pixel convention.
  batch_predictor = evaluate.make_batch_predictor(config, setup.model, setup.anchors,
                                                  setup.convention, setup.mesh)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if step == 0:
    writer.write_hparams(experiment.flat_hparams(config))
  progress = progress_lib.Progress(num_steps, start_step=step, log_every_steps=train_cfg.log_every_steps,
                              enabled=jax.process_index() == 0)
  hooks = []
  if train_cfg.profile_steps > 0 and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(num_profile_steps=train_cfg.profile_steps, logdir=workdir))

  def check_finite(state):
    bad = int(jax.device_get(state["first_nonfinite_step"]))
    if bad >= 0:
      manager.wait_until_finished()   # the saves already under way hold good states: finish them
      last = manager.latest_step()
      saved = (f"Last good checkpoint: step {last} in {manager.directory}." if last is not None
               else f"No checkpoint was saved before it (none in {manager.directory}: the first "
                    f"is written at step {train_cfg.checkpoint_every_steps}).")
      # The bad step's metrics are still pending: every log and every save checks first.
      index = bad - (step - len(pending))
      bad_metrics = jax.device_get(pending[index]) if 0 <= index < len(pending) else {}
      growth = float(bad_metrics.get("param_norm_growth", np.nan))
      if np.isfinite(growth) and growth > train_cfg.max_param_norm_growth > 0:
        before = float(bad_metrics["param_norm"]) / growth
        raise NonFiniteLossError(
            f"the parameters blew up at step {bad + 1}; its update would have multiplied their "
            f"norm by {growth:.3g} (from {before:.3g} to {float(bad_metrics['param_norm']):.3g}), "
            f"more than config.train.max_param_norm_growth={train_cfg.max_param_norm_growth:g}. "
            f"That update was not applied and nothing after it was saved. {saved} Lower "
            "config.train.base_lr (or set config.train.grad_clip_norm > 0) and rerun the same "
            "command: it resumes from there.")
      raise NonFiniteLossError(
          f"the loss, gradient or updated parameters stopped being finite at step {bad + 1}; that "
          f"update was not applied and nothing after it was saved. {saved} Try a lower "
          "config.train.base_lr, config.train.grad_clip_norm > 0, or check the data for broken boxes.")

  def save(state, metrics=None):
    check_finite(state)   # only finite states are ever written
    checkpointing.save(manager, int(jax.device_get(state["step"])), state, train_iter, meta, metrics)

  # ---- The loop. ----------------------------------------------------------------------------------
  eval_metrics = {}
  pending = []
  logging.info("training %s for %d steps (from step %d), global batch %d on %d device(s)",
               config.model.architecture, num_steps, step, train_cfg.global_batch_size,
               jax.device_count())
  start_step, start_time = step, time.time()
  compiled_step = None
  # Multi-process: a peer that stops answering ends this process with one error naming it, instead
  # of a wait without end at the next collective. It stops once the loop, its final evaluation and
  # saves are done: a peer that finished first is not a dead one.
  watchdog = multihost.PeerWatchdog(float(train_cfg.get("collective_timeout_s", 0) or 0))
  with (watchdog, _Preemption() as preemption, metric_writers.ensure_flushes(writer),
        _closing(manager), progress):
    while step < num_steps:
      batch = setup.global_batch(next(train_iter))
      if compiled_step is None:
        # Compile first, then meet the other processes: the step's collectives start together.
        compiled_step = train_step.lower(state, batch).compile()
        multihost.barrier("train_step_compiled")
      state, metrics = compiled_step(state, batch)
      pending.append(metrics)
      step += 1
      if not started:
        started.append(step)
      for hook in hooks:
        hook(step)
      logged = step % train_cfg.log_every_steps == 0 or step == num_steps

      if logged:
        check_finite(state)
        summary = {f"train/{k}": float(np.mean([m[k] for m in jax.device_get(pending)]))
                   for k in pending[0]}
        # Records the pipeline skipped or repaired (corrupt images, clipped or degenerate boxes).
        summary.update({f"data/{k}": float(v) for k, v in train_iter.stats.as_dict().items()})
        writer.write_scalars(step, summary)
        pending = []
      progress.update(step, loss=summary["train/loss"] if logged else None)

      due = {name: e for name, e in evaluators.items() if e.due(step, num_steps)}
      step_metrics = {}
      if due:
        check_finite(state)
        step_metrics = evaluate.run_evaluators(
            due, batch_predictor(experiment.model_variables(state)), step, config, workdir, writer)
        eval_metrics.update(step_metrics)
      preempted = (manager.reached_preemption(step) if jax.process_count() > 1
                   else preemption.requested)
      if due or preempted or step % train_cfg.checkpoint_every_steps == 0:
        # The metrics ride with the checkpoint only when they hold the one that ranks checkpoints.
        save(state, step_metrics if config.eval.best_metric in step_metrics else None)
      if preempted:
        logging.warning("stopped at step %d for preemption; rerun the same command to resume", step)
        break

  if jax.process_index() == 0:
    trained_s = time.time() - start_time
    images_per_s = (step - start_step) * train_cfg.global_batch_size / trained_s if trained_s else None
    progress_lib.say(_summary(config, workdir, manager, evaluators, step, trained_s, images_per_s,
                         eval_metrics, stopped_early=step < num_steps))
  return eval_metrics


def _summary(config, workdir, manager, evaluators, step, wall_s, images_per_s, eval_metrics,
             stopped_early):
  """The closing table: best and last headline metric, AP by size, speed, where everything is."""
  name, evaluator = next(iter(evaluators.items()))
  key = evaluator.headline_metric
  past = [h for h in history.read_eval_history(os.path.join(workdir, history.EVAL_RESULTS_FILE))
          if h.get("evaluator") == name and h.get("mode") == "train" and key in h]
  last = (past[-1]["step"], past[-1][key]) if past else None
  best = max(((h["step"], h[key]) for h in past), key=lambda sv: sv[1]) if past else None
  buckets = [bucket[0] for bucket in config.eval.size_buckets_px]
  ap_by_size = {b: eval_metrics.get(f"{name}/AP_size/{b}") for b in buckets} if eval_metrics else None
  pictures = os.path.join(workdir, "pictures")
  paths = {"checkpoints": f"{manager.directory} (latest: step {manager.latest_step()})",
           "pictures": pictures, "plots": os.path.join(workdir, plots.PLOTS_DIR),
           "metrics": os.path.join(workdir, history.EVAL_RESULTS_FILE),
           "logs": f"{workdir} (tensorboard --logdir={workdir})"}
  return progress_lib.run_summary(steps=step, wall_s=wall_s, images_per_s=images_per_s, last_map=last,
                             best_map=best, ap_by_size=ap_by_size, paths=paths,
                             metric_name=f"{name}/{key}", stopped_early=stopped_early)
