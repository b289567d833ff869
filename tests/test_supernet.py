"""The supernet runs exactly the sampled cells, and only they learn."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from autospace_jax import cells
from autospace_jax import genome as genome_lib
from autospace_jax import netspec
from autospace_jax import space_search
from autospace_jax import supernet
from autospace_jax.parallel import DataParallel
from conftest import tiny_config

ATTENTION_CELL = genome_lib.from_matrix([[0, 0, 0, 1], [3, 0, 0, [1, 1]], [5, 2, 0, 0],
                                         [1, 3, 2, 0]])


def make_trainer(estimator="sampled", momentum=0.9, parallel=None, decay_bn_and_bias=False):
  config = tiny_config()
  spec = space_search.supernet_spec(config, 10, (3, 5))
  trainer = supernet.SupernetTrainer(
      spec, 0.1, 1e-3, momentum, supernet.alpha_optimizer(0.01),
      0.1, estimator, parallel or DataParallel(), decay_bn_and_bias=decay_bn_and_bias)
  return spec, trainer


def batch(seed=0, size=8):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(size, 32, 32, 3)).astype(np.float32),
          "label": rng.integers(0, 10, size).astype(np.int32)}


def candidates_for(spec):
  cell_set = [genome_lib.irb(3, 6), genome_lib.irb(5, 3), ATTENTION_CELL]
  return [list(cell_set) for _ in spec.layers]


def step(trainer, state, cands, path, seed, train_alpha=True):
  return trainer.train_step(state, batch(seed), cands, path, train_alpha)


def leaves_by_entry(tree):
  return {layer: {entry: jax.tree.leaves(v) for entry, v in bank.items()}
          for layer, bank in tree["layers"].items()}


def test_a_fresh_state_holds_the_weight_optimizers_own_initial_state():
  spec, trainer = make_trainer()
  state = trainer.init(0, 3)
  for key in supernet.entry_keys(state.params):
    expected = trainer.weight_tx.init(supernet._get(state.params, key))
    actual = supernet._get(state.opt_state, key)
    assert jax.tree.structure(actual) == jax.tree.structure(expected), key
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
      assert a.dtype == e.dtype and np.array_equal(a, e), key


def test_one_step_changes_only_the_sampled_cells_weights_optimizer_state_and_bn_stats():
  spec, trainer = make_trainer()
  state = trainer.init(0, 3)
  cands = candidates_for(spec)
  # Two steps through every candidate give every entry momentum and moved BN statistics.
  for i, path in enumerate(([0] * 6, [1] * 6, [2] * 6)):
    state, _ = step(trainer, state, cands, path, i)
  before = jax.device_get(state)
  path = [0, 1, 2, 0, 1, 2]
  state, _ = step(trainer, state, cands, path, 7)
  after = jax.device_get(state)
  used = {supernet.layer_name(i): set(supernet.cell_entries(cands[i][c]))
          for i, c in enumerate(path)}
  for tree_name, (old, new) in {
      "params": (leaves_by_entry(before.params), leaves_by_entry(after.params)),
      "momentum": (leaves_by_entry(before.opt_state), leaves_by_entry(after.opt_state)),
      "batch_stats": (leaves_by_entry(before.batch_stats), leaves_by_entry(after.batch_stats)),
  }.items():
    for layer, bank in old.items():
      for entry, leaves in bank.items():
        if not leaves:
          continue  # attention has no BN statistics
        same = all(np.array_equal(a, b) for a, b in zip(leaves, new[layer][entry]))
        if entry in used[layer]:
          assert not same, f"{tree_name} of used {layer}/{entry} did not change"
        else:
          assert same, f"{tree_name} of unused {layer}/{entry} moved"


@pytest.mark.parametrize("decay_bn_and_bias", [False, True])
def test_a_train_step_is_the_weight_optimizer_on_the_gradients_of_the_entries_that_ran(
    decay_bn_and_bias):
  spec, trainer = make_trainer(decay_bn_and_bias=decay_bn_and_bias)
  state = trainer.init(0, 3)
  cands = candidates_for(spec)
  state, _ = step(trainer, state, cands, [1] * 6, 0)  # momentum is no longer zero
  path = [0, 1, 2, 0, 1, 2]
  metrics, grads, alpha_grad, run = trainer.loss_and_grads(state, batch(5), cands, path, True)
  new, new_metrics = trainer.train_step(state, batch(5), cands, path, True)

  np.testing.assert_allclose(new_metrics["loss"], metrics["loss"], rtol=1e-6)
  tx = supernet.weight_optimizer(0.1, 1e-3, 0.9, decay_bn_and_bias)  # make_trainer's
  keys = supernet.entry_keys(grads)
  assert len(keys) == 3 + sum(len(supernet.cell_entries(cands[i][c]))
                              for i, c in enumerate(path))
  for key in keys:
    params, opt_state = supernet._get(state.params, key), supernet._get(state.opt_state, key)
    updates, expected_opt_state = tx.update(supernet._get(grads, key), opt_state, params)
    for tree, expected in ((new.params, optax.apply_updates(params, updates)),
                           (new.opt_state, expected_opt_state)):
      for a, b in zip(jax.tree.leaves(supernet._get(tree, key)), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=str(key))
  expected_stats = supernet._with_entries(state.batch_stats, run.batch_stats)
  for a, b in zip(jax.tree.leaves(new.batch_stats), jax.tree.leaves(expected_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  alpha_updates, _ = trainer.alpha_tx.update(alpha_grad, state.alpha_opt_state, state.alpha)
  np.testing.assert_allclose(new.alpha, optax.apply_updates(state.alpha, alpha_updates),
                             rtol=1e-5, atol=1e-7)
  assert int(new.step) == int(state.step) + 1


def static_params(spec, variables, ops):
  """The bank entries of ``ops`` laid out as the static `cells.Net` names them."""
  def tree(collection):
    out = {"stem": variables[collection]["stem"],
           "block_0": variables[collection]["first_block"],
           "head": variables[collection]["head"]}
    for i, op in enumerate(ops):
      bank = variables[collection]["layers"][supernet.layer_name(i)]
      suffix = f"_e{op.expansion}"
      out[f"block_{i + 1}"] = {"cell": {e[:-len(suffix)]: bank[e]
                                        for e in supernet.cell_entries(op)}}
    return out
  return {"params": tree("params"), "batch_stats": tree("batch_stats")}


def test_host_chained_path_computes_the_same_loss_and_gradients_as_the_static_net():
  spec, trainer = make_trainer()
  state = trainer.init(1, 3)
  cands = candidates_for(spec)
  path = [2, 0, 1, 2, 2, 0]
  ops = [cands[i][c] for i, c in enumerate(path)]
  metrics, grads, _, _ = trainer.loss_and_grads(state, batch(3), cands, path, False)

  net = cells.Net(spec.net_spec(ops))
  ref_vars = static_params(spec, jax.device_get({"params": state.params,
                                                 "batch_stats": state.batch_stats}), ops)
  data = batch(3)

  def loss_fn(params):
    logits, _ = net.apply({"params": params, "batch_stats": ref_vars["batch_stats"]},
                          data["image"], train=True, mutable=["batch_stats"])
    return supernet.cross_entropy(logits, data["label"], 0.1)

  loss, ref_grads = jax.jit(jax.value_and_grad(loss_fn))(ref_vars["params"])
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  chained = static_params(spec, {"params": grads, "batch_stats": grads}, ops)["params"]
  for (path_, a), b in zip(jax.tree_util.tree_flatten_with_path(ref_grads)[0],
                           jax.tree.leaves(chained)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5, err_msg=str(path_))  # float32 sums


def test_op_forward_programs_pass_their_inputs_to_the_backward_instead_of_copying_them():
  expand = supernet._jitted_op_vjp(cells.Expand, (("features", 24),), True)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 6, 6, 8)), jnp.float32)
  variables = cells.Expand(features=24).init(jax.random.PRNGKey(0), x)
  run = supernet.PathRun()
  out, pullback, _ = run.call_vjp(expand, variables["params"], variables["batch_stats"], x)
  residuals = jax.tree.leaves(pullback.residuals)
  assert not any(r.shape == x.shape for r in residuals)  # x itself is not a residual

  cotangent = jnp.ones_like(out)
  params_ct, x_ct = supernet._backward(pullback.residuals, pullback.arguments, cotangent)
  _, vjp = jax.vjp(lambda p, v: cells.Expand(features=24).apply(
      {"params": p, "batch_stats": variables["batch_stats"]}, v, train=True,
      mutable=["batch_stats"])[0], variables["params"], x)
  expected_params_ct, expected_x_ct = vjp(cotangent)
  np.testing.assert_allclose(x_ct, expected_x_ct, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(params_ct), jax.tree.leaves(expected_params_ct)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)  # float32 sums, other options


def test_swapping_in_new_cells_compiles_nothing_once_their_op_kinds_have_run():
  spec, trainer = make_trainer()
  state = trainer.init(0, 3)
  cands = candidates_for(spec)
  for i, path in enumerate(([0] * 6, [1] * 6, [2] * 6)):
    state, _ = step(trainer, state, cands, path, i)
  jax.block_until_ready(state)
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **kw: compiles.append(event)
      if event == "/jax/core/compile/backend_compile_duration" else None)
  # Different genomes, made of op kinds the supernet has already run.
  swapped = [[genome_lib.irb(5, 3), ATTENTION_CELL, genome_lib.irb(3, 6)]
             for _ in spec.layers]
  for i in range(3):
    state, _ = step(trainer, state, swapped, [i] * 6, 10 + i)
  jax.block_until_ready(state)
  assert compiles == []


def test_sampled_estimator_gives_the_analytic_alpha_gradient():
  """∂L/∂α_k = <∂L/∂y, o>(δ_ik − p_k) for the sampled cell i: its sign pattern and
  zero sum over each layer's candidates."""
  spec, trainer = make_trainer()
  state = trainer.init(0, 3)
  state = state.replace(alpha=jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)),
                                          jnp.float32))
  cands = candidates_for(spec)
  _, _, alpha_grad, _ = trainer.loss_and_grads(state, batch(1), cands, [1] * 6, True)
  np.testing.assert_allclose(np.asarray(alpha_grad).sum(-1), 0.0, atol=1e-6)
  p = jax.nn.softmax(state.alpha, -1)
  # g_k / g_i = -p_k / (1 - p_i) for k != i.
  g = np.asarray(alpha_grad)
  for layer in range(6):
    if abs(g[layer, 1]) > 1e-9:
      np.testing.assert_allclose(g[layer, 0] / g[layer, 1], -p[layer, 0] / (1 - p[layer, 1]),
                                 rtol=1e-4)


