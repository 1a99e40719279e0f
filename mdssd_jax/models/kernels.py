"""Backend-aware kernels of the two ops whose fastest form differs between XLA:CPU and GPU/TPU.

One set of parameters, two implementations each, chosen by `config.model.kernels`:

| op | "native" (GPU, TPU) | "cpu" (XLA:CPU) |
|---|---|---|
| stride-2 transposed conv | one conv with `lhs_dilation` (what `lax.conv_transpose` emits) | zero insertion by `lax.pad` interior padding, then a stride-1 conv |
| 2x2 stride-2 max pool | `lax.reduce_window` (max) | argmax + one-hot product over the 4 window taps |

"auto" (the default) picks per platform when the function is LOWERED, through
`jax.lax.platform_dependent`: a CPU run gets the CPU forms, and a program lowered for "cuda" or
"tpu" (on a GPU host, or by `jax.export` from a CPU machine) holds only the native ops. Neither
form contains a scatter: the zero insertion is `pad`, whose gradient is a strided slice (an
`x.at[::2, ::2].set` zero insertion is a scatter forward and a gather backward, slow on TPU).
The measured CPU figures behind these choices are in docs/model.md ("Kernels per platform").
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

KERNEL_CHOICES = ("auto", "native", "cpu", "portable")
# "portable": the zero-insertion deconv and the reduce_window pool, the only forms the TFLite
# converter legalises (it has no input-dilated conv and no variadic argmax reduce); mdssd_jax/export.py.
DECONV_STRIDE = 2
# PyTorch's ConvTranspose2d padding for each deconv kernel size the Fusion Block uses: kernel 2 /
# padding 0 maps n -> 2n, kernel 3 / padding 1 maps n -> 2n - 1 (docs/model.md, "Deconvolution").
DECONV_PADDING = {2: 0, 3: 1}
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def check_choice(kernels: str) -> str:
  if kernels not in KERNEL_CHOICES:
    raise ValueError(f"config.model.kernels={kernels!r} is not one of {KERNEL_CHOICES}: 'auto' picks "
                     f"per platform at lowering time, 'native' forces the GPU/TPU ops, 'cpu' the "
                     f"XLA:CPU ones")
  return kernels


def per_platform(kernels: str, cpu_fn: Callable, native_fn: Callable, *args):
  """cpu_fn(*args) or native_fn(*args) as `kernels` says; "auto" decides at lowering time."""
  check_choice(kernels)
  if kernels == "cpu":
    return cpu_fn(*args)
  if kernels == "native":
    return native_fn(*args)
  return jax.lax.platform_dependent(*args, cpu=cpu_fn, default=native_fn)


def transpose_padding(kernel_size: Sequence[int]):
  """Padding of the dilated input equal to PyTorch's `padding` p: k - 1 - p on both sides.

  The stride-dilated input of size 2n - 1 padded by (k - 1 - p) each side and convolved (VALID)
  with a k kernel gives PyTorch's (n - 1) * 2 - 2p + k: kernel 2 -> 2n, kernel 3 -> 2n - 1.
  """
  for k in kernel_size:
    if k not in DECONV_PADDING:
      raise ValueError(f"deconv kernel {k} is not supported; the Fusion Block uses {sorted(DECONV_PADDING)}")
  return [(k - 1 - DECONV_PADDING[k], k - 1 - DECONV_PADDING[k]) for k in kernel_size]


def deconv_stride2(x, kernel, kernels: str = "auto"):
  """Stride-2 transposed conv with PyTorch's padding for the kernel size (no bias).

  Args:
    x: (B, h, w, Cin).
    kernel: (kh, kw, Cin, Cout), flax ConvTranspose layout (PyTorch's kernel flipped in space).
    kernels: "auto" | "native" | "cpu" | "portable" (see the module docstring).
  Returns:
    (B, H, W, Cout), H = 2h for kh = 2 and 2h - 1 for kh = 3 (the same for w).
  """
  pads = transpose_padding(kernel.shape[:2])

  def native(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), pads, lhs_dilation=(DECONV_STRIDE,) * 2,
                                        dimension_numbers=_DIMENSIONS)

  def cpu(x, kernel):
    # Interior padding inserts the zeros and the edge padding adds the border in one `pad`;
    # XLA:CPU differentiates this + a stride-1 conv faster than a conv with lhs_dilation.
    config = [(0, 0, 0)] + [(lo, hi, DECONV_STRIDE - 1) for lo, hi in pads] + [(0, 0, 0)]
    dilated = jax.lax.pad(x, jnp.zeros((), x.dtype), config)
    return jax.lax.conv_general_dilated(dilated, kernel, (1, 1), "VALID",
                                        dimension_numbers=_DIMENSIONS)

  return per_platform("cpu" if kernels == "portable" else kernels, cpu, native, x, kernel)


def max_pool_2x2(x, ceil_mode: bool, kernels: str = "auto"):
  """2x2 stride-2 max pool on (B, H, W, C) -> (B, H', W', C).

  ceil_mode pads the bottom/right with the lowest value so odd sizes round up (Caffe SSD's pool3:
  75 -> 38); otherwise odd sizes round down.
  """
  b, h, w, c = x.shape
  lowest = jnp.array(jnp.finfo(x.dtype).min, x.dtype)

  def native(x):
    # Init -inf is what makes lax pick its differentiable max-pool primitive (reduce_window_max);
    # every window holds at least one real value, so the padded -inf never wins.
    pad = ((0, 0), (0, h % 2), (0, w % 2), (0, 0)) if ceil_mode else ((0, 0),) * 4
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                 (1, 2, 2, 1), pad)

  def cpu(x):
    # The window's winner is chosen with argmax and picked out with a one-hot product, so the
    # gradient is an elementwise product: XLA:CPU runs it 2x faster than reduce_window's
    # select-and-scatter. (A reshape + max is faster still, but its gradient divides by the count
    # of elements equal to the max: 0/0 = NaN when the compiler recomputes with other rounding.)
    if ceil_mode:
      x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=lowest)
    else:
      x = x[:, :h - h % 2, :w - w % 2, :]
    bb, hh, ww, cc = x.shape
    windows = x.reshape(bb, hh // 2, 2, ww // 2, 2, cc).transpose(0, 1, 3, 5, 2, 4).reshape(
        bb, hh // 2, ww // 2, cc, 4)
    winner = jax.lax.stop_gradient(jax.nn.one_hot(jnp.argmax(windows, axis=-1), 4, dtype=x.dtype))
    return jnp.sum(windows * winner, axis=-1)

  return per_platform("native" if kernels == "portable" else kernels, cpu, native, x)
