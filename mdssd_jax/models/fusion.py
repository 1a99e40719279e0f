"""MDSSD's Fusion Block: a deep, semantically strong map upsampled 8x and added to a shallow map.

Upper branch (deep map): three stride-2 transposed convs, each followed by a 3x3 conv, then L2Norm.
Lower branch (shallow map): a 3x3 conv, then L2Norm. Sum, one 3x3 conv, ReLU (docs/model.md,
"The Fusion Block"). With batch norm, every conv and deconv of the block is followed by BatchNorm,
as in DSSD's deconvolution module, so that the block trains from scratch.
"""

import math
from typing import Any, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mdssd_jax.models import kernels as kernels_lib
from mdssd_jax.models import vgg

DECONV_STRIDE = kernels_lib.DECONV_STRIDE
DECONV_PADDING = kernels_lib.DECONV_PADDING
DECONV_INITS = ("xavier", "bilinear")


def deconv_kernels(deep_size: int, shallow_size: int, num_steps: int = 3) -> Tuple[int, ...]:
  """Kernels (deep to shallow) of `num_steps` stride-2 deconvs taking deep_size to shallow_size.

  Walks back from the shallow size: the previous size is ceil(t / 2), reached with kernel 2 when
  2 * prev == t (exact doubling) and kernel 3 (2 * prev - 1) otherwise. E.g. 10 -> 75 is (3, 2, 3):
  10 -> 19 -> 38 -> 75. Raises ValueError if the walk does not land on deep_size.
  """
  kernels, t = [], int(shallow_size)
  for _ in range(num_steps):
    prev = math.ceil(t / DECONV_STRIDE)
    kernels.append(2 if DECONV_STRIDE * prev == t else 3)
    t = prev
  if t != deep_size:
    raise ValueError(
        f"a Fusion Block cannot join a {deep_size}x{deep_size} deep map to a "
        f"{shallow_size}x{shallow_size} shallow map: {num_steps} stride-2 deconvs from "
        f"{shallow_size} lead back to {t}, not {deep_size}. Pick a deep map about "
        f"{DECONV_STRIDE ** num_steps}x smaller than the shallow one (config.model.fusions).")
  return tuple(reversed(kernels))


def deconv_output_size(n: int, kernel: int) -> int:
  """Size after one stride-2 deconv with the kernel's padding (PyTorch formula)."""
  return (n - 1) * DECONV_STRIDE - 2 * DECONV_PADDING[kernel] + kernel


def interpolation_taps(kernel: int, stride: int = DECONV_STRIDE) -> np.ndarray:
  """1-D weights (kernel,) that make a stride-`stride` deconv interpolate linearly.

  The tent 1 - |a - centre| / stride, normalised so that the taps reaching each output phase
  (a mod stride) sum to 1, so a constant input stays constant. Kernel 3 (n -> 2n - 1) gives
  (0.5, 1, 0.5): every other output copies an input, the ones between average two neighbours,
  which is exact linear interpolation (FCN's and DSSD's bilinear start). Kernel 2 (n -> 2n) reaches
  each output from one input only, so the best it can do is nearest-neighbour, (1, 1).
  """
  centre = (kernel - 1) / 2
  taps = np.maximum(0.0, 1.0 - np.abs(np.arange(kernel) - centre) / stride)
  for phase in range(stride):
    taps[phase::stride] /= taps[phase::stride].sum()
  return taps


def channel_mixing(in_features: int, out_features: int) -> np.ndarray:
  """(in, out) matrix that sends a map constant over channels to the same constant.

  Output channel o averages the input channels i with i = o (mod min(in, out)): the identity when
  in == out, an average of in / out channels when narrowing, a copy when widening.
  """
  g = min(in_features, out_features)
  mix = (np.arange(in_features)[:, None] % g == np.arange(out_features)[None, :] % g).astype(np.float64)
  return mix / mix.sum(axis=0, keepdims=True)


def bilinear_deconv_init(key, shape, dtype=jnp.float32):
  """Initialiser for a deconv kernel (kh, kw, Cin, Cout): separable linear interpolation taps
  (`interpolation_taps`) times `channel_mixing`. Symmetric, so flax's flipped layout is the same."""
  del key   # deterministic
  kh, kw, cin, cout = shape
  taps = np.outer(interpolation_taps(kh), interpolation_taps(kw))
  return jnp.asarray(taps[:, :, None, None] * channel_mixing(cin, cout)[None, None], dtype)


