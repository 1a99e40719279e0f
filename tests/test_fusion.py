"""The Fusion Block's trainable-from-scratch form: batch norm, bilinear deconv start, widths per block.

Every check is against a NumPy reference or a layer list written here: the transposed conv as
PyTorch's scatter-add definition, batch norm as (x - batch mean) / sqrt(batch var + eps), linear
interpolation with np.interp, and parameter counts summed layer by layer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mdssd300_voc, tiny_mdssd
from mdssd_jax import models
from mdssd_jax.models import fusion

BN_EPS = 1e-5          # flax BatchNorm's default epsilon
BN_MOMENTUM = 0.99     # flax BatchNorm's default momentum of the running averages


# ---- NumPy references ---------------------------------------------------------------------------

def np_conv3x3(x, w, b=None):
  """Cross-correlation, stride 1, zero padding 1; NHWC, HWIO."""
  batch, h, wd, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = sum(xp[:, i:i + h, j:j + wd] @ w[i, j] for i in range(3) for j in range(3))
  return out if b is None else out + b


def np_deconv_torch(x, w_torch, stride, pad_h, pad_w):
  """PyTorch ConvTranspose2d: out[i * s + a - p] += x[i] @ w[a]; w (kh, kw, cin, cout)."""
  batch, h, wd, _ = x.shape
  kh, kw, _, cout = w_torch.shape
  full = np.zeros((batch, (h - 1) * stride + kh, (wd - 1) * stride + kw, cout))
  for a in range(kh):
    for c in range(kw):
      full[:, a:a + stride * (h - 1) + 1:stride, c:c + stride * (wd - 1) + 1:stride] += x @ w_torch[a, c]
  return full[:, pad_h:full.shape[1] - pad_h, pad_w:full.shape[2] - pad_w]


def np_batch_norm(x, scale, bias):
  mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  return (x - mean) / np.sqrt(var + BN_EPS) * scale + bias, mean, var


def np_l2norm(x, scale):
  return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-20) * scale


def np_upsample_linear(x, out_h, out_w, kernels):
  """Separable interpolation of (B, h, w, C): kernel 3 (n -> 2n - 1) is linear interpolation with
  the end samples on the end samples; kernel 2 (n -> 2n) repeats each sample (nearest)."""
  def axis(v, k, n_out, ax):
    n = v.shape[ax]
    if k == 2:
      return np.repeat(v, 2, axis=ax)
    pos = np.arange(n_out) / 2.0
    return np.apply_along_axis(lambda line: np.interp(pos, np.arange(n), line), ax, v)
  return axis(axis(x, kernels[0], out_h, 1), kernels[1], out_w, 2)


# ---- parameter counts from layer lists --------------------------------------------------------

def block_layers(deep_channels, shallow_channels, deconv_width, out_width, kernels, deep_branch=True):
  """[(kind, kernel_h, kernel_w, cin, cout)] of one Fusion Block, in the paper's order; without the
  deep branch, the shallow conv, its L2Norm and the output conv."""
  if not deep_branch:
    return [("conv", 3, 3, shallow_channels, deconv_width), ("l2norm", 0, 0, 0, deconv_width),
            ("conv", 3, 3, deconv_width, out_width)]
  layers, cin = [], deep_channels
  for kh, kw in kernels:
    layers += [("deconv", kh, kw, cin, deconv_width), ("conv", 3, 3, deconv_width, deconv_width)]
    cin = deconv_width
  layers += [("l2norm", 0, 0, 0, deconv_width), ("conv", 3, 3, shallow_channels, deconv_width),
             ("l2norm", 0, 0, 0, deconv_width), ("conv", 3, 3, deconv_width, out_width)]
  return layers


def count(layers, batch_norm):
  """(params, batch-stat scalars): a conv or deconv has k*k*cin*cout weights plus a bias, or, with
  batch norm, no bias and a BN scale + shift (params) and a mean + variance (statistics)."""
  params = stats = 0
  for kind, kh, kw, cin, cout in layers:
    if kind == "l2norm":
      params += cout
      continue
    params += kh * kw * cin * cout + (2 * cout if batch_norm else cout)
    stats += 2 * cout if batch_norm else 0
  return params, stats


# ---- tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("deep,shallow", [(3, 19), (2, 16)])
def test_block_shapes_and_parameter_counts(batch_norm, deep, shallow):
  block = models.FusionBlock(deconv_features=6, out_features=5, batch_norm=batch_norm)
  s = jax.ShapeDtypeStruct((2, shallow, shallow, 7), jnp.float32)
  d = jax.ShapeDtypeStruct((2, deep, deep, 9), jnp.float32)
  out, variables = jax.eval_shape(lambda s, d: block.init_with_output(jax.random.key(0), s, d, True),
                                  s, d)
  assert out.shape == (2, shallow, shallow, 5)
  kernels = list(zip(fusion.deconv_kernels(deep, shallow), fusion.deconv_kernels(deep, shallow)))
  want_params, want_stats = count(block_layers(9, 7, 6, 5, kernels), batch_norm)
  assert models.count_params(variables["params"]) == want_params
  assert models.count_params(variables.get("batch_stats", {})) == want_stats
  for name in ("deconv1", "deconv1_conv", "shallow_conv", "out_conv"):
    assert ("bias" in variables["params"][name]) == (not batch_norm)
    assert (f"{name}_bn" in variables["params"]) == batch_norm


@pytest.mark.parametrize("batch_norm", [False, True])
def test_block_without_deep_branch_is_its_shallow_path(batch_norm):
  """deep_branch=False: the parameters of the shallow path alone (counted here), the same names as
  the full block's shallow path, and its output computed in NumPy: relu(out_conv(l2norm(conv(x))))."""
  block = models.FusionBlock(deconv_features=6, out_features=5, batch_norm=batch_norm,
                             deep_branch=False)
  rng = np.random.default_rng(0)
  shallow = jnp.asarray(rng.normal(size=(2, 8, 8, 7)), jnp.float32)
  deep = jnp.asarray(rng.normal(size=(2, 1, 1, 9)), jnp.float32)
  variables = block.init(jax.random.key(1), shallow, deep, False)
  want_params, want_stats = count(block_layers(9, 7, 6, 5, [], deep_branch=False), batch_norm)
  assert models.count_params(variables["params"]) == want_params
  assert models.count_params(variables.get("batch_stats", {})) == want_stats
  full = models.FusionBlock(deconv_features=6, out_features=5, batch_norm=batch_norm)
  full_names = set(jax.eval_shape(lambda: full.init(jax.random.key(1), shallow, deep, False))["params"])
  assert set(variables["params"]) == {n for n in full_names
                                      if n.startswith(("shallow_", "out_conv"))}
  # A deep input of any size is not read.
  other = jnp.zeros((2, 3, 3, 4), jnp.float32)
  out = block.apply(variables, shallow, deep, False)
  np.testing.assert_array_equal(out, block.apply(variables, shallow, other, False))

  p = jax.tree_util.tree_map(np.asarray, variables["params"])
  stats = jax.tree_util.tree_map(np.asarray, variables.get("batch_stats", {}))

  def np_conv(x, name):
    w = p[name]["kernel"]
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = sum(np.einsum("bhwc,cd->bhwd", xp[:, i:i + x.shape[1], j:j + x.shape[2]], w[i, j])
            for i in range(3) for j in range(3))
    if not batch_norm:
      return y + p[name]["bias"]
    bn, st = p[f"{name}_bn"], stats[f"{name}_bn"]
    return (y - st["mean"]) / np.sqrt(st["var"] + 1e-5) * bn["scale"] + bn["bias"]

  low = np_conv(np.asarray(shallow, np.float64), "shallow_conv")
  low = low / np.sqrt((low ** 2).sum(-1, keepdims=True) + 1e-10) * p["shallow_norm"]["scale"]
  want = np.maximum(np_conv(low, "out_conv"), 0)
  np.testing.assert_allclose(out, want, rtol=2e-4, atol=2e-4)


