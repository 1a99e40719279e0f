"""Times forward + backward of a Fusion Block's deconv chain on this machine, per deconv form.

    python -m benchmarks.kernel_table

Three stride-2 deconvs, each followed by a 3x3 conv + ReLU (the upper branch of a Fusion Block), at
three sizes. Forms: "scatter" (zero insertion with x.at[::2, ::2].set, the previous CPU form),
"pad" (zero insertion by lax.pad interior padding: config.model.kernels="cpu"), "stack" (zeros
stacked and reshaped in), "lhs_dilation" (one conv with lhs_dilation: kernels="native") and
lax.conv_transpose. Variants are timed interleaved (one call of each per round, median of the
rounds) so that the load of a shared machine hits them alike. Prints the largest relative
difference of each form's loss + gradients from the first form.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mdssd_jax.models import kernels

DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _scatter(x, w):
  b, h, ww, c = x.shape
  dilated = jnp.zeros((b, 2 * h - 1, 2 * ww - 1, c), x.dtype).at[:, ::2, ::2, :].set(x)
  return lax.conv_general_dilated(dilated, w, (1, 1), kernels.transpose_padding(w.shape[:2]),
                                  dimension_numbers=DIMENSIONS)


def _stack(x, w):
  b, h, ww, c = x.shape
  z = jnp.stack([x, jnp.zeros_like(x)], 2).reshape(b, 2 * h, ww, c)[:, :2 * h - 1]
  z = jnp.stack([z, jnp.zeros_like(z)], 3).reshape(b, 2 * h - 1, 2 * ww, c)[:, :, :2 * ww - 1]
  return lax.conv_general_dilated(z, w, (1, 1), kernels.transpose_padding(w.shape[:2]),
                                  dimension_numbers=DIMENSIONS)


FORMS = dict(
    scatter=_scatter,
    pad=lambda x, w: kernels.deconv_stride2(x, w, "cpu"),
    stack=_stack,
    lhs_dilation=lambda x, w: kernels.deconv_stride2(x, w, "native"),
    conv_transpose=lambda x, w: lax.conv_transpose(x, w, (2, 2), kernels.transpose_padding(w.shape[:2]),
                                                   dimension_numbers=DIMENSIONS))
CASES = (("demo fusion1: 6 -> 48, kernels (2, 2, 2), 64 -> 32 ch, batch 8", 6, (2, 2, 2), 64, 32, 8),
         ("MDSSD300 1/8 width fusion1: 10 -> 75, (3, 2, 3), 64 -> 32 ch, batch 8", 10, (3, 2, 3), 64, 32, 8),
         ("MDSSD300 1/4 width fusion1: 10 -> 75, (3, 2, 3), 128 -> 64 ch, batch 4", 10, (3, 2, 3), 128, 64, 4))


def chain(deconv, params, x):
  for w, conv_w in params:
    x = deconv(x, w)
    x = jax.nn.relu(lax.conv_general_dilated(x, conv_w, (1, 1), [(1, 1), (1, 1)],
                                             dimension_numbers=DIMENSIONS))
  return x


def bench(deep, ks, cin, width, batch, rounds=15):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, deep, deep, cin)), jnp.float32)
  params, c = [], cin
  for k in ks:
    params.append((jnp.asarray(rng.standard_normal((k, k, c, width)) * 0.1, jnp.float32),
                   jnp.asarray(rng.standard_normal((3, 3, width, width)) * 0.1, jnp.float32)))
    c = width
  fns, ref, errors, times = {}, None, {}, {}
  for name, deconv in FORMS.items():
    f = jax.jit(jax.value_and_grad(lambda p, x, d=deconv: jnp.sum(chain(d, p, x) ** 2), (0, 1)))
    out = jax.block_until_ready(f(params, x))
    ref = out if ref is None else ref
    errors[name] = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30)) for a, b in
                       zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)))
    fns[name], times[name] = f, []
  for _ in range(rounds):
    for name, f in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(f(params, x))
      times[name].append(time.perf_counter() - start)
  return {name: (1e3 * float(np.median(t)), errors[name]) for name, t in times.items()}


def main():
  print(f"jax {jax.__version__}, backend {jax.default_backend()}; forward + backward ms (median)\n")
  print("| case | " + " | ".join(FORMS) + " |")
  print("|---|" + "---|" * len(FORMS))
  for label, *case in CASES:
    r = bench(*case)
    print(f"| {label} | " + " | ".join(f"{ms:.0f} (err {err:.0e})" for ms, err in r.values()) + " |",
          flush=True)


if __name__ == "__main__":
  main()
