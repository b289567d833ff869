"""Flax nets built from net descriptions: exactly the analytic parameters, runnable."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autospace_jax import cells
from autospace_jax import counting
from autospace_jax import genome as genome_lib
from autospace_jax import netspec
from autospace_jax import ops
from test_counting import NET_340M


def random_net(seed: int, se: bool = False) -> netspec.NetSpec:
  """A skeleton net of random valid genomes (any code, mixes), with Zero where allowed."""
  rng = np.random.default_rng(seed)
  genomes = list(genome_lib.all_genomes(genome_lib.EDGE_CODES))
  layer_ops = []
  for i in range(len(netspec.skeleton_shapes())):
    if not netspec.is_stage_first(i) and rng.random() < 0.2:
      layer_ops.append(netspec.ZERO)
    else:
      layer_ops.append(genomes[rng.integers(len(genomes))])
  return netspec.build_net(layer_ops, width_multiplier=0.5, num_classes=37,
                           resolution=int(rng.choice([96, 128, 160])), se=se)


NETS = {
    "mobilenet_v2": netspec.mobilenet_v2,
    "official_340M": lambda: netspec.load_net(NET_340M),
    "random_0": lambda: random_net(0),
    "random_1": lambda: random_net(1),
    "random_2_se": lambda: random_net(2, se=True),
}


def abstract_variables(spec: netspec.NetSpec) -> dict:
  x = jax.ShapeDtypeStruct((1, spec.resolution, spec.resolution, 3), jnp.float32)
  return jax.eval_shape(lambda x: cells.Net(spec).init(jax.random.PRNGKey(0), x,
                                                       train=False), x)


@pytest.mark.parametrize("name", NETS)
def test_flax_trainable_parameters_equal_the_analytic_count(name):
  spec = NETS[name]()
  assert cells.count_params(abstract_variables(spec)["params"]) == (
      counting.net_cost(spec).params)


def test_mobilenet_v2_flax_model_has_the_published_parameter_count():
  assert cells.count_params(abstract_variables(netspec.mobilenet_v2())["params"]) == 3_504_872


@pytest.mark.parametrize("name", NETS)
def test_forward_pass_at_the_declared_resolution_gives_finite_logits(name, monkeypatch):
  # XLA's convolutions compile several times faster than the shifted-tap ones and this
  # is forward-only, where their CPU speed is fine.
  monkeypatch.setattr(ops, "CONV_IMPL", "xla")
  spec = NETS[name]()
  model, variables = cells.init_net(spec, np.random.default_rng(0))
  images = jax.random.normal(jax.random.PRNGKey(1), (2, spec.resolution, spec.resolution, 3))
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  assert logits.shape == (2, spec.num_classes)
  assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize("module, inputs", [
    (cells.Expand(features=384), [(1, 4, 4, 64)]),
    (cells.DepthwiseBN(kernel_size=5, stride=2), [(1, 8, 8, 512)]),
    (cells.Project(features=256), [(1, 4, 4, 384)]),
    (cells.ChannelAttention(), [(1, 4, 4, 384)] * 3),
    (cells.Stem(features=64), [(1, 16, 16, 3)]),
    (cells.Head(features=512, num_classes=300), [(1, 2, 2, 96)]),
])
def test_host_initialisation_draws_what_flax_init_draws(module, inputs):
  zeros = [jnp.zeros(s) for s in inputs]
  reference = module.init(jax.random.PRNGKey(0), *zeros, train=True)
  abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *zeros, train=True))
  drawn = cells.host_init(abstract, np.random.default_rng(0))
  assert jax.tree.structure(drawn) == jax.tree.structure(reference)
  for (path, ref), host in zip(jax.tree_util.tree_flatten_with_path(reference)[0],
                               jax.tree.leaves(drawn)):
    ref, host = np.asarray(ref), np.asarray(host)
    assert host.shape == ref.shape and host.dtype == ref.dtype, path
    if ref.std() == 0:
      np.testing.assert_array_equal(host, ref, err_msg=str(path))
    else:  # same distribution: scale within sampling error, same truncation
      np.testing.assert_allclose(host.std(), ref.std(), rtol=0.1, err_msg=str(path))
      assert np.abs(host).max() <= 1.2 * np.abs(ref).max() + 1e-6, path


@pytest.mark.parametrize("relu6", (False, True))
def test_batch_norm_computes_what_flax_batch_norm_and_relu6_compute(relu6):
  """Same variables, outputs, running averages and gradients as `flax.linen.BatchNorm`
  (then `jax.nn.relu6`), in training and in evaluation, so checkpoints and results carry
  over."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 5, 5, 6)) * 3 + 1, jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  ours = cells.BatchNorm(momentum=0.9, epsilon=1e-3, relu6=relu6)
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3)
  assert (jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(0), x, train=True)) ==
          jax.tree.map(jnp.shape, flax_bn.init(jax.random.PRNGKey(0), x)))
  params = {"scale": jnp.asarray(rng.normal(size=6), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=6), jnp.float32)}
  stats = {"mean": jnp.asarray(rng.normal(size=6), jnp.float32),
           "var": jnp.asarray(rng.uniform(1, 2, size=6), jnp.float32)}
  activation = jax.nn.relu6 if relu6 else (lambda y: y)

  def ours_loss(params, x):
    y, new = ours.apply({"params": params, "batch_stats": stats}, x, train=True,
                        mutable=["batch_stats"])
    return jnp.sum(y * cotangent), new

  def flax_loss(params, x):
    y, new = flax_bn.apply({"params": params, "batch_stats": stats}, x,
                           mutable=["batch_stats"])
    return jnp.sum(activation(y) * cotangent), new

  got = jax.value_and_grad(ours_loss, (0, 1), has_aux=True)(params, x)
  want = jax.value_and_grad(flax_loss, (0, 1), has_aux=True)(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      ours.apply({"params": params, "batch_stats": stats}, x, train=False),
      activation(flax_bn.clone(use_running_average=True).apply(
          {"params": params, "batch_stats": stats}, x)), rtol=1e-6, atol=1e-6)
