"""Analytic parameter and multiply-add counts from genomes (SPEC §4 counting convention).

params = every conv and FC weight, FC biases and 2 per BN channel; MAdds = multiply-adds of
convs and FCs only, a conv costing k²·(C_in/groups)·C_out·H_out·W_out with k // 2 padding
(H_out = ceil(H / stride) for odd k), an FC costing in·out per image. Pooling, activations,
sums and softmaxes are free. Counts come from the genome and the shape, never from XLA's
cost analysis (it counts 2x and skips padding). `cells.py` builds exactly the layers counted
here; the widths of its attention and SE modules must be `attention_width` and `se_width`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

from autospace_jax import genome as genome_lib
from autospace_jax.genome import Genome
from autospace_jax.netspec import LayerSpec, NetSpec

SE_RATIO = 0.25


class Cost(NamedTuple):
  params: int
  madds: int


def total(costs: Sequence[Cost]) -> Cost:
  return Cost(sum(c.params for c in costs), sum(c.madds for c in costs))


def out_size(size: int, stride: int) -> int:
  """Spatial size after an op of ``stride`` (odd kernels padded k // 2)."""
  return -(-size // stride)


def attention_width(c_mid: int) -> int:
  """Squeeze width r of a channel-attention node (SPEC §4)."""
  return max(c_mid // 4, 8)


def se_width(c_mid: int) -> int:
  """Squeeze width of the stage-3 SE module, ratio 0.25 (SPEC §7)."""
  return max(8, int(c_mid * SE_RATIO))


def conv_bn_cost(c_in: int, c_out: int, kernel_size: int, out_hw: int, groups: int = 1
                 ) -> Cost:
  """A bias-free conv followed by BN, producing an ``out_hw`` x ``out_hw`` map."""
  weights = kernel_size * kernel_size * (c_in // groups) * c_out
  return Cost(weights + 2 * c_out, weights * out_hw * out_hw)


def fc_cost(in_features: int, out_features: int) -> Cost:
  """A fully connected layer with bias."""
  return Cost(in_features * out_features + out_features, in_features * out_features)


def cell_cost(genome: Genome, c_in: int, c_out: int, stride: int, in_size: int,
              se: bool = False) -> Cost:
  """Cost of one cell (SPEC §4): expansion, depthwise edges, attention, SE, projection."""
  c_mid = genome.expansion * c_in
  size = out_size(in_size, stride)  # every node after node 0 is at the output resolution
  costs = []
  if genome.expansion > 1:
    costs.append(conv_bn_cost(c_in, c_mid, 1, in_size))
  for code in genome.edges:
    if code in genome_lib.CONV_CODES:
      costs.append(conv_bn_cost(c_mid, c_mid, code, size, groups=c_mid))
  for node in (2, 3):
    if genome.uses_attention(node):
      r = attention_width(c_mid)
      costs.append(fc_cost(c_mid, r))
      costs.extend(fc_cost(r, c_mid) for _ in genome.in_edges(node))
  if se:
    costs += [fc_cost(c_mid, se_width(c_mid)), fc_cost(se_width(c_mid), c_mid)]
  costs.append(conv_bn_cost(c_mid, c_out, 1, size))
  return total(costs)


@functools.lru_cache(maxsize=1 << 16)
def cell_madds(genome: Genome, c_in: int, c_out: int, stride: int, in_size: int) -> int:
  """MAdds of a cell without SE, memoised for evolution's constraint checks."""
  return cell_cost(genome, c_in, c_out, stride, in_size).madds


def layer_cost(layer: LayerSpec, in_size: int, se: bool = False) -> Cost:
  """Cost of one block; a Zero block and the identity shortcut cost nothing."""
  if layer.kind == "zero":
    return Cost(0, 0)
  return cell_cost(layer.op, layer.in_channels, layer.out_channels, layer.stride, in_size, se)


def stem_cost(spec: NetSpec) -> Cost:
  """conv 3x3 stride 2 from RGB, BN."""
  return conv_bn_cost(3, spec.stem_channels, 3, out_size(spec.resolution, 2))


def block_costs(spec: NetSpec) -> list[Cost]:
  """Cost of every block, each at the spatial size its input has."""
  size = out_size(spec.resolution, 2)
  costs = []
  for layer in spec.layers:
    costs.append(layer_cost(layer, size, spec.se))
    size = out_size(size, layer.stride)
  return costs


def head_cost(spec: NetSpec) -> Cost:
  """conv 1x1 to the head width, BN, then (after free pooling) the classifier FC."""
  size = out_size(spec.resolution, 2)
  for layer in spec.layers:
    size = out_size(size, layer.stride)
  return total([conv_bn_cost(spec.layers[-1].out_channels, spec.head_channels, 1, size),
                fc_cost(spec.head_channels, spec.num_classes)])


def net_cost(spec: NetSpec) -> Cost:
  """Whole-network params and MAdds."""
  return total([stem_cost(spec), *block_costs(spec), head_cost(spec)])
