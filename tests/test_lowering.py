"""The train step and the predict function lowered for GPU and TPU on this CPU machine (jax.export),
and compiled once per input shape on the CPU.

- On "cuda" and "tpu" the model holds no scatter and no gather: the Fusion Block's upsampling is a
  native transposed convolution there, not zero insertion through `.at[::2, ::2].set` (a scatter
  forward, a gather backward). Matching may use scatters (the forced matches): only ops inside the
  Flax module `SSD` are checked.
- The op classification is checked not to be vacuous: the model part holds exactly one convolution per
  conv kernel in the forward pass, and 3 per kernel less one (no input gradient of the first conv) in
  the train step.
- Three train steps, two evaluations and one more step trace and compile each function once.
"""

import collections
import re

import jax
from jax import export as jax_export
import jax.numpy as jnp
import numpy as np
import pytest

from mdssd_jax.state import experiment
from mdssd_jax import models
from mdssd_jax.state import optim
from mdssd_jax.core import pixels
from mdssd_jax.inference import predictor as predict_lib
from mdssd_jax.run import train
from tests import helpers

ACCELERATORS = ("cuda", "tpu")
BATCH = 2
# An op belongs to the model when its name stack passes through the top Flax module `SSD`:
# "SSD/vgg/..." forward, "jvp(SSD)/..." and "transpose(jvp(SSD))/..." in training.
MODEL_SCOPE = re.compile(r"(^|[/(])SSD[/)]")
NAME_STACK = re.compile(r'loc\(\s*"([^"]*)"')
# Indexed memory access: none of the model's layers (convs, pools, norms, activations) needs one.
FORBIDDEN_IN_MODEL = ("stablehlo.scatter", "stablehlo.gather")


def tiny_config():
  return helpers.tiny_config(**{"model.kernels": "auto"})   # the backend-aware choice, as users get it


def pieces(config):
  model, anchors = models.build_detector(config)
  tx, schedule = optim.make_optimizer(config.train)
  return model, anchors, tx, schedule, pixels.as_convention(config.model.pixel)


def abstract_state(model, tx, config):
  return jax.eval_shape(
      lambda r, s: experiment.create_state(experiment.init_variables(model, config, r), tx, s),
      jax.random.key(0, impl="rbg"), jax.random.PRNGKey(0))


def abstract_batch(config, batch=BATCH):
  size, slots = config.model.input_size_px, config.data.max_boxes
  return dict(image=jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8),
              boxes=jax.ShapeDtypeStruct((batch, slots, 4), jnp.float32),
              labels=jax.ShapeDtypeStruct((batch, slots), jnp.int32))


def op_counts(exported):
  """Counter {(op name, "model" | "other")} over the ops of an exported module (nested regions too)."""
  from jax._src.interpreters import mlir as jax_mlir  # pylint: disable=g-import-not-at-top
  from jax.extend.mlir import ir  # pylint: disable=g-import-not-at-top
  counts = collections.Counter()

  def walk(operation):
    for region in operation.regions:
      for block in region.blocks:
        for op in block.operations:
          stack = NAME_STACK.search(str(op.location))
          part = "model" if stack and MODEL_SCOPE.search(stack.group(1)) else "other"
          counts[(op.operation.name, part)] += 1
          walk(op.operation)

  with jax_mlir.make_ir_context():
    walk(ir.Module.parse(exported.mlir_module()).operation)
  return counts


def num_conv_kernels(params):
  """Conv kernels (4-D parameters) of the model: each is one convolution of the forward pass."""
  return sum(1 for leaf in jax.tree_util.tree_leaves(params) if len(leaf.shape) == 4)


def forbidden_report(counts):
  found = {name: counts[(name, "model")] for name in FORBIDDEN_IN_MODEL if counts[(name, "model")]}
  return found


@pytest.fixture(scope="module")
def exported_functions():
  """{platform: (train step Exported, predict Exported, number of conv kernels)}."""
  config = tiny_config()
  model, anchors, tx, schedule, convention = pieces(config)
  state, batch = abstract_state(model, tx, config), abstract_batch(config)
  step = jax.jit(train.make_train_step(model, tx, schedule, anchors, config, convention))
  predict = jax.jit(predict_lib.make_predict_fn(model, anchors, config, convention))
  out = {}
  for platform in ACCELERATORS:
    out[platform] = (jax_export.export(step, platforms=(platform,))(state, batch),
                     jax_export.export(predict, platforms=(platform,))(
                         experiment.model_variables(state), batch["image"]),
                     num_conv_kernels(state["params"]))
  return out


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_model_forward_backward_alone_has_no_scatter(platform):
  """model.apply forward + backward (w.r.t. params and images), lowered without the rest."""
  config = tiny_config()
  model, _, tx, _, _ = pieces(config)
  state = abstract_state(model, tx, config)
  images = jax.ShapeDtypeStruct((BATCH, config.model.input_size_px, config.model.input_size_px, 3),
                                jnp.float32)

  def loss(params, images, variables):
    (loc, logits), _ = model.apply(dict(variables, params=params), images, train=True,
                                   mutable=["batch_stats"])
    return jnp.sum(loc) + jnp.sum(logits)

  exported = jax_export.export(jax.jit(jax.grad(loss, argnums=(0, 1))), platforms=(platform,))(
      state["params"], images, experiment.model_variables(state))
  counts = collections.Counter()
  for (name, _), n in op_counts(exported).items():
    counts[name] += n
  assert exported.platforms == (platform,)
  found = {name: counts[name] for name in FORBIDDEN_IN_MODEL if counts[name]}
  assert not found, (f"the model's forward + backward lowered for {platform} holds {found}: the "
                     "Fusion Block's deconvolution (or the pool) still indexes memory instead of "
                     "using a native transposed convolution / reduce_window there")
  # Not vacuous: the forward and the weight gradient of every conv kernel are there (JAX drops
  # some input-gradient convs of this linear loss, so only a lower bound is exact).
  assert counts["stablehlo.convolution"] >= 2 * num_conv_kernels(state["params"])


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_exported_train_step_model_part_has_no_scatter(exported_functions, platform):
  step, _, kernels = exported_functions[platform]
  counts = op_counts(step)
  assert step.platforms == (platform,)
  # The name-stack split is not vacuous: every convolution is the model's, and all of them are seen.
  assert counts[("stablehlo.convolution", "other")] == 0
  assert counts[("stablehlo.convolution", "model")] == 3 * kernels - 1
  found = forbidden_report(counts)
  others = {name: counts[(name, "other")] for name in FORBIDDEN_IN_MODEL}
  assert not found, (f"train step lowered for {platform}: the model part holds {found} "
                     f"(outside the model, in matching/loss/optimiser: {others})")


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_exported_predict_model_part_has_no_scatter(exported_functions, platform):
  _, predict, kernels = exported_functions[platform]
  counts = op_counts(predict)
  assert counts[("stablehlo.convolution", "model")] == kernels
  assert counts[("stablehlo.convolution", "other")] == 0
  found = forbidden_report(counts)
  assert not found, f"predict lowered for {platform}: the model part holds {found}"


