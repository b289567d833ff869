"""The static network description and the official JSON formats (SPEC §2, §7, §9).

A `NetSpec` is a whole macro-network: stem, the blocks (the fixed first block, then one
per searchable layer), head and classifier. Stage 3 trains it, `counting` costs it, and it
reads and writes the authors' `ProxylessNASNets` JSON, so the authors' 340M net can be
loaded here and the nets found here can be read by the PyTorch ProxylessNAS tools. A learned
space (per layer a list of genomes) uses the authors' `SuperProxylessNASNets` format.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

from etils import epath

from autospace_jax import files
from autospace_jax import genome as genome_lib
from autospace_jax.genome import Genome

ZERO = "zero"  # The Zero op: the block outputs zeros, only its shortcut remains.
Op = Genome | str  # a genome or ZERO
KINDS = ("motif", "mbconv", "zero")

STEM_CHANNELS = 32
FIRST_BLOCK_CHANNELS = 16
HEAD_CHANNELS = 1280
STAGE_WIDTHS = (24, 40, 80, 96, 192, 320)
STAGE_STRIDES = (2, 2, 2, 1, 2, 1)
LAYERS_PER_STAGE = (4, 4, 4, 4, 4, 1)
# MobileNetV2-1.0 as (expansion t, channels c, layers n, first stride s), stem 32, head 1280.
MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))
DEFAULT_RESOLUTION = 224
NET_NAME = "ProxylessNASNets"
SPACE_NAME = "SuperProxylessNASNets"


class NetFormatError(ValueError):
  """A net or space description that cannot be read; the message names the file, field
  or block at fault."""


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One MobileInvertedResidualBlock: channels, stride, its op and how JSON writes it."""

  in_channels: int
  out_channels: int
  stride: int
  op: Op
  kind: str  # 'motif' | 'mbconv' | 'zero': how the block is written to JSON.

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"layer kind {self.kind!r} is not one of {KINDS}")
    if (self.kind == "zero") != (self.op == ZERO):
      raise ValueError(f"a layer of kind {self.kind!r} cannot hold op {self.op!r}")
    if self.kind == "mbconv" and not is_irb(self.op):
      raise ValueError(f"an 'mbconv' layer needs an IRB genome, got {self.op.describe()}")

  @property
  def has_shortcut(self) -> bool:
    """The identity shortcut of SPEC §2: stride 1 and unchanged channels."""
    return self.stride == 1 and self.in_channels == self.out_channels


@dataclasses.dataclass(frozen=True)
class NetSpec:
  """A whole static network; ``layers[0]`` is the fixed first block (32->16, e1 k3)."""

  layers: tuple[LayerSpec, ...]
  stem_channels: int = STEM_CHANNELS
  head_channels: int = HEAD_CHANNELS
  num_classes: int = 1000
  resolution: int = DEFAULT_RESOLUTION
  bn_momentum: float = 0.1  # PyTorch convention (Flax: 1 - momentum).
  bn_eps: float = 1e-3
  se: bool = False


def is_irb(op: Op) -> bool:
  """Whether ``op`` is an inverted-residual block, i.e. writable as MBInvertedConvLayer."""
  if not isinstance(op, Genome):
    return False
  kernel = op.edge(0, 1)
  return kernel in genome_lib.CONV_CODES and op == genome_lib.irb(kernel, op.expansion)


def block_kind(op: Op) -> str:
  """How a searched layer is written: an IRB as MBInvertedConvLayer (which stock
  ProxylessNAS tools read), any other cell as Motif, Zero as ZeroLayer."""
  return "zero" if op == ZERO else "mbconv" if is_irb(op) else "motif"


# --- Skeleton (SPEC §2) -------------------------------------------------------------------


def make_divisible(channels: float, divisor: int = 8) -> int:
  """MobileNet's rounding: nearest multiple of ``divisor``, at least ``divisor`` and not
  below 90% of ``channels``."""
  rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * channels else rounded


def stem_channels(width_multiplier: float = 1.0) -> int:
  return make_divisible(STEM_CHANNELS * width_multiplier)


def first_block_channels(width_multiplier: float = 1.0) -> int:
  return make_divisible(FIRST_BLOCK_CHANNELS * width_multiplier)


