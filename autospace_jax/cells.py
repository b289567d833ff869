"""Flax modules for cells, blocks and whole nets, built statically from genomes.

The cell semantics of SPEC §4 are written once, in `cell_dataflow`, over a callback
that runs one parameterised op. The static `Cell` module passes a callback that creates
named submodules; the stage-1/2 supernet passes one that runs the same op modules on
weights from its per-layer bank, so both execute exactly the same computation.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from autospace_jax import counting
from autospace_jax import genome as genome_lib
from autospace_jax import netspec
from autospace_jax import ops

Array = jax.Array
# He-normal over fan-out, as ProxylessNAS initialises its convolutions.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BatchNorm(nn.Module):
  """Flax's BatchNorm (same variables, statistics and running averages) fused with an
  optional ReLU6, its training-mode gradient written by hand (`ops.batch_norm_train`)."""

  momentum: float = 0.9
  epsilon: float = 1e-3
  relu6: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
    variance = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
    if not train:
      return ops.batch_norm_inference(x, mean.value, variance.value, scale, bias,
                                      self.epsilon, self.relu6).astype(self.dtype)
    y, batch_mean, batch_variance = ops.batch_norm_train(x, scale, bias, self.epsilon,
                                                         self.relu6)
    if not self.is_initializing():
      mean.value = self.momentum * mean.value + (1.0 - self.momentum) * batch_mean
      variance.value = self.momentum * variance.value + (1.0 - self.momentum) * batch_variance
    return y.astype(self.dtype)


class BNConfig(nn.Module):
  """Mixin fields shared by every module that owns a BatchNorm."""

  bn_momentum: float = 0.9  # Flax convention: 1 - PyTorch momentum.
  bn_epsilon: float = 1e-3
  dtype: Any = jnp.float32

  def batch_norm(self, x: Array, train: bool, relu6: bool, name: str = "bn") -> Array:
    return BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon, relu6=relu6,
                     dtype=self.dtype, name=name)(x, train)


class ConvBN(BNConfig):
  """Dense k x k convolution, BN, optional ReLU6: the stem and the head's 1x1 mix."""

  features: int = 32
  kernel_size: int = 3
  stride: int = 1
  activation: bool = True

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    k = self.param("kernel", conv_init, (self.kernel_size, self.kernel_size, x.shape[-1],
                                         self.features))
    return self.batch_norm(ops.conv2d(x.astype(self.dtype), k, self.stride), train,
                           relu6=self.activation)


class Expand(BNConfig):
  """Node 0: 1x1 expansion to C_mid, BN, ReLU6."""

  features: int = 16

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    k = self.param("kernel", conv_init, (x.shape[-1], self.features))
    return self.batch_norm(ops.pointwise_conv(x.astype(self.dtype), k), train, relu6=True)


class DepthwiseBN(BNConfig):
  """A conv edge: depthwise k x k (padded k // 2), BN, ReLU6."""

  kernel_size: int = 3
  stride: int = 1

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    k = self.param("kernel", conv_init, (self.kernel_size, self.kernel_size, x.shape[-1]))
    y = ops.depthwise_conv(x.astype(self.dtype), k, self.stride)
    return self.batch_norm(y, train, relu6=True)


class ChannelAttention(nn.Module):
  """Mix gene 1: softmax over inputs per channel of FC_n(ReLU(FC(GAP(sum))))."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, *inputs: Array, train: bool = True) -> Array:
    del train
    c_mid = inputs[0].shape[-1]
    z = jnp.mean(sum(inputs), axis=(1, 2))
    z = nn.relu(nn.Dense(counting.attention_width(c_mid), dtype=self.dtype, name="squeeze")(z))
    logits = jnp.stack([nn.Dense(c_mid, dtype=self.dtype, name=f"select_{n}")(z)
                        for n in range(len(inputs))], axis=0)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=0).astype(inputs[0].dtype)
    return sum(w[:, None, None, :] * x for w, x in zip(weights, inputs))


class SqueezeExcite(nn.Module):
  """SE after the depthwise stage: x * sigmoid(FC(ReLU(FC(GAP(x)))))."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    del train
    z = nn.relu(nn.Dense(counting.se_width(x.shape[-1]), dtype=self.dtype, name="squeeze")(
        jnp.mean(x, axis=(1, 2))))
    gate = jax.nn.sigmoid(nn.Dense(x.shape[-1], dtype=self.dtype, name="excite")(z))
    return x * gate[:, None, None, :]


