"""Net description: the skeleton of SPEC §2 and the official JSON formats of SPEC §9."""

import copy
import json
import re

import pytest

from autospace_jax import genome as genome_lib
from autospace_jax import netspec
from autospace_jax.netspec import LayerSpec, NetFormatError
from conftest import reference_file


NET_340M = reference_file("autospace_net_340M.config")
SPACE = reference_file("autospace_search_space.config")
NET_JSON = json.loads(NET_340M.read_text())


def broken(edit) -> dict:
  """A copy of the 340M net dict after ``edit`` mutates it."""
  d = copy.deepcopy(NET_JSON)
  edit(d)
  return d


def conv(d: dict, block: int) -> dict:
  return d["blocks"][block]["mobile_inverted_conv"]


# --- The 340M net ---------------------------------------------------------------------------


def test_340m_net_loads_with_its_blocks_and_settings():
  spec = netspec.load_net(NET_340M)
  kinds = [layer.kind for layer in spec.layers]
  assert (len(kinds), kinds.count("motif"), kinds.count("mbconv"), kinds.count("zero")) == (
      22, 13, 3, 6)
  assert spec.layers[0] == netspec.first_block()
  assert (spec.stem_channels, spec.head_channels, spec.num_classes, spec.resolution) == (
      32, 1280, 1000, 224)
  assert (spec.bn_momentum, spec.bn_eps, spec.se) == (0.1, 0.006, False)


def test_340m_net_follows_the_skeleton():
  spec = netspec.load_net(NET_340M)
  shapes = [(l.in_channels, l.out_channels, l.stride) for l in spec.layers[1:]]
  assert shapes == netspec.skeleton_shapes()


def test_340m_net_re_exports_identically_plus_resolution():
  exported = netspec.net_to_json(netspec.load_net(NET_340M))
  assert exported.pop("resolution") == 224
  assert list(exported) == list(NET_JSON)
  for i, (ours, theirs) in enumerate(zip(exported["blocks"], NET_JSON["blocks"], strict=True)):
    assert json.dumps(ours) == json.dumps(theirs), f"block {i}"  # same keys, order, values
  for key in ("name", "bn", "first_conv", "feature_mix_layer", "classifier"):
    assert json.dumps(exported[key]) == json.dumps(NET_JSON[key]), key


def test_save_and_load_round_trip(tmp_path):
  ops = [genome_lib.irb(5, 3) if netspec.is_stage_first(i) else netspec.ZERO
         for i in range(21)]
  spec = netspec.build_net(ops, width_multiplier=0.5, num_classes=10, resolution=160, se=True)
  netspec.save_net(spec, tmp_path / "net.json")
  assert netspec.load_net(tmp_path / "net.json") == spec


def test_mobilenet_v2_is_written_as_mbconv_blocks():
  spec = netspec.mobilenet_v2()
  d = netspec.net_to_json(spec)
  assert {conv(d, i)["name"] for i in range(len(d["blocks"]))} == {"MBInvertedConvLayer"}
  assert netspec.net_from_json(d) == spec


def test_resolution_defaults_to_224_and_is_read_when_present():
  assert netspec.net_from_json(NET_JSON).resolution == 224
  assert netspec.net_from_json({**NET_JSON, "resolution": 192}).resolution == 192


# --- Skeleton -------------------------------------------------------------------------------


def test_skeleton_shapes_at_width_1():
  expected = [(16, 24, 2)] + [(24, 24, 1)] * 3 + [(24, 40, 2)] + [(40, 40, 1)] * 3 + [
      (40, 80, 2)] + [(80, 80, 1)] * 3 + [(80, 96, 1)] + [(96, 96, 1)] * 3 + [
          (96, 192, 2)] + [(192, 192, 1)] * 3 + [(192, 320, 1)]
  assert netspec.skeleton_shapes(1.0) == expected