def _check_layers_per_stage(layers_per_stage: Sequence[int]) -> None:
  if len(layers_per_stage) != len(STAGE_WIDTHS) or any(n < 1 for n in layers_per_stage):
    raise ValueError(f"layers_per_stage must be {len(STAGE_WIDTHS)} counts >= 1, "
                     f"got {tuple(layers_per_stage)}")


def skeleton_shapes(width_multiplier: float = 1.0,
                    layers_per_stage: Sequence[int] = LAYERS_PER_STAGE
                    ) -> list[tuple[int, int, int]]:
  """(c_in, c_out, stride) of every searchable layer; the head's 1280 is never scaled."""
  _check_layers_per_stage(layers_per_stage)
  shapes = []
  c_in = first_block_channels(width_multiplier)
  for width, stride, count in zip(STAGE_WIDTHS, STAGE_STRIDES, layers_per_stage):
    c_out = make_divisible(width * width_multiplier)
    for i in range(count):
      shapes.append((c_in, c_out, stride if i == 0 else 1))
      c_in = c_out
  return shapes


def is_stage_first(layer_index: int, layers_per_stage: Sequence[int] = LAYERS_PER_STAGE
                   ) -> bool:
  """Whether searchable layer ``layer_index`` opens its stage (no Zero allowed there)."""
  start = 0
  for count in layers_per_stage:
    if layer_index == start:
      return True
    start += count
  return False


def first_block(width_multiplier: float = 1.0) -> LayerSpec:
  """The fixed first block: MBConv expand 1, k3, stem -> 16 channels, stride 1."""
  return LayerSpec(stem_channels(width_multiplier), first_block_channels(width_multiplier), 1,
                   genome_lib.irb(3, 1), "mbconv")


def build_net(ops: Sequence[Op], width_multiplier: float = 1.0,
              layers_per_stage: Sequence[int] = LAYERS_PER_STAGE, num_classes: int = 1000,
              resolution: int = DEFAULT_RESOLUTION, se: bool = False) -> NetSpec:
  """The skeleton of SPEC §2 with ``ops`` (genomes or ZERO) in its searchable layers."""
  shapes = skeleton_shapes(width_multiplier, layers_per_stage)
  if len(ops) != len(shapes):
    raise ValueError(f"{len(ops)} ops for {len(shapes)} searchable layers")
  layers = [first_block(width_multiplier)] + [
      LayerSpec(c_in, c_out, stride, op, "zero" if op == ZERO else "motif")
      for (c_in, c_out, stride), op in zip(shapes, ops)]
  return NetSpec(tuple(layers), stem_channels(width_multiplier), HEAD_CHANNELS, num_classes,
                 resolution, se=se)


def mobilenet_v2(num_classes: int = 1000, resolution: int = DEFAULT_RESOLUTION) -> NetSpec:
  """MobileNetV2-1.0 written as IRB genomes (the counting reference of SPEC §4)."""
  layers, c_in = [], STEM_CHANNELS
  for expansion, c_out, count, stride in MOBILENET_V2:
    for i in range(count):
      layers.append(LayerSpec(c_in, c_out, stride if i == 0 else 1,
                              genome_lib.irb(3, expansion), "mbconv"))
      c_in = c_out
  return NetSpec(tuple(layers), STEM_CHANNELS, HEAD_CHANNELS, num_classes, resolution)


def expand_space(space: Sequence[Sequence[Genome]],
                 layers_per_stage: Sequence[int]) -> list[list[Genome]]:
  """Per-layer cells for the skeleton. A space with one entry per layer is used as is; one
  with an entry per (stage, first-or-rest) group, like the official 11-layer file for the
  21-layer net, is shared within each group."""
  num_layers = sum(layers_per_stage)
  if len(space) == num_layers:
    return [list(c) for c in space]
  groups = [(s, 0) for s, n in enumerate(layers_per_stage)]
  groups += [(s, 1) for s, n in enumerate(layers_per_stage) if n > 1]
  groups.sort()
  if len(space) != len(groups):
    needs = (f"{num_layers}" if num_layers == len(groups) else
             f"{num_layers} (one per layer) or {len(groups)} (first and rest of each stage)")
    raise NetFormatError(f"the space has {len(space)} layers; the skeleton "
                         f"model.layers_per_stage={tuple(layers_per_stage)} needs {needs}")
  index = {g: i for i, g in enumerate(groups)}
  return [list(space[index[(s, int(j > 0))]]) for s, n in enumerate(layers_per_stage)
          for j in range(n)]


