"""Backend-aware kernels, lowering for GPU/TPU from this CPU machine, and rematerialisation.

- Every kernel variant ("cpu", "native", "auto") computes the same outputs and gradients from the
  same parameters: the deconv against PyTorch's scatter-add definition written here in NumPy, the
  pool against a NumPy window maximum, the variants against each other.
- `jax.export` lowers a tiny MDSSD forward + backward for "cuda" and "tpu": no scatter op in the
  program (the pool's gradient is select_and_scatter, the native max-pool gradient, and allowed).
- remat="blocks" gives the same loss and gradients as remat="none".
Tolerance: float32, |difference| <= 1e-5 x the largest magnitude for single ops and 1e-4 for the
whole model (conv algorithms sum in different orders); remat is compared at 1e-6.
"""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny_mdssd
from mdssd_jax import models
from mdssd_jax.models import kernels
from tests import helpers

VARIANTS = helpers.KERNEL_VARIANTS


def np_deconv_torch(x, w_torch, pads):
  """PyTorch ConvTranspose2d, stride 2: out[2i + a - p] += x[i] @ w[a]."""
  batch, h, wd, _ = x.shape
  kh, kw, _, cout = w_torch.shape
  full = np.zeros((batch, 2 * (h - 1) + kh, 2 * (wd - 1) + kw, cout))
  for a in range(kh):
    for c in range(kw):
      full[:, a:a + 2 * (h - 1) + 1:2, c:c + 2 * (wd - 1) + 1:2] += x @ w_torch[a, c]
  return full[:, pads[0]:full.shape[1] - pads[0], pads[1]:full.shape[2] - pads[1]]


def np_max_pool(x, ceil_mode):
  b, h, w, c = x.shape
  ho, wo = ((h + 1) // 2, (w + 1) // 2) if ceil_mode else (h // 2, w // 2)
  out = np.empty((b, ho, wo, c))
  for i in range(ho):
    for j in range(wo):
      out[:, i, j] = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].max(axis=(1, 2))
  return out


def close(a, b, tol):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape
  np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(1e-30, np.abs(b).max()))


@pytest.mark.parametrize("kernel_size", [(2, 2), (3, 3), (3, 2)])
def test_deconv_variants_agree_with_numpy_and_each_other(kernel_size):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 4, 3)).astype(np.float32)
  w = rng.standard_normal(kernel_size + (3, 6)).astype(np.float32)
  pads = [{2: 0, 3: 1}[k] for k in kernel_size]
  want = np_deconv_torch(x.astype(np.float64), w[::-1, ::-1].astype(np.float64), pads)
  cot = rng.standard_normal(want.shape).astype(np.float32)   # a random cotangent for the gradient
  grads = {}
  for variant in VARIANTS:
    f = jax.jit(lambda x, w, v=variant: kernels.deconv_stride2(x, w, v))
    out, vjp = jax.vjp(f, x, w)
    close(out, want, 1e-5)
    grads[variant] = vjp(cot)
  for variant in VARIANTS[1:]:
    for g, ref in zip(grads[variant], grads["cpu"]):
      close(g, ref, 1e-5)
  # The gradient wrt x of a linear map is its transpose: check it with NumPy too.
  eps_dir = rng.standard_normal(x.shape)
  lin = np.sum(np_deconv_torch(eps_dir, w[::-1, ::-1].astype(np.float64), pads) * cot)
  np.testing.assert_allclose(np.sum(np.asarray(grads["native"][0]) * eps_dir), lin, rtol=1e-4)


@pytest.mark.parametrize("ceil_mode", [True, False])
@pytest.mark.parametrize("size", [(6, 6), (7, 5)])
def test_pool_variants_agree_with_numpy_and_each_other(ceil_mode, size):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2,) + size + (3,)).astype(np.float32)   # no ties
  want = np_max_pool(x, ceil_mode)
  cot = rng.standard_normal(want.shape).astype(np.float32)
  # The gradient routes each output's cotangent to its window's winner.
  want_grad = np.zeros(x.shape)
  for i in range(want.shape[1]):
    for j in range(want.shape[2]):
      window = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
      flat = window.reshape(2, -1, 3).argmax(axis=1)
      for b in range(2):
        for c in range(3):
          di, dj = divmod(flat[b, c], window.shape[2])
          want_grad[b, 2 * i + di, 2 * j + dj, c] += cot[b, i, j, c]
  for variant in VARIANTS:
    out, vjp = jax.vjp(jax.jit(lambda x, v=variant: kernels.max_pool_2x2(x, ceil_mode, v)), x)
    close(out, want, 0)
    close(vjp(cot)[0], want_grad, 0)


