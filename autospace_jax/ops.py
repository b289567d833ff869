"""Convolution and batch-norm primitives shared by the static cells and the supernet.

1x1 convolutions are written as matrix products and depthwise k x k convolutions as a
sum of k^2 shifted, scaled slices. Every k x k convolution pads k // 2 on each side, as
ProxylessNAS's PyTorch layers do (`padding=k // 2`): output pixel i is centred on input
pixel i * stride, the pixel the strided identity `subsample` keeps, so a stride-2 conv
edge and an identity edge of one cell stay aligned (TensorFlow's SAME pads (0, 1) for
k = 3 on even sizes and would centre on i * stride + 1). On XLA:CPU the shifted slices
are several times faster than `lax.conv_general_dilated` with `feature_group_count=C`
(whose weight gradient is slow, and far slower again inside a conditional); see
benchmarks/. Their gradient is written by hand: differentiated automatically, every
tap's slice became a saved residual and a kernel of its own, which made the ops' programs
the slowest of the supernet's to compile. Set ``AUTOSPACE_CONV=xla`` to use XLA's
convolutions instead (the better choice on GPU/TPU).

Training-mode batch norm and its ReLU6 are one function with a hand-written gradient
too: autodiff through Flax's BatchNorm made ~14 small kernels in each op's forward
program and as many in its backward, each compiled and launched on its own.
"""

from __future__ import annotations

import functools
import os
from typing import Any

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
  if _use_xla_conv():
    return lax.conv_general_dilated(
        x, kernel[:, :, None, :], (stride, stride), _centred_padding(kernel.shape[0]),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])
  return _depthwise_taps(x, kernel, stride)


def _taps(padded: jax.Array, kernel: jax.Array, stride: int, out_h: int, out_w: int
          ) -> jax.Array:
  """sum over (i, j) of kernel[i, j] times ``padded`` shifted by (i, j), strided: one fused
  loop over the output. Written with static `lax.slice`s: k^2 jnp indexing operations made
  these the slowest programs to trace."""
  b, _, _, c = padded.shape
  k = kernel.shape[0]
  weights = kernel.reshape(k * k, c)
  out = None
  for tap in range(k * k):
    i, j = divmod(tap, k)
    window = lax.slice(padded, (0, i, j, 0),
                       (b, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c),
                       (1, stride, stride, 1))
    term = window * lax.index_in_dim(weights, tap, keepdims=False)
    out = term if out is None else out + term
  return out


def _window(padded: jax.Array, i: jax.Array, j: jax.Array, stride: int, out_h: int,
            out_w: int) -> jax.Array:
  """The pixels tap (i, j) reads for each output pixel, for a traced (i, j)."""
  b, _, _, c = padded.shape
  window = lax.dynamic_slice(padded, (0, i, j, 0),
                             (b, (out_h - 1) * stride + 1, (out_w - 1) * stride + 1, c))
  return window[:, ::stride, ::stride, :]


