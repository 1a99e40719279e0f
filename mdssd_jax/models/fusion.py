"""MDSSD's Fusion Block: a deep, semantically strong map upsampled 8x and added to a shallow map.

Upper branch (deep map): three stride-2 transposed convs, each followed by a 3x3 conv, then L2Norm.
Lower branch (shallow map): a 3x3 conv, then L2Norm. Sum, one 3x3 conv, ReLU (REFERENCE.md s. 1).
"""

import math
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mdssd_jax.models import vgg

# A stride-2 transposed conv with kernel 2 / padding 0 maps n -> 2n, kernel 3 / padding 1 maps
# n -> 2n - 1 (PyTorch's padding convention). These two are all the Fusion Block needs.
DECONV_STRIDE = 2
DECONV_PADDING = {2: 0, 3: 1}


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


class FusionBlock(nn.Module):
  """Fusion Block of MDSSD.

  Attributes:
    deconv_features: channels of the upper branch's deconvs and convs and of the lower branch's
      conv (the two branches are summed, so they share it). 256 in the paper.
    out_features: channels of the block's output conv (256 / 512 / 1024 in the paper).
    l2norm_scale: initial L2Norm scale of both branches.
    num_deconvs: upsampling steps (3: the maps differ by a factor of 8).
    dtype: compute dtype; params float32.
  Call: shallow (B, H, W, Cs), deep (B, h, w, Cd) -> (B, H, W, out_features), after ReLU.
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
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, shallow, deep):
    conv = lambda features, name: nn.Conv(
        features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=vgg.KERNEL_INIT, bias_init=vgg.BIAS_INIT, name=name)

    kernels_h = deconv_kernels(deep.shape[1], shallow.shape[1], self.num_deconvs)
    kernels_w = deconv_kernels(deep.shape[2], shallow.shape[2], self.num_deconvs)
    up = deep.astype(self.dtype)
    for i, (kh, kw) in enumerate(zip(kernels_h, kernels_w)):
      up = Deconv(self.deconv_features, (kh, kw), dtype=self.dtype, name=f"deconv{i + 1}")(up)
      up = conv(self.deconv_features, f"deconv{i + 1}_conv")(up)
      if i + 1 < self.num_deconvs:
        up = nn.relu(up)
    up = vgg.L2Norm(self.l2norm_scale, dtype=self.dtype, name="deep_norm")(up)

    low = conv(self.deconv_features, "shallow_conv")(shallow.astype(self.dtype))
    low = vgg.L2Norm(self.l2norm_scale, dtype=self.dtype, name="shallow_norm")(low)

    return nn.relu(conv(self.out_features, "out_conv")(up + low))


class Deconv(nn.Module):
  """A stride-2 transposed conv with PyTorch's padding for its kernel (2 -> 0, 3 -> 1).

  The same function and parameters as flax's `nn.ConvTranspose` (kernel (kh, kw, Cin, Cout), bias),
  computed as zero insertion + an ordinary stride-1 conv: XLA:CPU differentiates a conv with
  lhs dilation (what ConvTranspose lowers to) through a slow path, 3x slower here than this.
  """
  features: int
  kernel_size: Tuple[int, int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", vgg.KERNEL_INIT, tuple(self.kernel_size) + (x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", vgg.BIAS_INIT, (self.features,), jnp.float32)
    b, h, w, c = x.shape
    s = DECONV_STRIDE
    dilated = jnp.zeros((b, (h - 1) * s + 1, (w - 1) * s + 1, c), self.dtype)
    dilated = dilated.at[:, ::s, ::s, :].set(x.astype(self.dtype))
    y = jax.lax.conv_general_dilated(dilated, kernel.astype(self.dtype), (1, 1),
                                     _transpose_padding(self.kernel_size),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias.astype(self.dtype)


def _transpose_padding(kernel: Sequence[int]):
  """lax/flax explicit ConvTranspose padding equal to PyTorch's `padding` p: k - 1 - p each side.

  flax pads the stride-dilated input directly, so PyTorch's output (n - 1) * s - 2p + k needs
  (k - 1 - p) on both sides: kernel 2 -> (1, 1) gives 2n, kernel 3 -> (1, 1) gives 2n - 1.
  """
  return [(k - 1 - DECONV_PADDING[k], k - 1 - DECONV_PADDING[k]) for k in kernel]