def test_unknown_kernel_choice_is_refused():
  c = tiny_mdssd.get_config()
  c.model.kernels = "gpu"
  with pytest.raises(ValueError, match="config.model.kernels='gpu'"):
    models.build_model(c)


# ---- the whole tiny MDSSD: variants, remat, lowering -------------------------------------------

def _loss_and_grads_fn(config):
  """f(variables, images) -> (scalar, grads of params), a train-mode forward + backward."""
  model = models.build_model(config)

  def f(variables, images):
    def scalar(params):
      (loc, logits), _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                     images, train=True, mutable=["batch_stats"])
      return jnp.mean(loc ** 2) + jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    return jax.value_and_grad(scalar)(variables["params"])
  return model, f


def _tiny(**model_overrides):
  # A bilinear deconv start exercises the block's every option at once.
  return helpers.tiny_config(**{"model.fusion_deconv_init": "bilinear",
                                **{f"model.{k}": v for k, v in model_overrides.items()}})


@pytest.fixture(scope="module")
def tiny_inputs():
  c = _tiny()
  model = models.build_model(c)
  images = np.random.default_rng(0).standard_normal((2, 96, 96, 3)).astype(np.float32)
  variables = jax.jit(lambda r: model.init(r, images, train=False))(jax.random.key(0, impl="rbg"))
  return variables, images


def _run(config, variables, images):
  _, f = _loss_and_grads_fn(config)
  compiled = jax.jit(f).lower(variables, images).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  return compiled(variables, images)


@pytest.mark.parametrize("setting", [dict(kernels="native"), dict(remat="blocks")])
def test_tiny_mdssd_variants_compute_the_same_loss_and_gradients(tiny_inputs, setting, monkeypatch):
  """From the same parameters: kernels "native" vs "cpu", and remat "blocks" vs "none". The CPU
  convs' matmul weight gradient is forced on (the tiny model is below its size threshold). The
  Winograd form stays off here (as it is at this width): its forward rounds differently from XLA's
  conv, and this model's gradients move by 1 % when its input moves by 1e-7 (the next test)."""
  monkeypatch.setattr(kernels, "MATMUL_WGRAD_MIN_TAP_MACS", 0)
  monkeypatch.setattr(kernels, "WINOGRAD_MIN_CHANNELS", float("inf"))
  variables, images = tiny_inputs
  ref_value, ref_grads = _run(_tiny(kernels="cpu"), variables, images)
  value, grads = _run(_tiny(kernels="cpu", **setting) if "remat" in setting else _tiny(**setting),
                      variables, images)
  tol = 1e-6 if "remat" in setting else 1e-4
  np.testing.assert_allclose(value, ref_value, rtol=tol)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(ref_grads)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    ref = np.asarray(_get(ref_grads, path))
    np.testing.assert_allclose(g, ref, rtol=0, atol=tol * max(1e-12, np.abs(ref).max()),
                               err_msg=jax.tree_util.keystr(path))


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(leaf, np.float64))
                         for leaf in jax.tree_util.tree_leaves(tree)])


def test_tiny_mdssd_with_winograd_on_its_large_3x3_convs(tiny_inputs, monkeypatch):
  """The Winograd form wired into the whole tiny MDSSD (its width is below the channel threshold,
  so the channel rules are lifted: every 3x3 stride-1 conv of at least 19x19 output runs it): the loss equals the native
  kernels' to 1e-6. Its gradients are compared in the one way this model allows: its train-mode
  gradient is ill-conditioned (the 2x2 max pools' choices and batch norm over 2 images), so a 1e-7
  relative change of the input alone moves them by about 1 % (relative L2 over all parameters,
  measured here as the reference); Winograd's rounding may move them by no more than 3x that,
  where a wrong transform or a swapped gradient moves them by 100 %. Each conv shape's value and
  gradients are checked against the float64 definition in the test further down."""
  variables, images = tiny_inputs
  ref_value, ref_grads = _run(_tiny(kernels="native"), variables, images)
  noisy = images * (1 + 1e-7 * np.random.default_rng(1).standard_normal(images.shape))
  _, noisy_grads = _run(_tiny(kernels="native"), variables, noisy.astype(np.float32))
  monkeypatch.setattr(kernels, "WINOGRAD_MIN_CHANNELS", 0)
  monkeypatch.setattr(kernels, "WINOGRAD_MAX_CHANNEL_DROP", float("inf"))
  value, grads = _run(_tiny(kernels="cpu"), variables, images)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  ref = _flat(ref_grads)
  conditioning = np.linalg.norm(_flat(noisy_grads) - ref) / np.linalg.norm(ref)
  assert 1e-4 < conditioning < 0.05, conditioning
  assert np.linalg.norm(_flat(grads) - ref) / np.linalg.norm(ref) <= 3 * conditioning


