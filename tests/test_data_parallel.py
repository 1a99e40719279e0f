"""The data-parallel train step: per-device matching and loss, compiled for several devices.

Matching and the MultiBox loss run per device under shard_map (train.make_matching_and_loss); these
tests check that this changes no number on one device, and that the step compiled for 1, 2 and 4
(simulated) devices neither gathers the global batch nor does more work per device as devices are
added. (The two-process test of tests/test_train.py runs the step across processes.)
"""

import json
import subprocess
import sys
import textwrap

import numpy as np

from configs import tiny_mdssd
from tests.conftest import ROOT


def test_one_device_loss_and_gradients_equal_the_whole_batch_formula():
  """Through shard_map on a 1-device mesh: the loss, its parts and every gradient leaf equal, bit
  for bit, matching + `losses.multibox_loss` on the whole batch (normalised by all its positives)
  differentiated under plain jit."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mdssd_jax.state import experiment  # pylint: disable=g-import-not-at-top
  from mdssd_jax.core import losses, matching, pixels
  from mdssd_jax.run import train
  config = tiny_mdssd.get_config()
  setup = experiment.Setup(config, devices=jax.devices()[:1])
  state = setup.initial_state()
  rng = np.random.default_rng(0)
  batch_size, size, slots = 4, config.model.input_size_px, config.data.max_boxes
  corner = rng.uniform(0.0, 0.7, (batch_size, slots, 2)).astype(np.float32)
  extent = rng.uniform(0.04, 0.3, (batch_size, slots, 2)).astype(np.float32)
  boxes = np.concatenate([corner, corner + extent], axis=-1)
  counts = np.array([0, 1, 3, slots])   # an image without objects, and one with every slot used
  labels = np.where(np.arange(slots)[None] < counts[:, None],
                    rng.integers(1, config.model.num_classes + 1, (batch_size, slots)), 0)
  images = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
  anchors = jnp.asarray(setup.anchors, jnp.float32)
  variables = experiment.model_variables(state)
  matching_and_loss = train.make_matching_and_loss(setup.anchors, config, setup.mesh)

  def predictions(params):
    x = pixels.normalize(images, setup.convention, jnp.dtype(config.model.dtype))
    (loc, cls), _ = setup.model.apply(dict(variables, params=params), x, train=True,
                                      mutable=["batch_stats"])
    return loc, cls

  def reference(params):   # today's formula: the whole batch at once, no shard_map
    loc_t, cls_t = matching.match(boxes, labels, anchors, iou_threshold=config.loss.iou_threshold,
                                  variances=tuple(config.anchors.variances),
                                  rule=config.loss.matching)
    return losses.multibox_loss(*predictions(params), loc_t, cls_t,
                                neg_pos_ratio=config.loss.neg_pos_ratio,
                                loc_weight=config.loss.loc_weight)

  def per_device(params):
    return matching_and_loss(*predictions(params), jnp.asarray(boxes), jnp.asarray(labels))

  (want, want_aux), want_grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(
      state["params"])
  (got, got_aux), got_grads = jax.jit(jax.value_and_grad(per_device, has_aux=True))(
      state["params"])
  assert float(want_aux["num_pos"]) > 0 and float(want) > 0
  assert float(got) == float(want)
  for key in want_aux:
    assert float(got_aux[key]) == float(want_aux[key]), key
  want_leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(want_grads))
  got_leaves = jax.tree_util.tree_leaves(jax.device_get(got_grads))
  assert len(want_leaves) == len(got_leaves)
  for (path, w), g in zip(want_leaves, got_leaves):
    np.testing.assert_array_equal(g, w, err_msg=jax.tree_util.keystr(path))


# Compiles (never runs: XLA:CPU's in-process collectives can starve a 2-core machine) the real train
# step of train_and_evaluate for meshes of the first 1, 2 and 4 of 4 simulated CPU devices, 3 images
# per device, and prints its collectives and cost analysis as JSON. With the GPU/TPU kernels
# (config.model.kernels="native"): the program a pod or a multi-GPU host runs. (XLA:CPU's own
# kernels are for one CPU device, not for data parallelism over simulated ones.)
COMPILE_ONLY = textwrap.dedent("""
    import json
    import jax
    from benchmarks import aot_compile
    from configs import tiny_mdssd
    PER_DEVICE = 3
    out = {}
    for n in (1, 2, 4):
      config = tiny_mdssd.get_config()
      config.model.kernels = "native"
      compiled, _ = aot_compile.compile_train_step(config, jax.devices()[:n], PER_DEVICE)
      cost = aot_compile.cost(compiled)
      out[n] = dict(flops=cost["flops"], collectives=aot_compile.hlo_collectives(compiled.as_text()))
    print(json.dumps(dict(per_device=PER_DEVICE, results=out)))
""")


def test_step_compiled_for_4_devices_keeps_per_image_work_on_its_device():
  """No all-gather / all-to-all / collective-permute of anything batch-sized (the global batch, 12,
  is a size no array of the tiny model has), and per-device FLOPs flat from 1 to 4 devices (the
  same per-device batch: weak scaling). Before matching and loss went per device, the partitioner
  gathered the global batch for them: 11 all-gathers at 4 devices."""
  env = dict(__import__("os").environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", COMPILE_ONLY], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  per_device, results = report["per_device"], report["results"]
  for n, result in results.items():
    global_batch = per_device * int(n)
    moved = [c for c in result["collectives"]
             if c["kind"] in ("all-gather", "all-to-all", "collective-permute", "ragged-all-to-all")]
    batch_sized = [c for c in moved if any(
        global_batch in dims for _, dims in c["operands"] + c["results"])]
    assert not batch_sized, (n, batch_sized)
    if int(n) > 1:   # the gradient all-reduce (and batch-norm statistics) are there: not vacuous
      assert any(c["kind"] == "all-reduce" for c in result["collectives"]), (n, result)
  flops = {int(n): r["flops"] for n, r in results.items()}
  assert flops[1] > 0
  for n in (2, 4):
    assert abs(flops[n] / flops[1] - 1) < 0.05, flops
