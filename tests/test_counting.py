"""Analytic params/MAdds (SPEC §4) and the `python -m autospace_jax.count` CLI."""

import dataclasses
import subprocess
import sys

import pytest

from autospace_jax import counting
from autospace_jax import genome as genome_lib
from autospace_jax import netspec
from autospace_jax.counting import Cost
from autospace_jax.genome import Genome
from conftest import ROOT, reference_file


NET_340M = reference_file("autospace_net_340M.config")


def genome(edges: dict, expansion: int, mix=(0, 0)) -> Genome:
  return Genome(tuple(edges.get(e, genome_lib.NONE) for e in genome_lib.EDGES),
                genome_lib.EXPANSION_RATIOS.index(expansion), mix)


def run_count(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "autospace_jax.count", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)


# --- Reference figures ----------------------------------------------------------------------


def test_mobilenet_v2_counts_exactly_as_published():
  assert counting.net_cost(netspec.mobilenet_v2()) == Cost(3_504_872, 300_774_272)


def test_net_cost_is_stem_plus_blocks_plus_head():
  spec = netspec.load_net(NET_340M)
  parts = [counting.stem_cost(spec), *counting.block_costs(spec), counting.head_cost(spec)]
  assert counting.net_cost(spec) == counting.total(parts)


# --- Hand-computed cells --------------------------------------------------------------------


def test_irb_cell_counts_expand_depthwise_project():
  # IRB k3 e6, 16 -> 24, stride 2, 8x8 input: C_mid 96, output 4x4.
  expand = Cost(16 * 96 + 2 * 96, 16 * 96 * 8 * 8)
  depthwise = Cost(9 * 96 + 2 * 96, 9 * 96 * 4 * 4)
  project = Cost(96 * 24 + 2 * 24, 96 * 24 * 4 * 4)
  assert counting.cell_cost(genome_lib.irb(3, 6), 16, 24, 2, 8) == counting.total(
      [expand, depthwise, project])


def test_attention_node_adds_squeeze_fc_and_one_fc_per_input():
  # e3, 8 -> 8, stride 1, 4x4: C_mid 24, r = max(24 // 4, 8) = 8; node 2 mixes 2 inputs.
  g = genome({(0, 1): 3, (0, 2): 5, (1, 2): 2, (2, 3): 3}, 3, mix=(1, 0))
  expand = Cost(8 * 24 + 48, 8 * 24 * 16)
  dw3 = Cost(9 * 24 + 48, 9 * 24 * 16)
  dw5 = Cost(25 * 24 + 48, 25 * 24 * 16)
  squeeze = Cost(24 * 8 + 8, 24 * 8)
  select = Cost(8 * 24 + 24, 8 * 24)
  project = Cost(24 * 8 + 16, 24 * 8 * 16)
  assert counting.cell_cost(g, 8, 8, 1, 4) == counting.total(
      [expand, dw3, dw5, dw3, squeeze, select, select, project])


def test_mix_gene_on_a_single_input_node_costs_nothing():
  plain = genome({(0, 1): 3, (0, 2): 5, (1, 2): 2, (2, 3): 3}, 6)
  mixed = dataclasses.replace(plain, mix=(0, 1))  # node 3 has one in-edge: plain sum.
  assert counting.cell_cost(mixed, 16, 16, 1, 8) == counting.cell_cost(plain, 16, 16, 1, 8)


def test_identity_edge_from_node_0_subsamples_for_free_at_stride_2():
  # e6, 8 -> 16, stride 2, 8x8: expansion at 8x8, the 1->2 conv and projection at 4x4.
  g = genome({(0, 1): 2, (1, 2): 3, (2, 3): 2}, 6)
  expand = Cost(8 * 48 + 96, 8 * 48 * 64)
  depthwise = Cost(9 * 48 + 96, 9 * 48 * 16)
  project = Cost(48 * 16 + 32, 48 * 16 * 16)
  assert counting.cell_cost(g, 8, 16, 2, 8) == counting.total([expand, depthwise, project])


