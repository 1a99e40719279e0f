"""StableHLO op counts of the train step and the predict function, lowered for GPU and TPU on this
machine with `jax.export` (no accelerator needed), split into the model's ops and the rest.

    python -m benchmarks.lowering_report                                  # tiny MDSSD, cuda + tpu
    python -m benchmarks.lowering_report --config=mdssd300_voc --batch=32 --dtype=bfloat16
    python -m benchmarks.lowering_report --platforms=cpu,cuda,tpu --ops=scatter,gather,convolution

An op belongs to "the model" when its name stack (the first string of its MLIR location) passes
through the Flax module `SSD` (forward `SSD/...`, backward `transpose(jvp(SSD))/...`); everything else
is pixel normalisation, matching, loss, optimiser or detection. Lowering is shape-polymorphism-free:
the figures are those of one program per input shape. Prints markdown tables.
"""

import argparse
import collections
import importlib
import os
import re
import time


import jax  # pylint: disable=g-import-not-at-top
from jax import export as jax_export
import jax.numpy as jnp

from mdssd_jax.state import experiment
from mdssd_jax import models
from mdssd_jax.state import optim
from mdssd_jax.core import pixels
from mdssd_jax.inference import predictor as predict_lib
from mdssd_jax.run import train

# The name stack of an op inside the detector: the top Flax module is the class `SSD`, which JAX
# shows as `SSD/...` in the forward pass and inside `jvp(SSD)` / `transpose(jvp(SSD))` in training.
MODEL_SCOPE = re.compile(r"(^|[/(])SSD[/)]")
# The first quoted string of a location, e.g. loc("jit(train_step)/jvp(SSD)/vgg/conv1_1/conv"(...)).
NAME_STACK = re.compile(r'loc\(\s*"([^"]*)"')
# Ops that only structure the module, not computation.
STRUCTURAL_OPS = ("func.func", "func.return", "func.call", "stablehlo.return", "builtin.module")


def load_config(name, dtype=None, input_size_px=None):
  config = importlib.import_module(f"configs.{name}").get_config()
  if dtype:
    config.model.dtype = dtype
  if input_size_px:
    config.model.input_size_px = input_size_px
  return config


def abstract_inputs(config, batch_size):
  """(model, anchors, tx, schedule, convention, abstract state, abstract train batch) of a config.

  The state comes from jax.eval_shape: nothing is initialised, so full-size models cost nothing.
  """
  model, anchors = models.build_detector(config)
  tx, schedule = optim.make_optimizer(config.train)
  convention = pixels.as_convention(config.model.pixel)
  state = jax.eval_shape(
      lambda r, s: experiment.create_state(experiment.init_variables(model, config, r), tx, s),
      jax.random.key(0, impl="rbg"), jax.random.PRNGKey(0))
  size, max_boxes = config.model.input_size_px, config.data.max_boxes
  batch = dict(image=jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
               boxes=jax.ShapeDtypeStruct((batch_size, max_boxes, 4), jnp.float32),
               labels=jax.ShapeDtypeStruct((batch_size, max_boxes), jnp.int32))
  return model, anchors, tx, schedule, convention, state, batch


def export_train_and_predict(config, batch_size, platforms):
  """{"train step": Exported, "predict": Exported} lowered for `platforms` (a tuple of names)."""
  model, anchors, tx, schedule, convention, state, batch = abstract_inputs(config, batch_size)
  step = train.make_train_step(model, tx, schedule, anchors, config, convention)
  predict = predict_lib.make_predict_fn(model, anchors, config, convention)
  variables = experiment.model_variables(state)
  return {
      "train step": jax_export.export(jax.jit(step), platforms=platforms)(state, batch),
      "predict": jax_export.export(jax.jit(predict), platforms=platforms)(variables, batch["image"]),
  }


def parse_module(exported):
  """The exported StableHLO as an MLIR module object (with locations) that can be walked."""
  from jax._src.interpreters import mlir as jax_mlir  # pylint: disable=g-import-not-at-top
  from jax.extend.mlir import ir  # pylint: disable=g-import-not-at-top
  context = jax_mlir.make_ir_context()
  with context:
    return ir.Module.parse(exported.mlir_module()), context


def count_ops(exported):
  """Counter {(op name, "model" | "other"): count} over every op of the exported module."""
  module, context = parse_module(exported)
  counts = collections.Counter()

  def walk(operation):
    for region in operation.regions:
      for block in region.blocks:
        for op in block.operations:
          name = op.operation.name
          if name not in STRUCTURAL_OPS:
            match = NAME_STACK.search(str(op.location))
            part = "model" if match and MODEL_SCOPE.search(match.group(1)) else "other"
            counts[(name, part)] += 1
          walk(op.operation)

  with context:
    walk(module.operation)
  return counts


def print_tables(results, only_ops=None):
  """results: {(function, platform): Counter} -> one markdown table per function."""
  for function in dict.fromkeys(f for f, _ in results):
    platforms = [p for f, p in results if f == function]
    names = sorted({n for p in platforms for n, _ in results[(function, p)]})
    if only_ops:
      names = [n for n in names if any(o in n for o in only_ops)]
    print(f"\n{function}: ops as model / other (model = inside the Flax module SSD)\n")
    print("| op | " + " | ".join(platforms) + " |")
    print("|---|" + "---:|" * len(platforms))
    for name in names:
      cells = [f"{results[(function, p)][(name, 'model')]} / {results[(function, p)][(name, 'other')]}"
               for p in platforms]
      print(f"| `{name}` | " + " | ".join(cells) + " |")
    totals = [f"{sum(v for (n, part), v in results[(function, p)].items() if part == 'model')} / "
              f"{sum(v for (n, part), v in results[(function, p)].items() if part == 'other')}"
              for p in platforms]
    print("| **all** | " + " | ".join(totals) + " |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="tiny_mdssd")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--dtype", default=None, help="config.model.dtype override, e.g. bfloat16")
  parser.add_argument("--kernels", default=None,
                      help="config.model.kernels override ('auto' | 'native' | 'cpu'), if the config has it")
  parser.add_argument("--platforms", default="cuda,tpu")
  parser.add_argument("--ops", default="", help="comma-separated substrings: only these ops")
  args = parser.parse_args()
  config = load_config(args.config, args.dtype)
  if args.kernels:
    if "kernels" not in config.model:
      raise SystemExit(f"--kernels={args.kernels}: config {args.config} has no model.kernels "
                       "(this version of the library has one kernel set)")
    config.model.kernels = args.kernels
  print(f"{args.config}, batch {args.batch}, dtype {config.model.dtype}, "
        f"kernels {config.model.get('kernels', '(no model.kernels)')}, jax {jax.__version__}")
  results = {}
  for platform in args.platforms.split(","):
    start = time.perf_counter()
    exported = export_train_and_predict(config, args.batch, (platform,))
    for function, exp in exported.items():
      results[(function, platform)] = count_ops(exp)
    print(f"lowered for {platform} in {time.perf_counter() - start:.1f} s", flush=True)
  print_tables(results, [o for o in args.ops.split(",") if o])


if __name__ == "__main__":
  main()
