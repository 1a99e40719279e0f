"""Prints a markdown table of the four detectors: parameters, default boxes, forward GFLOPs/image.

    python -m benchmarks.model_table [--configs ssd300_voc,mdssd300_voc] [--batch 1]

(from the repository root: `-m` puts it on the path, so `configs` and `mdssd_jax` import.)

Shapes come from jax.eval_shape (nothing is allocated); FLOPs from XLA's cost analysis of the
compiled inference forward pass (XLA counts a multiply-add as 2 FLOPs). Compiling the full-size
models on a CPU takes a minute or two; no forward pass is run.
"""

import argparse
import importlib
import time

import jax
import jax.numpy as jnp

from mdssd_jax import models

DEFAULT_CONFIGS = ("ssd300_voc", "ssd512_voc", "mdssd300_voc", "mdssd512_voc")


def forward_flops(model, variables, image_size, batch):
  """FLOPs of one jitted inference forward pass for `batch` images, from XLA's cost analysis."""
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images)
  cost = lowered.compile().cost_analysis()
  if isinstance(cost, (list, tuple)):   # older JAX: one dict per device program
    cost = cost[0]
  return float(cost["flops"])


def row(config_name, batch):
  config = importlib.import_module(f"configs.{config_name}").get_config()
  model, anchors = models.build_detector(config)
  size = int(config.model.input_size_px)
  variables, _, maps = models.abstract_forward(model, size, batch)
  start = time.time()
  flops = forward_flops(model, variables, size, batch) / batch
  return dict(name=config_name, input=size, params=models.count_params(variables["params"]),
              boxes=anchors.shape[0], maps=[int(m.shape[1]) for m in maps], gflops=flops / 1e9,
              compile_s=time.time() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                      help="comma-separated config modules under configs/")
  parser.add_argument("--batch", type=int, default=1, help="images per forward pass analysed")
  args = parser.parse_args()
  rows = [row(name, args.batch) for name in args.configs.split(",")]
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, batch {args.batch}\n")
  print("| config | input | parameters | default boxes | head maps | forward GFLOPs / image |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['name']} | {r['input']} | {r['params'] / 1e6:.2f} M | {r['boxes']} | "
          f"{r['maps']} | {r['gflops']:.1f} |")
  print("\n(compile seconds: " + ", ".join(f"{r['name']} {r['compile_s']:.0f}" for r in rows) + ")")


if __name__ == "__main__":
  main()
