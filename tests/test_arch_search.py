"""Stage 2: derived nets meet their MAdds targets, the arch loss is the SPEC's, and the
official 11-layer space file drives the 21-layer skeleton."""

import collections
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autospace_jax import arch_search
from autospace_jax import counting
from autospace_jax import genome as genome_lib
from autospace_jax import input_pipeline
from autospace_jax import metrics
from autospace_jax import netspec
from autospace_jax import presets
from autospace_jax import supernet
from conftest import reference_file, short_schedule, tiny_config
from test_precompile import OP_PROGRAMS, compiled_programs


def irb_search(tmp_path, target: int, config=None) -> arch_search.ArchSearch:
  config = config or presets.default()
  layers = sum(config.model.layers_per_stage)
  return arch_search.ArchSearch(config, str(tmp_path), arch_search.irb_space(layers), "irb",
                                arch_search.Target(target))


def net_madds(search: arch_search.ArchSearch, choice: list[int]) -> float:
  return search.fixed_madds + sum(search.candidate_madds[i, c] for i, c in enumerate(choice))


def reference_choice(search: arch_search.ArchSearch) -> list[int]:
  """IRB k3 e6 in every layer: the net that target fractions are fractions of."""
  return [ops.index(genome_lib.REFERENCE) for ops in search.candidates]


@pytest.mark.parametrize("fraction", presets.default().search.target_fractions)
def test_derived_net_lands_within_ten_percent_of_each_default_target(tmp_path, fraction):
  probe = irb_search(tmp_path, 1)
  target = int(round(fraction * net_madds(probe, reference_choice(probe))))
  search = irb_search(tmp_path, target)
  rng = np.random.default_rng(0)
  for _ in range(20):  # whatever α the search ends with
    alpha = rng.normal(scale=3.0, size=search.mask.shape)
    choice = arch_search.derive(alpha, search.mask, search.candidate_madds,
                                search.fixed_madds, target)
    assert all(search.mask[i, c] for i, c in enumerate(choice))
    assert abs(net_madds(search, choice) / target - 1) <= arch_search.MADDS_TOLERANCE
  os.makedirs(search.workdir)
  result = search.write_outputs(alpha)
  assert abs(result["madds_error"]) <= arch_search.MADDS_TOLERANCE
  net = netspec.load_net(os.path.join(search.workdir, netspec.NET_FILE))
  assert counting.net_cost(net).madds == result["madds"]  # the file is the reported net


def test_nets_from_the_irb_space_are_written_as_blocks_stock_proxylessnas_reads(tmp_path):
  search = irb_search(tmp_path, 1)
  os.makedirs(search.workdir)
  search.write_outputs(np.random.default_rng(0).normal(size=search.mask.shape))
  with open(os.path.join(search.workdir, netspec.NET_FILE)) as f:
    blocks = json.load(f)["blocks"]
  names = {block["mobile_inverted_conv"]["name"] for block in blocks[1:]}
  assert names <= {"MBInvertedConvLayer", "ZeroLayer"} and "MBInvertedConvLayer" in names


def test_derive_keeps_the_argmax_when_it_already_meets_the_target(tmp_path):
  search = irb_search(tmp_path, 1)
  choice = reference_choice(search)
  alpha = np.zeros(search.mask.shape)
  alpha[np.arange(len(choice)), choice] = 5.0
  target = int(net_madds(search, choice))
  assert arch_search.derive(alpha, search.mask, search.candidate_madds, search.fixed_madds,
                            target) == choice


def test_argmax_derivation_keeps_the_most_probable_cells_whatever_their_madds(tmp_path):
  config = presets.default()
  config.search.derive = "argmax"
  search = irb_search(tmp_path, 1, config)  # a target no net meets
  alpha = np.random.default_rng(0).normal(size=search.mask.shape)
  os.makedirs(search.workdir)
  result = search.write_outputs(alpha)
  assert result["choice"] == [int(np.argmax(np.where(m, a, -np.inf)))
                              for a, m in zip(alpha, search.mask)]
  assert result["derive"] == "argmax"