# --- Writing the official format ----------------------------------------------------------


def _conv_layer_json(in_channels: int, out_channels: int, kernel_size: int,
                     stride: int) -> dict[str, Any]:
  return {"name": "ConvLayer", "kernel_size": kernel_size, "stride": stride, "dilation": 1,
          "groups": 1, "bias": False, "has_shuffle": False, "in_channels": in_channels,
          "out_channels": out_channels, "use_bn": True, "act_func": "relu6",
          "dropout_rate": 0, "ops_order": "weight_bn_act"}


def _classifier_json(in_features: int, out_features: int) -> dict[str, Any]:
  return {"name": "LinearLayer", "in_features": in_features, "out_features": out_features,
          "bias": True, "use_bn": False, "act_func": None, "dropout_rate": 0,
          "ops_order": "weight_bn_act"}


def _identity_layer_json(channels: int) -> dict[str, Any]:
  return {"name": "IdentityLayer", "in_channels": channels, "out_channels": channels,
          "use_bn": False, "act_func": None, "dropout_rate": 0, "ops_order": "weight_bn_act"}


def _op_json(layer: LayerSpec, se: bool) -> dict[str, Any]:
  if layer.kind == "zero":
    return {"name": "ZeroLayer", "stride": layer.stride}
  g = layer.op
  if layer.kind == "mbconv":
    return {"name": "MBInvertedConvLayer", "in_channels": layer.in_channels,
            "out_channels": layer.out_channels, "kernel_size": g.edge(0, 1),
            "stride": layer.stride, "expand_ratio": g.expansion, "mid_channels": None,
            "has_se": se}
  return {"name": "Motif", "in_channels": layer.in_channels,
          "out_channels": layer.out_channels, "kernel_size": 3, "stride": layer.stride,
          "expand_ratio": g.expansion, "num_nodes": genome_lib.NUM_NODES,
          "build_graph": genome_lib.matrix_to_string(genome_lib.to_matrix(g)),
          "dim_conv_idx": g.expansion_index, "atten_mode": "channel",
          "feature_mix_mode_idx": list(g.mix), "has_se": se}


def net_to_json(spec: NetSpec) -> dict[str, Any]:
  """The official ProxylessNASNets dict, plus a top-level "resolution" key."""
  blocks = []
  for i, layer in enumerate(spec.layers):
    if layer.kind == "zero" and not layer.has_shortcut:
      raise NetFormatError(f"block {i}: a ZeroLayer needs the identity shortcut "
                           "(stride 1, in_channels == out_channels)")
    blocks.append({"name": "MobileInvertedResidualBlock",
                   "mobile_inverted_conv": _op_json(layer, spec.se),
                   "shortcut": (_identity_layer_json(layer.in_channels)
                                if layer.has_shortcut else None)})
  return {
      "name": NET_NAME,
      "bn": {"momentum": spec.bn_momentum, "eps": spec.bn_eps},
      "first_conv": _conv_layer_json(3, spec.stem_channels, 3, 2),
      "blocks": blocks,
      "feature_mix_layer": _conv_layer_json(spec.layers[-1].out_channels, spec.head_channels,
                                            1, 1),
      "classifier": _classifier_json(spec.head_channels, spec.num_classes),
      "resolution": spec.resolution,
  }


def space_to_json(space: Sequence[Sequence[Genome]]) -> dict[str, Any]:
  """The official SuperProxylessNASNets dict: per layer the list of cell matrices."""
  return {"name": SPACE_NAME,
          "blocks": [[genome_lib.to_matrix(g) for g in cells] for cells in space]}


def _write_json(d: dict[str, Any], path: str | os.PathLike) -> None:
  files.write_text(path, json.dumps(d, indent=4) + "\n")


NET_FILE = "net.json"  # the net a search found, or a training directory trains


def save_net(spec: NetSpec, path: str | os.PathLike) -> None:
  _write_json(net_to_json(spec), path)


def save_space(space: Sequence[Sequence[Genome]], path: str | os.PathLike) -> None:
  _write_json(space_to_json(space), path)


# --- Reading the official format ----------------------------------------------------------


def _field(obj: Any, key: str, where: str) -> Any:
  if not isinstance(obj, dict):
    raise NetFormatError(f"{where} must be a JSON object, got {type(obj).__name__}")
  if key not in obj:
    raise NetFormatError(f"{where}: missing key {key!r}")
  return obj[key]


