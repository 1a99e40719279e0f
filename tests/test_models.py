"""Tests of the SSD / MDSSD models against independent references written here.

Shapes and parameter counts of the full-size models come from jax.eval_shape (no compute); numeric
checks use tiny widths and NumPy convolutions written in this file.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, mdssd300_voc, mdssd512_voc, ssd300_voc, ssd512_voc
from mdssd_jax import models
from mdssd_jax.models import fusion

CONFIGS = dict(ssd300=ssd300_voc, ssd512=ssd512_voc, mdssd300=mdssd300_voc, mdssd512=mdssd512_voc)


def _config(name, **model_overrides):
  c = CONFIGS[name].get_config()
  for key, value in model_overrides.items():
    c.model[key] = value
  return c


# ---- independent references ------------------------------------------------------------------

def np_conv(x, w_hwio, b, stride=1, pad=0, dilation=1):
  """Plain cross-correlation, NHWC input, HWIO kernel, symmetric zero padding."""
  batch, h, w, _ = x.shape
  kh, kw, cin, cout = w_hwio.shape
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho = (h + 2 * pad - dilation * (kh - 1) - 1) // stride + 1
  wo = (w + 2 * pad - dilation * (kw - 1) - 1) // stride + 1
  taps = [xp[:, i * dilation:i * dilation + stride * (ho - 1) + 1:stride,
             j * dilation:j * dilation + stride * (wo - 1) + 1:stride, :]
          for i in range(kh) for j in range(kw)]
  patches = np.stack(taps, axis=3).reshape(batch, ho, wo, kh * kw * cin)
  return patches @ w_hwio.reshape(kh * kw * cin, cout) + b


def np_conv_transpose_torch(x, w, b, stride, pad):
  """PyTorch's ConvTranspose2d semantics by scattering: out[i*s + a - p] += x[i] * w[a].

  w: (kh, kw, cin, cout). Output side (n - 1) * s - 2p + k.
  """
  batch, h, wd, _ = x.shape
  kh, kw, _, cout = w.shape
  full = np.zeros((batch, (h - 1) * stride + kh, (wd - 1) * stride + kw, cout), np.float64)
  for a in range(kh):
    for c in range(kw):
      full[:, a:a + stride * (h - 1) + 1:stride, c:c + stride * (wd - 1) + 1:stride] += x @ w[a, c]
  return full[:, pad:full.shape[1] - pad, pad:full.shape[2] - pad] + b


def np_l2norm(x, scale):
  return x / (np.sqrt(np.sum(x * x, axis=-1, keepdims=True)) + 1e-10) * scale


def relu(x):
  return np.maximum(x, 0)


# ---- parameter counts from a layer list written here -----------------------------------------

VGG_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
             (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
SSD300_EXTRAS = [(1024, 256, 512, 3), (512, 128, 256, 3), (256, 128, 256, 3), (256, 128, 256, 3)]
SSD512_EXTRAS = SSD300_EXTRAS + [(256, 128, 256, 4)]
# Deconv kernels of the three Fusion Modules (docs/model.md, "Deconvolution kernels"): 300 and 512 input.
FUSION_KERNELS = {300: [(3, 2, 3), (2, 3, 2), (3, 2, 3)], 512: [(2, 2, 2)] * 3}
FUSION_IO = [(256, 512, 256), (512, 256, 512), (1024, 256, 1024)]   # shallow, deep, out channels


def conv_params(k, cin, cout):
  return k * k * cin * cout + cout


def expected_param_count(name, num_classes=20):
  size = 512 if name.endswith("512") else 300
  extras = SSD512_EXTRAS if size == 512 else SSD300_EXTRAS
  total = sum(conv_params(3, i, o) for i, o in VGG_CONVS)
  total += conv_params(3, 512, 1024) + conv_params(1, 1024, 1024)     # fc6, fc7
  total += sum(conv_params(1, cin, mid) + conv_params(k, mid, out) for cin, mid, out, k in extras)
  extra_maps = [out for _, _, out, _ in extras]
  if name.startswith("mdssd"):
    for kernels, (shallow, deep, out) in zip(FUSION_KERNELS[size], FUSION_IO):
      cin = deep
      for k in kernels:
        total += conv_params(k, cin, 256) + conv_params(3, 256, 256)   # deconv, its 3x3 conv
        cin = 256
      total += 2 * 256                                                # two L2Norm scales
      total += conv_params(3, shallow, 256) + conv_params(3, 256, out)
    head_channels = [256, 512, 1024] + extra_maps
  else:
    total += 512                                                      # conv4_3 L2Norm
    head_channels = [512, 1024] + extra_maps
  ratios = {"ssd300": [1, 2, 2, 2, 1, 1], "ssd512": [1, 2, 2, 2, 2, 1, 1],
            "mdssd300": [1, 1, 2, 2, 2, 1, 1], "mdssd512": [1, 1, 2, 2, 2, 2, 1, 1]}[name]
  for cin, r in zip(head_channels, ratios):
    k = 2 + 2 * r
    total += conv_params(3, cin, 4 * k) + conv_params(3, cin, (num_classes + 1) * k)
  return total


def expected_boxes(sizes, ratios):
  return sum(f * f * (2 + 2 * len(r)) for f, r in zip(sizes, ratios))


# ---- full-size models: shapes, counts, parameters (eval_shape only) ---------------------------

@pytest.mark.parametrize("name,num_boxes,sizes", [
    ("ssd300", 8732, (38, 19, 10, 5, 3, 1)),
    ("ssd512", 24564, (64, 32, 16, 8, 4, 2, 1)),
    ("mdssd300", 31232, (75, 38, 19, 10, 5, 3, 1)),
    ("mdssd512", None, (128, 64, 32, 16, 8, 4, 2, 1)),
])
def test_full_size_shapes_boxes_and_params(name, num_boxes, sizes):
  c = _config(name)
  if num_boxes is None:
    num_boxes = expected_boxes(sizes, c.anchors.aspect_ratios)
  model, anchors = models.build_detector(c)
  variables, (loc, logits), maps = models.abstract_forward(model, c.model.input_size_px, 2)
  assert anchors.shape == (num_boxes, 4)
  assert loc.shape == (2, num_boxes, 4) and loc.dtype == jnp.float32
  assert logits.shape == (2, num_boxes, 21) and logits.dtype == jnp.float32
  assert tuple(m.shape[1] for m in maps) == sizes
  assert models.feature_sizes(c.model) == sizes
  assert "batch_stats" not in variables
  params = variables["params"]
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  assert models.count_params(params) == expected_param_count(name)


def test_ssd300_param_count_is_the_known_figure():
  # ssd.pytorch's SSD300 VOC has 26,285,486 parameters.
  assert expected_param_count("ssd300") == 26_285_486
  c = _config("ssd300")
  variables, _, _ = models.abstract_forward(models.build_model(c), 300)
  assert models.count_params(variables["params"]) == 26_285_486


def test_mdssd_fusion_maps_and_channels():
  for name, size, want in (("mdssd300", 300, (75, 38, 19)), ("mdssd512", 512, (128, 64, 32))):
    c = _config(name)
    _, _, maps = models.abstract_forward(models.build_model(c), size)
    assert [m.shape[1:] for m in maps[:3]] == [(s, s, ch) for s, ch in zip(want, (256, 512, 1024))]


def test_width_multiplier_scales_hidden_widths_not_heads():
  c = _config("mdssd300", width_multiplier=0.25)
  variables, (loc, logits), maps = models.abstract_forward(models.build_model(c), 300)
  p = variables["params"]
  assert p["vgg"]["conv1_1"]["conv"]["kernel"].shape == (3, 3, 3, 16)
  assert p["vgg"]["conv7"]["conv"]["kernel"].shape == (1, 1, 256, 256)
  assert p["conv8_2"]["conv"]["kernel"].shape == (3, 3, 64, 128)
  assert p["fusion1"]["deconv1"]["kernel"].shape == (3, 3, 128, 64)
  assert [m.shape[-1] for m in maps] == [64, 128, 256, 128, 64, 64, 64]
  assert p["fusion1_loc"]["kernel"].shape == (3, 3, 64, 16)
  assert p["fusion3_conf"]["kernel"].shape == (3, 3, 256, 6 * 21)
  assert loc.shape == (1, 31232, 4) and logits.shape == (1, 31232, 21)


def test_unused_extras_are_not_built():
  c = _config("ssd300")
  c.model.head_sources = c.model.head_sources[:-1]
  c.anchors.aspect_ratios = c.anchors.aspect_ratios[:-1]
  variables, _, maps = models.abstract_forward(models.build_model(c), 300)
  assert "conv10_2" in variables["params"] and "conv11_1" not in variables["params"]
  assert len(maps) == 5


# ---- Fusion Block -----------------------------------------------------------------------------

@pytest.mark.parametrize("deep,shallow,kernels", [
    (10, 75, (3, 2, 3)), (5, 38, (2, 3, 2)), (3, 19, (3, 2, 3)),
    (16, 128, (2, 2, 2)), (8, 64, (2, 2, 2)), (4, 32, (2, 2, 2))])
def test_deconv_kernels_follow_the_paper(deep, shallow, kernels):
  assert fusion.deconv_kernels(deep, shallow) == kernels
  n = deep
  for k in kernels:   # PyTorch's ConvTranspose2d size formula with the kernel's padding
    n = (n - 1) * 2 - 2 * {2: 0, 3: 1}[k] + k
  assert n == shallow


def test_deconv_kernels_reject_unreachable_sizes():
  with pytest.raises(ValueError, match="10x10 deep map to a 60x60"):
    fusion.deconv_kernels(10, 60)


@pytest.mark.parametrize("deep_size,shallow_size", [(3, 19), (2, 16)])
def test_fusion_block_matches_numpy(deep_size, shallow_size):
  """The whole block against a NumPy transcription of the paper's description (tiny widths)."""
  rng = np.random.default_rng(0)
  shallow = rng.standard_normal((2, shallow_size, shallow_size, 5)).astype(np.float32)
  deep = rng.standard_normal((2, deep_size, deep_size, 6)).astype(np.float32)
  block = models.FusionBlock(deconv_features=4, out_features=3, l2norm_scale=20.0)
  params = jax.eval_shape(lambda: block.init(jax.random.key(1), shallow, deep))["params"]
  # Random biases and scales, so a mix-up of any of them shows.
  params = jax.tree_util.tree_map(
      lambda x: np.asarray(rng.standard_normal(x.shape), np.float32), params)
  got = np.asarray(jax.jit(block.apply)({"params": params}, shallow, deep))

  p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
  up = deep.astype(np.float64)
  for i, k in enumerate(fusion.deconv_kernels(deep_size, shallow_size)):
    d = p[f"deconv{i + 1}"]
    # flax's ConvTranspose kernel is PyTorch's kernel flipped in space.
    up = np_conv_transpose_torch(up, d["kernel"][::-1, ::-1], d["bias"], 2, {2: 0, 3: 1}[k])
    c = p[f"deconv{i + 1}_conv"]
    up = np_conv(up, c["kernel"], c["bias"], pad=1)
    if i < 2:
      up = relu(up)
  up = np_l2norm(up, p["deep_norm"]["scale"])
  low = np_conv(shallow.astype(np.float64), p["shallow_conv"]["kernel"], p["shallow_conv"]["bias"],
                pad=1)
  low = np_l2norm(low, p["shallow_norm"]["scale"])
  want = relu(np_conv(up + low, p["out_conv"]["kernel"], p["out_conv"]["bias"], pad=1))
  assert got.shape == (2, shallow_size, shallow_size, 3)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ---- tiny MDSSD300: head order, forward, backward -----------------------------------------------

