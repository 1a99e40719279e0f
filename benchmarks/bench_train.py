"""Train-step throughput on the present device: steps/s, images/s, achieved FLOP/s, and the split of
one step between the model (forward + backward), matching + MultiBox loss, and the optimiser.

    python benchmarks/bench_train.py --configs=ssd300_voc,mdssd300_voc --batch=32 --dtype=bfloat16
    python benchmarks/bench_train.py --configs=demo_synthetic --batch=16          # this CPU

Random images and boxes stand in for data: this measures the device step, not the input pipeline
(benchmarks/bench_input.py does that). Prints a markdown table.
"""

import argparse
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax

from mdssd_jax import losses
from mdssd_jax import matching
from mdssd_jax import train


def random_batch(config, batch, rng):
  size, max_boxes = config.model.input_size_px, config.data.max_boxes
  xy = rng.uniform(0, 0.8, (batch, max_boxes, 2))
  wh = rng.uniform(0.02, 0.2, (batch, max_boxes, 2))
  boxes = np.concatenate([xy, np.minimum(xy + wh, 1.0)], -1).astype(np.float32)
  labels = rng.integers(1, config.model.num_classes + 1, (batch, max_boxes)).astype(np.int32)
  labels[:, max_boxes // 4:] = 0   # a quarter of the slots hold boxes, as in VOC-like data
  images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  return dict(image=images, boxes=boxes, labels=labels)


def timed(fn, *args, repeats):
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def bench(config_name, batch, dtype, repeats):
  config = importlib.import_module(f"configs.{config_name}").get_config()
  config.model.dtype = dtype
  config.train.global_batch_size = batch
  config.data.num_workers = 0
  setup = train.Setup(config)
  state = setup.initial_state()
  host_batch = random_batch(config, batch, np.random.default_rng(0))
  dev_batch = setup.global_batch(host_batch)

  step_fn = jax.jit(train.make_train_step(setup.model, setup.tx, setup.schedule, setup.anchors,
                                          config, setup.convention))
  compiled = step_fn.lower(state, dev_batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  t_step = timed(lambda s, b: compiled(s, b)[1]["loss"], state, dev_batch, repeats=repeats)

  # Model alone: forward + backward of a scalar of its outputs.
  images = train.pixels.normalize(dev_batch["image"], setup.convention, jnp.dtype(dtype))
  variables = train.model_variables(state)
  mutable = ["batch_stats"] if state["batch_stats"] else []

  def model_loss(params):
    (loc, logits), _ = setup.model.apply(dict(variables, params=params), images, train=True,
                                         mutable=mutable)
    return jnp.mean(loc) + jnp.mean(logits)
  t_model = timed(jax.jit(jax.grad(model_loss)), state["params"], repeats=repeats)

  # Matching + loss alone, on random predictions of the right shapes.
  anchors = jnp.asarray(setup.anchors)
  num_anchors, num_logits = len(setup.anchors), config.model.num_classes + 1
  preds = jax.random.normal(jax.random.PRNGKey(0), (batch, num_anchors, 4 + num_logits))

  def match_and_loss(preds, boxes, labels):
    loc_t, cls_t = matching.match(boxes, labels, anchors, iou_threshold=config.loss.iou_threshold)
    return losses.multibox_loss(preds[..., :4], preds[..., 4:], loc_t, cls_t)[0]
  t_loss = timed(jax.jit(jax.grad(match_and_loss)), preds, dev_batch["boxes"], dev_batch["labels"],
                 repeats=repeats)

  # Optimiser update alone.
  grads = jax.tree_util.tree_map(jnp.ones_like, state["params"])
  update = jax.jit(lambda g, o, p: optax.apply_updates(p, setup.tx.update(g, o, p)[0]))
  t_opt = timed(update, grads, state["opt_state"], state["params"], repeats=repeats)

  return dict(config=config_name, batch=batch, dtype=dtype, steps_per_s=1 / t_step,
              images_per_s=batch / t_step, tflops=flops / t_step / 1e12, gflops_per_step=flops / 1e9,
              model_ms=1e3 * t_model, loss_ms=1e3 * t_loss, opt_ms=1e3 * t_opt, step_ms=1e3 * t_step)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="tiny_mdssd,demo_synthetic")
  parser.add_argument("--batch", type=int, nargs="+", default=[16])
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f"device: {device.platform} {getattr(device, 'device_kind', '')} x{jax.device_count()}")
  print("| config | batch | dtype | steps/s | images/s | TFLOP/s | GFLOP/step | step ms | "
        "model fwd+bwd ms | match+loss ms | optimiser ms |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for name in args.configs.split(","):
    for batch in args.batch:
      r = bench(name, batch, args.dtype, args.repeats)
      print(f"| {r['config']} | {r['batch']} | {r['dtype']} | {r['steps_per_s']:.2f} | "
            f"{r['images_per_s']:.1f} | {r['tflops']:.3f} | {r['gflops_per_step']:.1f} | "
            f"{r['step_ms']:.1f} | {r['model_ms']:.1f} | {r['loss_ms']:.1f} | {r['opt_ms']:.1f} |",
            flush=True)


if __name__ == "__main__":
  main()
