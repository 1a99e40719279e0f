"""Backend-aware kernels of the ops whose fastest form differs between XLA:CPU and GPU/TPU.

One set of parameters, two implementations each, chosen by `config.model.kernels`:

| op | "native" (GPU, TPU) | "cpu" (XLA:CPU) |
|---|---|---|
| wide 3x3 stride-1 convs, trained (`conv_cpu`) | XLA's convolution and its transposed convolutions | Winograd F(2x2, 3x3) forward and both gradients (`conv_winograd_grads`) |
| every other conv's gradients (`conv_cpu`) | XLA's transposed convolutions | input gradient: XLA's (a forward conv for stride 1); weight gradient: one chunked matmul per kernel tap (`conv_weight_grad`) |
| stride-2 transposed conv | one conv with `lhs_dilation` (what `lax.conv_transpose` emits) | zero insertion by `lax.pad` interior padding, then a stride-1 conv |
| 2x2 stride-2 max pool | `lax.reduce_window` (max) | argmax + one-hot product over the 4 window taps |

"auto" (the default) picks per platform when the function is LOWERED, through
`jax.lax.platform_dependent`: a CPU run gets the CPU forms, and a program lowered for "cuda" or
"tpu" (on a GPU host, or by `jax.export` from a CPU machine) holds only the native ops. Neither
form contains a scatter: the zero insertion is `pad`, whose gradient is a strided slice (an
`x.at[::2, ::2].set` zero insertion is a scatter forward and a gather backward, slow on TPU).
The measured CPU figures behind these choices are in docs/model.md ("Kernels per platform").
"""

import functools
from typing import Callable, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

KERNEL_CHOICES = ("auto", "native", "cpu", "portable")
# "portable": the zero-insertion deconv and the reduce_window pool, the only forms the TFLite
# converter legalises (it has no input-dilated conv and no variadic argmax reduce); mdssd_jax/run/export.py.
DECONV_STRIDE = 2
# PyTorch's ConvTranspose2d padding for each deconv kernel size the Fusion Block uses: kernel 2 /
# padding 0 maps n -> 2n, kernel 3 / padding 1 maps n -> 2n - 1 (docs/model.md, "Deconvolution").
DECONV_PADDING = {2: 0, 3: 1}
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
# Rows (batch x output rows x output columns) that one matmul of the CPU weight gradient contracts.
# XLA:CPU's matmul splits its work over the output's tiles: a (Cin, Cout) = (64, 64) output of a
# 360,000-row contraction is one tile, so one thread, out of cache. Cutting the rows into chunks
# of about this many, as a batched matmul summed afterwards, gives every thread work and keeps each
# chunk in cache (benchmarks/bench_train.py --torch_cpu, the per-layer table).
WGRAD_CHUNK_ROWS = 2048
# Below this many multiply-adds per kernel tap (rows x Cin x Cout, rows = batch x output pixels)
# XLA's own weight gradient is as fast or faster: every conv of the 1/8-width demo at batch 8 and
# SSD300's 84-class head on conv4_3 at batch 4 (2.5e8) measured so; SSD300's trunk and extras at
# batch 4 (3.8e8 to 1.5e9) run 1.2-2.4x faster as matmuls (python -m benchmarks.conv_layers).
MATMUL_WGRAD_MIN_TAP_MACS = 2 ** 28


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
    if kernels == "portable":   # an exported forward: lax's op, nothing custom to convert
      return jax.lax.conv_general_dilated(dilated, kernel, (1, 1), "VALID",
                                          dimension_numbers=_DIMENSIONS)
    return conv_cpu(dilated, kernel, (1, 1), ((0, 0), (0, 0)), (1, 1))

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


# ---- convolution: XLA's forward, matmul gradients on the CPU --------------------------------------