def test_unreachable_target_is_reported_with_the_space_range(tmp_path, caplog):
  search = irb_search(tmp_path, 1000)
  low, high = search.madds_range()
  assert low < high
  with caplog.at_level(logging.WARNING):
    search.warn_if_unreachable()
  assert f"{low:,} to {high:,}" in caplog.text
  caplog.clear()
  irb_search(tmp_path, (low + high) // 2).warn_if_unreachable()
  assert caplog.text == ""


def test_weights_learn_from_search_train_and_alpha_from_held_out_batches(tmp_path,
                                                                        monkeypatch):
  config = short_schedule(tiny_config(), warmup=0.1, main=0.2)  # 4 + 8 steps
  config.search.alpha_update_every = 3
  config.precompile_threads = 0
  layers = sum(config.model.layers_per_stage)
  space = [[genome_lib.REFERENCE, genome_lib.irb(5, 3)]] * layers
  search = arch_search.ArchSearch(config, str(tmp_path), space, "learned",
                                  arch_search.Target(10**6))
  drawn = collections.Counter()
  make_iterator = input_pipeline.make_iterator

  def counting_iterator(data, split, *args, **kwargs):
    for batch in make_iterator(data, split, *args, **kwargs):
      drawn[split] += 1
      yield batch

  monkeypatch.setattr(input_pipeline, "make_iterator", counting_iterator)
  calls = []
  train_step, loss_and_grads, apply_alpha = (search.trainer.train_step,
                                             search.trainer.loss_and_grads,
                                             search.trainer.apply_alpha)

  def recording_train_step(state, batch, candidates, path, train_alpha):
    calls.append(("weights", train_alpha))
    return train_step(state, batch, candidates, path, train_alpha)

  def recording_loss_and_grads(state, batch, candidates, path, train_alpha, **kwargs):
    calls.append(("alpha", train_alpha, kwargs.get("label_smoothing")))
    return loss_and_grads(state, batch, candidates, path, train_alpha, **kwargs)

  def checked_apply_alpha(state, alpha_grad, run):
    new = apply_alpha(state, alpha_grad, run)
    assert int(new.step) == int(state.step)  # the learning rate schedule does not move
    for old_leaf, new_leaf in zip(jax.tree.leaves((state.params, state.opt_state)),
                                  jax.tree.leaves((new.params, new.opt_state))):
      np.testing.assert_array_equal(old_leaf, new_leaf)
    assert not np.array_equal(new.alpha, state.alpha)
    return new

  monkeypatch.setattr(search.trainer, "train_step", recording_train_step)
  monkeypatch.setattr(search.trainer, "loss_and_grads", recording_loss_and_grads)
  monkeypatch.setattr(search.trainer, "apply_alpha", checked_apply_alpha)
  search.writer = metrics.MetricWriter(str(tmp_path), enabled=True)
  config.log_every_steps = 1
  search.run()
  search.writer.close()
  logged = metrics.read_jsonl(str(tmp_path / metrics.JSONL_FILE))
  assert [r["step"] for r in logged if "held_out_loss" in r] == list(range(7, 13))
  assert (search.warmup_steps, search.total_steps) == (4, 12)
  assert drawn == {"search_train": 12, "search_val": 2}  # α after weight steps 7 and 10
  assert calls.count(("weights", False)) == 12
  assert calls.count(("alpha", True, 0.0)) == 2  # ProxylessNAS's architecture loss: plain CE
  assert len(calls) == 14


def test_after_the_alpha_passes_an_alpha_step_compiles_no_supernet_program(tmp_path):
  # α steps run `loss_and_grads` with plain CE and update no weights: their passes must
  # compile those programs, not a weight step's.
  config = tiny_config()
  search = irb_search(tmp_path, 1, config)
  state = search.trainer.init(0, search.mask.shape[1])
  batch = next(input_pipeline.make_iterator(config.data, "search_val",
                                            config.search.batch_size, seed=0))
  for j in range(search.mask.shape[1]):
    search.compile_pass(state, batch, search.candidates,
                        [min(j, len(c) - 1) for c in search.candidates], True)
  names = compiled_programs()
  new_state, _ = search.alpha_step(state, 0, batch)
  jax.block_until_ready(new_state)
  assert [n for n in names if n in OP_PROGRAMS] == []


def test_each_candidate_has_its_own_weights_even_where_cells_share_op_names(tmp_path):
  config = tiny_config()
  search = irb_search(tmp_path, 1, config)
  state = search.trainer.init(0, search.mask.shape[1])
  k3e6, k5e6 = (search.candidates[0].index(genome_lib.irb(k, 6)) for k in (3, 5))
  batch = next(input_pipeline.make_iterator(config.data, "search_train",
                                            config.search.batch_size, seed=0))
  path = [k3e6] * len(search.candidates)
  new, _ = search.trainer.train_step(state, batch, search.candidates, path,
                                     train_alpha=False)
  old_bank, new_bank = (s.params["layers"][supernet.layer_name(0)] for s in (state, new))
  for entry in ("expand_e6", "project_e6"):  # names both IRBs' 1x1 convs have
    trained, other = f"slot{k3e6}_{entry}", f"slot{k5e6}_{entry}"
    assert not np.array_equal(old_bank[trained]["kernel"], new_bank[trained]["kernel"])
    np.testing.assert_array_equal(old_bank[other]["kernel"], new_bank[other]["kernel"])


def test_a_search_over_official_cells_gives_each_one_all_the_weights_it_runs(tmp_path):
  official = netspec.load_space(reference_file("autospace_search_space.config"))
  config = tiny_config()
  space = [official[0]] * sum(config.model.layers_per_stage)  # identity, strided, mixed
  search = arch_search.ArchSearch(config, str(tmp_path), space, "learned",
                                  arch_search.Target(10**6))
  params = search.trainer.init(0, search.mask.shape[1]).params
  for i, cells in enumerate(search.candidates):
    bank = params["layers"][supernet.layer_name(i)]
    for slot, op in enumerate(cells):
      if op != netspec.ZERO and search.mask[i, slot]:
        assert {supernet.slot_entry(search.spec, slot, e)
                for e in supernet.cell_entries(op)} <= set(bank)


def test_padding_slots_own_no_weights_and_proxyless_alpha_steps_do_not_run_them(tmp_path):
  config = tiny_config()
  config.search.estimator = "proxyless"
  config.model.layers_per_stage = (1, 2, 1, 1, 1, 1)  # one layer that may be Zero
  search = irb_search(tmp_path, 1, config)
  assert not search.mask.all()  # stage-first layers have no Zero: they are padded
  state = search.trainer.init(0, search.mask.shape[1])
  for i, cells in enumerate(search.candidates):
    bank = state.params["layers"][supernet.layer_name(i)]
    assert {e for e in bank} == {supernet.slot_entry(search.spec, slot, e)
                                 for slot, op in enumerate(cells)
                                 if search.mask[i, slot] and op != netspec.ZERO
                                 for e in supernet.cell_entries(op)}
  batch = next(input_pipeline.make_iterator(config.data, "search_val",
                                            config.search.batch_size, seed=0))
  _, loss = search.alpha_step(state, 0, batch)  # would look up the padding's weights
  assert np.isfinite(float(loss))


def test_arch_loss_is_cross_entropy_times_the_expected_madds_penalty():
  rng = np.random.default_rng(1)
  alpha = jnp.asarray(rng.normal(size=(4, 3)))
  mask = jnp.asarray([[True, True, True]] * 3 + [[True, True, False]])
  madds = jnp.asarray(rng.uniform(1e5, 1e6, size=(4, 3)))
  fixed, log_target, beta = 2e6, float(np.log(3e6)), 0.6

  probs = np.where(mask, np.exp(alpha), 0.0)
  probs /= probs.sum(-1, keepdims=True)
  expected = fixed + float(np.sum(probs * madds))
  penalty = arch_search.expected_madds_penalty(alpha, mask, madds, fixed, log_target, beta)
  np.testing.assert_allclose(penalty, (np.log(expected) / log_target) ** beta, rtol=1e-6)

  def cross_entropy(a):  # any differentiable stand-in for the supernet's CE(α)
    return jnp.sum(jnp.sin(a) * jnp.where(mask, 1.0, 0.0)) + 3.0

  def arch_loss(a):
    return cross_entropy(a) * arch_search.expected_madds_penalty(a, mask, madds, fixed,
                                                                 log_target, beta)

  got = arch_search.arch_gradient(alpha, cross_entropy(alpha), jax.grad(cross_entropy)(alpha),
                                  mask, madds, fixed, log_target, beta)
  np.testing.assert_allclose(got, jax.grad(arch_loss)(alpha), rtol=1e-5, atol=1e-9)


def test_penalty_pushes_alpha_toward_cheaper_cells_above_the_target():
  madds = jnp.asarray([[1e5, 9e5]])
  mask = jnp.asarray([[True, True]])
  grad = jax.grad(arch_search.expected_madds_penalty)(
      jnp.zeros((1, 2)), mask, madds, 1e6, float(np.log(1e6)), 0.6)
  assert grad[0, 1] > 0 > grad[0, 0]  # gradient descent lowers α of the expensive cell


def test_official_eleven_layer_space_file_fills_the_21_layer_skeleton():
  space = netspec.load_space(reference_file("autospace_search_space.config"))
  assert [len(cells) for cells in space] == [9] * 11
  lps = presets.imagenet().model.layers_per_stage
  expanded = netspec.expand_space(space, lps)
  assert len(expanded) == 21
  # Groups in order: stage 0 first, stage 0 rest, stage 1 first, ... stage 5 first.
  starts = np.cumsum([0, *lps[:-1]])
  group = 0
  for stage, (start, count) in enumerate(zip(starts, lps)):
    assert expanded[start] == space[group]
    group += 1
    if count > 1:
      assert all(expanded[start + j] == space[group] for j in range(1, count))
      group += 1
  candidates = arch_search.candidates_for(expanded, lps)
  firsts = arch_search.stage_first_layers(lps)
  assert all((netspec.ZERO in c) != first for c, first in zip(candidates, firsts))


def test_space_file_with_the_wrong_number_of_layers_names_the_skeleton_field():
  space = [[genome_lib.REFERENCE]] * 5
  with pytest.raises(netspec.NetFormatError,
                     match=r"model.layers_per_stage=\(4, 4, 4, 4, 4, 1\) needs 21 \(one"):
    netspec.expand_space(space, (4, 4, 4, 4, 4, 1))


def test_irb_baseline_space_is_the_six_inverted_residual_blocks():
  space = arch_search.irb_space(3)
  assert len(space) == 3
  assert set(space[0]) == {genome_lib.irb(k, e) for k in (3, 5, 7) for e in (3, 6)}
