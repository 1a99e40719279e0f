"""Prints a markdown table of training memory per image, with and without rematerialisation.

    python -m benchmarks.memory_table [--configs ssd300_voc,mdssd300_voc,mdssd512_voc]
                                      [--batch 2] [--dtype float32] [--remat none,blocks]

(from the repository root, so that `configs` and `mdssd_jax` import.)

For each config and `config.model.remat` setting it compiles (nothing runs; inputs are abstract) a
train-like step: the model's training forward pass, a loss on every output, and the gradient of
every parameter. XLA's buffer assignment (`compiled.memory_analysis()`) gives the temporary bytes
of that program: activations kept for the backward pass plus the working buffers. Per image =
temporary bytes / batch (the batch-independent part of the temporaries is counted as if it grew
with the batch, so the figure errs high). The largest batch that fits a device follows from

    per_image * batch + 4 * parameter bytes  <=  device memory

(4 copies of the parameters: the parameters, their gradients, SGD's momentum, the updated
parameters). XLA:CPU's buffer assignment stands in for the GPU's: both schedule the same HLO, but
a GPU build fuses differently and needs cuDNN workspace, so treat the largest batch as an
estimate to confirm on the device. `jax.export` can lower for "cuda" / "tpu" from a CPU machine,
but memory analysis needs a compiler for that platform, so this table is CPU-only.
"""

import argparse
import importlib
import time

import jax
import jax.numpy as jnp

from mdssd_jax import models

DEFAULT_CONFIGS = ("ssd300_voc", "mdssd300_voc", "mdssd512_voc")
DEVICES_GB = (("80 GB", 80e9), ("141 GB", 141e9))   # H100 / A100 80 GB; H200 141 GB
PARAM_COPIES = 4


def train_like_step(model):
  """f(variables, images) -> (loss, grads): forward in train mode, a loss on all outputs, backward."""
  def step(variables, images):
    def loss(params):
      (loc, logits), _ = model.apply(dict(variables, params=params), images, train=True,
                                     mutable=["batch_stats"])
      return jnp.mean(loc ** 2) - jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    return jax.value_and_grad(loss)(variables["params"])
  return step


def measure(config_name, remat, batch, dtype):
  config = importlib.import_module(f"configs.{config_name}").get_config()
  config.model.remat = remat
  config.model.dtype = dtype
  model = models.build_model(config)
  size = int(config.model.input_size_px)
  variables, _, _ = models.abstract_forward(model, size, batch)
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  start = time.time()
  # LLVM's optimisation level changes code, not buffer assignment: level 0 compiles much faster.
  compiled = jax.jit(train_like_step(model)).lower(variables, images).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  memory = compiled.memory_analysis()
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(variables["params"]))
  per_image = memory.temp_size_in_bytes / batch
  fits = {name: int((total - PARAM_COPIES * param_bytes) // per_image) for name, total in DEVICES_GB}
  return dict(name=config_name, remat=remat, per_image=per_image, param_bytes=param_bytes,
              temp=memory.temp_size_in_bytes, fits=fits, compile_s=time.time() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
  parser.add_argument("--remat", default="none,blocks", help="config.model.remat values")
  parser.add_argument("--batch", type=int, default=2, help="images per compiled step")
  parser.add_argument("--dtype", default="float32", help="config.model.dtype")
  args = parser.parse_args()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, batch {args.batch}, "
        f"dtype {args.dtype}\n")
  print("| config | remat | MB per image | parameters MB (x4 held) | largest batch, 80 GB | "
        "largest batch, 141 GB | compile s |")
  print("|---|---|---|---|---|---|---|")
  for name in args.configs.split(","):
    for remat in args.remat.split(","):
      r = measure(name, remat, args.batch, args.dtype)
      print(f"| {r['name']} | {r['remat']} | {r['per_image'] / 1e6:.0f} | "
            f"{r['param_bytes'] / 1e6:.0f} | {r['fits']['80 GB']} | {r['fits']['141 GB']} | "
            f"{r['compile_s']:.0f} |", flush=True)


if __name__ == "__main__":
  main()
