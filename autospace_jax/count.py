"""Count a net file: ``python -m autospace_jax.count NET_JSON [--resolution R] [--num-classes N]``.

Prints one row per block (index, kind, channels, stride, params, MAdds) between the stem and
head rows, then as the last line ``params=<int> madds=<int>`` so scripts can parse it. A
missing or malformed file prints one ``error: ...`` line to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

from autospace_jax import counting
from autospace_jax import netspec

ROW = "{:>5}  {:<6}  {:>14}  {:>6}  {:>10}  {:>13}"


def positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
  return value


def format_table(spec: netspec.NetSpec) -> list[str]:
  """The per-block table and the final ``params=... madds=...`` line."""
  stem, head = counting.stem_cost(spec), counting.head_cost(spec)
  blocks = counting.block_costs(spec)
  lines = [ROW.format("block", "kind", "channels", "stride", "params", "madds"),
           ROW.format("", "stem", f"3->{spec.stem_channels}", 2, stem.params, stem.madds)]
  for i, (layer, cost) in enumerate(zip(spec.layers, blocks)):
    lines.append(ROW.format(i, layer.kind, f"{layer.in_channels}->{layer.out_channels}",
                            layer.stride, cost.params, cost.madds))
  head_channels = f"{spec.layers[-1].out_channels}->{spec.head_channels}->{spec.num_classes}"
  lines.append(ROW.format("", "head", head_channels, 1, head.params, head.madds))
  cost = counting.total([stem, *blocks, head])
  lines.append(f"params={cost.params} madds={cost.madds}")
  return lines


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m autospace_jax.count",
                                   description="Params and MAdds of an official net file.")
  parser.add_argument("net_json", help="a ProxylessNASNets JSON file")
  parser.add_argument("--resolution", type=positive_int,
                      help="input size (default: the file's, or 224)")
  parser.add_argument("--num-classes", type=positive_int,
                      help="classes (default: the file's)")
  args = parser.parse_args(argv)
  try:
    spec = netspec.load_net(args.net_json)
  except (OSError, netspec.NetFormatError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  overrides = {"resolution": args.resolution, "num_classes": args.num_classes}
  spec = dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})
  print("\n".join(format_table(spec)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