TINY = 1.0 / 16


def rbg_key(seed):
  # The "rbg" PRNG compiles in a fraction of the time threefry takes on CPU (~100 params here).
  return jax.random.key(seed, impl="rbg")


def compile_fast(fn, *args):
  """jax.jit(fn) compiled for args with XLA's backend optimisations off: half the compile time of
  a ~100-layer graph on CPU, and these tests run it once."""
  return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def tiny_mdssd300():
  """One jitted init + training forward + backward of a tiny batch-norm MDSSD300 (the demo's
  variant), compiled once for several tests: XLA compiles slowly on a shared CPU.

  The head biases are re-drawn at random so that a bias mix-up shows in the order test.
  """
  c = _config("mdssd300", width_multiplier=TINY, batch_norm=True)
  model, anchors = models.build_detector(c)
  images = np.random.default_rng(0).standard_normal((2, 300, 300, 3)).astype(np.float32)

  def run(key, x):
    init_key, bias_key = jax.random.split(key)
    variables = model.init(init_key, x, train=False)
    params = dict(variables["params"])
    for i, name in enumerate(f"{s}_{t}" for s in model.head_sources for t in ("loc", "conf")):
      bias = jax.random.normal(jax.random.fold_in(bias_key, i), params[name]["bias"].shape)
      params[name] = dict(params[name], bias=bias)

    def scalar(p):
      (loc, logits), state = model.apply({"params": p, "batch_stats": variables["batch_stats"]},
                                         x, train=True, mutable=["batch_stats", "intermediates"])
      value = jnp.mean(loc ** 2) + jnp.mean(jax.nn.log_softmax(logits)[..., 0])
      return value, (loc, logits, state)

    (value, aux), grads = jax.value_and_grad(scalar, has_aux=True)(params)
    return variables, params, value, aux, grads

  variables, params, value, (loc, logits, state), grads = compile_fast(run, rbg_key(0), images)(
      rbg_key(0), images)
  return dict(config=c, model=model, anchors=anchors, variables=variables, params=params,
              value=value, loc=loc, logits=logits, maps=state["intermediates"]["head_maps"],
              batch_stats=state["batch_stats"], grads=grads)


