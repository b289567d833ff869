"""Convolution primitives shared by the static cells and the supernet.

1x1 convolutions are written as matrix products and depthwise k x k convolutions as a
sum of k^2 shifted, scaled slices. Every k x k convolution pads k // 2 on each side, as
ProxylessNAS's PyTorch layers do (`padding=k // 2`): output pixel i is centred on input
pixel i * stride, the pixel the strided identity `subsample` keeps, so a stride-2 conv
edge and an identity edge of one cell stay aligned (TensorFlow's SAME pads (0, 1) for
k = 3 on even sizes and would centre on i * stride + 1). On XLA:CPU the shifted slices
are several times faster than `lax.conv_general_dilated` with `feature_group_count=C`
(whose weight gradient is slow, and far slower again inside a conditional); see
benchmarks/. Set ``AUTOSPACE_CONV=xla`` to use XLA's convolutions instead (the better
choice on GPU/TPU).
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


def _centred_padding(kernel_size: int) -> list[tuple[int, int]]:
  """(k // 2, k // 2) for height and width: output sizes are ceil(size / stride) for the odd
  kernels every op uses."""
  return [(kernel_size // 2, kernel_size // 2)] * 2


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """Depthwise k x k convolution, k // 2 padding, of NHWC ``x`` with a (k, k, C) kernel."""
  kernel = kernel.astype(x.dtype)
  k = kernel.shape[0]
  if _use_xla_conv():
    return lax.conv_general_dilated(
        x, kernel[:, :, None, :], (stride, stride), _centred_padding(k),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])
  _, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), *_centred_padding(k), (0, 0)))
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
  """The strided identity: keep every ``stride``-th row and column, from the first (where
  strided convs centre their outputs)."""
  return x if stride == 1 else x[:, ::stride, ::stride, :]


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """Dense k x k convolution (the stem), k // 2 padding, (k, k, C_in, C_out) kernel."""
  return lax.conv_general_dilated(
      x, kernel.astype(x.dtype), (stride, stride), _centred_padding(kernel.shape[0]),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