def _get(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_remat_is_applied_and_keeps_parameter_names(tiny_inputs):
  variables, images = tiny_inputs
  jaxprs = {}
  for remat in ("none", "blocks"):
    model = models.build_model(_tiny(remat=remat))
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(variables)
    forward = lambda v, x, model=model: model.apply(v, x, train=True, mutable=["batch_stats"])
    jaxprs[remat] = str(jax.make_jaxpr(forward)(variables, images))
  # One checkpoint per VGG stage (5), the fc block, and the three Fusion Blocks.
  assert jaxprs["none"].count("remat2[") == 0
  assert jaxprs["blocks"].count("remat2[") == 9
  assert len(re.findall(r"policy=<function nothing_saveable", jaxprs["blocks"])) == 9
  c = _tiny(remat="blocks", remat_policy="save_everything_please")
  with pytest.raises(ValueError, match="remat_policy"):
    models.build_model(c)


def _op_counts(mlir_text):
  return collections.Counter(re.findall(r"stablehlo\.([a-z_]+)", mlir_text))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowering_for_accelerators_has_native_ops_and_no_scatter(tiny_inputs, platform):
  """kernels="auto" lowered by jax.export for an accelerator from this CPU machine."""
  variables, images = tiny_inputs
  _, f = _loss_and_grads_fn(_tiny(kernels="auto"))
  exported = jax.export.export(jax.jit(f), platforms=[platform])(variables, images)
  text = exported.mlir_module()
  ops = _op_counts(text)
  assert ops["scatter"] == 0 and ops["gather"] == 0, ops
  # The four 2x2 pools and pool5 are reduce_window (forward), select_and_scatter (backward).
  assert ops["reduce_window"] == 5 and ops["select_and_scatter"] == 5, ops
  # Native deconvs: 3 blocks x 3 deconvs with lhs_dilation (their input-gradients are ordinary
  # strided convs); no argmax pool (iota) and no interior-padding zero insertion is left.
  assert len(re.findall(r"lhs_dilate\s*=\s*\[2, 2\]", text)) >= 9
  assert ops["iota"] == 0
  assert not re.search(r"interior = \[0, 1, 1, 0\]", text)


def test_cpu_lowering_uses_the_cpu_kernels(tiny_inputs):
  variables, images = tiny_inputs
  _, f = _loss_and_grads_fn(_tiny(kernels="auto"))
  text = jax.jit(f).lower(variables, images).as_text()
  ops = _op_counts(text)
  assert ops["scatter"] == 0
  assert ops["reduce_window"] == 1    # pool5 only; the 2x2 pools are argmax + one-hot
  assert re.search(r"interior = \[0, 1, 1, 0\]", text)


# ---- the CPU convolution: every layer shape of SSD300, MDSSD300 and the demo --------------------

def np_conv_and_grads(x, w, dy, strides, padding, dilation):
  """Float64 NumPy convolution (NHWC / HWIO) by its definition, one tap at a time, with the
  gradients of <y, dy> and, for each, the sum of |terms| that bounds its float32 rounding:
  (y, dx, dw), (|y|, |dx|, |dw|)."""
  x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
  (plo, phi), (qlo, qhi) = padding
  xp = np.pad(x, ((0, 0), (plo, phi), (qlo, qhi), (0, 0)))
  batch, out_h, out_w, cout = dy.shape
  cin = x.shape[-1]
  dy2 = dy.reshape(-1, cout)
  y, y_abs = np.zeros(dy2.shape), np.zeros(dy2.shape)
  dxp, dxp_abs = np.zeros_like(xp), np.zeros_like(xp)
  dw, dw_abs = np.zeros(w.shape), np.zeros(w.shape)
  for i in range(w.shape[0]):
    for j in range(w.shape[1]):
      rows = slice(i * dilation[0], i * dilation[0] + (out_h - 1) * strides[0] + 1, strides[0])
      cols = slice(j * dilation[1], j * dilation[1] + (out_w - 1) * strides[1] + 1, strides[1])
      tap = xp[:, rows, cols].reshape(-1, cin)     # (B * Ho * Wo, Cin): what w[i, j] multiplies
      y += tap @ w[i, j]
      y_abs += np.abs(tap) @ np.abs(w[i, j])
      dw[i, j] = tap.T @ dy2
      dw_abs[i, j] = np.abs(tap).T @ np.abs(dy2)
      dxp[:, rows, cols] += (dy2 @ w[i, j].T).reshape(batch, out_h, out_w, cin)
      dxp_abs[:, rows, cols] += (np.abs(dy2) @ np.abs(w[i, j]).T).reshape(batch, out_h, out_w, cin)
  crop = (slice(None), slice(plo, plo + x.shape[1]), slice(qlo, qlo + x.shape[2]))
  return ((y.reshape(dy.shape), dxp[crop], dw),
          (y_abs.reshape(dy.shape), dxp_abs[crop], dw_abs))


def _model_conv_shapes(batch):
  """Distinct convs (kernels.conv_layers) of the three models as the CPU form runs them."""
  from configs import demo_synthetic, mdssd300_voc, ssd300_voc  # pylint: disable=g-import-not-at-top
  shapes = {}
  for module in (ssd300_voc, mdssd300_voc, demo_synthetic):
    config = module.get_config()
    config.model.kernels = "cpu"
    model = models.build_model(config)
    size = config.model.input_size_px
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x, model=model: model.init(jax.random.key(0), x, train=False),
                               images)
    for layer in kernels.conv_layers(
        lambda v, x, model=model: model.apply(v, x, train=True, mutable=["batch_stats"]),
        variables, images):
      layer.pop("count")
      shapes[repr(layer)] = layer
  return list(shapes.values())