def test_head_outputs_follow_default_box_order(tiny_mdssd300):
  """Rebuilds (B, A, 4) and (B, A, C+1) from the head maps with explicit loops over
  (layer, row, column, box in cell), the order of the default boxes."""
  t = tiny_mdssd300
  c, params = t["config"], jax.tree_util.tree_map(np.asarray, t["params"])
  num_classes = c.model.num_classes
  want_loc, want_cls = [], []
  for source, ratios, fmap in zip(c.model.head_sources, c.anchors.aspect_ratios, t["maps"]):
    k = 2 + 2 * len(ratios)
    fmap = np.asarray(fmap, np.float64)
    lo = np_conv(fmap, params[f"{source}_loc"]["kernel"], params[f"{source}_loc"]["bias"], pad=1)
    cl = np_conv(fmap, params[f"{source}_conf"]["kernel"], params[f"{source}_conf"]["bias"], pad=1)
    for i in range(fmap.shape[1]):
      for j in range(fmap.shape[2]):
        for box in range(k):
          want_loc.append(lo[:, i, j, box * 4:(box + 1) * 4])
          want_cls.append(cl[:, i, j, box * (num_classes + 1):(box + 1) * (num_classes + 1)])
  want_loc, want_cls = np.stack(want_loc, 1), np.stack(want_cls, 1)
  assert t["loc"].shape == want_loc.shape == (2, t["anchors"].shape[0], 4)
  assert t["logits"].shape == want_cls.shape == (2, 31232, num_classes + 1)
  np.testing.assert_allclose(t["loc"], want_loc, rtol=1e-4, atol=1e-4 * np.abs(want_loc).max())
  np.testing.assert_allclose(t["logits"], want_cls, rtol=1e-4, atol=1e-4 * np.abs(want_cls).max())


