"""Training and evaluation, top to bottom: `train_and_evaluate(config, workdir)`.

One `jax.jit` train step over a device `Mesh` with the batch sharded on "data" (1 CPU, 8 GPUs or a TPU
pod alike); matching and the MultiBox loss run inside the step on padded ground truth. Orbax saves
everything a resume needs; clu writes TensorBoard summaries and progress.
"""

import contextlib
import json
import os
import signal
import time

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from mdssd_jax import checkpointing
from mdssd_jax import losses
from mdssd_jax import matching
from mdssd_jax import models
from mdssd_jax import optim
from mdssd_jax import pixels
from mdssd_jax import postprocess
from mdssd_jax.data import pipeline
from mdssd_jax.data import registry

EVAL_RESULTS_FILE = "eval_results.jsonl"


# ---------------------------------------------------------------------------------------------------
# The model's state and steps.
# ---------------------------------------------------------------------------------------------------

def init_variables(model, config, rng):
  """Flax variables {"params", maybe "batch_stats"} for one (1, S, S, 3) input."""
  size = config.model.input_size_px
  return model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32), train=False)


def create_state(variables, tx, rng):
  """The training state: a plain dict, so Orbax and jit see an ordinary pytree."""
  params = variables["params"]
  return dict(step=jnp.zeros((), jnp.int32), params=params,
              batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params), rng=rng,
              # The first step whose loss or gradient was not finite (-1: none). Such a step leaves
              # params and optimiser state untouched, so the state stays fit to checkpoint.
              first_nonfinite_step=jnp.full((), -1, jnp.int32))


def model_variables(state):
  variables = {"params": state["params"]}
  if state["batch_stats"]:
    variables["batch_stats"] = state["batch_stats"]
  return variables