def _explicit_padding(padding, in_hw, kernel_hw, strides, dilation) -> Tuple[Tuple[int, int], ...]:
  """lax padding ("SAME" / "VALID" / pairs) -> ((lo, hi), (lo, hi)) for the two spatial axes."""
  if isinstance(padding, str):
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_hw, dilation)]
    return tuple(tuple(int(v) for v in p)
                 for p in jax.lax.padtype_to_pads(in_hw, dilated, strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _chunks(rows: int, outer: int) -> int:
  """How many chunks to cut a contraction of `rows` rows into: a divisor of `outer` (the batch x
  output rows, so that chunks are whole output rows) giving chunks of about WGRAD_CHUNK_ROWS."""
  target = rows / WGRAD_CHUNK_ROWS
  if target < 2:
    return 1
  divisors = [p for p in range(1, outer + 1) if outer % p == 0]
  return min(divisors, key=lambda p: abs(np.log(p / target)))


def conv_weight_grad(x, dy, kernel_hw, strides, padding, dilation):
  """Gradient wrt the kernel of y = conv(x, w) (NHWC / HWIO), as matmuls.

  Tap (i, j) of the kernel sees the padded input shifted by (i * dilation, j * dilation) and
  subsampled by the stride, so dw[i, j] = x_shifted.reshape(-1, Cin).T @ dy.reshape(-1, Cout):
  one matmul per tap, each cut into chunks of rows (`_chunks`) and summed, accumulated in float32.

  Args:
    x: (B, H, W, Cin), the conv's input. dy: (B, Ho, Wo, Cout), the gradient of its output.
    kernel_hw: (kh, kw); strides, dilation: (sh, sw); padding: ((lo, hi), (lo, hi)).
  Returns:
    (kh, kw, Cin, Cout) float32.
  """
  batch, out_h, out_w, cout = dy.shape
  cin = x.shape[-1]
  padded = jnp.pad(x, ((0, 0),) + tuple(padding) + ((0, 0),))
  num_chunks = _chunks(batch * out_h * out_w, batch * out_h)
  dy_chunks = dy.reshape(num_chunks, -1, cout)
  taps = []
  for i in range(kernel_hw[0]):
    for j in range(kernel_hw[1]):
      r0, c0 = i * dilation[0], j * dilation[1]
      shifted = jax.lax.slice(padded, (0, r0, c0, 0),
                              (batch, r0 + (out_h - 1) * strides[0] + 1,
                               c0 + (out_w - 1) * strides[1] + 1, cin),
                              (1, strides[0], strides[1], 1))
      tap = jax.lax.dot_general(shifted.reshape(num_chunks, -1, cin), dy_chunks,
                                (((1,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
      taps.append(jnp.sum(tap, axis=0))
  return jnp.stack(taps).reshape(tuple(kernel_hw) + (cin, cout))


def _xla_conv(x, kernel, strides, padding, dilation):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation,
                                      dimension_numbers=_DIMENSIONS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_matmul_wgrad(x, kernel, strides, padding, dilation):
  """XLA's convolution (NHWC / HWIO, explicit padding) whose weight gradient is `conv_weight_grad`.

  The forward and the input gradient stay XLA's: both are forward convolutions for stride 1, which
  XLA:CPU runs as fast as oneDNN. Its weight gradient, a convolution whose "kernel" is the whole
  output gradient, runs 2-4x slower than the same arithmetic as matmuls, except for small layers
  (fewer than MATMUL_WGRAD_MIN_TAP_MACS multiply-adds per tap), which keep XLA's.
  """
  return _xla_conv(x, kernel, strides, padding, dilation)


def _conv_matmul_wgrad_fwd(x, kernel, strides, padding, dilation):
  return _xla_conv(x, kernel, strides, padding, dilation), (x, kernel)


def _conv_matmul_wgrad_bwd(strides, padding, dilation, residuals, dy):
  x, kernel = residuals
  if dy.size * x.shape[-1] < MATMUL_WGRAD_MIN_TAP_MACS:   # small layers: XLA's gradients as they are
    _, vjp = jax.vjp(lambda x, k: _xla_conv(x, k, strides, padding, dilation), x, kernel)
    return vjp(dy)
  _, input_vjp = jax.vjp(lambda x: _xla_conv(x, kernel, strides, padding, dilation), x)
  dx, = input_vjp(dy)
  dw = conv_weight_grad(x, dy, kernel.shape[:2], strides, padding, dilation)
  return dx, dw.astype(kernel.dtype)


conv_matmul_wgrad.defvjp(_conv_matmul_wgrad_fwd, _conv_matmul_wgrad_bwd)


# ---- Winograd F(2x2, 3x3): the wide 3x3 stride-1 convolutions on the CPU ----------------------------
#
# Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016), docs/model.md:
# the output is cut into 2x2 tiles; tile t of y is A^T [(G g G^T) * (B^T d_t B)] A, d_t the 4x4
# input patch under it, * elementwise. Over all tiles and channels the elementwise products are 16
# matmuls (one per position of the 4x4 transformed tile) of (tiles, Cin) x (Cin, Cout): 16 / 36 of
# a direct 3x3 conv's multiply-adds, in the forward and in both gradients. The transforms hold
# only 0, +-1 and +-1/2: on the shapes where it runs, values and gradients stay within the direct
# sum's float32 bound (tests/test_kernels.py).
WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
WINOGRAD_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)
WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
# Where the Winograd form runs (`winograd_applies`), measured per conv shape of SSD300, MDSSD300
# and MDSSD300-COCO at batch 4 (forward + backward; docs/model.md, "Why the wide 3x3 convolutions
# train as Winograd on the CPU"): it takes 0.42-0.94x
# the time of XLA's conv with matmul weight gradients on every trunk, Fusion Block and wide-head
# conv with at least 64 channels in and out, an output of at least 19x19, and no more than 4x
# fewer outputs than inputs; on the narrow heads (512 -> 16, 1024 -> 24, 1024 -> 126) and maps of
# 10x10 or less the transforms' traffic and fixed costs outweigh the saved multiply-adds (1.1-7x).
WINOGRAD_MIN_CHANNELS = 64
WINOGRAD_MIN_OUTPUT_PX = 19 * 19
WINOGRAD_MAX_CHANNEL_DROP = 4


def winograd_applies(x_shape, kernel_shape, strides, padding, dilation, dtype) -> bool:
  """Whether `conv_cpu` runs this conv (NHWC / HWIO, explicit padding) as Winograd F(2x2, 3x3)."""
  if tuple(kernel_shape[:2]) != (3, 3) or tuple(strides) != (1, 1) or tuple(dilation) != (1, 1):
    return False
  out_h, out_w, *_ = _winograd_geometry(x_shape, padding)
  cin, cout = kernel_shape[2:]
  return (jnp.dtype(dtype) == jnp.float32 and min(cin, cout) >= WINOGRAD_MIN_CHANNELS
          and cout * WINOGRAD_MAX_CHANNEL_DROP >= cin and out_h * out_w >= WINOGRAD_MIN_OUTPUT_PX)


def _combine(matrix, terms):
  """[sum_k matrix[i, k] * terms[k] for each row i], skipping zeros (matrix: NumPy constants)."""
  rows = []
  for coefficients in matrix:
    total = None
    for c, term in zip(coefficients, terms):
      if c == 0:
        continue
      part = term if c == 1 else (-term if c == -1 else float(c) * term)
      total = part if total is None else total + part
    rows.append(total)
  return rows


def _tile_rows(xp, tiles, axis):
  """The 4 row (or column, by `axis`) offsets of every input tile: tile t starts at 2t, so row
  2t + r of the padded map is block t + r // 2, phase r % 2 of its space-to-depth view.
  xp: (..., 2 * tiles + 2 along axis, ...) -> 4 arrays with `tiles` along axis."""
  shape = xp.shape
  pairs = xp.reshape(shape[:axis] + (tiles + 1, 2) + shape[axis + 1:])
  take = lambda r: jax.lax.index_in_dim(
      jax.lax.slice_in_dim(pairs, r // 2, r // 2 + tiles, axis=axis), r % 2, axis + 1, keepdims=False)
  return [take(r) for r in range(4)]


def _untile_rows(parts, axis):
  """Transpose of `_tile_rows`: 4 arrays with `tiles` along axis, overlap-added into 2 * tiles + 2."""
  zero = [(0, 0)] * parts[0].ndim
  def shifted(part, block):   # place at block offset 0 or 1 of tiles + 1 blocks
    pad = list(zero)
    pad[axis] = (block, 1 - block)
    return jnp.pad(part, pad)
  even = shifted(parts[0], 0) + shifted(parts[2], 1)
  odd = shifted(parts[1], 0) + shifted(parts[3], 1)
  pairs = jnp.stack([even, odd], axis=axis + 1)
  shape = pairs.shape
  return pairs.reshape(shape[:axis] + (shape[axis] * 2,) + shape[axis + 2:])


def _winograd_geometry(x_shape, padding):
  """(out_h, out_w, tiles_h, tiles_w, pads) of a 3x3 stride-1 conv of x_shape (B, H, W, C) with
  padding ((top, bottom), (left, right)); pads: the jnp.pad widths giving 2 * tiles + 2 rows and
  columns."""
  _, h, w, _ = x_shape
  (top, bottom), (left, right) = padding
  out_h, out_w = h + top + bottom - 2, w + left + right - 2
  tiles_h, tiles_w = -(-out_h // 2), -(-out_w // 2)
  # Pad to 2 * tiles + 2 rows / columns; any extra bottom/right rows only feed outputs cut off.
  pads = ((0, 0), (top, 2 * tiles_h + 2 - h - top), (left, 2 * tiles_w + 2 - w - left), (0, 0))
  return out_h, out_w, tiles_h, tiles_w, pads


def _winograd_input(x, padding):
  """(B, H, W, C) -> V (16, B * tiles_h * tiles_w, C) = B^T d B for every 4x4 input tile d."""
  batch, _, _, cin = x.shape
  _, _, tiles_h, tiles_w, pads = _winograd_geometry(x.shape, padding)
  xp = jnp.pad(x, pads)
  rows = jnp.stack(_combine(WINOGRAD_BT, _tile_rows(xp, tiles_h, axis=1)))   # (4, B, th, Wp, C)
  # Materialising the row stage halves the transform's time on XLA:CPU (the column stage then
  # reads each row result once instead of recomputing it for all four columns).
  rows = jax.lax.optimization_barrier(rows)
  v = jnp.stack(_combine(WINOGRAD_BT, _tile_rows(rows, tiles_w, axis=3)), axis=1)  # (4, 4, ...)
  return v.reshape(16, batch * tiles_h * tiles_w, cin)


def _winograd_input_transpose(dv, x_shape, padding):
  """Transpose of `_winograd_input`: dV (16, T, C) -> dx (B, H, W, C)."""
  batch, h, w, cin = x_shape
  _, _, tiles_h, tiles_w, pads = _winograd_geometry(x_shape, padding)
  dv = dv.reshape(4, 4, batch, tiles_h, tiles_w, cin)
  columns = [_untile_rows(_combine(WINOGRAD_BT.T, [dv[i, j] for j in range(4)]), axis=2)
             for i in range(4)]                                      # 4 x (B, th, Wp, C)
  rows = jax.lax.optimization_barrier(jnp.stack(columns))
  dxp = _untile_rows(_combine(WINOGRAD_BT.T, [rows[i] for i in range(4)]), axis=1)
  return dxp[:, pads[1][0]:pads[1][0] + h, pads[2][0]:pads[2][0] + w]


def _winograd_output(m, x_shape, padding):
  """M (16, T, Cout) -> y (B, Ho, Wo, Cout): A^T m A for each tile, the 2x2 tiles laid out."""
  batch = x_shape[0]
  out_h, out_w, tiles_h, tiles_w, _ = _winograd_geometry(x_shape, padding)
  m = m.reshape(4, 4, batch, tiles_h, tiles_w, -1)
  rows = _combine(WINOGRAD_AT, [m[i] for i in range(4)])            # 2 x (4, B, th, tw, Co)
  y = jnp.stack([jnp.stack(_combine(WINOGRAD_AT, [r[j] for j in range(4)])) for r in rows])
  y = y.transpose(2, 3, 0, 4, 1, 5).reshape(batch, 2 * tiles_h, 2 * tiles_w, -1)
  return y[:, :out_h, :out_w]


def _winograd_output_transpose(dy, x_shape, padding):
  """Transpose of `_winograd_output`: dy (B, Ho, Wo, Cout) -> dM (16, T, Cout)."""
  batch = x_shape[0]
  out_h, out_w, tiles_h, tiles_w, _ = _winograd_geometry(x_shape, padding)
  dy = jnp.pad(dy, ((0, 0), (0, 2 * tiles_h - out_h), (0, 2 * tiles_w - out_w), (0, 0)))
  dy = dy.reshape(batch, tiles_h, 2, tiles_w, 2, -1).transpose(2, 4, 0, 1, 3, 5)  # (2, 2, B, th, tw, Co)
  rows = _combine(WINOGRAD_AT.T, [dy[p] for p in range(2)])           # 4 x (2, B, th, tw, Co)
  dm = jnp.stack([jnp.stack(_combine(WINOGRAD_AT.T, [r[q] for q in range(2)])) for r in rows])
  return dm.reshape(16, batch * tiles_h * tiles_w, -1)


def _winograd_kernel(kernel):
  """(3, 3, Cin, Cout) -> U (16, Cin, Cout) = G g G^T."""
  g = jnp.asarray(WINOGRAD_G)
  return jnp.einsum("ik,klco,jl->ijco", g, kernel, g).reshape(16, *kernel.shape[2:])


def _bmm(a, b, contract):
  """Batched (over axis 0) matmul contracting axis `contract[0]` of a with `contract[1]` of b."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((0,), (0,))),
                             preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_winograd_grads(x, kernel, padding):
  """3x3 stride-1 convolution (NHWC / HWIO, explicit padding) that trains as Winograd F(2x2, 3x3).

  Args:
    x: (B, H, W, Cin) float32. kernel: (3, 3, Cin, Cout). padding: ((top, bottom), (left, right)).
  Returns:
    (B, H + top + bottom - 2, W + left + right - 2, Cout).
  Called without differentiation (inference, evaluation, export) it is XLA's convolution: alone, the
  Winograd forward is no faster (its input transform costs what its 16 matmuls save, and at 64-128
  channels it is 2x slower). Differentiated, the forward is Winograd; the residual is x, as for
  XLA's conv, and the backward transforms it again (the same ops on the same x, which XLA may merge
  with the forward's: keeping V, 4x the input's size, measured no faster); it shares one transformed
  output gradient dM between dV = dM U^T (-> dx) and dU = V^T dM (-> dw). Forward + backward take
  0.42-0.94x the time of XLA's forward with matmul gradients on the shapes where `conv_cpu` picks it.
  """
  return _xla_conv(x, kernel, (1, 1), padding, (1, 1))


def _conv_winograd_fwd(x, kernel, padding):
  y = _winograd_output(_bmm(_winograd_input(x, padding), _winograd_kernel(kernel), (2, 1)),
                       x.shape, padding)
  return y.astype(x.dtype), (x, kernel)


def _conv_winograd_bwd(padding, residuals, dy):
  x, kernel = residuals
  dm = _winograd_output_transpose(dy, x.shape, padding)                     # (16, T, Cout)
  dv = _bmm(dm, _winograd_kernel(kernel), (2, 2))                           # (16, T, Cin)
  du = _bmm(_winograd_input(x, padding), dm, (1, 1))                        # (16, Cin, Cout)
  g = jnp.asarray(WINOGRAD_G)
  dw = jnp.einsum("ik,ijco,jl->klco", g, du.reshape(4, 4, *du.shape[1:]), g)
  return (_winograd_input_transpose(dv, x.shape, padding).astype(x.dtype), dw.astype(kernel.dtype))


conv_winograd_grads.defvjp(_conv_winograd_fwd, _conv_winograd_bwd)


def conv_cpu(x, kernel, strides, padding, dilation):
  """The CPU form of one convolution (NHWC / HWIO, explicit padding), chosen by its shape:
  Winograd F(2x2, 3x3) for the wide 3x3 stride-1 convs (`winograd_applies`), else XLA's forward
  and input gradient with the matmul weight gradient (`conv_matmul_wgrad`)."""
  if winograd_applies(x.shape, kernel.shape, strides, padding, dilation, x.dtype):
    return conv_winograd_grads(x, kernel, padding)
  return conv_matmul_wgrad(x, kernel, strides, padding, dilation)


def conv_general_dilated(x, kernel, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None,
                         *, kernels: str = "auto"):
  """`lax.conv_general_dilated` with the per-platform gradient (`conv_cpu` on XLA:CPU).

  Takes lax's arguments so that `nn.Conv(conv_general_dilated=conv_fn(kernels))` uses it. The CPU
  form covers what the models use (2-D, NHWC / HWIO, no input dilation, one feature group); any
  other call is lax's own on every platform.
  """
  check_choice(kernels)
  strides = tuple(int(s) for s in window_strides)
  dilation = tuple(int(d) for d in (rhs_dilation or (1,) * len(strides)))
  native_args = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                     dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                     precision=precision)
  dims = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, dimension_numbers or _DIMENSIONS)
  supported = (x.ndim == 4 and feature_group_count == 1 and all(d == 1 for d in lhs_dilation or (1,))
               and dims == jax.lax.conv_dimension_numbers(x.shape, kernel.shape, _DIMENSIONS))
  if not supported or kernels == "portable":
    return jax.lax.conv_general_dilated(x, kernel, window_strides, padding, **native_args)
  pads = _explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides, dilation)

  def cpu(x, kernel):
    return conv_cpu(x, kernel, strides, pads, dilation)

  def native(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, strides, pads, **native_args)

  return per_platform(kernels, cpu, native, x, kernel)


def conv_fn(kernels: str) -> Callable:
  """`conv_general_dilated` bound to a `config.model.kernels` choice, for `nn.Conv`."""
  check_choice(kernels)
  return functools.partial(conv_general_dilated, kernels=kernels)


def conv_layers(fn, *args):
  """The distinct convolutions `fn(*args)` computes: a list of dicts, in first-use order, with
  `input_shape` (B, H, W, Cin), `kernel_shape` (kh, kw, Cin, Cout), `strides`, `padding`
  ((lo, hi), (lo, hi)), `dilation` and `count` (how many convs share the shape). Traced, not run,
  through every nested jaxpr (jit, remat, custom_vjp, platform_dependent), so `fn` may be a whole
  model's forward at full size. Only the NHWC / HWIO convs without input dilation are listed: the
  ones `conv_general_dilated` runs in its CPU form."""
  found = {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        p = eqn.params
        lhs, rhs = (v.aval for v in eqn.invars[:2])
        if any(d != 1 for d in p["lhs_dilation"]) or p["feature_group_count"] != 1 or lhs.ndim != 4:
          continue
        key = (tuple(lhs.shape), tuple(rhs.shape), tuple(p["window_strides"]),
               tuple(tuple(q) for q in p["padding"]), tuple(p["rhs_dilation"]))
        entry = found.setdefault(key, dict(zip(("input_shape", "kernel_shape", "strides",
                                                "padding", "dilation"), key), count=0))
        entry["count"] += 1
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return list(found.values())