class Project(BNConfig):
  """Output: 1x1 projection to C_out and BN, no activation."""

  features: int = 16

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    k = self.param("kernel", conv_init, (x.shape[-1], self.features))
    return self.batch_norm(ops.pointwise_conv(x.astype(self.dtype), k), train, relu6=False)


# apply_op(name, module_class, module_kwargs, *inputs) -> output
ApplyOp = Callable[..., Array]


def add_all(*inputs: Array) -> Array:
  """A node's sum of its incoming edges."""
  return sum(inputs[1:], inputs[0])


def cell_dataflow(genome: genome_lib.Genome, x: Array, out_channels: int, stride: int,
                  se: bool, apply_op: ApplyOp, add: Callable[..., Array] = add_all,
                  subsample: Callable[[Array, int], Array] = ops.subsample) -> Array:
  """SPEC §4 cell semantics; ``apply_op`` runs each parameterised op by its name, ``add``
  sums a node's inputs and ``subsample`` is the strided identity edge (the supernet
  passes its own, which record themselves for the backward pass)."""
  c_mid = genome.expansion * x.shape[-1]
  nodes = {0: apply_op("expand", Expand, {"features": c_mid}, x) if genome.expansion > 1
           else x}
  for node in (1, 2, 3):
    inputs = []
    for source, code in genome.in_edges(node):
      edge_stride = stride if source == 0 else 1
      if code == genome_lib.IDENTITY:
        inputs.append(subsample(nodes[source], edge_stride))
      else:
        inputs.append(apply_op(f"edge_{source}{node}_k{code}", DepthwiseBN,
                               {"kernel_size": code, "stride": edge_stride}, nodes[source]))
    if genome.uses_attention(node):
      nodes[node] = apply_op(f"attention_{node}", ChannelAttention, {}, *inputs)
    else:
      nodes[node] = add(*inputs) if len(inputs) > 1 else inputs[0]
  hidden = nodes[3]
  if se:
    hidden = apply_op("se", SqueezeExcite, {}, hidden)
  return apply_op("project", Project, {"features": out_channels}, hidden)


BN_MODULES = (ConvBN, Expand, DepthwiseBN, Project)


class Cell(BNConfig):
  """A static cell: the genome's DAG with named submodules (no conditionals)."""

  genome: genome_lib.Genome = genome_lib.REFERENCE
  out_channels: int = 16
  stride: int = 1
  se: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    def apply_op(name, module_class, kwargs, *inputs):
      if module_class in BN_MODULES:
        kwargs = dict(kwargs, bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon)
      return module_class(**kwargs, dtype=self.dtype, name=name)(*inputs, train=train)

    return cell_dataflow(self.genome, x, self.out_channels, self.stride, self.se, apply_op)


