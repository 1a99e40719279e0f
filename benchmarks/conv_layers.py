"""Per-layer CPU convolution table: XLA's convolution, our CPU form and torch, side by side.

For each distinct convolution shape of a config's model (traced with `kernels.conv_layers`, so
the list is the model's own), at the benchmark's batch and float32 on the CPU: the forward and the
forward + backward (value and both gradients of sum(y^2)) of

  - "XLA": `lax.conv_general_dilated` and the gradients XLA derives for it;
  - "CPU form": `kernels.conv_cpu`, what `config.model.kernels="auto"` runs on a CPU (Winograd
    F(2x2, 3x3) for the wide 3x3 stride-1 convs; otherwise XLA's forward with matmul weight
    gradients);
  - "torch": `torch.nn.Conv2d` (NCHW), measured by benchmarks/torch_cpu.py under the torch Python.

`bench_train --torch_cpu` prints this table after the whole-step one. Alone:

    python -m benchmarks.conv_layers --config=ssd300_voc --batch=4 --torch_python=VENV/bin/python
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Layers shown: the largest by forward FLOPs (x how many convs share the shape) until they hold
# this share of the model's convolution FLOPs; --all_layers shows every shape.
FLOP_SHARE_SHOWN = 0.95


def cpu_description() -> str:
  """'MODEL NAME (AVX2, AVX-512, AMX)': the CPU and the vector extensions that decide XLA:CPU's and
  oneDNN's speed, from /proc/cpuinfo (Linux); 'unknown CPU' elsewhere."""
  model, flags = "unknown CPU", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown CPU":
          model = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  ext = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"),
                                 ("AVX-512 bf16", "avx512_bf16"), ("AMX", "amx_tile"))
         if flag in flags]
  return f"{model} ({', '.join(ext) or 'no AVX2'})"


def layer_key(layer):
  """[H, W, Cin, Cout, kernel, stride, padding, dilation] of a square conv (torch_cpu's format)."""
  _, h, w, cin = layer["input_shape"]
  k, _, _, cout = layer["kernel_shape"]
  return [h, w, cin, cout, k, layer["strides"][0], layer["padding"][0][0], layer["dilation"][0]]


def forward_gflops(layer, batch):
  h, w, cin, cout, k, stride, pad, dil = layer_key(layer)
  out_h = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1
  out_w = (w + 2 * pad - dil * (k - 1) - 1) // stride + 1
  return 2e-9 * batch * out_h * out_w * cout * cin * k * k


def model_layers(config_name, batch, all_layers=False):
  """The config's distinct convs (see module docstring), largest first."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import bench_train  # pylint: disable=g-import-not-at-top
  from mdssd_jax import models  # pylint: disable=g-import-not-at-top
  from mdssd_jax.models import kernels  # pylint: disable=g-import-not-at-top
  config = bench_train.load_config(config_name, {"model.kernels": "cpu", "model.dtype": "float32"})
  model = models.build_model(config)
  size = config.model.input_size_px
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  found = kernels.conv_layers(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, images)
  # Squares only: the table's format (and every conv of the models) has one size per axis.
  found = [l for l in found if l["input_shape"][1] == l["input_shape"][2]
           and l["kernel_shape"][0] == l["kernel_shape"][1]]
  found.sort(key=lambda l: -l["count"] * forward_gflops(l, batch))
  if all_layers:
    return found
  total, shown, kept = sum(l["count"] * forward_gflops(l, batch) for l in found), 0.0, []
  for layer in found:
    if shown >= FLOP_SHARE_SHOWN * total:
      break
    kept.append(layer)
    shown += layer["count"] * forward_gflops(layer, batch)
  return kept


def jax_times(layers, batch, repeats):
  """{key: dict(xla_fwd_s, xla_fwd_bwd_s, cpu_fwd_bwd_s)} for each layer, this process's XLA."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from benchmarks.torch_cpu import median_seconds  # pylint: disable=g-import-not-at-top
  from mdssd_jax.models import kernels  # pylint: disable=g-import-not-at-top
  times = {}
  for layer in layers:
    h, w, cin, cout, k, stride, pad, dil = layer_key(layer)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, h, w, cin), np.float32))
    kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout), np.float32) / np.sqrt(k * k * cin))
    args = ((stride, stride), ((pad, pad), (pad, pad)), (dil, dil))
    forward = jax.jit(lambda x, kernel: kernels._xla_conv(x, kernel, *args))  # pylint: disable=protected-access
    row = dict(xla_fwd_s=median_seconds(lambda: jax.block_until_ready(forward(x, kernel)), repeats))
    for name, conv in (("xla", kernels._xla_conv), ("cpu", kernels.conv_cpu)):  # pylint: disable=protected-access
      both = jax.jit(jax.value_and_grad(lambda x, kernel, conv=conv: jnp.sum(jnp.square(
          conv(x, kernel, *args))), argnums=(0, 1)))
      row[f"{name}_fwd_bwd_s"] = median_seconds(lambda: jax.block_until_ready(both(x, kernel)),
                                                repeats)
    times[json.dumps(layer_key(layer))] = row
  return times