def _full_mdssd300_count(deconv_widths, batch_norm):
  """MDSSD300 (VOC, 21 classes) parameters and batch statistics from a layer list written here."""
  vgg = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
         (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
  layers = [("conv", 3, 3, i, o) for i, o in vgg]
  layers += [("conv", 3, 3, 512, 1024), ("conv", 1, 1, 1024, 1024)]           # fc6, fc7
  for cin, mid, out in ((1024, 256, 512), (512, 128, 256), (256, 128, 256), (256, 128, 256)):
    layers += [("conv", 1, 1, cin, mid), ("conv", 3, 3, mid, out)]
  params, stats = count(layers, batch_norm)
  fusions = [(256, 512, 256, (3, 2, 3)), (512, 256, 512, (2, 3, 2)), (1024, 256, 1024, (3, 2, 3))]
  for (shallow, deep, out, ks), width in zip(fusions, deconv_widths):
    p, s = count(block_layers(deep, shallow, width, out, [(k, k) for k in ks]), batch_norm)
    params, stats = params + p, stats + s
  # Heads have biases and no batch norm: 3x3 convs for 4k offsets and 21k scores.
  for cin, k in zip((256, 512, 1024, 512, 256, 256, 256), (4, 4, 6, 6, 6, 4, 4)):
    params += 9 * cin * 4 * k + 4 * k + 9 * cin * 21 * k + 21 * k
  return params, stats


@pytest.mark.parametrize("widths", [(256,), (256, 512, 1024)])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_full_size_counts_for_both_width_readings(widths, batch_norm):
  c = mdssd300_voc.get_config()
  c.model.fusion_deconv_channels = widths
  c.model.batch_norm = batch_norm
  variables, _, maps = models.abstract_forward(models.build_model(c), 300)
  per_block = widths * 3 if len(widths) == 1 else widths
  want_params, want_stats = _full_mdssd300_count(per_block, batch_norm)
  assert models.count_params(variables["params"]) == want_params
  assert models.count_params(variables.get("batch_stats", {})) == want_stats
  assert [m.shape[-1] for m in maps[:3]] == [256, 512, 1024]   # block outputs: both readings
  assert variables["params"]["fusion3"]["deconv3"]["kernel"].shape[-1] == per_block[2]


def test_width_per_block_must_match_the_number_of_blocks():
  c = tiny_mdssd.get_config()
  c.model.fusion_deconv_channels = (256, 512)
  with pytest.raises(ValueError, match="fusion_deconv_channels.*one width per block"):
    models.build_model(c)


def test_batch_norm_block_matches_numpy_and_updates_statistics():
  """Train-mode forward against NumPy (batch statistics), and the running averages it writes."""
  rng = np.random.default_rng(0)
  shallow = rng.standard_normal((3, 11, 11, 5)).astype(np.float32)
  deep = rng.standard_normal((3, 2, 2, 4)).astype(np.float32)
  block = models.FusionBlock(deconv_features=4, out_features=3, batch_norm=True)
  variables = jax.eval_shape(lambda: block.init(jax.random.key(0), shallow, deep, False))
  # Random params (BN scales and shifts included), so that a mix-up shows.
  params = jax.tree_util.tree_map(lambda x: np.asarray(rng.standard_normal(x.shape), np.float32),
                                  variables["params"])
  stats = {name: {"mean": np.zeros(v["mean"].shape, np.float32),
                  "var": np.ones(v["var"].shape, np.float32)}
           for name, v in variables["batch_stats"].items()}
  got, new_vars = jax.jit(lambda p, s: block.apply({"params": p, "batch_stats": s}, shallow, deep,
                                                   True, mutable=["batch_stats"]))(params, stats)

  p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
  want_stats = {}

  def bn(x, name):
    y, mean, var = np_batch_norm(x, p[name]["scale"], p[name]["bias"])
    want_stats[name] = dict(mean=(1 - BN_MOMENTUM) * mean, var=BN_MOMENTUM + (1 - BN_MOMENTUM) * var)
    return y

  up = deep.astype(np.float64)
  for i, k in enumerate(fusion.deconv_kernels(2, 11)):   # (3, 2, 3): 2 -> 3 -> 6 -> 11
    name = f"deconv{i + 1}"
    up = np_deconv_torch(up, p[name]["kernel"][::-1, ::-1], 2, {2: 0, 3: 1}[k], {2: 0, 3: 1}[k])
    up = bn(up, f"{name}_bn")
    up = bn(np_conv3x3(up, p[f"{name}_conv"]["kernel"]), f"{name}_conv_bn")
    if i < 2:
      up = np.maximum(up, 0)
  up = np_l2norm(up, p["deep_norm"]["scale"])
  low = bn(np_conv3x3(shallow.astype(np.float64), p["shallow_conv"]["kernel"]), "shallow_conv_bn")
  low = np_l2norm(low, p["shallow_norm"]["scale"])
  want = np.maximum(bn(np_conv3x3(up + low, p["out_conv"]["kernel"]), "out_conv_bn"), 0)

  assert got.shape == want.shape == (3, 11, 11, 3)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  assert set(new_vars["batch_stats"]) == set(want_stats)
  for name, moments in want_stats.items():
    for key, value in moments.items():
      np.testing.assert_allclose(new_vars["batch_stats"][name][key], value, rtol=1e-3, atol=1e-5,
                                 err_msg=f"{name}/{key}")
  # Evaluation uses the running averages and leaves them alone.
  eval_out = block.apply({"params": params, "batch_stats": new_vars["batch_stats"]}, shallow, deep,
                         False)
  assert eval_out.shape == got.shape and not np.allclose(eval_out, got)


@pytest.mark.parametrize("kernel_size,size_in", [((3, 3), (4, 5)), ((2, 2), (3, 4)), ((3, 2), (5, 3))])
def test_bilinear_deconv_interpolates(kernel_size, size_in):
  """A bilinear-initialised deconv (Cin == Cout) equals NumPy interpolation of each channel."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2,) + size_in + (3,)).astype(np.float32)
  deconv = fusion.Deconv(3, kernel_size, kernel_init=fusion.bilinear_deconv_init)
  variables = deconv.init(jax.random.key(0), x)
  got = np.asarray(deconv.apply(variables, x))
  out_h = fusion.deconv_output_size(size_in[0], kernel_size[0])
  out_w = fusion.deconv_output_size(size_in[1], kernel_size[1])
  want = np_upsample_linear(x.astype(np.float64), out_h, out_w, kernel_size)
  assert got.shape == want.shape == (2, out_h, out_w, 3)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cin,cout", [(8, 4), (4, 4), (3, 5)])
def test_bilinear_block_keeps_a_constant_map_constant(cin, cout):
  """The upper branch's three bilinear deconvs take a constant 2x2 map to a constant 11x11 one
  (the interior and, for these kernels, the border too), narrowing or widening the channels."""
  x = np.full((1, 2, 2, cin), 0.7, np.float32)
  up = x
  for i, k in enumerate(fusion.deconv_kernels(2, 11)):
    deconv = fusion.Deconv(cout, (k, k), kernel_init=fusion.bilinear_deconv_init)
    up = deconv.apply(deconv.init(jax.random.key(i), up), up)
  assert up.shape == (1, 11, 11, cout)
  np.testing.assert_allclose(up, 0.7, rtol=1e-6)


def test_block_deconv_init_option():
  """fusion_deconv_init="bilinear" reaches every block's deconvs; "xavier" stays random."""
  c = tiny_mdssd.get_config()
  for init in ("bilinear", "xavier"):
    c.model.fusion_deconv_init = init
    model = models.build_model(c)
    params = model.init(jax.random.key(0, impl="rbg"), np.zeros((1, 96, 96, 3), np.float32),
                        train=False)["params"]
    kernel = np.asarray(params["fusion2"]["deconv2"]["kernel"])    # (k, k, width, width)
    diagonal = kernel[:, :, np.arange(kernel.shape[2]), np.arange(kernel.shape[3])]
    centre = kernel.shape[0] // 2
    if init == "bilinear":
      assert np.all(diagonal[centre, centre] == 1.0)   # the centre tap copies its own channel
      assert np.count_nonzero(kernel) == np.count_nonzero(diagonal)
    else:
      assert np.count_nonzero(kernel) == kernel.size
  c.model.fusion_deconv_init = "lanczos"
  with pytest.raises(ValueError, match="fusion_deconv_init"):
    models.build_model(c)
