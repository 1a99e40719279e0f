"""Pixel conventions: how uint8 RGB images become the trunk's input.

Each source of VGG16 weights was trained on its own pixel convention (RGB in [0, 1] with ImageNet
mean/std for torchvision and timm; BGR in [0, 255] minus the Caffe mean for ssd.pytorch). The input
pipeline ships uint8 RGB (4x fewer bytes to the device) and the train/eval step calls `normalize`.
"""

import numpy as np

_KEYS = ("channel_order", "input_range", "mean", "std")


def as_convention(convention):
  """A plain dict {channel_order, input_range, mean, std} from a dict or ConfigDict; validated."""
  convention = {k: convention[k] for k in _KEYS if k in convention}
  missing = [k for k in _KEYS if k not in convention]
  if missing:
    raise ValueError(f"pixel convention lacks {missing}; it needs {list(_KEYS)} "
                     "(see config.model.pixel in configs/common.py)")
  order = str(convention["channel_order"]).upper()
  if order not in ("RGB", "BGR"):
    raise ValueError(f"pixel convention channel_order={order!r}; use 'RGB' or 'BGR'")
  mean, std = tuple(float(v) for v in convention["mean"]), tuple(float(v) for v in convention["std"])
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise ValueError(f"pixel convention mean={mean} std={std}: need three values each, std > 0")
  return dict(channel_order=order, input_range=float(convention["input_range"]), mean=mean, std=std)


def normalize(images_uint8, convention, dtype=None):
  """uint8 RGB images (..., H, W, 3) -> float trunk input, for np or jnp arrays alike.

  value = (pixel / 255 * input_range - mean) / std, channels reordered first when the convention is BGR.
  """
  convention = as_convention(convention)
  xp = np if isinstance(images_uint8, np.ndarray) else _jnp()
  x = images_uint8.astype(xp.float32)
  if convention["channel_order"] == "BGR":
    x = x[..., ::-1]
  scale = convention["input_range"] / 255.0
  mean = xp.asarray(convention["mean"], xp.float32)
  inv_std = 1.0 / xp.asarray(convention["std"], xp.float32)
  x = (x * scale - mean) * inv_std
  return x if dtype is None else x.astype(dtype)


def _jnp():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp
