"""Data parallelism: 8 devices compute the same supernet step as one on the same batch.

XLA's fake CPU devices must be requested before JAX initialises, so the comparison runs
in a subprocess started with `--xla_force_host_platform_device_count=8`.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_COMPARE = textwrap.dedent('''
    import json
    import jax
    import numpy as np
    import optax
    from autospace_jax import genome as genome_lib
    from autospace_jax import space_search, supernet
    from autospace_jax.parallel import DataParallel
    from conftest import tiny_config

    GLOBAL_BATCH = 16
    spec = space_search.supernet_spec(tiny_config(), 10, (3, 5))
    # Two IRB cells and one path: few distinct ops, so few programs to compile twice.
    cands = [[genome_lib.irb(3, 6), genome_lib.irb(5, 3)] for _ in spec.layers]
    paths = ([0, 1, 0, 1, 1, 0],) * 2

    def batch(seed):
      rng = np.random.default_rng(seed)
      return {"image": rng.normal(size=(GLOBAL_BATCH, 32, 32, 3)).astype(np.float32),
              "label": rng.integers(0, 10, GLOBAL_BATCH).astype(np.int32)}

    def train(devices):
      parallel = DataParallel(devices)
      # SGD for α: Adam's first step is lr * g / (|g| + eps), which turns float32 noise
      # in a near-zero α gradient (a layer feeding a batch-normalised conv is almost
      # scale-invariant) into steps of order lr, and the comparison would measure that.
      trainer = supernet.SupernetTrainer(spec, 0.01, 1e-3, 0.9, optax.sgd(0.1), 0.1,
                                         "sampled", parallel)
      state = trainer.init(0, 2)
      losses, shards = [], []
      for i, path in enumerate(paths):
        images, _ = trainer.shard(batch(i))
        shards.append([len(images.sharding.device_set), len(images.addressable_shards),
                       list(images.addressable_shards[0].data.shape)])
        state, metrics = trainer.train_step(state, batch(i), cands, path, True)
        losses.append(float(metrics["loss"]))
      return losses, shards, jax.device_get(state)

    def max_diff(a, b):
      leaves = list(zip(jax.tree.leaves(a), jax.tree.leaves(b)))
      assert leaves and jax.tree.structure(a) == jax.tree.structure(b)
      return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                 for x, y in leaves)

    def relative_diff(a, b):
      """|a - b| / |a| over the whole tree (Euclidean norms)."""
      pairs = [(np.asarray(x, np.float64), np.asarray(y, np.float64))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
      return float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in pairs) /
                           sum(np.sum(x ** 2) for x, _ in pairs)))

    initial = jax.device_get(supernet.init_variables(spec, 0))
    one_losses, one_shards, one = train(jax.devices()[:1])
    all_losses, all_shards, many = train(jax.devices())
    print(json.dumps({
        "num_devices": len(jax.devices()),
        "losses": [one_losses, all_losses], "shards": [one_shards, all_shards],
        "diff": {"params": relative_diff(one.params, many.params),
                 "batch_stats": max_diff(one.batch_stats, many.batch_stats),
                 "momentum": relative_diff(one.opt_state, many.opt_state),
                 "alpha": max_diff(one.alpha, many.alpha)},
        "change": {"params": max_diff(initial["params"], one.params),
                   "batch_stats": max_diff(initial["batch_stats"], one.batch_stats),
                   "alpha": float(np.max(np.abs(one.alpha)))},
    }))
''')


def _run_compare():
  # XLA:CPU sizes the pool that runs each device's share of a program, and also the
  # compiler's parallel codegen, to max(cores, devices): with 8 devices on 2 cores,
  # codegen tasks queued there can hold back the 8th participant of an all-reduce
  # past XLA's 40 s rendezvous timeout (seen once, under load, with a cold compile
  # cache). PJRT_NPROC=16 leaves threads to spare.
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
         "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "PJRT_NPROC": "16"}
  result = subprocess.run([sys.executable, "-c", _COMPARE], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-5000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_eight_devices_give_the_same_loss_weights_bn_stats_and_alpha_as_one():
  out = _run_compare()
  # The 8-device run really splits the batch: 16 images as 8 shards of 2.
  assert out["num_devices"] == 8
  assert out["shards"][0] == [[1, 1, [16, 32, 32, 3]]] * 2
  assert out["shards"][1] == [[8, 8, [2, 32, 32, 3]]] * 2
  # The step did something, so equality below is not equality of untouched state.
  assert all(change > 1e-3 for change in out["change"].values()), out["change"]
  # Only float32 summation order differs (8 partial sums, then an all-reduce). Loss, BN
  # statistics and α are compared element by element: measured max |difference| 1e-7
  # relative (loss), 8.3e-7 (statistics of order 1), 2.6e-8 (α). Weights and momentum are
  # compared as whole trees (|one - many| / |one|): a ReLU6 input within rounding of 0 or
  # 6 may land on the other side, which moves its channel's gradient by that pixel's
  # cotangent (measured once: one unit of 98k, 1% of one channel's bias gradient; tree-wide
  # 1.0e-3 for the momentum, which is the summed gradients here, and 4.5e-6 for the
  # weights). A replica that normalised or averaged over its own shard only would be off by
  # whole percents.
  one, many = out["losses"]
  for a, b in zip(one, many):
    assert abs(a - b) <= 1e-5 * abs(a), (one, many)
  diff = out["diff"]
  assert diff["batch_stats"] <= 1e-5, diff
  assert diff["params"] <= 1e-4 and diff["momentum"] <= 1e-2, diff
  assert diff["alpha"] <= 1e-6, diff