def test_width_multiplier_rounds_to_multiples_of_8_but_keeps_the_head():
  assert netspec.skeleton_shapes(0.35, (1, 1, 1, 1, 1, 1)) == [
      (8, 8, 2), (8, 16, 2), (16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 112, 1)]
  spec = netspec.build_net([genome_lib.REFERENCE] * 6, 0.35, (1, 1, 1, 1, 1, 1))
  assert (spec.stem_channels, spec.head_channels) == (16, 1280)
  assert netspec.make_divisible(1.4 * 24) == 32  # 33.6 rounds to 32, which is >= 90%


def test_is_stage_first_marks_the_first_layer_of_each_stage():
  assert [i for i in range(21) if netspec.is_stage_first(i)] == [0, 4, 8, 12, 16, 20]
  assert [i for i in range(6) if netspec.is_stage_first(i, (2, 1, 1, 1, 1))] == [0, 2, 3, 4, 5]


def test_build_net_needs_one_op_per_searchable_layer():
  with pytest.raises(ValueError, match="20 ops for 21 searchable layers"):
    netspec.build_net([genome_lib.REFERENCE] * 20)


def test_shortcut_only_when_shape_is_kept():
  assert LayerSpec(24, 24, 1, genome_lib.REFERENCE, "motif").has_shortcut
  assert not LayerSpec(24, 24, 2, genome_lib.REFERENCE, "motif").has_shortcut
  assert not LayerSpec(24, 40, 1, genome_lib.REFERENCE, "motif").has_shortcut


def test_layer_kind_must_match_its_op():
  with pytest.raises(ValueError, match="IRB genome"):
    LayerSpec(24, 24, 1, genome_lib.from_matrix(NET_JSON["blocks"][6]["mobile_inverted_conv"][
        "build_graph"]), "mbconv")
  with pytest.raises(ValueError, match="cannot hold op"):
    LayerSpec(24, 24, 1, netspec.ZERO, "motif")


# --- Net format errors ----------------------------------------------------------------------


@pytest.mark.parametrize("edit, message", [
    (lambda d: conv(d, 5).update(in_channels=32),
     "block 5: Motif.in_channels is 32 but the previous layer outputs 24 channels"),
    (lambda d: d["feature_mix_layer"].update(in_channels=192),
     "feature_mix_layer.in_channels is 192 but the last block outputs 320 channels"),
    (lambda d: d["classifier"].update(in_features=1024),
     "classifier.in_features is 1024, expected 1280"),
    (lambda d: d["blocks"][2].update(shortcut=None),
     "block 2: shortcut is null but the block keeps its shape"),
    (lambda d: d["blocks"][1].update(shortcut=d["blocks"][2]["shortcut"]),
     "block 1: an IdentityLayer shortcut needs stride 1 and equal channels"),
    (lambda d: d["blocks"][3]["shortcut"].update(in_channels=40),
     "block 3: shortcut.in_channels is 40, expected 24"),
])
def test_channel_mismatches_name_the_block_or_field(edit, message):
  with pytest.raises(NetFormatError, match=message):
    netspec.net_from_json(broken(edit))