def test_same_padding_rounds_odd_sizes_up():
  # e1 has no expansion, so a 7x7 input at stride 2 costs exactly like an 8x8 one (4x4 out).
  irb = genome_lib.irb(3, 1)
  assert counting.cell_cost(irb, 8, 8, 2, 7) == counting.cell_cost(irb, 8, 8, 2, 8)
  assert counting.cell_cost(irb, 8, 8, 2, 7).madds == 9 * 8 * 16 + 8 * 8 * 16


def test_se_adds_two_fcs_with_bias_at_ratio_one_quarter():
  # C_mid 96 -> SE width 24.
  irb = genome_lib.irb(3, 6)
  with_se = counting.cell_cost(irb, 16, 24, 2, 8, se=True)
  without = counting.cell_cost(irb, 16, 24, 2, 8)
  assert with_se.params - without.params == (96 * 24 + 24) + (24 * 96 + 96)
  assert with_se.madds - without.madds == 2 * 96 * 24
  assert counting.se_width(16) == 8  # never below 8


def test_net_se_flag_adds_se_to_every_non_zero_block():
  spec = netspec.load_net(NET_340M)
  with_se = dataclasses.replace(spec, se=True)
  extra = [counting.layer_cost(layer, 8, se=True).params - counting.layer_cost(layer, 8).params
           for layer in spec.layers]
  assert counting.net_cost(with_se).params - counting.net_cost(spec).params == sum(extra)
  assert all((e > 0) == (layer.kind != "zero") for e, layer in zip(extra, spec.layers))


def test_zero_layer_costs_nothing():
  layer = netspec.LayerSpec(24, 24, 1, netspec.ZERO, "zero")
  assert counting.layer_cost(layer, 56, se=True) == Cost(0, 0)


def test_cell_madds_matches_cell_cost_and_is_cached():
  g = genome({(0, 1): 5, (1, 2): 3, (1, 3): 2, (2, 3): 2}, 3, mix=(0, 1))
  counting.cell_madds.cache_clear()
  assert counting.cell_madds(g, 40, 80, 2, 28) == counting.cell_cost(g, 40, 80, 2, 28).madds
  counting.cell_madds(g, 40, 80, 2, 28)
  assert counting.cell_madds.cache_info().hits == 1


# --- CLI ------------------------------------------------------------------------------------


def test_count_cli_ends_with_params_and_madds_of_the_net():
  result = run_count(str(NET_340M))
  assert result.returncode == 0, result.stderr
  cost = counting.net_cost(netspec.load_net(NET_340M))
  assert result.stdout.splitlines()[-1] == f"params={cost.params} madds={cost.madds}"


def test_count_cli_prints_one_row_per_block():
  lines = run_count(str(NET_340M)).stdout.splitlines()
  spec = netspec.load_net(NET_340M)
  rows = [line.split() for line in lines if line.split()[0].isdigit()]
  assert [(int(r[0]), r[1]) for r in rows] == [(i, l.kind) for i, l in enumerate(spec.layers)]


def test_count_cli_overrides_resolution_and_classes():
  result = run_count(str(NET_340M), "--resolution", "160", "--num-classes", "10")
  spec = dataclasses.replace(netspec.load_net(NET_340M), resolution=160, num_classes=10)
  cost = counting.net_cost(spec)
  assert result.stdout.splitlines()[-1] == f"params={cost.params} madds={cost.madds}"


@pytest.mark.parametrize("content, message", [
    ('{"name": "ProxylessNASNets", ', "not valid JSON"),
    ('{"name": "SuperProxylessNASNets", "blocks": []}', "expected 'ProxylessNASNets'"),
])
def test_count_cli_reports_a_malformed_file_in_one_line(tmp_path, content, message):
  path = tmp_path / "net.json"
  path.write_text(content)
  result = run_count(str(path))
  assert result.returncode == 2
  assert result.stdout == ""
  assert len(result.stderr.splitlines()) == 1
  assert result.stderr.startswith(f"error: {path}: ") and message in result.stderr


def test_count_cli_reports_a_missing_file_in_one_line(tmp_path):
  result = run_count(str(tmp_path / "missing.json"))
  assert result.returncode == 2
  assert result.stderr.startswith("error: ") and "missing.json" in result.stderr
  assert len(result.stderr.splitlines()) == 1