def test_conv_layers_lists_the_paper_models_convolutions():
  """SSD300: 13 trunk convs + fc6/fc7, 8 extra convs, 2 x 6 heads; MDSSD300 adds 3 Fusion Blocks of
  9 convs (3 deconvs run as convs on the zero-inserted map, 3 convs after them, the shallow conv,
  the output conv; the demo has the same architecture at 1/8 width)."""
  from configs import mdssd300_voc, ssd300_voc  # pylint: disable=g-import-not-at-top
  counts = {}
  for module in (ssd300_voc, mdssd300_voc):
    config = module.get_config()
    config.model.kernels = "cpu"
    model = models.build_model(config)
    images = jax.ShapeDtypeStruct((1, 300, 300, 3), jnp.float32)
    variables = jax.eval_shape(lambda x, model=model: model.init(jax.random.key(0), x, train=False),
                               images)
    layers = kernels.conv_layers(lambda v, x, model=model: model.apply(v, x, train=False),
                                 variables, images)
    counts[module.__name__] = sum(l["count"] for l in layers)
    first = layers[0]
    assert first["input_shape"] == (1, 300, 300, 3) and first["kernel_shape"] == (3, 3, 3, 64)
    assert any(l["dilation"] == (6, 6) and l["padding"] == ((6, 6), (6, 6)) for l in layers)  # fc6
    assert any(l["strides"] == (2, 2) for l in layers)                                        # conv8_2
  assert counts["configs.ssd300_voc"] == 15 + 8 + 12
  assert counts["configs.mdssd300_voc"] == 15 + 8 + 3 * 9 + 2 * 6 - 1   # conv11 is not reached


