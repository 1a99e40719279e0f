"""The real train step compiled ahead of time for a TPU topology on this CPU (no TPU needed).

    pip install -r requirements-tpu-aot.txt          # libtpu: the TPU compiler (benchmark-only)
    python -m benchmarks.aot_compile --config=configs/mdssd300_voc.py --topology=v5e:2x2 \
        --per_chip_batch=32 --dtype=bfloat16
    python -m benchmarks.aot_compile --table         # the docs/accelerators.md table from the results file
    python -m benchmarks.aot_compile --breakdown=2,32   # HBM bytes by part (compile both batches first)

`jax.experimental.topologies.get_topology_desc` describes the chips of a slice (`v5e:2x2`, the
256-chip `v5e:16x16`, `v5p:2x2x1`, `v4:2x2x1`, ...); `train.jit_train_step` -- the same jit, shardings
and donation as `train_and_evaluate` -- is lowered for a mesh of those devices and compiled by libtpu's
XLA:TPU compiler, deviceless, as MaxText's train_compile.py does. Nothing runs. Per chip it prints
what XLA says of the compiled program: HBM for arguments, temporaries and outputs
(`compiled.memory_analysis()`) against the chip's capacity, FLOPs and HBM bytes accessed per step
(`compiled.cost_analysis()`), a roofline time per step = max(FLOPs / peak bf16 FLOP/s, bytes / HBM
bandwidth) from Google's published figures (CHIPS), hence images/s per chip and which of the two
bounds it, the collectives of the compiled HLO by kind with their bytes, and the compile time. Each
result is appended to benchmarks/results/aot_compile.json as soon as it is compiled.

A roofline is an upper bound, not a measurement: it assumes every FLOP at peak and every byte at
full bandwidth, without overlap losses, collectives' time or the host. `cost_analysis()`'s own
`optimal_seconds` is not used (negative for these programs).

`--topology=cpu:N` compiles for N CPU devices of this machine (simulated if N > 1) and rates the
program against an H100 / H200 (`--gpu=h100|h200`): the GPU's model (config.model.kernels="native"),
but XLA:CPU's count of FLOPs and bytes of the step, not the GPU's compiled program (XLA:GPU fuses differently, and cuDNN picks its own convolution
algorithms), and its memory is XLA:CPU's buffer assignment. `benchmarks/device_check.sh` measures a
real GPU.
"""

import argparse
import collections
import datetime
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import time

# libtpu: one process at a time holds its lock file unless told otherwise (a test or another
# benchmark may hold it); no TPU metadata server to ask on this machine.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from mdssd_jax.state import experiment  # pylint: disable=g-import-not-at-top,wrong-import-position
from mdssd_jax.run import train  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "aot_compile.json")

GiB = 1024 ** 3

# Per chip: peak dense bf16 FLOP/s, HBM bandwidth (bytes/s), HBM capacity (bytes), and where from.
CHIPS = {
    "v5e": dict(name="TPU v5e", peak_flops=197e12, hbm_bytes_per_s=819e9, hbm_bytes=16 * GiB,
                source="cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s"),
    "v5p": dict(name="TPU v5p", peak_flops=459e12, hbm_bytes_per_s=2765e9, hbm_bytes=95 * GiB,
                source="cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM at 2765 GB/s"),
    "v4": dict(name="TPU v4", peak_flops=275e12, hbm_bytes_per_s=1200e9, hbm_bytes=32 * GiB,
               source="cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s"),
    "h100": dict(name="H100 SXM (XLA:CPU count)", peak_flops=989e12, hbm_bytes_per_s=3.35e12,
                 hbm_bytes=80e9, source="NVIDIA H100 SXM datasheet: 989 TFLOP/s dense bf16, 80 GB "
                 "HBM3 at 3.35 TB/s"),
    "h200": dict(name="H200 SXM (XLA:CPU count)", peak_flops=989e12, hbm_bytes_per_s=4.8e12,
                 hbm_bytes=141e9, source="NVIDIA H200 SXM datasheet: 989 TFLOP/s dense bf16, 141 GB "
                 "HBM3e at 4.8 TB/s"),
}