def test_proxyless_estimator_gradient_matches_its_formula_and_zero_gets_signal():
  spec, trainer = make_trainer("proxyless")
  state = trainer.init(0, 3)
  cands = [[genome_lib.irb(3, 6), genome_lib.irb(5, 3), netspec.ZERO] if not s.stride == 2
           and s.in_channels == s.out_channels else candidates_for(spec)[0]
           for s in spec.layers]
  _, _, alpha_grad, _ = trainer.loss_and_grads(state, batch(2), cands, [0] * 6, True)
  g = np.asarray(alpha_grad)
  np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-6)
  assert np.all(np.abs(g).sum(-1) > 0), "every layer's α must get a gradient"



def test_supernet_programs_use_all_the_cpu_compile_options_or_none_and_only_on_cpu():
  # Measured together on jax 0.10; jax 0.12 lacks one, and the other alone changed results.
  accepted = supernet.compile_options("cpu")
  assert accepted in ({}, supernet.CPU_COMPILE_OPTIONS)
  if jax.__version__.startswith("0.10."):
    assert accepted == supernet.CPU_COMPILE_OPTIONS
  assert supernet.compile_options("gpu") == {} == supernet.compile_options("tpu")
  x = jnp.ones((2, 3))
  assert float(supernet._accumulate(x, x).sum()) == 12.0  # a program compiled with them