def test_cpu_conv_forms_match_the_definition_on_every_model_layer_shape(monkeypatch):
  """Both CPU forms on each distinct conv of SSD300, MDSSD300 and the demo: value and both
  gradients equal the float64 definition within float32 rounding: |error| <= 4 eps sqrt(K) x the
  sum of |terms| (K terms per sum). `conv_matmul_wgrad` (XLA's forward and input gradient, matmul
  weight gradient, forced on every shape: at batch 1 most are below its size threshold) on every
  shape; `conv_winograd_grads` (the Winograd forward and gradients, as differentiation runs them)
  on every shape where `conv_cpu` picks it (sizes odd and even, padding 1 and 0). On maps of a few
  pixels the direct bound is too tight for Winograd (its transforms add a few roundings to sums of
  one to four terms); the rule keeps it off those."""
  monkeypatch.setattr(kernels, "MATMUL_WGRAD_MIN_TAP_MACS", 0)
  eps = np.finfo(np.float32).eps
  layers = _model_conv_shapes(batch=1)
  assert len(layers) >= 60
  winograd_shapes = 0
  for n, layer in enumerate(layers):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(layer["input_shape"]).astype(np.float32)
    kh, kw, cin, _ = layer["kernel_shape"]
    w = (rng.standard_normal(layer["kernel_shape"]) / np.sqrt(kh * kw * cin)).astype(np.float32)
    args = (layer["strides"], layer["padding"], layer["dilation"])
    forms = [lambda x, w, args=args: kernels.conv_matmul_wgrad(x, w, *args)]
    if kernels.winograd_applies(layer["input_shape"], layer["kernel_shape"], *args, np.float32):
      forms.append(lambda x, w, padding=args[1]: kernels.conv_winograd_grads(x, w, padding))
      winograd_shapes += 1
    want = bounds = None
    for form in forms:
      out, vjp = jax.vjp(jax.jit(form), x, w)
      if want is None:
        dy = rng.standard_normal(out.shape).astype(np.float32)
        want, bounds = np_conv_and_grads(x, w, dy, *args)
      got = (out,) + tuple(vjp(dy))
      batch, out_h, out_w, cout = out.shape
      terms = (kh * kw * cin, kh * kw * cout, batch * out_h * out_w)   # per sum: y, dx, dw
      for name, g, ref, bound, k in zip(("y", "dx", "dw"), got, want, bounds, terms):
        excess = np.abs(np.asarray(g, np.float64) - ref) - 4 * eps * np.sqrt(k) * bound
        assert excess.max() <= 1e-30, (name, form, layer, float(excess.max()))
  assert winograd_shapes >= 15


def test_winograd_runs_on_the_wide_convs_only():
  """The shape rule on SSD300 at batch 4: the trunk's 3x3 convs from conv1_2 to conv5_3 run as
  Winograd; conv1_1 (3 input channels), fc6 (dilated), the stride-2 and 5x5-or-smaller extras and
  the narrow heads (512 -> 16 and -> 84 on conv4_3, 1024 -> 24 and -> 126 on fc7) do not; neither
  does bfloat16, nor anything on GPU/TPU (the lowering tests above)."""
  from configs import ssd300_voc  # pylint: disable=g-import-not-at-top
  config = ssd300_voc.get_config()
  config.model.kernels = "cpu"
  model = models.build_model(config)
  images = jax.ShapeDtypeStruct((4, 300, 300, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  chosen = {}
  for l in kernels.conv_layers(lambda v, x: model.apply(v, x, train=False), variables, images):
    _, h, _, cin = l["input_shape"]
    chosen[(h, cin, l["kernel_shape"][-1], l["kernel_shape"][0], l["strides"][0],
            l["dilation"][0])] = kernels.winograd_applies(
                l["input_shape"], l["kernel_shape"], l["strides"], l["padding"], l["dilation"],
                jnp.float32)
  trunk = [(300, 64, 64), (150, 64, 128), (150, 128, 128), (75, 128, 256), (75, 256, 256),
           (38, 256, 512), (38, 512, 512), (19, 512, 512)]
  assert all(chosen[shape + (3, 1, 1)] for shape in trunk)
  assert not chosen[(300, 3, 64, 3, 1, 1)] and not chosen[(19, 512, 1024, 3, 1, 6)]
  assert not chosen[(38, 512, 16, 3, 1, 1)] and not chosen[(19, 1024, 24, 3, 1, 1)]
  assert not chosen[(19, 1024, 126, 3, 1, 1)] and not chosen[(5, 256, 126, 3, 1, 1)]
  assert not any(v for k, v in chosen.items() if k[4] == 2 or k[0] <= 5)
  assert not chosen[(38, 512, 84, 3, 1, 1)]       # 6x fewer outputs than inputs
  assert sum(chosen.values()) == len(trunk)
  assert not kernels.winograd_applies((4, 38, 38, 512), (3, 3, 512, 512), (1, 1), ((1, 1),) * 2,
                                      (1, 1), jnp.bfloat16)