@pytest.mark.parametrize("edit, message", [
    (lambda d: conv(d, 1).update(name="SepConv"),
     "block 1: mobile_inverted_conv.name is 'SepConv', expected one of"),
    (lambda d: d["blocks"][1].update(name="ResBlock"),
     "block 1: block.name is 'ResBlock', expected 'MobileInvertedResidualBlock'"),
    (lambda d: conv(d, 1).pop("stride"), "block 1: Motif: missing key 'stride'"),
    (lambda d: d.pop("classifier"), "net: missing key 'classifier'"),
    (lambda d: conv(d, 1).update(
        build_graph="[[0, 0, 0, 2], [5, 0, 0, [0, 0]], [1, 1, 0, 0], [1, 1, 2, 0]]"),
     "block 1: chain edge 1->2 is `none`"),
    (lambda d: conv(d, 1).update(dim_conv_idx=1),
     "block 1: Motif.dim_conv_idx is 1 but build_graph says 2"),
    (lambda d: conv(d, 5).update(feature_mix_mode_idx=[0, 0]),
     r"block 5: Motif.feature_mix_mode_idx is \[0, 0\] but build_graph says \[1, 0\]"),
    (lambda d: conv(d, 2).update(kernel_size=4), "block 2: kernel size 4 is not one of"),
    (lambda d: conv(d, 2).update(stride="1"),
     "block 2: MBInvertedConvLayer.stride must be a positive integer"),
    (lambda d: conv(d, 3).update(stride=2), "block 3: an IdentityLayer shortcut needs stride 1"),
    (lambda d: d["blocks"][3].update(shortcut=None), "block 3: a ZeroLayer block needs"),
    (lambda d: conv(d, 1).update(has_se=True), "has_se must be the same on every block"),
    (lambda d: d["first_conv"].update(stride=1), "first_conv.stride is 1, expected 2"),
    (lambda d: d.update(resolution=0), "net.resolution must be a positive integer"),
    # Settings the model does not implement would otherwise train another net silently.
    (lambda d: d["feature_mix_layer"].update(act_func="h_swish"),
     "feature_mix_layer.act_func is 'h_swish'; only 'relu6' is supported"),
    (lambda d: d["first_conv"].update(use_bn=False),
     "first_conv.use_bn is False; only True is supported"),
    (lambda d: d["classifier"].update(dropout_rate=0.2),
     "classifier.dropout_rate is 0.2; only 0 is supported"),
])
def test_malformed_nets_are_rejected_with_one_clear_message(edit, message):
  with pytest.raises(NetFormatError, match=message):
    netspec.net_from_json(broken(edit))


def test_load_net_names_the_file(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(broken(lambda d: conv(d, 5).update(in_channels=32))))
  with pytest.raises(NetFormatError, match=f"^{re.escape(str(path))}: block 5: "):
    netspec.load_net(path)
  for text in (b"{", bytes(range(256))):  # cut short; not even text
    path.write_bytes(text)
    with pytest.raises(NetFormatError, match=f"^{re.escape(str(path))}: not valid JSON"):
      netspec.load_net(path)


def test_zero_layer_without_shortcut_cannot_be_written():
  spec = netspec.build_net([netspec.ZERO] * 21)
  with pytest.raises(NetFormatError, match="block 1: a ZeroLayer needs the identity shortcut"):
    netspec.net_to_json(spec)


# --- Learned space --------------------------------------------------------------------------


def test_load_space_gives_11_layers_of_9_genomes():
  space = netspec.load_space(SPACE)
  assert [len(cells) for cells in space] == [9] * 11
  assert all(isinstance(g, genome_lib.Genome) for cells in space for g in cells)


def test_space_re_exports_identically(tmp_path):
  original = json.loads(SPACE.read_text())
  space = netspec.load_space(SPACE)
  assert netspec.space_to_json(space) == original
  netspec.save_space(space, tmp_path / "space.json")
  assert netspec.load_space(tmp_path / "space.json") == space


def test_space_accepts_matrices_as_strings():
  d = json.loads(SPACE.read_text())
  d["blocks"] = [[genome_lib.matrix_to_string(m) for m in cells] for cells in d["blocks"]]
  assert netspec.space_from_json(d) == netspec.load_space(SPACE)


def test_bad_space_cell_names_layer_and_cell(tmp_path):
  d = json.loads(SPACE.read_text())
  d["blocks"][2][4][3][2] = 1  # chain edge 2->3 set to `none`
  path = tmp_path / "space.json"
  path.write_text(json.dumps(d))
  message = f"^{re.escape(str(path))}: layer 2, cell 4: chain edge 2->3"
  with pytest.raises(NetFormatError, match=message):
    netspec.load_space(path)