def _int(obj: Any, key: str, where: str) -> int:
  value = _field(obj, key, where)
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise NetFormatError(f"{where}.{key} must be a positive integer, got {value!r}")
  return value


def _number(obj: Any, key: str, where: str) -> float:
  value = _field(obj, key, where)
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    raise NetFormatError(f"{where}.{key} must be a number, got {value!r}")
  return float(value)


def _expect(obj: Any, key: str, allowed: Any, where: str) -> Any:
  value = _field(obj, key, where)
  if value != allowed:
    raise NetFormatError(f"{where}.{key} is {value!r}, expected {allowed!r}")
  return value


def _check_supported(obj: Any, exported: dict[str, Any], where: str) -> None:
  """Fields that the exporter writes with one value, the only one the model implements
  (activation, BN, bias, dropout...), must have it when present: a net with another would
  silently train as a different one."""
  for key, value in exported.items():
    if key in obj and key not in _SIZE_FIELDS and obj[key] != value:
      raise NetFormatError(f"{where}.{key} is {obj[key]!r}; only {value!r} is supported")


_SIZE_FIELDS = ("in_channels", "out_channels", "in_features", "out_features")


def _conv_layer(d: dict, key: str, kernel_size: int, stride: int) -> tuple[int, int]:
  """(in_channels, out_channels) of the fixed ConvLayer ``key``, checking the rest."""
  conv = _field(d, key, "net")
  _expect(conv, "name", "ConvLayer", key)
  _expect(conv, "kernel_size", kernel_size, key)
  _expect(conv, "stride", stride, key)
  _check_supported(conv, _conv_layer_json(0, 0, kernel_size, stride), key)
  return _int(conv, "in_channels", key), _int(conv, "out_channels", key)


def _motif(conv: dict) -> Genome:
  """The genome of a Motif, checking the redundant fields against its build_graph."""
  where = "Motif"
  g = genome_lib.from_matrix(_field(conv, "build_graph", where))
  _expect(conv, "num_nodes", genome_lib.NUM_NODES, where)
  _expect(conv, "atten_mode", "channel", where)
  for key, value in (("dim_conv_idx", g.expansion_index), ("expand_ratio", g.expansion),
                     ("feature_mix_mode_idx", list(g.mix))):
    if _field(conv, key, where) != value:
      raise NetFormatError(f"Motif.{key} is {conv[key]!r} but build_graph says {value!r}")
  return g


def _block(block: Any, in_channels: int) -> tuple[LayerSpec, bool]:
  """One block read against the previous block's output channels; also its has_se."""
  _expect(block, "name", "MobileInvertedResidualBlock", "block")
  conv = _field(block, "mobile_inverted_conv", "block")
  shortcut = _field(block, "shortcut", "block")
  name = _field(conv, "name", "mobile_inverted_conv")
  if name == "ZeroLayer":
    if shortcut is None:
      raise NetFormatError("a ZeroLayer block needs an IdentityLayer shortcut")
    layer = LayerSpec(in_channels, in_channels, _int(conv, "stride", name), ZERO, "zero")
  elif name in ("MBInvertedConvLayer", "Motif"):
    c_in = _int(conv, "in_channels", name)
    if c_in != in_channels:
      raise NetFormatError(f"{name}.in_channels is {c_in} but the previous layer outputs "
                           f"{in_channels} channels")
    if name == "Motif":
      op, kind = _motif(conv), "motif"
    else:
      if _field(conv, "mid_channels", name) is not None:
        raise NetFormatError(f"{name}.mid_channels must be null (expand_ratio sets it)")
      op = genome_lib.irb(_int(conv, "kernel_size", name), _int(conv, "expand_ratio", name))
      kind = "mbconv"
    layer = LayerSpec(c_in, _int(conv, "out_channels", name), _int(conv, "stride", name), op,
                      kind)
  else:
    raise NetFormatError(f"mobile_inverted_conv.name is {name!r}, expected one of "
                         "'Motif', 'MBInvertedConvLayer', 'ZeroLayer'")
  if shortcut is None and layer.has_shortcut:
    raise NetFormatError("shortcut is null but the block keeps its shape (stride 1, "
                         "in == out channels); it needs an IdentityLayer shortcut")
  if shortcut is not None:
    _expect(shortcut, "name", "IdentityLayer", "shortcut")
    if not layer.has_shortcut:
      raise NetFormatError(f"an IdentityLayer shortcut needs stride 1 and equal channels, "
                           f"the block is {layer.in_channels}->{layer.out_channels} "
                           f"stride {layer.stride}")
    for key in ("in_channels", "out_channels"):
      _expect(shortcut, key, layer.in_channels, "shortcut")
  has_se = conv.get("has_se", False)
  if not isinstance(has_se, bool):
    raise NetFormatError(f"{name}.has_se must be true or false, got {has_se!r}")
  return layer, has_se


