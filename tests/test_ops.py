"""Convolutions: both implementations agree, and strided ops read the pixels the strided
identity keeps (PyTorch ProxylessNAS's k // 2 padding)."""

import jax
import numpy as np
import pytest

from autospace_jax import ops

IMPLEMENTATIONS = ("taps", "xla")


def centre_delta(k: int, channels: int) -> np.ndarray:
  kernel = np.zeros((k, k, channels), np.float32)
  kernel[k // 2, k // 2] = 1.0
  return kernel


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("k", (3, 5, 7))
@pytest.mark.parametrize("size", (8, 7))
def test_a_stride_2_depthwise_conv_is_centred_on_the_pixels_the_identity_edge_keeps(
    impl, k, size, monkeypatch):
  monkeypatch.setattr(ops, "CONV_IMPL", impl)
  x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  np.testing.assert_array_equal(ops.depthwise_conv(x, centre_delta(k, 3), stride=2),
                                ops.subsample(x, 2))


def test_the_strided_stem_conv_is_centred_on_the_pixels_the_identity_keeps():
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  kernel = np.zeros((3, 3, 3, 3), np.float32)
  kernel[1, 1] = np.eye(3)
  np.testing.assert_array_equal(ops.conv2d(x, kernel, stride=2), ops.subsample(x, 2))


@pytest.mark.parametrize("k, stride, size", [(3, 1, 8), (5, 1, 7), (5, 2, 8), (7, 2, 7), (3, 2, 5)])
def test_shifted_taps_compute_what_xla_depthwise_convolution_computes(
    k, stride, size, monkeypatch):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, size, size, 4)).astype(np.float32)
  kernel = rng.normal(size=(k, k, 4)).astype(np.float32)
  cotangent = rng.normal(size=(2, -(-size // stride), -(-size // stride), 4)).astype(
      np.float32)
  results = {}
  for impl in IMPLEMENTATIONS:
    monkeypatch.setattr(ops, "CONV_IMPL", impl)
    out, vjp = jax.vjp(lambda x, w: ops.depthwise_conv(x, w, stride), x, kernel)
    results[impl] = (out, *vjp(cotangent))
  for taps, xla in zip(*results.values()):
    np.testing.assert_allclose(taps, xla, rtol=1e-4, atol=1e-4)
