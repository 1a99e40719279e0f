"""Train-step throughput on the present device, and the CPU step beside torchvision's SSD300.

Device table (one row per config and batch): images/s, achieved TFLOP/s (XLA's cost analysis of the
compiled step), MFU against the card's bf16 dense peak, the step split between the model
(forward + backward), matching + MultiBox loss and the optimiser (each jitted and timed alone),
compile time, and the input pipeline's images/s per worker on this host (decode + Caffe SSD
augmentation of generated JPEGs, benchmarks/bench_input.py), so the table says whether input keeps up.

    python -m benchmarks.bench_train --configs=ssd300_voc,mdssd300_voc,mdssd512_voc \
        --dtype=bfloat16 --batch=32 --max_batch=1024 --input          # a GPU (benchmarks/device_check.sh)
    python -m benchmarks.bench_train --quick                          # the same table at toy size (CPU)

CPU comparison with torchvision (torch is a benchmark-only dependency, not a requirement):

    python -m benchmarks.bench_train --torch_cpu --batch=4 --torch_python=VENV/bin/python

prints the whole step (ours per variant / torchvision's) and then, per convolution shape of the
model, forward and forward + backward of XLA's convolution, our CPU form and torch's Conv2d
(benchmarks/conv_layers.py). The torch side (benchmarks/torch_cpu.py) needs only torch and
torchvision.

Random images and boxes stand in for data and nothing is downloaded. Each variant of the CPU
comparison runs in a fresh process (XLA reads its flags once) next to a torchvision measurement in
the same run, so the ratio is measured under the same machine load.
"""

import argparse
import importlib
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # pylint: disable=g-import-not-at-top

from benchmarks import conv_layers  # pylint: disable=g-import-not-at-top
from benchmarks import torch_cpu  # pylint: disable=g-import-not-at-top  (numpy only; torch lazily)

# bf16 dense (no sparsity) peak TFLOP/s per device, from the vendors' data sheets; matched in order
# against jax's device_kind (or nvidia-smi's name). SXM figures for H100/H200; PCIe H100 is lower.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0),
    ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v4", 275.0),
)

# XLA:CPU settings tried by --torch_cpu: name -> (extra XLA_FLAGS, config overrides, description).
CPU_VARIANTS = {
    "default": ("", {}, "as shipped"),
    "eigen_off": ("--xla_cpu_multi_thread_eigen=false", {}, "single-threaded Eigen kernels"),
    "fast_math": ("--xla_cpu_enable_fast_math=true", {}, "fast math"),
    "xnn_greedy": ("--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY", {},
                   "XNNPACK graph fusion"),
    "opt_level1": ("--xla_backend_optimization_level=1", {}, "backend optimisation level 1"),
    "bf16": ("", {"model.dtype": "bfloat16"}, "bfloat16 compute"),
    "kernels_native": ("", {"model.kernels": "native"}, "GPU/TPU kernels (reduce_window pool)"),
    "winograd_off": ("", {"_winograd_off": True},
                     "no Winograd: XLA's forward, matmul weight gradients (the previous release)"),
    "conv_grads_xla": ("", {"_winograd_off": True, "_xla_conv_grads": True},
                       "XLA's own conv gradients (the CPU form off)"),
    "prenormalised": ("", {"_prenormalised": True},
                      "float input normalised outside the step (the normalisation's cost)"),
}


def peak_tflops(device_kind):
  for name, tflops in PEAK_BF16_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops
  return None


def load_config(name, overrides=None):
  config = importlib.import_module(f"configs.{name}").get_config()
  for key, value in (overrides or {}).items():
    if key.startswith("_"):
      continue
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise SystemExit(f"config {name} has no {key}: this version of the library lacks that setting")
    node[leaf] = value
  return config


def quick_config(config):
  """--quick: the same architecture at toy width, so the whole table runs on a CPU in minutes."""
  config.model.width_multiplier = 1 / 32
  return config