def net_from_json(d: Any) -> NetSpec:
  """A `NetSpec` from an official ProxylessNASNets dict (optional "resolution", default
  224); raises `NetFormatError` naming the field or block at fault."""
  _expect(d, "name", NET_NAME, "net")
  bn = _field(d, "bn", "net")
  momentum, eps = _number(bn, "momentum", "bn"), _number(bn, "eps", "bn")
  image_channels, channels = _conv_layer(d, "first_conv", 3, 2)
  if image_channels != 3:
    raise NetFormatError(f"first_conv.in_channels is {image_channels}, expected 3 (RGB)")
  stem = channels
  blocks = _field(d, "blocks", "net")
  if not isinstance(blocks, list) or not blocks:
    raise NetFormatError("net.blocks must be a non-empty list")
  layers, se_flags = [], set()
  for i, block in enumerate(blocks):
    try:
      layer, has_se = _block(block, channels)
    except (NetFormatError, genome_lib.GenomeError) as e:
      raise NetFormatError(f"block {i}: {e}") from None
    layers.append(layer)
    if layer.kind != "zero":
      se_flags.add(has_se)
    channels = layer.out_channels
  if len(se_flags) > 1:
    raise NetFormatError("has_se must be the same on every block")
  mix_in, head = _conv_layer(d, "feature_mix_layer", 1, 1)
  if mix_in != channels:
    raise NetFormatError(f"feature_mix_layer.in_channels is {mix_in} but the last block "
                         f"outputs {channels} channels")
  classifier = _field(d, "classifier", "net")
  _expect(classifier, "name", "LinearLayer", "classifier")
  _expect(classifier, "in_features", head, "classifier")
  _check_supported(classifier, _classifier_json(0, 0), "classifier")
  num_classes = _int(classifier, "out_features", "classifier")
  resolution = _int(d, "resolution", "net") if "resolution" in d else DEFAULT_RESOLUTION
  return NetSpec(tuple(layers), stem, head, num_classes, resolution, momentum, eps,
                 se_flags == {True})


def space_from_json(d: Any) -> list[list[Genome]]:
  """Per layer the genomes of an official SuperProxylessNASNets dict."""
  _expect(d, "name", SPACE_NAME, "space")
  blocks = _field(d, "blocks", "space")
  if not isinstance(blocks, list) or not blocks:
    raise NetFormatError("space.blocks must be a non-empty list of layers")
  space = []
  for i, cells in enumerate(blocks):
    if not isinstance(cells, list) or not cells:
      raise NetFormatError(f"layer {i}: must be a non-empty list of cell matrices")
    layer = []
    for j, matrix in enumerate(cells):
      try:
        layer.append(genome_lib.from_matrix(matrix))
      except genome_lib.GenomeError as e:
        raise NetFormatError(f"layer {i}, cell {j}: {e}") from None
    space.append(layer)
  return space


def _read_json(path: str | os.PathLike) -> Any:
  try:
    return json.loads(epath.Path(path).read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise NetFormatError(f"{os.fspath(path)}: not valid JSON ({e})") from None


def load_net(path: str | os.PathLike) -> NetSpec:
  """Read an official net file; errors name ``path``. A missing file raises OSError."""
  d = _read_json(path)
  try:
    return net_from_json(d)
  except NetFormatError as e:
    raise NetFormatError(f"{os.fspath(path)}: {e}") from None


def load_space(path: str | os.PathLike) -> list[list[Genome]]:
  """Read an official space file: per layer a list of genomes."""
  d = _read_json(path)
  try:
    return space_from_json(d)
  except NetFormatError as e:
    raise NetFormatError(f"{os.fspath(path)}: {e}") from None