# get_topology_desc's names: v5p chips are "v5:..." to libtpu; v4 and v5p slices are compiled with
# one JAX device per chip (megacore: both TensorCores as one device), as they train. Host bounds as
# MaxText's accelerator_to_spec_map gives them (2x2x1 chips per host), which multi-host slices need.
TOPOLOGY_ARGS = {
    "v5e": dict(prefix="v5e", chip_config_name="default", chips_per_host_bounds=(2, 2, 1)),
    "v5p": dict(prefix="v5", chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1)),
    "v4": dict(prefix="v4", chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1)),
}

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter",
               "collective-broadcast", "ragged-all-to-all")
# One HLO instruction: "%name = TYPE op(operands), attributes". The async forms are counted once, at
# their -start (the -done carries no data of its own).
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s*\b(" + "|".join(COLLECTIVES)
                          + r")(-start)?\((.*)$", re.M)
# An array type with its optional layout: "bf16[32,300,300,64]{3,0,2,1:T(8,128)(2,1)}".
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|f8\w*|c\d+)\[([\d,]*)\](\{[^}]*\})?")
_BYTES = {"pred": 1, "bf16": 2}


def _element_bytes(dtype):
  return _BYTES.get(dtype) or max(1, int(re.sub(r"\D", "", dtype) or 8) // 8)


def _shapes(text):
  return [(dtype, tuple(int(d) for d in dims.split(",") if d))
          for dtype, dims, _ in _SHAPE.findall(text)]


def shape_bytes(shape):
  dtype, dims = shape
  size = _element_bytes(dtype)
  for d in dims:
    size *= d
  return size


def hlo_collectives(hlo_text):
  """[{kind, operands, results, bytes}] of every collective in compiled HLO text.

  operands / results: lists of (dtype, dims). For an async -start the result tuple also holds the
  operands (and u32 context scalars): only the rest count as its results. bytes: of the results
  (for an all-gather the gathered array, for an all-reduce the reduced one).
  """
  found = []
  for result_type, kind, start, rest in _INSTRUCTION.findall(hlo_text):
    # The operands: the shapes before the closing parenthesis of the call.
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        end = i
        break
    operands = _shapes(rest[:end])
    results = _shapes(result_type)
    if start:
      remaining = list(results)
      for shape in operands:
        if shape in remaining:
          remaining.remove(shape)
      results = [s for s in remaining if s != ("u32", ())] or operands
    found.append(dict(kind=kind, operands=operands, results=results,
                      bytes=sum(shape_bytes(s) for s in results)))
  return found


def collectives_by_kind(collectives):
  """{kind: {"count", "bytes", "shapes": {shape string: count}}}."""
  table = {}
  for c in collectives:
    entry = table.setdefault(c["kind"], dict(count=0, bytes=0, shapes=collections.Counter()))
    entry["count"] += 1
    entry["bytes"] += c["bytes"]
    for dtype, dims in c["results"]:
      entry["shapes"][f"{dtype}[{','.join(map(str, dims))}]"] += 1
  return {k: dict(v, shapes=dict(v["shapes"])) for k, v in sorted(table.items())}


# ---- What moves the bytes: the compiled program's buffers by memory space and by model part ------
#
# cost_analysis()'s "bytes accessed" adds up the operands and results of every instruction wherever
# they live. XLA:TPU keeps many in on-chip memory (VMEM: a layout with memory space S(1)) and
# streams others in with copy-start / slice-start, so that count is not HBM traffic. `hlo_traffic`
# re-counts from the compiled HLO text: each instruction's operands and results, padded to their
# layout's tiles (T(8,128): a 64-channel bf16 map takes 128 lanes), split into HBM (no memory space)
# and on-chip, and the HBM part per model part (from each instruction's op_name).

_INSTRUCTION_LINE = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
# Instructions that move no data of their own (aliases, bookkeeping, control flow whose bodies are
# counted as computations), and the -done halves of async pairs (counted at their -start).
_NO_TRAFFIC = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
               "conditional", "call", "after-all", "partition-id", "replica-id", "opt-barrier")