@pytest.mark.parametrize("decay_bn_and_bias", [False, True])
def test_weight_decay_reaches_bn_and_biases_only_when_asked(decay_bn_and_bias):
  params = {"conv": {"kernel": np.ones(2, np.float32)},
            "bn": {"scale": np.ones(2, np.float32), "bias": np.ones(2, np.float32)},
            "dense": {"kernel": np.ones(2, np.float32), "bias": np.ones(2, np.float32)}}
  tx = supernet.weight_optimizer(1.0, 0.5, 0.0, decay_bn_and_bias)
  updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
  decayed = {path: bool(np.any(u != 0))
             for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]}
  assert {jax.tree_util.keystr(p): d for p, d in decayed.items()} == {
      "['bn']['bias']": decay_bn_and_bias, "['bn']['scale']": decay_bn_and_bias,
      "['conv']['kernel']": True, "['dense']['bias']": decay_bn_and_bias,
      "['dense']['kernel']": True}


@pytest.mark.parametrize("estimator", ["sampled", "proxyless"])
def test_without_weight_gradients_the_loss_and_alpha_gradient_are_the_same(estimator):
  spec, trainer = make_trainer(estimator)
  state = trainer.init(0, 3)
  cands, path = candidates_for(spec), [2, 1, 0, 2, 1, 0]
  metrics, grads, alpha_grad, _ = trainer.loss_and_grads(state, batch(3), cands, path, True)
  alpha_metrics, none, alpha_only, _ = trainer.loss_and_grads(state, batch(3), cands, path,
                                                              True, weight_grads=False)
  assert none is None
  np.testing.assert_array_equal(alpha_metrics["loss"], metrics["loss"])
  # The same maths in other programs (XLA fuses them otherwise): equal to float rounding.
  np.testing.assert_allclose(alpha_only, alpha_grad, rtol=1e-5, atol=1e-6)
