"""The VGG16 "reduced fc" trunk of SSD and the L2Norm layer (docs/model.md, "The VGG16 trunk").

conv1_1 .. conv5_3, pool3 rounding up, pool5 3x3/1, fc6 as a dilated 3x3 conv, fc7 as a 1x1 conv.
The trunk returns its named maps so SSD heads and MDSSD Fusion Blocks can pick what they need.
"""

import math
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mdssd_jax.models import kernels as kernels_lib

# VGG16 configuration "D" (Simonyan & Zisserman, table 1): the conv widths of each stage.
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


REMAT_CHOICES = ("none", "blocks")


def remat_policy(name: str):
  """The `jax.checkpoint_policies` entry called `name` (config.model.remat_policy)."""
  policy = getattr(jax.checkpoint_policies, name, None)
  if not isinstance(name, str) or name.startswith("_") or not callable(policy):
    known = sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_")
                   and n.endswith(("saveable", "saveable_and_offloadable")))
    raise ValueError(f"config.model.remat_policy={name!r} is not a jax.checkpoint_policies name; "
                     f"known: {known}")
  return policy


def maybe_remat(fn, remat: str, policy: str, static_argnums=()):
  """fn itself (remat "none") or flax's lifted jax.checkpoint of it with the named policy (remat
  "blocks"): the block's inputs are kept for the backward pass and what the policy does not save
  inside it is recomputed. fn is a Module class or a function taking a Module first."""
  if remat not in REMAT_CHOICES:
    raise ValueError(f"config.model.remat={remat!r} is not one of {REMAT_CHOICES}")
  if remat == "none":
    return fn
  return nn.remat(fn, policy=remat_policy(policy), static_argnums=static_argnums)


def trunk_layer_names() -> Tuple[str, ...]:
  """Names of the trunk's convs in order: conv1_1 .. conv5_3, conv6, conv7 (the params' keys)."""
  names = [f"conv{s + 1}_{i + 1}" for s, widths in enumerate(VGG16_STAGES)
           for i in range(len(widths))]
  return tuple(names) + ("conv6", "conv7")


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
  "batch_stats" collection and the running averages are used when train=False. `kernels` chooses
  the conv's gradient form per platform (models/kernels.py, `conv_general_dilated`).
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  dilation: int = 1
  batch_norm: bool = False
  dtype: Any = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool):
    k = self.kernel_size
    x = nn.Conv(self.features, (k, k), strides=(self.stride, self.stride),
                padding=[(self.padding, self.padding)] * 2,
                kernel_dilation=(self.dilation, self.dilation), use_bias=not self.batch_norm,
                dtype=self.dtype, param_dtype=jnp.float32, kernel_init=KERNEL_INIT,
                bias_init=BIAS_INIT, conv_general_dilated=kernels_lib.conv_fn(self.kernels),
                name="conv")(x)
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
    kernels: "auto" | "native" | "cpu" | "portable", the 2x2 max pool's and the convs' gradients'
      implementation (models/kernels.py).
    remat: "none" | "blocks": with "blocks" each stage (pool + convs, and pool5 + conv6 + conv7)
      is rematerialised in the backward pass with the jax.checkpoint policy `remat_policy`.
  Call: images (B, S, S, 3) float, train -> dict of maps (B, h, w, c) in `dtype`:
    conv1_2 .. conv5_3 (each stage's last conv, after ReLU), pool5, conv7 (fc7, after ReLU).
    At S=300: conv3_3 75, conv4_3 38, conv5_3 19, conv7 19; at S=512: 128, 64, 32, 32.
  Params: one submodule per conv, named as `trunk_layer_names()`, each {"conv": {kernel, bias}}
    (+ {"bn": ...} with batch norm); the same names with and without remat.
  """
  width_multiplier: float = 1.0
  batch_norm: bool = False
  dtype: Any = jnp.float32
  kernels: str = "auto"
  remat: str = "none"
  remat_policy: str = "nothing_saveable"

  @nn.compact
  def __call__(self, images, train: bool) -> Dict[str, jax.Array]:
    def unit(name, features, **kw):
      return ConvReLU(scaled_width(features, self.width_multiplier), batch_norm=self.batch_norm,
                      dtype=self.dtype, kernels=self.kernels, name=name, **kw)

    def stage_fn(stage, widths):
      def run(module, x, train):
        del module   # the lifted scope; the units below attach to it by name
        if stage > 1:
          x = kernels_lib.max_pool_2x2(x, (stage - 1) in CEIL_POOLS, self.kernels)
        for i, features in enumerate(widths):
          x = unit(f"conv{stage}_{i + 1}", features)(x, train)
        return x
      return run

    def fc_fn(module, x, train):
      del module
      # pool5: 3x3 stride 1 pad 1 keeps the size, so fc6 can be dilated instead of strided.
      pool5 = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
      x = unit("conv6", FC6_CHANNELS, kernel_size=3, padding=FC6_DILATION,
               dilation=FC6_DILATION)(pool5, train)
      return pool5, unit("conv7", FC7_CHANNELS, kernel_size=1, padding=0)(x, train)

    block = lambda fn: maybe_remat(fn, self.remat, self.remat_policy, static_argnums=(2,))
    maps = {}
    x = images.astype(self.dtype)
    for s, widths in enumerate(VGG16_STAGES):
      x = block(stage_fn(s + 1, widths))(self, x, train)
      maps[f"conv{s + 1}_{len(widths)}"] = x
    maps["pool5"], maps["conv7"] = block(fc_fn)(self, x, train)
    return maps


def map_names() -> Sequence[str]:
  """The names VGG16Trunk returns, shallow to deep."""
  return tuple(f"conv{s + 1}_{len(w)}" for s, w in enumerate(VGG16_STAGES)) + ("pool5", "conv7")