def tiled_bytes(dtype, dims, layout):
  """Bytes of one array as laid out: each tiled dimension rounded up to its tile ("T(8,128)": the
  minor dimension to 128, the next to 8)."""
  size = _element_bytes(dtype)
  dims = [int(d) for d in dims.split(",") if d]
  tile = re.search(r"T\((\d+)(?:,(\d+))?\)", layout or "")
  order = re.match(r"\{([\d,]*)", layout or "")
  if tile and dims and order and order.group(1):
    minor_to_major = [int(d) for d in order.group(1).split(",")]
    sizes = [int(t) for t in tile.groups() if t]
    for axis, t in zip(minor_to_major, reversed(sizes)):
      dims[axis] = -(-dims[axis] // t) * t
  for d in dims:
    size *= d
  return size


def _by_space(shapes_text):
  """(HBM bytes, on-chip bytes) of the arrays named in an HLO type string."""
  hbm = on_chip = 0
  for dtype, dims, layout in _SHAPE.findall(shapes_text):
    b = tiled_bytes(dtype, dims, layout)
    if re.search(r"S\((\d+)\)", layout or ""):
      on_chip += b
    else:
      hbm += b
  return hbm, on_chip


def model_part(op_name):
  """The part of the train step an op_name belongs to: "forward conv1" ... "forward conv5" (the VGG
  stages), "forward pools", "forward conv6-7", "forward extra layers", "forward fusion1" ..., "forward
  heads" (every loc / conf conv), "forward head outputs" (their reshapes and concatenation), the same
  with "backward", "matching + loss", "optimizer + update", or "state and compiler copies"."""
  if "SSD" in op_name:
    m = re.search(r"SSD\)*/(\w+)(?:/(\w+))?", op_name)
    module, inner = (m.group(1), m.group(2) or "") if m else ("", "")
    if re.search(r"_(conf|loc)$", module):
      part = "heads"
    elif module == "vgg":
      stage = re.match(r"conv(\d+)", inner)
      part = ("pools" if not stage else f"conv{stage.group(1)}" if int(stage.group(1)) <= 5
              else "conv6-7")
    elif re.match(r"conv\d+_\d+$", module):
      part = "extra layers"
    elif module.startswith("fusion"):
      part = module
    else:   # reshape, split, concatenate, convert_element_type of the heads' outputs
      part = "head outputs"
    return ("backward " if "transpose(" in op_name else "forward ") + part
  if "shard_map" in op_name:
    return "matching + loss"
  if op_name.startswith("state[") or not op_name:
    return "state and compiler copies"
  return "optimizer + update"


def hlo_traffic(hlo_text):
  """{"hbm": bytes, "on_chip": bytes, "parts": {model_part: HBM bytes}} of a compiled program.

  Every instruction of the entry computation and of the computations it calls as control flow
  (fused computations are inside their fusion), operands plus results; copy-start / slice-start
  count their source and destination once. Loop bodies count once (their state lives on chip here).
  """
  computations, current = {}, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line) if not line.startswith(" ") else None
    if m:
      current = computations.setdefault(m.group(2), [])
    elif line.startswith("}"):
      current = None
    elif current is not None:
      current.append(line)
  inside = set(re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", hlo_text))
  total = dict(hbm=0, on_chip=0)
  parts = collections.Counter()
  for name, lines in computations.items():
    if name in inside:
      continue
    parsed = [m.groups() for m in map(_INSTRUCTION_LINE.match, lines) if m]
    types = {instr: result_type for instr, result_type, _, _ in parsed}
    names = {instr: (re.search(r'op_name="([^"]*)"', rest) or [None, ""])[1]
             for instr, _, _, rest in parsed}
    for instr, result_type, op, rest in parsed:
      if op in _NO_TRAFFIC or op.endswith("-done"):
        continue
      operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
      operand_text = " ".join(types.get(o, "") for o in operands)
      if op.endswith("-start"):   # the result tuple repeats the operands: count the rest once
        result_type = result_type.replace(operand_text, "", 1) if operand_text else result_type
      hbm_in, chip_in = _by_space(operand_text)
      hbm_out, chip_out = _by_space(result_type)
      total["hbm"] += hbm_in + hbm_out
      total["on_chip"] += chip_in + chip_out
      op_name = names.get(instr) or (names.get(operands[0], "") if operands else "")
      parts[model_part(op_name)] += hbm_in + hbm_out
  return dict(total, parts=dict(parts.most_common()))


def load_config(name, dtype=None, remat=None):
  """A config by module name or path ("mdssd300_voc", "configs/mdssd300_voc.py")."""
  module = os.path.splitext(os.path.basename(name))[0]
  config = importlib.import_module(f"configs.{module}").get_config()
  if dtype:
    config.model.dtype = dtype
  if remat:
    config.model.remat = remat
  return config


def abstract_inputs(setup, global_batch):
  """(state, batch) as ShapeDtypeStructs with train_and_evaluate's shardings: nothing allocated."""
  state = setup.abstract_state()   # replicated over setup.mesh
  config = setup.config
  size, max_boxes = config.model.input_size_px, config.data.max_boxes
  split = setup.batch_sharding
  batch = dict(image=jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.uint8, sharding=split),
               boxes=jax.ShapeDtypeStruct((global_batch, max_boxes, 4), jnp.float32, sharding=split),
               labels=jax.ShapeDtypeStruct((global_batch, max_boxes), jnp.int32, sharding=split))
  return state, batch