def random_batch(config, batch, rng):
  return torch_cpu.random_arrays(batch, config.model.input_size_px, config.data.max_boxes,
                                 config.model.num_classes, rng)


median_seconds = torch_cpu.median_seconds


class Pieces:
  """Model, default boxes, optimiser, convention and a fresh state of a config (no data set)."""

  def __init__(self, config):
    import jax  # pylint: disable=g-import-not-at-top
    from mdssd_jax.state import experiment, optim  # pylint: disable=g-import-not-at-top
    from mdssd_jax import models
    from mdssd_jax.core import pixels
    self.config = config
    self.model, self.anchors = models.build_detector(config)
    self.tx, self.schedule = optim.make_optimizer(config.train)
    self.convention = pixels.as_convention(config.model.pixel)
    self.state = jax.jit(lambda r, s: experiment.create_state(
        experiment.init_variables(self.model, config, r), self.tx, s))(
            jax.random.key(0, impl="rbg"), jax.random.PRNGKey(0))

  def train_step(self, prenormalised=False):
    """The library's train step; prenormalised: it takes float images already normalised."""
    _clu_without_tensorflow()
    from mdssd_jax.run import train  # pylint: disable=g-import-not-at-top
    # Prenormalised: the step's normalisation becomes the identity (range 255, mean 0, std 1), so
    # it passes the floats it is given; XLA folds the multiply by 1.
    identity = dict(channel_order="RGB", input_range=255.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return train.make_train_step(self.model, self.tx, self.schedule, self.anchors, self.config,
                                 identity if prenormalised else self.convention)


def _clu_without_tensorflow():
  """Lets mdssd_jax.run.train import where TensorFlow is absent, as on a lent GPU machine with no network
  (benchmarks/device_check.sh; TF is too big to carry there): clu.metric_writers imports its TF
  summary writer when it is imported, and a bench step never writes summaries, so a placeholder
  module stands in for that one module. Does nothing where TensorFlow is installed."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  name = "clu.metric_writers.summary_writer"
  if name in sys.modules or importlib.util.find_spec("tensorflow") is not None:
    return

  def summary_writer(*args, **kwargs):
    raise ImportError("clu's SummaryWriter needs TensorFlow, which is not installed")
  placeholder = types.ModuleType(name)
  placeholder.SummaryWriter = summary_writer
  sys.modules[name] = placeholder


def is_out_of_memory(error):
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def measure_step(pieces, batch, repeats, donate=True):
  """(step seconds, compile seconds, GFLOP per step, memory bytes or None) at one batch size."""
  import jax  # pylint: disable=g-import-not-at-top
  config = pieces.config
  host = random_batch(config, batch, np.random.default_rng(0))
  dev = {k: jax.device_put(v) for k, v in host.items()}
  state = jax.tree_util.tree_map(lambda x: x.copy(), pieces.state)
  jitted = jax.jit(pieces.train_step(), donate_argnums=0 if donate else ())
  start = time.perf_counter()
  lowered = jitted.lower(state, dev)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  # XLA's count of the step BEFORE compilation: on a GPU the compiled program hands its
  # convolutions to cuDNN as custom calls, which the compiled cost analysis leaves out (it counted
  # 0.4-1.4 GFLOP of SSD300's 180 per image on an H200, benchmarks/results/device_check_h200.md).
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  memory = None
  try:
    analysis = compiled.memory_analysis()
    memory = int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
                 + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    pass
  box = [state]

  def run():
    box[0], metrics = compiled(box[0], dev)
    jax.block_until_ready(metrics["loss"])

  step_s = median_seconds(run, repeats)
  return step_s, compile_s, flops / 1e9, memory


def measure_split(pieces, batch, repeats):
  """(model fwd+bwd ms, match+loss fwd+bwd ms, optimiser ms), each jitted and timed alone."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from mdssd_jax.state import experiment  # pylint: disable=g-import-not-at-top
  from mdssd_jax.core import losses, matching, pixels
  config, state = pieces.config, pieces.state
  host = random_batch(config, batch, np.random.default_rng(1))
  images = jax.device_put(pixels.normalize(host["image"], pieces.convention, np.float32).astype(
      jnp.dtype(config.model.dtype)))
  variables = experiment.model_variables(state)
  mutable = ["batch_stats"] if state["batch_stats"] else []

  def model_loss(params, images):
    (loc, logits), _ = pieces.model.apply(dict(variables, params=params), images, train=True,
                                          mutable=mutable)
    return jnp.mean(loc) + jnp.mean(logits)
  model_grad = jax.jit(jax.grad(model_loss))
  t_model = median_seconds(lambda: jax.block_until_ready(model_grad(state["params"], images)),
                           repeats)

  anchors = jnp.asarray(pieces.anchors)
  num_logits = config.model.num_classes + 1
  preds = jax.random.normal(jax.random.PRNGKey(0), (batch, len(pieces.anchors), 4 + num_logits))
  boxes, labels = jax.device_put(host["boxes"]), jax.device_put(host["labels"])

  def match_and_loss(preds, boxes, labels):
    loc_t, cls_t = matching.match(boxes, labels, anchors, iou_threshold=config.loss.iou_threshold,
                                  variances=tuple(config.anchors.variances),
                                  **_matching_rule(config))
    return losses.multibox_loss(preds[..., :4], preds[..., 4:], loc_t, cls_t,
                                neg_pos_ratio=config.loss.neg_pos_ratio,
                                loc_weight=config.loss.loc_weight)[0]
  loss_grad = jax.jit(jax.grad(match_and_loss))
  t_loss = median_seconds(lambda: jax.block_until_ready(loss_grad(preds, boxes, labels)), repeats)

  grads = jax.tree_util.tree_map(jnp.ones_like, state["params"])
  update = jax.jit(lambda g, o, p: optax.apply_updates(p, pieces.tx.update(g, o, p)[0]))
  t_opt = median_seconds(
      lambda: jax.block_until_ready(update(grads, state["opt_state"], state["params"])), repeats)
  return 1e3 * t_model, 1e3 * t_loss, 1e3 * t_opt


def _matching_rule(config):
  """The matching rule keyword of matching.match, when this version of the library has one."""
  import inspect  # pylint: disable=g-import-not-at-top
  from mdssd_jax.core import matching  # pylint: disable=g-import-not-at-top
  if "rule" in inspect.signature(matching.match).parameters and "matching" in config.loss:
    return dict(rule=config.loss.matching)
  return {}


def largest_batch(pieces, start_batch, max_batch, repeats, deadline):
  """The largest batch of the doubling sequence start*2, start*4, ... <= max_batch that compiles
  and runs, as (batch, step seconds, compile seconds, GFLOP/step, bytes) or None.

  Tried from the top down, halving after each failure, since the first fit ends the search: on a
  large card the cap fits at once, where climbing would compile every size on the way (each try
  compiles a new program). No try starts after the deadline (time.monotonic()). The step already
  ran at start_batch, so a failure at a larger batch is taken for "does not fit" (out of memory,
  or a kernel or autotuner allocation failing at that size) and printed.
  """
  sizes = []
  batch = start_batch * 2
  while batch <= max_batch:
    sizes.append(batch)
    batch *= 2
  for batch in reversed(sizes):
    if time.monotonic() >= deadline:
      break
    try:
      return (batch,) + measure_step(pieces, batch, repeats)
    except Exception as error:  # pylint: disable=broad-except
      kind = "out of memory" if is_out_of_memory(error) else "failed"
      print(f"batch {batch}: {kind}: {str(error).strip().splitlines()[0][:200]}", flush=True)
  return None


def input_rates(sizes, num_images, repeats):
  """{size: images/s of ONE worker} for decode + train augmentation at each output size."""
  import cv2  # pylint: disable=g-import-not-at-top
  from benchmarks import bench_input  # pylint: disable=g-import-not-at-top
  from configs.common import base_config  # pylint: disable=g-import-not-at-top
  from mdssd_jax.data import augment  # pylint: disable=g-import-not-at-top
  config = base_config()
  cfg = config.augment.to_dict()
  cfg.setdefault("resize_interpolations", augment.DEFAULT_INTERPOLATIONS)
  jpegs, boxes, labels = bench_input.natural_looking_jpegs(num_images, np.random.default_rng(0))
  threads = cv2.getNumThreads()
  cv2.setNumThreads(1)   # one worker = one core
  try:
    return {size: bench_input.throughput(jpegs, boxes, labels, cfg, size, config.data.max_boxes, 0,
                                         repeats)[0]
            for size in sizes}
  finally:
    cv2.setNumThreads(threads)


def device_table(args):
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", device.platform)
  peak = args.peak_tflops or peak_tflops(kind)
  names = args.configs.split(",")
  deadline = time.monotonic() + args.time_budget_s
  peak_text = f"{peak:.0f} TFLOP/s" if peak else "unknown (no MFU; --peak_tflops sets it)"
  quick_text = "; --quick (toy width 1/32)" if args.quick else ""
  lines = [f"device: {device.platform}, {kind} x{jax.device_count()}; jax {jax.__version__}; "
           f"dtype {args.dtype}; bf16 dense peak {peak_text}; host {os.cpu_count()} CPUs; "
           f"median of {args.repeats} steps{quick_text}", ""]
  rows = []
  configs = {}
  for name in names:
    overrides = {"model.dtype": args.dtype}
    config = load_config(name, overrides)
    configs[name] = quick_config(config) if args.quick else config
  rates = {}
  if args.input:
    sizes = sorted({c.model.input_size_px for c in configs.values()})
    rates = input_rates(sizes, args.input_images, 1 if args.quick else 2)
  header = ("| config | batch | images/s | TFLOP/s | MFU | GFLOP/image | step ms | model fwd+bwd ms | "
            "match+loss ms | optimiser ms | compile s | input images/s per worker |")
  lines += [header, "|" + "---|" * (header.count("|") - 1)]
  print("\n".join(lines), flush=True)

  def row(name, batch, step_s, compile_s, gflops, split, note=""):
    tflops = gflops / step_s / 1e3
    mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
    size = configs[name].model.input_size_px
    rate = f"{rates[size]:.0f} ({size} px)" if size in rates else "not measured"
    model_ms, loss_ms, opt_ms = (f"{v:.1f}" for v in split) if split else ("-",) * 3
    text = (f"| {name} | {batch}{note} | {batch / step_s:.1f} | {tflops:.2f} | {mfu} | "
            f"{gflops / batch:.1f} | {1e3 * step_s:.1f} | {model_ms} | {loss_ms} | {opt_ms} | "
            f"{compile_s:.1f} | {rate} |")
    rows.append(text)
    print(text, flush=True)

  for i, name in enumerate(names):
    started = time.monotonic()
    pieces = Pieces(configs[name])
    for batch in args.batch:
      step_s, compile_s, gflops, _ = measure_step(pieces, batch, args.repeats)
      split = measure_split(pieces, batch, args.repeats) if args.split else None
      row(name, batch, step_s, compile_s, gflops, split)
    if args.max_batch > max(args.batch):
      # This config's search gets an equal share of the budget left once the configs still to
      # come have had their batch rows (taken to last as long as this one's), so the first
      # config's search cannot leave the others without a largest-batch row.
      now, todo = time.monotonic(), len(names) - i
      share = (deadline - now - (now - started) * (todo - 1)) / todo
      found = largest_batch(pieces, max(args.batch), args.max_batch, args.repeats, now + share)
      if found:
        batch, step_s, compile_s, gflops, _ = found
        row(name, batch, step_s, compile_s, gflops, None,
            note=f" (largest{' tried' if batch * 2 > args.max_batch else ''})")
    del pieces
  table = "\n".join(lines + rows) + "\n"
  if rates:
    table += ("\nInput: one worker decodes and augments the images/s shown; a host with W free cores "
              f"runs about W workers ({os.cpu_count()} CPUs here).\n")
  return table


# ---------------------------------------------------------------------------------------------------
# The CPU step beside torchvision's ssd300_vgg16.
# ---------------------------------------------------------------------------------------------------

def jax_cpu_worker(args):
  """Runs in a fresh process: our SSD300 step for one variant; prints one JSON line."""
  import jax  # pylint: disable=g-import-not-at-top
  flags, overrides, _ = CPU_VARIANTS[args.variant]
  from mdssd_jax.models import kernels  # pylint: disable=g-import-not-at-top
  if overrides.get("_winograd_off"):
    kernels.WINOGRAD_MIN_CHANNELS = float("inf")       # no conv runs as Winograd
  if overrides.get("_xla_conv_grads"):
    kernels.MATMUL_WGRAD_MIN_TAP_MACS = float("inf")   # every other conv keeps XLA's gradients
  config = load_config(args.cpu_config, overrides)
  config.train.global_batch_size = args.batch[0]
  pieces = Pieces(config)
  host = random_batch(config, args.batch[0], np.random.default_rng(0))
  prenormalised = bool(overrides.get("_prenormalised"))
  if prenormalised:
    from mdssd_jax.core import pixels  # pylint: disable=g-import-not-at-top
    host["image"] = pixels.normalize(host["image"], pieces.convention, np.float32)
  dev = {k: jax.device_put(v) for k, v in host.items()}
  start = time.perf_counter()
  compiled = jax.jit(pieces.train_step(prenormalised), donate_argnums=0).lower(pieces.state, dev).compile()
  compile_s = time.perf_counter() - start
  box = [pieces.state]

  def run():
    box[0], metrics = compiled(box[0], dev)
    jax.block_until_ready(metrics["loss"])
  step_s = median_seconds(run, args.repeats)
  print(json.dumps(dict(variant=args.variant, flags=flags, step_s=step_s, compile_s=compile_s)))


def _run_worker(kind, variant, args, python):
  flags = CPU_VARIANTS.get(variant, ("",))[0]
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
  if kind == "torch":   # torch + torchvision only: nothing of this project, no JAX
    cmd = [python, os.path.join(ROOT, "benchmarks", "torch_cpu.py"), "step", f"--batch={args.batch[0]}",
           f"--repeats={args.repeats}", f"--threads={args.threads}"]
  else:
    cmd = [python, "-m", "benchmarks.bench_train", f"--_worker={kind}", f"--variant={variant}",
           f"--batch={args.batch[0]}", f"--repeats={args.repeats}", f"--cpu_config={args.cpu_config}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=ROOT)
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  return dict(variant=variant, error=(proc.stderr.strip().splitlines() or ["no output"])[-1][:160])


def torch_cpu_table(args):
  python = args.torch_python or sys.executable
  torch_runs = [_run_worker("torch", "torchvision", args, python)]
  if "error" in torch_runs[0]:
    raise SystemExit(f"torchvision could not run with {python}: {torch_runs[0]['error']}. Install "
                     "torch and torchvision there (benchmark-only dependencies; docs/benchmarks.md, 'The CPU "
                     "step beside torchvision'), or name a Python that has them with --torch_python")
  results = [_run_worker("jax", v, args, sys.executable) for v in args.variants.split(",")]
  torch_runs.append(_run_worker("torch", "torchvision", args, python))   # drift of a shared machine
  torch_s = float(np.mean([r["step_s"] for r in torch_runs]))
  lines = [f"{args.cpu_config} train step, batch {args.batch[0]}, 300 px, "
           f"{conv_layers.cpu_description()}, {os.cpu_count()} CPUs "
           f"(load average {os.getloadavg()[0]:.1f}), median of {args.repeats} steps; "
           f"{torch_runs[0]['version']}, {torch_runs[0]['threads']} threads; torchvision "
           f"ssd300_vgg16 {1e3 * torch_runs[0]['step_s']:.0f} ms before and "
           f"{1e3 * torch_runs[1]['step_s']:.0f} ms after the JAX runs (their mean is the "
           "reference)", "",
           "| variant | what | JAX step ms | compile s | JAX / torchvision time |",
           "|---|---|---:|---:|---:|"]
  for r in results:
    what = CPU_VARIANTS[r["variant"]][2]
    if "error" in r:
      lines.append(f"| {r['variant']} | {what} | failed: {r['error']} | | |")
    else:
      lines.append(f"| {r['variant']} | {what} | {1e3 * r['step_s']:.0f} | {r['compile_s']:.0f} | "
                   f"{r['step_s'] / torch_s:.2f}x |")
  table = "\n".join(lines) + "\n"
  print(table, flush=True)
  if args.layer_table:
    layers = conv_layers.table(args.cpu_config, args.batch[0], args.repeats, args.threads, python)
    print(layers, flush=True)
    table += "\n" + layers
  return table


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", default="ssd300_voc,mdssd300_voc,mdssd512_voc")
  parser.add_argument("--batch", type=int, nargs="+", default=None,
                      help="batch sizes (default 32; 2 with --quick; 4 with --torch_cpu)")
  parser.add_argument("--max_batch", type=int, default=0,
                      help="also find the largest batch by doubling up to this (0: off)")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--split", type=int, default=1, help="1: time model / match+loss / optimiser")
  parser.add_argument("--input", action="store_true", help="measure the input pipeline per worker")
  parser.add_argument("--input_images", type=int, default=48)
  parser.add_argument("--peak_tflops", type=float, default=0.0, help="override the device's peak")
  parser.add_argument("--time_budget_s", type=float, default=240.0,
                      help="no new largest-batch try starts after this many seconds (each config "
                      "gets a share)")
  parser.add_argument("--quick", action="store_true",
                      help="toy width (1/32), batch 2, 2 repeats: proves the table end to end on a CPU")
  parser.add_argument("--out", default="", help="also write the table here ($OUT/... by default)")
  parser.add_argument("--torch_cpu", action="store_true",
                      help="our CPU step per XLA:CPU variant beside torchvision's ssd300_vgg16")
  parser.add_argument("--variants", default="default,winograd_off,conv_grads_xla",
                      help=f"comma-separated, of {sorted(CPU_VARIANTS)}")
  parser.add_argument("--layer_table", type=int, default=1,
                      help="1: also the per-layer table (benchmarks/conv_layers.py)")
  parser.add_argument("--cpu_config", default="ssd300_voc")
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all CPUs)")
  parser.add_argument("--torch_python", default="", help="a Python with torch + torchvision")
  parser.add_argument("--_worker", default="", help=argparse.SUPPRESS)
  parser.add_argument("--variant", default="default", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.batch is None:
    args.batch = [4] if (args.torch_cpu or args._worker) else [2] if args.quick else [32]
  if args.quick:
    args.repeats = min(args.repeats, 2)
    args.input_images = min(args.input_images, 8)
    args.max_batch = min(args.max_batch, 2 * max(args.batch)) if args.max_batch else 0

  if args._worker == "jax":
    return jax_cpu_worker(args)
  table = torch_cpu_table(args) if args.torch_cpu else device_table(args)
  out = args.out or (os.path.join(os.environ["OUT"], "bench_train.md") if os.environ.get("OUT") else "")
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(table)
    print(f"table written to {out}")


if __name__ == "__main__":
  main()