def zero_output(x: Array, out_channels: int, stride: int) -> Array:
  """The Zero op: zeros of the block's output shape."""
  b, h, w, _ = x.shape
  return jnp.zeros((b, -(-h // stride), -(-w // stride), out_channels), x.dtype)


class Block(BNConfig):
  """One MobileInvertedResidualBlock: a cell (or Zero) plus the identity shortcut."""

  layer: netspec.LayerSpec = None
  se: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    spec = self.layer
    if spec.op == netspec.ZERO:
      y = zero_output(x, spec.out_channels, spec.stride)
    else:
      y = Cell(genome=spec.op, out_channels=spec.out_channels, stride=spec.stride, se=self.se,
               bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype,
               name="cell")(x, train)
    return x + y if spec.has_shortcut else y


class Stem(BNConfig):
  """conv 3x3 stride 2, BN, ReLU6."""

  features: int = 32

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    return ConvBN(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype,
                  features=self.features, kernel_size=3, stride=2, name="conv")(x, train)


class Head(BNConfig):
  """conv 1x1 to 1280, BN, ReLU6, global average pool, FC to the classes."""

  features: int = 1280
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    x = ConvBN(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype,
               features=self.features, kernel_size=1, name="feature_mix")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x).astype(
        jnp.float32)


def bn_kwargs(spec: netspec.NetSpec) -> dict[str, float]:
  """Flax BN settings from a net spec (which uses the PyTorch momentum convention)."""
  return {"bn_momentum": 1.0 - spec.bn_momentum, "bn_epsilon": spec.bn_eps}


class Net(nn.Module):
  """A whole static network from a `NetSpec` (stage 3, and the single-path baseline)."""

  spec: netspec.NetSpec
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    bn = bn_kwargs(self.spec)
    x = Stem(**bn, dtype=self.dtype, features=self.spec.stem_channels, name="stem")(x, train)
    for i, layer in enumerate(self.spec.layers):
      x = Block(**bn, dtype=self.dtype, layer=layer, se=self.spec.se, name=f"block_{i}")(
          x, train)
    return Head(**bn, dtype=self.dtype, features=self.spec.head_channels,
                num_classes=self.spec.num_classes, name="head")(x, train)


def count_params(params: Any) -> int:
  """Number of trainable parameters in a params pytree."""
  return int(sum(p.size for p in jax.tree.leaves(params)))


def _fan(shape: tuple[int, ...], mode: str) -> int:
  """Fans as jax.nn.initializers computes them (in axis -2, out axis -1)."""
  receptive = int(np.prod(shape[:-2]))
  return shape[-2 if mode == "fan_in" else -1] * receptive


def _initial_value(path: tuple[str, ...], leaf: jax.ShapeDtypeStruct,
                   rng: np.random.Generator) -> np.ndarray:
  """A NumPy draw from the distribution the Flax modules above initialise with.

  Conv kernels (Flax: `cells.conv_init`, He normal over fan-out) and Dense kernels (Flax's
  default LeCun truncated normal) are the only random leaves; BN scales and variances
  start at one, biases and means at zero. Dense layers are always submodules of an op and
  have 2-D kernels, which tells them apart from the ops' own 1x1 conv kernels.
  """
  shape, name = leaf.shape, path[-1]
  if name in ("scale", "var"):
    return np.ones(shape, leaf.dtype)
  if name in ("bias", "mean"):
    return np.zeros(shape, leaf.dtype)
  if name != "kernel":
    raise ValueError(f"no host initialiser for parameter {'/'.join(path)}")
  is_dense = len(shape) == 2 and len(path) > 2  # (collection, submodule, ..., 'kernel')
  if not is_dense:
    return (rng.standard_normal(shape) * np.sqrt(2.0 / _fan(shape, "fan_out"))).astype(
        leaf.dtype)
  draws = rng.standard_normal(shape)
  while np.any(outside := np.abs(draws) > 2.0):  # truncate at two standard deviations
    draws[outside] = rng.standard_normal(int(outside.sum()))
  stddev = np.sqrt(1.0 / _fan(shape, "fan_in")) / 0.87962566103423978
  return (draws * stddev).astype(leaf.dtype)


def host_init(abstract_variables: Any, rng: np.random.Generator) -> Any:
  """Initial variables for the shapes of ``abstract_variables``, drawn on the host.

  Flax's `init` under jit compiles an RNG program per module variant (~0.5 s each on
  XLA:CPU: a minute for a supernet bank of hundreds of op variants, seconds per net);
  these NumPy draws from the same distributions take milliseconds. (`device_put`, since
  an eager `jnp.asarray` compiles a staging program per shape.)
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jax.device_put(
          _initial_value(tuple(p.key for p in path), leaf, rng)),
      abstract_variables)


def init_net(spec: netspec.NetSpec, rng: np.random.Generator, batch_size: int = 1,
             dtype: Any = jnp.float32) -> tuple[Net, dict]:
  """Build a `Net` and its (host-drawn) variables for ``spec`` at its declared resolution."""
  model = Net(spec, dtype=dtype)
  x = jax.ShapeDtypeStruct((batch_size, spec.resolution, spec.resolution, 3), jnp.float32)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
  return model, host_init(abstract, rng)