def compile_train_step(config, devices, per_device_batch):
  """(compiled train step, compile seconds) for `devices` at `per_device_batch` images each."""
  config.train.global_batch_size = per_device_batch * len(devices)
  setup = experiment.Setup(config, devices=devices)
  state, batch = abstract_inputs(setup, config.train.global_batch_size)
  step = train.jit_train_step(setup, jax.tree_util.tree_map(lambda x: x.sharding, state))
  start = time.time()
  compiled = step.lower(state, batch).compile()
  return compiled, time.time() - start


def cost(compiled):
  """cost_analysis() as one dict (older jax returns a list of one per program)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return dict(analysis or {})


def topology_devices(topology):
  """The devices of `topology`: "v5e:2x2", "v5p:2x2x1", "v4:2x2x1", ..., or "cpu:N"."""
  family, _, shape = topology.partition(":")
  if family == "cpu":
    count = int(shape or 1)
    if count > jax.device_count():
      raise SystemExit(f"--topology={topology} needs {count} CPU devices; run with "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={count}")
    return jax.devices()[:count]
  if family not in TOPOLOGY_ARGS:
    raise SystemExit(f"unknown TPU family {family!r}; known: {', '.join(TOPOLOGY_ARGS)}, cpu")
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover
    raise SystemExit(f"this jax has no jax.experimental.topologies: {e}")
  args = TOPOLOGY_ARGS[family]
  try:
    return topologies.get_topology_desc(
        topology_name=f"{args['prefix']}:{shape}", platform="tpu",
        chip_config_name=args["chip_config_name"],
        chips_per_host_bounds=args["chips_per_host_bounds"]).devices
  except Exception as e:  # pylint: disable=broad-except
    raise SystemExit(f"no TPU topology {topology!r} ({e}); is libtpu installed? "
                     "pip install -r requirements-tpu-aot.txt")


def _roofline(compute_s, memory_s, images):
  """(seconds per step, "FLOPs" | "bytes", images/s or None): the slower of the two bounds."""
  step_s = max(compute_s, memory_s)
  return step_s, "FLOPs" if compute_s >= memory_s else "bytes", images / step_s if step_s else None


def measure(config_name, topology, per_chip_batch, dtype, remat=None, gpu="h100", hlo_out=None):
  """Compiles one (config, topology, batch) and returns its figures as a JSON-able dict.

  hlo_out: a path to write the compiled HLO text to (to read what `hlo_traffic` counts), or None.
  """
  config = load_config(config_name, dtype, remat)
  devices = topology_devices(topology)
  family = topology.partition(":")[0]
  chip = CHIPS[gpu if family == "cpu" else family]
  if family == "cpu":
    # Rated as a GPU: the GPU's program (native convolutions and pools, as kernels="auto" lowers for
    # cuda), not the CPU forms XLA:CPU would get.
    config.model.kernels = "native"
  compiled, compile_s = compile_train_step(config, devices, per_chip_batch)
  hlo_text = compiled.as_text()
  if hlo_out:
    with open(hlo_out, "w") as f:
      f.write(hlo_text)
  memory = compiled.memory_analysis()
  costs = cost(compiled)
  flops, accessed = float(costs.get("flops", 0.0)), float(costs.get("bytes accessed", 0.0))
  compute_s, memory_s = flops / chip["peak_flops"], accessed / chip["hbm_bytes_per_s"]
  step_s, bound, images_per_s = _roofline(compute_s, memory_s, per_chip_batch)
  hbm = dict(arguments=memory.argument_size_in_bytes, temporaries=memory.temp_size_in_bytes,
             outputs=memory.output_size_in_bytes, aliased=memory.alias_size_in_bytes,
             generated_code=memory.generated_code_size_in_bytes)
  # Donated state: the outputs reuse the arguments' buffers (aliased), so they are not added twice.
  hbm["total"] = (hbm["arguments"] + hbm["temporaries"] + hbm["outputs"] - hbm["aliased"]
                  + hbm["generated_code"])
  # XLA:TPU's layouts say which buffers live on chip; XLA:CPU's have no memory spaces to tell.
  traffic = hlo_traffic(hlo_text) if family != "cpu" else None
  hbm_fields = {}
  if traffic:
    hbm_step_s, hbm_bound, hbm_images_per_s = _roofline(
        compute_s, traffic["hbm"] / chip["hbm_bytes_per_s"], per_chip_batch)
    hbm_fields = dict(
        hbm_traffic_bytes=traffic["hbm"], on_chip_bytes=traffic["on_chip"],
        hbm_traffic_parts=traffic["parts"], hbm_roofline_step_s=hbm_step_s, hbm_bound=hbm_bound,
        hbm_images_per_s_per_chip=hbm_images_per_s)
  return dict(
      config=os.path.splitext(os.path.basename(config_name))[0], topology=topology,
      chips=len(devices), device_kind=devices[0].device_kind, per_chip_batch=per_chip_batch,
      global_batch=per_chip_batch * len(devices), dtype=config.model.dtype,
      remat=config.model.get("remat", "none"), chip=chip["name"], chip_source=chip["source"],
      hbm_bytes=hbm, hbm_capacity_bytes=chip["hbm_bytes"], fits=hbm["total"] <= chip["hbm_bytes"],
      flops=flops, bytes_accessed=accessed, roofline_step_s=step_s, bound=bound,
      compute_s=compute_s, memory_s=memory_s, images_per_s_per_chip=images_per_s,
      collectives=collectives_by_kind(hlo_collectives(hlo_text)),
      **hbm_fields, compile_s=compile_s, jax=jax.__version__, libtpu=_libtpu_version(), host=_cpu_model(),
      measured_at=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"))


def _libtpu_version():
  try:
    import importlib.metadata as metadata  # pylint: disable=g-import-not-at-top
    return metadata.version("libtpu")
  except Exception:  # pylint: disable=broad-except
    return None


def _cpu_model():
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = re.search(r"Model name:\s*(.+)", out)
    return f"{model.group(1).strip() if model else platform.processor()}, {os.cpu_count()} cores"
  except OSError:
    return platform.processor()


def append_result(result, path=RESULTS):
  """Adds `result` to the JSON list at `path`, replacing an earlier one of the same setting."""
  results = json.load(open(path)) if os.path.exists(path) else []
  key = lambda r: (r["config"], r["topology"], r["per_chip_batch"], r["dtype"], r["remat"], r["chip"])
  results = [r for r in results if key(r) != key(result)] + [result]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
    f.write("\n")


def report(r):
  """A few lines per result, as printed after each compile."""
  gib = lambda b: f"{b / GiB:.2f} GiB"
  h = r["hbm_bytes"]
  lines = [
      f"{r['config']} on {r['topology']} ({r['chips']} x {r['device_kind']}), {r['per_chip_batch']} "
      f"images per chip, {r['dtype']}, remat={r['remat']}: compiled in {r['compile_s']:.0f} s",
      f"  HBM per chip: arguments {gib(h['arguments'])}, temporaries {gib(h['temporaries'])}, outputs "
      f"{gib(h['outputs'])} (aliased {gib(h['aliased'])}), total {gib(h['total'])} of "
      f"{gib(r['hbm_capacity_bytes'])}: {'fits' if r['fits'] else 'DOES NOT FIT'}",
      f"  per chip per step: {r['flops'] / 1e12:.2f} TFLOP, {r['bytes_accessed'] / 1e9:.1f} GB accessed",
      f"  roofline ({r['chip_source']}): {r['compute_s'] * 1e3:.1f} ms of FLOPs, "
      f"{r['memory_s'] * 1e3:.1f} ms of bytes -> {r['roofline_step_s'] * 1e3:.1f} ms per step, "
      f"{r['images_per_s_per_chip']:.0f} images/s per chip at most, bound by {r['bound']}",
  ]
  if "hbm_traffic_bytes" in r:
    lines.append(
        f"  of which in HBM (on-chip buffers left out, layout tiles counted): "
        f"{r['hbm_traffic_bytes'] / 1e9:.1f} GB -> {r['hbm_roofline_step_s'] * 1e3:.1f} ms per step, "
        f"{r['hbm_images_per_s_per_chip']:.0f} images/s per chip at most, bound by {r['hbm_bound']}")
    lines.append("  HBM bytes by part: " + ", ".join(
        f"{part} {b / 1e9:.2f} GB" for part, b in list(r["hbm_traffic_parts"].items())[:8]))
  lines += [
      "  collectives: " + (", ".join(
          f"{v['count']} {k} ({v['bytes'] / 1e6:.2f} MB)" for k, v in r["collectives"].items())
                           or "none"),
  ]
  return "\n".join(lines)


def table(results):
  """The docs/accelerators.md table: one row per result, TPU compiles first, by config, chip kind,
  slice size, remat and batch."""
  rows = ["| config | topology | per-chip batch | dtype | remat | HBM args / temps / total GiB "
          "(of chip) | TFLOP / step | GB accessed / step (XLA's count) | roofline ms / step | bound | "
          "images/s per chip (roofline) | GB in HBM / step | images/s per chip, HBM roofline (bound) | "
          "collectives (count, MB) | compile s |",
          "|---|---|---:|---|---|---|---:|---:|---:|---|---:|---:|---|---|---:|"]
  order = lambda r: (r["topology"].startswith("cpu"), r["config"], r["topology"].split(":")[0],
                     r["chips"], r["remat"] != "none", r["remat"], r["per_chip_batch"], r["chip"])
  for r in sorted(results, key=order):
    h = r["hbm_bytes"]
    coll = "; ".join(f"{v['count']} {k} {v['bytes'] / 1e6:.1f}" for k, v in r["collectives"].items())
    rows.append(
        f"| {r['config']} | {r['topology']}"
        + (f" rated as {r['chip'].split(' (')[0]}" if r["topology"].startswith("cpu") else "")
        + f" | {r['per_chip_batch']} | {r['dtype']} | {r['remat']} | "
        f"{h['arguments'] / GiB:.2f} / {h['temporaries'] / GiB:.2f} / {h['total'] / GiB:.2f} "
        f"({r['hbm_capacity_bytes'] / GiB:.0f}){'' if r['fits'] else ' **no fit**'} | "
        f"{r['flops'] / 1e12:.2f} | {r['bytes_accessed'] / 1e9:.1f} | "
        f"{r['roofline_step_s'] * 1e3:.1f} | {r['bound']} | {r['images_per_s_per_chip']:.0f} | "
        + (f"{r['hbm_traffic_bytes'] / 1e9:.1f} | {r['hbm_images_per_s_per_chip']:.0f} "
           f"({r['hbm_bound']}) | " if "hbm_traffic_bytes" in r else "- | - | ")
        + f"{coll or 'none'} | {r['compile_s']:.0f} |")
  return "\n".join(rows)


def breakdown(small, large, min_share=0.01):
  """Markdown table of HBM bytes by part for two compiles of one setting at two per-chip batches:
  each part's bytes per step at both, and its split into per-image and per-step (fixed) bytes.
  Parts under `min_share` of the larger compile's bytes are summed in one row."""
  b0, b1 = small["per_chip_batch"], large["per_chip_batch"]
  p0, p1 = small["hbm_traffic_parts"], large["hbm_traffic_parts"]
  rows = [f"| part | GB at {b0} / chip | GB at {b1} / chip | MB per image | GB per step (fixed) |"
          f" share at {b1} |", "|---|---:|---:|---:|---:|---:|"]
  total = large["hbm_traffic_bytes"]
  shown = [(part, p0.get(part, 0), b) for part, b in sorted(p1.items(), key=lambda kv: -kv[1])
           if b >= min_share * total]
  rest = (sum(p0.values()) - sum(b for _, b, _ in shown), total - sum(b for _, _, b in shown))
  if rest[1] > 0:
    shown.append((f"the other parts (each < {100 * min_share:g} %)",) + rest)
  for part, bytes0, bytes1 in shown:
    per_image = (bytes1 - bytes0) / (b1 - b0)
    rows.append(f"| {part} | {bytes0 / 1e9:.2f} | {bytes1 / 1e9:.2f} | {per_image / 1e6:.1f} | "
                f"{(bytes1 - per_image * b1) / 1e9:.2f} | {100 * bytes1 / total:.1f} % |")
  per_image = (large["hbm_traffic_bytes"] - small["hbm_traffic_bytes"]) / (b1 - b0)
  rows.append(f"| **all** | {small['hbm_traffic_bytes'] / 1e9:.2f} | {total / 1e9:.2f} | "
              f"{per_image / 1e6:.1f} | {(total - per_image * b1) / 1e9:.2f} | 100 % |")
  return "\n".join(rows)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/mdssd300_voc.py")
  parser.add_argument("--topology", default="v5e:2x2",
                      help="v5e:2x2 | v5e:16x16 | v5p:2x2x1 | v4:2x2x1 | ... | cpu:N")
  parser.add_argument("--per_chip_batch", type=int, default=32)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--remat", default=None, help="config.model.remat (default: the config's)")
  parser.add_argument("--gpu", default="h100", choices=("h100", "h200"),
                      help="the card whose figures rate a --topology=cpu:N compile")
  parser.add_argument("--results", default=RESULTS)
  parser.add_argument("--no_save", action="store_true", help="print only")
  parser.add_argument("--hlo_out", default=None, help="also write the compiled HLO text here")
  parser.add_argument("--table", action="store_true", help="print the docs/accelerators.md table of --results")
  parser.add_argument("--breakdown", default=None, metavar="B1,B2",
                      help="print HBM bytes by part from the results of --config/--topology/--dtype/"
                      "--remat at two per-chip batches, e.g. 2,32 (compile both first)")
  args = parser.parse_args(argv)
  if args.breakdown:
    config = os.path.splitext(os.path.basename(args.config))[0]
    results = {r["per_chip_batch"]: r for r in json.load(open(args.results))
               if r["config"] == config and r["topology"] == args.topology
               and r["dtype"] == args.dtype and r["remat"] == (args.remat or "none")
               and "hbm_traffic_parts" in r}
    batches = [int(b) for b in args.breakdown.split(",")]
    missing = [b for b in batches if b not in results]
    if missing:
      raise SystemExit(f"--breakdown: no result with HBM parts for {config} on {args.topology} at "
                       f"per-chip batch {missing} in {args.results}; compile it first")
    print(breakdown(results[batches[0]], results[batches[1]]))
    return
  if args.table:
    print(table(json.load(open(args.results))))
    return
  result = measure(args.config, args.topology, args.per_chip_batch, args.dtype, args.remat, args.gpu,
                   args.hlo_out)
  print(report(result))
  if not args.no_save:
    append_result(result, args.results)
    print(f"  saved to {args.results}")


if __name__ == "__main__":
  sys.exit(main())