def _pad_centred(x: jax.Array, k: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), *_centred_padding(k), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_taps(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  _, h, w, _ = x.shape
  return _taps(_pad_centred(x, kernel.shape[0]), kernel, stride, -(-h // stride),
               -(-w // stride))


def _depthwise_taps_fwd(x, kernel, stride):
  return _depthwise_taps(x, kernel, stride), (x, kernel)


def _depthwise_taps_bwd(stride, residuals, cotangent):
  """The input's cotangent correlates the stride-dilated cotangent with the flipped kernel
  (one fused loop); the kernel's, one tap at a time in a loop (one small program body
  instead of k^2 reductions), accumulated in float32."""
  x, kernel = residuals
  k, pad = kernel.shape[0], kernel.shape[0] // 2
  _, h, w, _ = x.shape
  out_h, out_w = cotangent.shape[1:3]
  dilated = lax.pad(cotangent, jnp.zeros((), cotangent.dtype),
                    ((0, 0, 0), (pad, pad + h - (out_h - 1) * stride - 1, stride - 1),
                     (pad, pad + w - (out_w - 1) * stride - 1, stride - 1), (0, 0, 0)))
  x_cotangent = _taps(dilated, kernel[::-1, ::-1], 1, h, w)
  padded = _pad_centred(x, k)

  def tap_cotangent(tap):
    window = _window(padded, tap // k, tap % k, stride, out_h, out_w)
    return jnp.sum(window * cotangent, axis=(0, 1, 2), dtype=jnp.float32)

  kernel_cotangent = lax.map(tap_cotangent, jnp.arange(k * k)).reshape(kernel.shape)
  return x_cotangent, kernel_cotangent.astype(kernel.dtype)


_depthwise_taps.defvjp(_depthwise_taps_fwd, _depthwise_taps_bwd)


def subsample(x: jax.Array, stride: int) -> jax.Array:
  """The strided identity: keep every ``stride``-th row and column, from the first (where
  strided convs centre their outputs)."""
  return x if stride == 1 else x[:, ::stride, ::stride, :]


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """Dense k x k convolution (the stem), k // 2 padding, (k, k, C_in, C_out) kernel."""
  return lax.conv_general_dilated(
      x, kernel.astype(x.dtype), (stride, stride), _centred_padding(kernel.shape[0]),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def batch_norm_inference(x: jax.Array, mean: jax.Array, variance: jax.Array,
                         scale: jax.Array, bias: jax.Array, epsilon: float, relu6: bool
                         ) -> jax.Array:
  """Batch norm with given (running) statistics, then ReLU6 if ``relu6``."""
  y = _scale_shift(x.astype(jnp.float32), mean, lax.rsqrt(variance + epsilon), scale, bias)
  return _activation(y, relu6).astype(x.dtype)


def _scale_shift(xf, mean, inverse, scale, bias):
  return (xf - mean) * (inverse * scale) + bias


def _activation(y, relu6):
  return jnp.clip(y, 0.0, 6.0) if relu6 else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     relu6: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Batch norm over all but the last axis with the batch's statistics, then ReLU6 if
  ``relu6``: ``(y, mean, variance)``. Statistics are float32 (variance E[x^2] - E[x]^2,
  as Flax's BatchNorm computes it); ``y`` has ``x``'s dtype. The returned mean and
  variance feed running averages only and are not differentiated."""
  return _batch_norm_train_fwd(x, scale, bias, epsilon, relu6)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon, relu6):
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axes)
  variance = jnp.maximum(jnp.mean(xf * xf, axes) - mean * mean, 0.0)
  inverse = lax.rsqrt(variance + epsilon)
  y = _activation(_scale_shift(xf, mean, inverse, scale, bias), relu6)
  return (y.astype(x.dtype), mean, variance), (x, mean, inverse, scale, bias)


def _batch_norm_train_bwd(epsilon, relu6, residuals, cotangents):
  """The usual batch-norm gradient, with ReLU6's mask recomputed from the residuals."""
  del epsilon
  x, mean, inverse, scale, bias = residuals
  y_cotangent = cotangents[0].astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.float32)
  if relu6:  # jax.nn.relu6's gradient: 1 strictly inside (0, 6)
    y = _scale_shift(xf, mean, inverse, scale, bias)
    y_cotangent = jnp.where((y > 0.0) & (y < 6.0), y_cotangent, 0.0)
  normalized = (xf - mean) * inverse
  bias_cotangent = jnp.sum(y_cotangent, axes)
  scale_cotangent = jnp.sum(y_cotangent * normalized, axes)
  count = xf.size // xf.shape[-1]
  x_cotangent = (scale * inverse) * (
      y_cotangent - (bias_cotangent + normalized * scale_cotangent) / count)
  return (x_cotangent.astype(x.dtype), scale_cotangent.astype(scale.dtype),
          bias_cotangent.astype(bias.dtype))


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)