def test_one_export_serves_cpu_cuda_and_tpu():
  """A single artifact lowered for all three platforms serialises and reloads with its signature."""
  config = tiny_config()
  model, anchors, _, _, convention = pieces(config)
  state = abstract_state(model, optim.make_optimizer(config.train)[0], config)
  images = abstract_batch(config)["image"]
  predict = jax.jit(predict_lib.make_predict_fn(model, anchors, config, convention))
  exported = jax_export.export(predict, platforms=("cpu", "cuda", "tpu"))(
      experiment.model_variables(state), images)
  again = jax_export.deserialize(exported.serialize())
  assert again.platforms == ("cpu", "cuda", "tpu")
  assert again.in_avals == exported.in_avals and again.out_avals == exported.out_avals
  expected = jax.tree_util.tree_leaves(
      jax.eval_shape(predict, experiment.model_variables(state), images))
  assert [(a.shape, a.dtype) for a in again.out_avals] == [(e.shape, e.dtype) for e in expected]
  assert all(a.shape[:2] == (BATCH, config.eval.top_k) for a in again.out_avals)


class CompileCounter:
  """Counts JAX's lowerings (one per jit cache miss, whether or not XLA's persistent cache then
  serves the executable) while active."""

  LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"

  def __init__(self):
    self.events = []

  def __call__(self, event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event == self.LOWER_EVENT:
      self.events.append(event)

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)


def test_train_steps_and_evaluations_compile_once_per_shape():
  """The jit set-up of train_and_evaluate (state sharding in and out, state donated) and the
  evaluation's jitted predict: step 1 and evaluation 1 compile, nothing after them does."""
  config = tiny_config()
  model, anchors, tx, schedule, convention = pieces(config)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  init_rng, state_rng = jax.random.key(0, impl="rbg"), jax.random.PRNGKey(0)
  state = jax.jit(
      lambda r, s: experiment.create_state(experiment.init_variables(model, config, r), tx, s),
      out_shardings=replicated)(init_rng, state_rng)
  state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
  step = jax.jit(train.make_train_step(model, tx, schedule, anchors, config, convention),
                 in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None),
                 donate_argnums=0)
  predict = jax.jit(predict_lib.make_predict_fn(model, anchors, config, convention))
  rng = np.random.default_rng(0)
  size, slots = config.model.input_size_px, config.data.max_boxes

  def batch():
    xy = rng.uniform(0, 0.6, (BATCH, slots, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.1, 0.4, (BATCH, slots, 2))], -1)
    labels = rng.integers(0, config.model.num_classes + 1, (BATCH, slots))
    return {k: jax.device_put(v, batch_sharding) for k, v in dict(
        image=rng.integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8),
        boxes=boxes.astype(np.float32), labels=labels.astype(np.int32)).items()}

  with CompileCounter() as first:
    state, metrics = step(state, batch())
    jax.block_until_ready(metrics)
  assert len(first.events) >= 1, "the listener saw no lowering of the first step: it counts nothing"
  before = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype, x.sharding), state)
  with CompileCounter() as later_steps:
    for _ in range(2):
      state, metrics = step(state, batch())
    jax.block_until_ready(metrics)
  assert later_steps.events == [], "train steps 2 and 3 traced and compiled the step again"
  assert jax.tree_util.tree_map(lambda x: (x.shape, x.dtype, x.sharding), state) == before
  assert int(state["step"]) == 3

  with CompileCounter() as first_eval:
    jax.block_until_ready(predict(experiment.model_variables(state), batch()["image"]))
  assert len(first_eval.events) >= 1
  with CompileCounter() as later:
    jax.block_until_ready(predict(experiment.model_variables(state), batch()["image"]))
    state, metrics = step(state, batch())   # training goes on after an evaluation
    jax.block_until_ready(predict(experiment.model_variables(state), batch()["image"]))
    jax.block_until_ready(metrics)
  assert later.events == [], "an evaluation or the step after it compiled again"
  assert np.isfinite(float(metrics["loss"]))