def _subprocess_json(cmd):
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
  rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode != 0 and not rows:
    rows = [dict(error=(proc.stderr.strip().splitlines() or ["no output"])[-1][:160])]
  return rows


def torch_times(layers, batch, repeats, threads, python):
  """{key: dict(fwd_s, fwd_bwd_s)} from benchmarks/torch_cpu.py under `python`, or {"error": ...}."""
  rows = _subprocess_json([python, os.path.join(ROOT, "benchmarks", "torch_cpu.py"), "layers",
                           f"--batch={batch}", f"--repeats={repeats}", f"--threads={threads}",
                           "--layers=" + json.dumps([layer_key(l) for l in layers])])
  if rows and "error" in rows[0]:
    return rows[0]
  return {json.dumps(r["layer"]): r for r in rows}


def table(config_name, batch, repeats, threads, torch_python, all_layers=False):
  """The per-layer table (markdown) for `config_name` at `batch`; torch columns when it runs."""
  layers = model_layers(config_name, batch, all_layers)
  mine = _subprocess_json([sys.executable, "-m", "benchmarks.conv_layers", "--_worker",
                           f"--config={config_name}", f"--batch={batch}",
                           f"--repeats={repeats}"] + (["--all_layers"] if all_layers else []))
  if mine and "error" in mine[0]:
    raise SystemExit(f"the JAX layer timings failed: {mine[0]['error']}")
  mine = mine[0]
  theirs = torch_times(layers, batch, repeats, threads, torch_python) if torch_python else {}
  ms = lambda s: f"{1e3 * s:.0f}"
  lines = [f"Per layer shape, {config_name} at batch {batch}, float32, {cpu_description()}, "
           f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), median of {repeats}; "
           "ms; fwd+bwd = value and both gradients of sum(y^2); layers holding "
           f"{'all' if all_layers else f'{FLOP_SHARE_SHOWN:.0%}'} of the convolution FLOPs",
           "" if "error" not in theirs else f"(torch failed: {theirs['error']})", "",
           "| layer (H=W, Cin -> Cout, kernel/stride/dilation) | convs | GFLOP fwd | XLA fwd | "
           "XLA fwd+bwd | CPU form fwd+bwd | torch fwd | torch fwd+bwd | CPU form / XLA | "
           "CPU form / torch |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  sums = dict(xla=0.0, cpu=0.0, torch=0.0)
  for layer in layers:
    key = json.dumps(layer_key(layer))
    h, _, cin, cout, k, stride, _, dil = layer_key(layer)
    row, t = mine[key], theirs.get(key, {})
    n = layer["count"]
    sums["xla"] += n * row["xla_fwd_bwd_s"]
    sums["cpu"] += n * row["cpu_fwd_bwd_s"]
    sums["torch"] += n * t.get("fwd_bwd_s", float("nan"))
    vs_torch = f"{row['cpu_fwd_bwd_s'] / t['fwd_bwd_s']:.2f}x" if t else "-"
    lines.append(
        f"| {h}, {cin} -> {cout}, {k}/{stride}/{dil} | {n} | {forward_gflops(layer, batch):.1f} | "
        f"{ms(row['xla_fwd_s'])} | {ms(row['xla_fwd_bwd_s'])} | {ms(row['cpu_fwd_bwd_s'])} | "
        f"{ms(t['fwd_s']) if t else '-'} | {ms(t['fwd_bwd_s']) if t else '-'} | "
        f"{row['cpu_fwd_bwd_s'] / row['xla_fwd_bwd_s']:.2f}x | {vs_torch} |")
  has_torch = bool(theirs) and "error" not in theirs
  vs_torch = f"{sums['cpu'] / sums['torch']:.2f}x" if has_torch else "-"
  lines.append(f"| all shown, x convs | | | | {ms(sums['xla'])} | {ms(sums['cpu'])} | | "
               f"{ms(sums['torch']) if has_torch else '-'} | {sums['cpu'] / sums['xla']:.2f}x | "
               f"{vs_torch} |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="ssd300_voc")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all CPUs)")
  parser.add_argument("--torch_python", default="", help="a Python with torch (no torch columns if empty)")
  parser.add_argument("--all_layers", action="store_true", help="every distinct shape")
  parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._worker:
    layers = model_layers(args.config, args.batch, args.all_layers)
    print(json.dumps(jax_times(layers, args.batch, args.repeats)))
    return
  print(table(args.config, args.batch, args.repeats, args.threads, args.torch_python,
              args.all_layers))


if __name__ == "__main__":
  main()