def test_forward_and_backward_are_finite(tiny_mdssd300):
  t = tiny_mdssd300
  assert np.isfinite(t["value"])
  assert np.all(np.isfinite(t["loc"])) and np.all(np.isfinite(t["logits"]))
  grads = t["grads"]
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  # Every part takes part: the gradient reaches conv1_1, every fusion branch and every head.
  assert np.abs(grads["vgg"]["conv1_1"]["conv"]["kernel"]).sum() > 0
  for name in ("fusion1", "fusion2", "fusion3"):
    assert np.abs(grads[name]["deconv1"]["kernel"]).sum() > 0
    assert np.abs(grads[name]["shallow_conv"]["kernel"]).sum() > 0
  assert all(np.abs(grads[f"{s}_conf"]["kernel"]).sum() > 0 for s in t["model"].head_sources)


def test_batch_norm_variant(tiny_mdssd300):
  """Batch norm after every trunk/extra conv; training updates the running statistics."""
  t = tiny_mdssd300
  variables = t["variables"]
  assert set(variables) == {"params", "batch_stats"}
  assert "bias" not in variables["params"]["vgg"]["conv1_1"]["conv"]
  assert "bn" in variables["params"]["conv8_2"] and "bn" in variables["params"]["vgg"]["conv7"]
  old = variables["batch_stats"]["vgg"]["conv1_1"]["bn"]["mean"]
  new = t["batch_stats"]["vgg"]["conv1_1"]["bn"]["mean"]
  assert old.shape == (4,) and not np.allclose(old, new)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  c = _config("mdssd300", dtype="bfloat16", batch_norm=True)
  variables, (loc, logits), maps = models.abstract_forward(models.build_model(c), 300)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
  assert loc.dtype == logits.dtype == jnp.float32
  assert all(m.dtype == jnp.bfloat16 for m in maps)
  # A real bf16 Fusion Block stays close to its float32 twin (same float32 params).
  rng = np.random.default_rng(0)
  shallow = rng.standard_normal((1, 19, 19, 8)).astype(np.float32)
  deep = rng.standard_normal((1, 3, 3, 8)).astype(np.float32)
  block32 = models.FusionBlock(8, 8)
  params = block32.init(rbg_key(0), shallow, deep)
  out32 = block32.apply(params, shallow, deep)
  out16 = models.FusionBlock(8, 8, dtype=jnp.bfloat16).apply(params, shallow, deep)
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out16, np.float32), out32, rtol=0.05,
                             atol=0.05 * np.abs(out32).max())


