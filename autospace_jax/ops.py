"""Convolution primitives shared by the static cells and the supernet.

1x1 convolutions are written as matrix products and depthwise k x k convolutions as a
sum of k^2 shifted, scaled slices. On XLA:CPU this is several times faster than
`lax.conv_general_dilated` with `feature_group_count=C` (whose weight gradient is slow,
and far slower again inside a conditional); see benchmarks/. Set
``AUTOSPACE_CONV=xla`` to use XLA's convolutions instead (the better choice on GPU/TPU).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPL = os.environ.get("AUTOSPACE_CONV", "auto")


def _use_xla_conv() -> bool:
  if CONV_IMPL == "auto":
    return jax.default_backend() != "cpu"
  return CONV_IMPL == "xla"


def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """1x1 convolution of NHWC ``x`` with a (C_in, C_out) kernel."""
  return jnp.einsum("bhwc,cd->bhwd", x, kernel.astype(x.dtype))


def _same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel_size - size, 0)
  return total // 2, total - total // 2


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """Depthwise k x k convolution, SAME padding, of NHWC ``x`` with a (k, k, C) kernel."""
  kernel = kernel.astype(x.dtype)
  k = kernel.shape[0]
  if _use_xla_conv():
    return lax.conv_general_dilated(
        x, kernel[:, :, None, :], (stride, stride), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])
  _, h, w, _ = x.shape
  ph, pw = _same_padding(h, k, stride), _same_padding(w, k, stride)
  xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
  out_h, out_w = -(-h // stride), -(-w // stride)
  out = None
  for i in range(k):
    for j in range(k):
      tap = lax.slice(xp, (0, i, j, 0),
                      (x.shape[0], i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1,
                       x.shape[3]), (1, stride, stride, 1)) * kernel[i, j]
      out = tap if out is None else out + tap
  return out


def subsample(x: jax.Array, stride: int) -> jax.Array:
  """The strided identity: keep every ``stride``-th row and column (SAME alignment)."""
  return x if stride == 1 else x[:, ::stride, ::stride, :]


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """Dense k x k convolution (the stem), SAME padding, (k, k, C_in, C_out) kernel."""
  return lax.conv_general_dilated(
      x, kernel.astype(x.dtype), (stride, stride), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