def make_train_step(model, tx, schedule, anchors_cxcywh, config, convention):
  """(state, batch) -> (new state, metrics); batch as the input pipeline gives it (uint8 images)."""
  anchors = jnp.asarray(anchors_cxcywh, jnp.float32)
  compute_dtype = jnp.dtype(config.model.dtype)
  variances = tuple(config.anchors.variances)

  def train_step(state, batch):
    images = pixels.normalize(batch["image"], convention, compute_dtype)
    loc_targets, cls_targets = matching.match(batch["boxes"], batch["labels"], anchors,
                                              iou_threshold=config.loss.iou_threshold,
                                              variances=variances)

    def loss_fn(params):
      variables = dict(model_variables(state), params=params)
      mutable = ["batch_stats"] if state["batch_stats"] else []
      (loc_preds, cls_logits), new_vars = model.apply(variables, images, train=True, mutable=mutable)
      loss, aux = losses.multibox_loss(loc_preds, cls_logits, loc_targets, cls_targets,
                                       neg_pos_ratio=config.loss.neg_pos_ratio,
                                       loc_weight=config.loss.loc_weight)
      return loss, (aux, new_vars)

    (loss, (aux, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)

    def keep_if_finite(new, old):
      return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = dict(
        step=state["step"] + 1,
        params=keep_if_finite(params, state["params"]),
        batch_stats=keep_if_finite(new_vars.get("batch_stats", {}), state["batch_stats"]),
        opt_state=keep_if_finite(opt_state, state["opt_state"]),
        rng=jax.random.fold_in(state["rng"], state["step"]),
        first_nonfinite_step=jnp.where((state["first_nonfinite_step"] < 0) & ~finite,
                                       state["step"], state["first_nonfinite_step"]))
    metrics = dict(loss=loss, loc_loss=aux["loc_loss"], cls_loss=aux["cls_loss"],
                   num_pos=aux["num_pos"].astype(jnp.float32), grad_norm=grad_norm,
                   learning_rate=schedule(state["step"]))
    return new_state, metrics

  return train_step


def make_predict_fn(model, anchors_cxcywh, config, convention):
  """(variables, uint8 images (B, S, S, 3)) -> postprocess.detect's fixed-size detections."""
  anchors = jnp.asarray(anchors_cxcywh, jnp.float32)
  compute_dtype = jnp.dtype(config.model.dtype)

  def predict(variables, images_uint8):
    images = pixels.normalize(images_uint8, convention, compute_dtype)
    loc_preds, cls_logits = model.apply(variables, images, train=False)
    return postprocess.detect(loc_preds, cls_logits, anchors,
                              score_threshold=config.eval.score_threshold,
                              nms_iou=config.eval.nms_iou, top_k=config.eval.top_k,
                              pre_nms_top_k=config.eval.pre_nms_top_k,
                              variances=tuple(config.anchors.variances))

  return predict


def local_image_predictor(model, anchors_cxcywh, config, convention, variables):
  """uint8 images (N, S, S, 3) -> numpy detections, on this process's first device alone.

  Used where each process handles a different number of images (tiles of large pictures, image
  files): no collective runs, so processes never wait for each other.
  """
  device = jax.local_devices()[0]
  local = jax.tree_util.tree_map(
      lambda x: jax.device_put(x.addressable_data(0) if isinstance(x, jax.Array) else x, device),
      variables)
  predict = jax.jit(make_predict_fn(model, anchors_cxcywh, config, convention))

  def run(images_uint8):
    out = predict(local, jax.device_put(np.asarray(images_uint8, np.uint8), device))
    return {k: np.asarray(v) for k, v in jax.device_get(out).items()}

  return run


def tiled_batch_predictor(image_predictor, config):
  """eval batch with original images -> fixed-size normalised detections, by tiled inference."""
  from mdssd_jax import predict as predict_lib  # pylint: disable=g-import-not-at-top
  top_k = config.eval.top_k

  def run(batch):
    size = len(batch["original_image"])
    out = dict(boxes=np.zeros((size, top_k, 4), np.float32), scores=np.zeros((size, top_k), np.float32),
               classes=np.zeros((size, top_k), np.int32), valid=np.zeros((size, top_k), bool))
    for i, image in enumerate(batch["original_image"]):
      if image is None:   # a padding example
        continue
      found = predict_lib.tiled_detect(image_predictor, image, config.model.input_size_px,
                                       config.eval.tiled.overlap_px, config.eval.nms_iou, top_k,
                                       config.eval.batch_size)
      n = len(found["scores"])
      height, width = image.shape[:2]
      out["boxes"][i, :n] = found["boxes_px"] / np.array([width, height, width, height], np.float32)
      out["scores"][i, :n], out["classes"][i, :n], out["valid"][i, :n] = found["scores"], found["classes"], True
    return out

  return run


# ---------------------------------------------------------------------------------------------------
# Building blocks that train, eval and predict share.
# ---------------------------------------------------------------------------------------------------

def _init_rngs(seed):
  """(key for parameter initialisation, key carried in the state).

  Initialisation uses the "rbg" generator: XLA compiles the threefry generator's many calls (one
  per parameter) about 8x slower on CPU, which dominated start-up of small models.
  """
  return jax.random.key(seed, impl="rbg"), jax.random.PRNGKey(seed)


class Setup:
  """The mesh, data set info, model, default boxes, optimiser and initial state of a config."""

  def __init__(self, config, with_optimizer=True):
    self.config = config
    # A plain Mesh (Auto axes): XLA propagates the "data" sharding through matching and the loss.
    self.mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    self.batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
    self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    if config.eval.batch_size % jax.local_device_count():
      raise ValueError(f"config.eval.batch_size={config.eval.batch_size} is not divisible by the "
                       f"{jax.local_device_count()} local devices; choose a multiple of "
                       f"{jax.local_device_count()}")
    self.dataset = registry.get_dataset(config.data)
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
      from mdssd_jax import pretrained  # pylint: disable=g-import-not-at-top
      params, convention = pretrained.load_vgg16(
          self.config.model.init_from, jax.device_get(variables["params"]),
          source=self.config.model.init_source)
      self.convention = pixels.as_convention(convention)
      variables = dict(variables, params=jax.device_put(params, self.replicated))
      logging.info("initialised the VGG16 trunk from %s (pixel convention %s)",
                   self.config.model.init_from, self.convention)
    return jax.jit(lambda v, r: create_state(v, self.tx, r),
                   out_shardings=self.replicated)(variables, state_rng)

  def abstract_state(self):
    """Shapes, dtypes and shardings of the state, without computing it."""
    init_rng, state_rng = _init_rngs(self.config.seed)
    shapes = jax.eval_shape(
        lambda r, s: create_state(init_variables(self.model, self.config, r), self.tx, s),
        init_rng, state_rng)
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated), shapes)

  def jitted_predict(self):
    """The jitted forward + detect, built once per pixel convention (each eval reuses it)."""
    key = json.dumps(self.convention, sort_keys=True)
    if getattr(self, "_predict_key", None) != key:
      self._predict = jax.jit(make_predict_fn(self.model, self.anchors, self.config, self.convention))
      self._predict_key = key
    return self._predict

  def meta(self, state):
    # The fingerprint needs parameter shapes only: no copy of the parameters to the host.
    return dict(fingerprint=checkpointing.model_fingerprint(self.config, len(self.anchors),
                                                            state["params"]),
                pixel_convention=self.convention,
                class_names=list(self.dataset.class_names),
                data_set=self.config.data.name)

  def global_batch(self, local_batch):
    """Per-process numpy batch -> global jax arrays sharded on "data"."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}

  def restore(self, manager, step, data_iterator=None):
    """The state of checkpoint `step`; refuses a checkpoint of another model."""
    meta = checkpointing.restore_meta(manager, step)
    abstract = self.abstract_state()
    current = checkpointing.model_fingerprint(self.config, len(self.anchors), abstract["params"])
    checkpointing.check_fingerprint(meta["fingerprint"], current, manager.directory)
    state, meta = checkpointing.restore(manager, step, abstract, data_iterator)
    self.convention = pixels.as_convention(meta["pixel_convention"])
    return state


def run_evaluation(setup, state, step, workdir=None, writer=None):
  """Evaluates `state` on config.data.eval_split; returns the metrics dict (on every process).

  Each process predicts its own shard of the split (one jit over the global mesh), keeps its
  detections, and one all-gather at the end brings every image to every process. Process 0 writes
  the metrics, appends them to eval_results.jsonl and draws pictures of the first images.
  """
  from mdssd_jax import evaluation  # pylint: disable=g-import-not-at-top
  from mdssd_jax.evaluation import loop as eval_loop  # pylint: disable=g-import-not-at-top
  config = setup.config
  variables = model_variables(state)
  evaluator = evaluation.make_evaluator(config.eval, setup.dataset.class_names,
                                        **_evaluator_kwargs(setup.dataset))
  num_pictures = config.eval.num_pictures if (workdir and jax.process_index() == 0) else 0
  pictures = []

  def mesh_predict_fn(batch):
    images = setup.global_batch({"image": batch["image"]})["image"]
    detections = setup.jitted_predict()(variables, images)
    return multihost_utils.global_array_to_host_local_array(
        detections, setup.mesh, jax.sharding.PartitionSpec("data"))

  tiled = bool(config.eval.tiled.enabled)
  if tiled:   # large images (TT100K): tiles of the input size at the image's own resolution
    predict_fn = tiled_batch_predictor(
        local_image_predictor(setup.model, setup.anchors, config, setup.convention, variables), config)
  else:
    predict_fn = mesh_predict_fn

  def keep_pictures(batch, arrays):
    for i in np.flatnonzero(arrays["batch_mask"])[:num_pictures - len(pictures)]:
      # Boxes normalised to the original image, drawn on the input-size image the model saw.
      size = np.asarray(batch["image"].shape[1:3], np.float32)
      scale = size[[1, 0, 1, 0]] / np.asarray(batch["orig_size"][i], np.float32)[[1, 0, 1, 0]]
      keep = arrays["keep"][i] & (arrays["scores"][i] >= config.eval.picture_score_threshold)
      pictures.append(dict(image=np.asarray(batch["image"][i]), boxes_px=arrays["boxes_px"][i][keep] * scale,
                           classes=arrays["classes"][i][keep], scores=arrays["scores"][i][keep]))

  start = time.time()
  metrics = eval_loop.evaluate_batches(
      predict_fn,
      pipeline.make_eval_batches(config, process_index=jax.process_index(),
                                 process_count=jax.process_count(), with_original_images=tiled),
      evaluator,
      process_allgather=(multihost_utils.process_allgather if jax.process_count() > 1 else None),
      on_batch=keep_pictures if num_pictures else None)
  metrics = {k: float(v) for k, v in metrics.items()}
  logging.info("evaluation at step %d took %.1f s", step, time.time() - start)
  if jax.process_index() == 0:
    print(f"Evaluation at step {step}:\n{evaluator.table()}", flush=True)
    if writer is not None:
      writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    if workdir:
      with open(os.path.join(workdir, EVAL_RESULTS_FILE), "a") as f:
        f.write(json.dumps(dict(step=int(step), **metrics)) + "\n")
      _write_pictures(pictures, setup.dataset.class_names,
                      os.path.join(workdir, "pictures", f"step_{int(step):08d}"))
  return metrics


def _evaluator_kwargs(dataset):
  mapping = getattr(dataset, "label_to_category_id", None)
  return {"label_to_category_id": mapping} if mapping else {}


def _write_pictures(pictures, class_names, directory):
  if not pictures:
    return
  from mdssd_jax import visualize  # pylint: disable=g-import-not-at-top
  import cv2  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  for i, pic in enumerate(pictures):
    drawn = visualize.draw_detections(pic["image"], pic["boxes_px"], pic["classes"], pic["scores"],
                                      class_names)
    cv2.imwrite(os.path.join(directory, f"{i:03d}.jpg"), drawn[..., ::-1])


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
  """Finishes the asynchronous saves under way, however the loop ends (an error included)."""
  try:
    yield manager
  finally:
    manager.wait_until_finished()
    manager.close()


def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final metrics."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  train_cfg = config.train
  if train_cfg.global_batch_size % jax.device_count():
    raise ValueError(f"config.train.global_batch_size={train_cfg.global_batch_size} is not divisible "
                     f"by the {jax.device_count()} devices; choose a multiple of {jax.device_count()}")

  # ---- Model, data and optimiser. ----------------------------------------------------------------
  setup = Setup(config)
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
  state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
  train_step = jax.jit(
      make_train_step(setup.model, setup.tx, setup.schedule, setup.anchors, config, setup.convention),
      in_shardings=(state_sharding, setup.batch_sharding), out_shardings=(state_sharding, None),
      donate_argnums=0)

  # ---- Writers and periodic actions. --------------------------------------------------------------
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if step == 0:
    writer.write_hparams(_flat_hparams(config))
  hooks = [periodic_actions.ReportProgress(num_train_steps=train_cfg.num_steps, writer=writer,
                                           every_steps=train_cfg.log_every_steps, every_secs=None)]
  if train_cfg.profile_steps > 0 and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(num_profile_steps=train_cfg.profile_steps, logdir=workdir))

  def check_finite(state):
    bad = int(jax.device_get(state["first_nonfinite_step"]))
    if bad >= 0:
      manager.wait_until_finished()   # the saves already under way hold good states: finish them
      raise NonFiniteLossError(
          f"the loss or gradient stopped being finite at step {bad + 1}; the parameters of that step "
          f"were not applied and nothing after it was saved. Last good checkpoint: step "
          f"{manager.latest_step()} in {manager.directory}. Try a lower config.train.base_lr, "
          "config.train.grad_clip_norm > 0, or check the data for broken boxes.")

  def save(state, metrics=None):
    check_finite(state)
    checkpointing.save(manager, int(jax.device_get(state["step"])), state, train_iter, meta, metrics)

  # ---- The loop. ----------------------------------------------------------------------------------
  eval_metrics = {}
  pending = []
  logging.info("training %s for %d steps (from step %d), global batch %d on %d device(s)",
               config.model.architecture, train_cfg.num_steps, step, train_cfg.global_batch_size,
               jax.device_count())
  with _Preemption() as preemption, metric_writers.ensure_flushes(writer), _closing(manager):
    while step < train_cfg.num_steps:
      batch = setup.global_batch(next(train_iter))
      state, metrics = train_step(state, batch)
      pending.append(metrics)
      step += 1
      for hook in hooks:
        hook(step)

      if step % train_cfg.log_every_steps == 0 or step == train_cfg.num_steps:
        check_finite(state)
        summary = {f"train/{k}": float(np.mean([m[k] for m in jax.device_get(pending)]))
                   for k in pending[0]}
        # Records the pipeline skipped or repaired (corrupt images, clipped or degenerate boxes).
        summary.update({f"data/{k}": float(v) for k, v in train_iter.stats.as_dict().items()})
        writer.write_scalars(step, summary)
        pending = []

      is_last = step == train_cfg.num_steps
      eval_now = is_last or (config.eval.every_steps and step % config.eval.every_steps == 0)
      if eval_now:
        eval_metrics = run_evaluation(setup, state, step, workdir, writer)
      preempted = (manager.reached_preemption(step) if jax.process_count() > 1
                   else preemption.requested)
      if eval_now or preempted or step % train_cfg.checkpoint_every_steps == 0:
        save(state, eval_metrics if eval_now else None)
      if preempted:
        logging.warning("stopped at step %d for preemption; rerun the same command to resume", step)
        break

  if jax.process_index() == 0:
    _say_where(workdir, manager, step)
  return eval_metrics


def _say_where(workdir, manager, step):
  lines = [f"Done at step {step}.",
           f"  checkpoints:  {manager.directory} (latest: step {step})",
           f"  metrics:      {os.path.join(workdir, EVAL_RESULTS_FILE)} and TensorBoard logs in {workdir}",
           f"  pictures:     {os.path.join(workdir, 'pictures')}"]
  print("\n".join(lines), flush=True)


def _flat_hparams(config):
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


# ---------------------------------------------------------------------------------------------------
# Evaluation and inference from a checkpoint.
# ---------------------------------------------------------------------------------------------------

def load_checkpoint(config, workdir, step=None):
  """(setup, state, step) of the latest (or a named) checkpoint in workdir, for eval / predict."""
  setup = Setup(config)
  manager = checkpointing.make_manager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                       config.train, best_metric=config.eval.best_metric)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}; train first with "
                            f"`python main.py --config=... --workdir={workdir}`")
  state = setup.restore(manager, step)
  manager.close()
  return setup, state, step


def evaluate_checkpoint(config, workdir, step=None):
  """--mode=eval: evaluates a checkpoint, prints the table and appends to eval_results.jsonl."""
  setup, state, step = load_checkpoint(config, workdir, step)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  metrics = run_evaluation(setup, state, step, workdir, writer)
  writer.flush()
  return metrics