class FusionBlock(nn.Module):
  """Fusion Block of MDSSD.

  Attributes:
    deconv_features: channels of the upper branch's deconvs and convs and of the lower branch's
      conv (the two branches are summed, so they share it). 256 in the paper.
    out_features: channels of the block's output conv (256 / 512 / 1024 in the paper).
    l2norm_scale: initial L2Norm scale of both branches.
    num_deconvs: upsampling steps (3: the maps differ by a factor of 8).
    batch_norm: BatchNorm after every conv and deconv of the block (the convs then have no bias);
      statistics in the "batch_stats" collection, running averages when train=False.
    deconv_init: "xavier" (Glorot uniform, as every fresh layer) or "bilinear"
      (`bilinear_deconv_init`: the upper branch starts as an interpolating upsampler).
    kernels: "auto" | "native" | "cpu" | "portable", the deconvs' and convs' implementation
      (mdssd_jax/models/kernels.py).
    deep_branch: False drops the upper (deconvolution) branch: the block is its shallow path alone
      (shallow conv, L2Norm, output conv), a control that trains the same fine head without the
      deep map's semantics (benchmarks/study_small_objects.py's `mdssd_bn_shallow`). `deep` is
      then not read.
    dtype: compute dtype; params float32.
  Call: shallow (B, H, W, Cs), deep (B, h, w, Cd), train -> (B, H, W, out_features), after ReLU.
    The deconv kernels are derived per axis from (h, H) and (w, W) with `deconv_kernels`.

  ReLU placement (the paper's figure draws none inside the branches): ReLU after the first two
  of the upper branch's 3x3 convs, so the three deconv+conv steps are not one linear map; none
  after the third, so that both summands reach the sum signed and L2-normalised, the way DSSD's
  deconvolution module sums two linear (BN) outputs and applies ReLU after the sum.
  """
  deconv_features: int
  out_features: int
  l2norm_scale: float = 20.0
  num_deconvs: int = 3
  batch_norm: bool = False
  deconv_init: str = "xavier"
  kernels: str = "auto"
  deep_branch: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, shallow, deep, train: bool = False):
    if self.deconv_init not in DECONV_INITS:
      raise ValueError(f"config.model.fusion_deconv_init={self.deconv_init!r} is not one of "
                       f"{DECONV_INITS}")

    def bn(x, name):
      if not self.batch_norm:
        return x
      return nn.BatchNorm(use_running_average=not train, dtype=self.dtype, param_dtype=jnp.float32,
                          name=f"{name}_bn")(x)

    def conv(x, features, name):
      x = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=not self.batch_norm,
                  dtype=self.dtype, param_dtype=jnp.float32, kernel_init=vgg.KERNEL_INIT,
                  bias_init=vgg.BIAS_INIT, conv_general_dilated=kernels_lib.conv_fn(self.kernels),
                  name=name)(x)
      return bn(x, name)

    low = conv(shallow.astype(self.dtype), self.deconv_features, "shallow_conv")
    low = vgg.L2Norm(self.l2norm_scale, dtype=self.dtype, name="shallow_norm")(low)
    if not self.deep_branch:
      return nn.relu(conv(low, self.out_features, "out_conv"))

    kernels_h = deconv_kernels(deep.shape[1], shallow.shape[1], self.num_deconvs)
    kernels_w = deconv_kernels(deep.shape[2], shallow.shape[2], self.num_deconvs)
    init = bilinear_deconv_init if self.deconv_init == "bilinear" else vgg.KERNEL_INIT
    up = deep.astype(self.dtype)
    for i, (kh, kw) in enumerate(zip(kernels_h, kernels_w)):
      name = f"deconv{i + 1}"
      up = Deconv(self.deconv_features, (kh, kw), use_bias=not self.batch_norm, kernel_init=init,
                  kernels=self.kernels, dtype=self.dtype, name=name)(up)
      up = bn(up, name)
      up = conv(up, self.deconv_features, f"{name}_conv")
      if i + 1 < self.num_deconvs:
        up = nn.relu(up)
    up = vgg.L2Norm(self.l2norm_scale, dtype=self.dtype, name="deep_norm")(up)

    return nn.relu(conv(up + low, self.out_features, "out_conv"))


class Deconv(nn.Module):
  """A stride-2 transposed conv with PyTorch's padding for its kernel (2 -> 0, 3 -> 1).

  The same function and parameters as flax's `nn.ConvTranspose` (kernel (kh, kw, Cin, Cout), bias),
  computed by `kernels.deconv_stride2` in the form that is fastest on the platform.
  """
  features: int
  kernel_size: Tuple[int, int]
  use_bias: bool = True
  kernel_init: Any = vgg.KERNEL_INIT
  kernels: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init,
                        tuple(self.kernel_size) + (x.shape[-1], self.features), jnp.float32)
    y = kernels_lib.deconv_stride2(x.astype(self.dtype), kernel.astype(self.dtype), self.kernels)
    if self.use_bias:
      y = y + self.param("bias", vgg.BIAS_INIT, (self.features,), jnp.float32).astype(self.dtype)
    return y
