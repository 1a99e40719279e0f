"""The VGG16 "reduced fc" trunk of SSD and the L2Norm layer (REFERENCE.md section 3).

conv1_1 .. conv5_3, pool3 rounding up, pool5 3x3/1, fc6 as a dilated 3x3 conv, fc7 as a 1x1 conv.
The trunk returns its named maps so SSD heads and MDSSD Fusion Blocks can pick what they need.
"""

import math
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# VGG16 configuration "D": the conv widths of each stage (REFERENCE.md section 3).
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
FC6_CHANNELS = 1024
FC7_CHANNELS = 1024
FC6_DILATION = 6
# Which 2x2 pools round the output size up (Caffe SSD's pool3: 75 -> 38 at 300 input).
CEIL_POOLS = (3,)

# Fresh layers as in ssd.pytorch: Xavier/Glorot uniform weights, zero biases.
KERNEL_INIT = nn.initializers.xavier_uniform()
BIAS_INIT = nn.initializers.zeros


def scaled_width(channels: int, width_multiplier: float) -> int:
  """A hidden conv width scaled by `width_multiplier`, rounded to nearest, at least 1 channel."""
  return max(1, int(math.floor(channels * width_multiplier + 0.5)))


def trunk_layer_names() -> Tuple[str, ...]:
  """Names of the trunk's convs in order: conv1_1 .. conv5_3, conv6, conv7 (the params' keys)."""
  names = [f"conv{s + 1}_{i + 1}" for s, widths in enumerate(VGG16_STAGES)
           for i in range(len(widths))]
  return tuple(names) + ("conv6", "conv7")


def max_pool_2x2(x, ceil_mode: bool):
  """2x2 stride-2 max pool on (B, H, W, C); ceil_mode pads bottom/right so odd sizes round up.

  The window's winner is chosen with argmax and picked out with a one-hot product, so the gradient
  is a plain elementwise product: XLA:CPU runs it 2x faster than reduce_window's select-and-scatter.
  (A reshape + max is faster still, but its gradient divides by the count of elements equal to the
  max, which is 0/0 = NaN whenever the compiler recomputes the map with different rounding.)
  """
  b, h, w, c = x.shape
  if ceil_mode:   # pad with the lowest value, so the padded row/column never wins
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=jnp.finfo(x.dtype).min)
  else:
    x = x[:, :h - h % 2, :w - w % 2, :]
  b, h, w, c = x.shape
  windows = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(
      b, h // 2, w // 2, c, 4)
  winner = jax.lax.stop_gradient(jax.nn.one_hot(jnp.argmax(windows, axis=-1), 4, dtype=x.dtype))
  return jnp.sum(windows * winner, axis=-1)


class L2Norm(nn.Module):
  """Per-position L2 normalisation over channels with a learnable per-channel scale (ParseNet/SSD).

  y[b, i, j, c] = scale[c] * x[b, i, j, c] / sqrt(||x[b, i, j, :]||^2 + eps^2). The norm is computed
  in float32 whatever the compute dtype, since a bf16 sum of squares over 512+ channels loses digits;
  eps goes inside the square root so that an all-zero vector (a dead ReLU map) has a finite gradient.
  """
  scale_init: float
  eps: float = 1e-10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.constant(self.scale_init), (x.shape[-1],),
                       jnp.float32)
    x32 = x.astype(jnp.float32)
    inv_norm = jax.lax.rsqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True) + self.eps ** 2)
    return (x32 * inv_norm * scale).astype(self.dtype)


class ConvReLU(nn.Module):
  """Conv (+ BatchNorm when batch_norm) + ReLU, the unit of the trunk and the extra layers.

  With batch norm the conv has no bias (BN's shift replaces it); BN statistics live in the
  "batch_stats" collection and the running averages are used when train=False.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  dilation: int = 1
  batch_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    k = self.kernel_size
    x = nn.Conv(self.features, (k, k), strides=(self.stride, self.stride),
                padding=[(self.padding, self.padding)] * 2,
                kernel_dilation=(self.dilation, self.dilation), use_bias=not self.batch_norm,
                dtype=self.dtype, param_dtype=jnp.float32, kernel_init=KERNEL_INIT,
                bias_init=BIAS_INIT, name="conv")(x)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype, param_dtype=jnp.float32,
                       name="bn")(x)
    return nn.relu(x)


class VGG16Trunk(nn.Module):
  """VGG16 reduced-fc trunk.

  Attributes:
    width_multiplier: scales every conv width (1.0 = VGG16; ImageNet weights need 1.0).
    batch_norm: BatchNorm after every conv (for training from scratch).
    dtype: compute dtype; params stay float32.
  Call: images (B, S, S, 3) float, train -> dict of maps (B, h, w, c) in `dtype`:
    conv1_2 .. conv5_3 (each stage's last conv, after ReLU), pool5, conv7 (fc7, after ReLU).
    At S=300: conv3_3 75, conv4_3 38, conv5_3 19, conv7 19; at S=512: 128, 64, 32, 32.
  Params: one submodule per conv, named as `trunk_layer_names()`, each {"conv": {kernel, bias}}
    (+ {"bn": ...} with batch norm).
  """
  width_multiplier: float = 1.0
  batch_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool) -> Dict[str, jax.Array]:
    def unit(name, features, **kw):
      return ConvReLU(scaled_width(features, self.width_multiplier), batch_norm=self.batch_norm,
                      dtype=self.dtype, name=name, **kw)

    maps = {}
    x = images.astype(self.dtype)
    for s, widths in enumerate(VGG16_STAGES):
      stage = s + 1
      if stage > 1:
        x = max_pool_2x2(x, ceil_mode=(stage - 1) in CEIL_POOLS)
      for i, features in enumerate(widths):
        x = unit(f"conv{stage}_{i + 1}", features)(x, train)
      maps[f"conv{stage}_{len(widths)}"] = x
    # pool5: 3x3 stride 1 pad 1 keeps the size, so fc6 can be dilated instead of strided.
    x = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    maps["pool5"] = x
    x = unit("conv6", FC6_CHANNELS, kernel_size=3, padding=FC6_DILATION,
             dilation=FC6_DILATION)(x, train)
    x = unit("conv7", FC7_CHANNELS, kernel_size=1, padding=0)(x, train)
    maps["conv7"] = x
    return maps


def map_names() -> Sequence[str]:
  """The names VGG16Trunk returns, shallow to deep."""
  return tuple(f"conv{s + 1}_{len(w)}" for s, w in enumerate(VGG16_STAGES)) + ("pool5", "conv7")