# ---- model / anchors consistency ----------------------------------------------------------------

def test_mismatched_anchors_raise_with_both_numbers():
  c = _config("mdssd300")
  c.anchors.feature_sizes = (76, 38, 19, 10, 5, 3, 1)
  with pytest.raises(ValueError) as info:
    models.build_detector(c)
  message = str(info.value)
  assert "31232" in message and str(31232 + (76 * 76 - 75 * 75) * 4) in message


def test_permuted_feature_sizes_raise_with_both_lists():
  c = _config("mdssd300")
  c.anchors.feature_sizes = (38, 75, 19, 10, 5, 3, 1)   # same count: both finest maps have k=4
  with pytest.raises(ValueError) as info:
    models.build_detector(c)
  assert "[75, 38, 19, 10, 5, 3, 1]" in str(info.value)
  assert "[38, 75, 19, 10, 5, 3, 1]" in str(info.value)


def test_config_errors_are_clear():
  c = _config("ssd300")
  c.anchors.aspect_ratios = c.anchors.aspect_ratios[:-1]
  with pytest.raises(ValueError, match="6 heads.*5 entries"):
    models.build_model(c)
  c = _config("ssd300")
  c.model.head_sources = ("conv4_3", "conv99_2")
  with pytest.raises(ValueError, match="conv99_2"):
    models.build_model(c)
  with pytest.raises(ValueError, match="anchors"):
    models.build_model(_config("ssd300").model)


def test_common_builders_agree_with_feature_sizes():
  """Every architecture builder of configs/common.py gives anchors that fit its model."""
  for builder in (common.ssd300, common.ssd512, common.mdssd300, common.mdssd512):
    c = common.base_config()
    builder(c)
    assert models.feature_sizes(c) == tuple(c.anchors.feature_sizes)


# ---- architecture registry ------------------------------------------------------------------------

def test_unknown_architecture_lists_the_known_ones():
  c = _config("ssd300")
  c.model.architecture = "yolo"
  with pytest.raises(ValueError, match=r"architecture='yolo' is unknown.*\['mdssd', 'ssd'\]"):
    models.build_model(c)


def test_architecture_and_fusions_must_agree():
  c = _config("mdssd300")
  c.model.architecture = "ssd"
  with pytest.raises(ValueError, match="architecture='mdssd'"):
    models.build_model(c)
  c = _config("ssd300")
  c.model.architecture = "mdssd"
  with pytest.raises(ValueError, match="needs Fusion Blocks"):
    models.build_model(c)


def test_a_registered_builder_is_selected_by_the_config():
  from mdssd_jax.models import registry, ssd as ssd_lib
  calls = []

  @registry.register("ssd_for_test")
  def build(model_cfg, boxes_per_cell):
    calls.append(tuple(boxes_per_cell))
    return ssd_lib.build_ssd_module(model_cfg, boxes_per_cell)

  try:
    c = _config("ssd300")
    c.model.architecture = "ssd_for_test"
    model, anchors = models.build_detector(c)
    assert calls[-1] == (4, 6, 6, 6, 4, 4) and anchors.shape == (8732, 4)
    assert "ssd_for_test" in models.known_architectures()
  finally:
    registry._BUILDERS.pop("ssd_for_test")


def test_config_fields_reach_the_module_by_name():
  """Every SSD field that is a config.model key is taken from the config (one place per setting)."""
  c = _config("mdssd300", kernels="cpu", remat="blocks", fusion_deconv_init="bilinear",
              fusion_l2norm_init_scale=7.0, dtype="bfloat16", batch_norm=True)
  model = models.build_model(c)
  assert (model.kernels, model.remat, model.fusion_deconv_init, model.fusion_l2norm_init_scale,
          model.dtype, model.batch_norm) == ("cpu", "blocks", "bilinear", 7.0, jnp.bfloat16, True)
  assert model.extras == tuple(tuple(e) for e in c.model.extras)
