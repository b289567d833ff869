"""Multi-host stages 1 and 2: two processes on one machine run as one job, in step.

Each process joins a `jax.distributed` job on localhost (one CPU device each, collectives
over Gloo), runs stage 1 in a shared work directory (as hosts share a bucket, so Orbax
writes one checkpoint for both) and reports its populations and its own replica of the
weights, then searches the learned space (stage 2) and reports its α and net; the test
compares the two hosts, and checks that both can load each stage's output as soon as the
stage returns, though process 0 writes it late.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STEPS = 4  # 1 warm-up step, then 3 evolving: one evolution round, after step 3.

_HOST = textwrap.dedent('''
    import json, sys
    import jax
    process_id, port, workdir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=process_id)
    import os, time
    import numpy as np
    from autospace_jax import arch_search, netspec, space_search, supernet
    from autospace_jax.parallel import DataParallel
    from conftest import short_schedule, tiny_config

    def written_late(save):  # process 0 writes 3 s late, as on a slow bucket
      def slow_save(value, path):
        time.sleep(3)
        save(value, path)
      return slow_save

    netspec.save_space = written_late(netspec.save_space)
    netspec.save_net = written_late(netspec.save_net)
    final = {}
    finish = space_search.SpaceSearch.finish

    def capture(self, run, state):
      finish(self, run, state)  # α written back: the populations the outputs rank
      final.update(run=run.to_json(), state=state)

    space_search.SpaceSearch.finish = capture
    # digits: 38 steps per epoch at batch 32, so 1 warm-up and 3 evolving steps.
    config = short_schedule(tiny_config(), warmup=0.03, main=0.08)
    config.space.mutation_interval = 2
    config.checkpoint.every_steps = 2
    search = space_search.SpaceSearch(config, workdir, DataParallel(), None)
    result = search.run()
    # Stage 2 loads the learned space on every host as soon as stage 1 returns.
    loaded = netspec.load_space(os.path.join(workdir, "space", "learned_space.config"))
    state = final["state"]
    local = lambda x: np.asarray(x.addressable_shards[0].data)  # this host's replica
    trees = {"params": state.params, "batch_stats": state.batch_stats,
             "opt_state": state.opt_state, "alpha": state.alpha}
    np.savez(f"{out}/weights_{process_id}.npz",
             **{jax.tree_util.keystr(p): local(x)
                for p, x in jax.tree_util.tree_flatten_with_path(trees)[0]})
    # Stage 2 on the learned space: 1 warm-up step, then weight and α steps; stage 3
    # loads the searched net on every host as soon as stage 2 returns.
    config.search.compare_irb = False
    [searched] = arch_search.run(config, workdir, os.path.join(
        workdir, "space", "learned_space.config"), None, DataParallel())
    [net_file] = (p for p in (os.path.join(workdir, "search", d, netspec.NET_FILE)
                              for d in os.listdir(os.path.join(workdir, "search")))
                  if os.path.exists(p))
    net = netspec.load_net(net_file)
    initial = supernet.init_variables(search.spec, config.seed)["params"]
    moved = max(float(np.max(np.abs(local(x) - y)))
                for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(initial)))
    print(json.dumps({
        "process": [jax.process_index(), jax.process_count()],
        "devices": [len(jax.devices()), len(jax.local_devices())],
        "steps": [search.warmup_steps, search.total_steps, int(local(state.step))],
        "params_moved": moved, "run": final["run"], "records": result["records"],
        "loaded_space": [[g.describe() for g in cells] for cells in loaded],
        "search": {k: searched[k] for k in ("alpha", "choice", "cells", "steps")},
        "loaded_net": ["zero" if layer.op == netspec.ZERO else layer.op.describe()
                       for layer in net.layers[1:]]}))
''')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_two_hosts(workdir: Path, out: Path) -> list[dict]:
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
         "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  port = str(_free_port())
  hosts = [subprocess.Popen([sys.executable, "-c", _HOST, str(i), port, str(workdir),
                             str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  reports = []
  try:
    for i, host in enumerate(hosts):
      stdout, stderr = host.communicate(timeout=600)
      assert host.returncode == 0, f"host {i} failed:\n{stderr[-6000:]}"
      reports.append(json.loads(stdout.strip().splitlines()[-1]))
  finally:
    for host in hosts:
      if host.poll() is None:
        host.kill()
        host.communicate()
  return reports


def test_two_processes_agree_on_populations_weights_and_the_searched_net(tmp_path):
  workdir, out = tmp_path / "work", tmp_path / "out"
  workdir.mkdir()
  out.mkdir()
  first, second = _run_two_hosts(workdir, out)

  # A real two-process job: 2 global devices, one per process, the whole schedule run.
  assert [first["process"], second["process"]] == [[0, 2], [1, 2]]
  assert first["devices"] == second["devices"] == [2, 1]
  assert first["steps"] == second["steps"] == [1, STEPS, STEPS]
  # One evolution round ran, so the populations compared below went through α
  # write-back, selection and mutation on both hosts.
  assert [h["step"] for h in first["run"]["history"]] == [3]
  assert any(a != 0 for p in first["run"]["populations"] for a in p["alpha"])
  assert first["params_moved"] > 1e-3

  # Populations, slots, α and lineage: identical, not merely close.
  assert first["run"] == second["run"]
  assert first["records"] == second["records"]

  # Each host's own replica of the weights, BN statistics, momentum and α. The hosts
  # apply the same all-reduced gradients with the same programs, so they agree
  # bit for bit (measured max |difference| 0); 1e-6 allows for any reduction that
  # differed in the last float32 bit.
  ours = np.load(out / "weights_0.npz")
  theirs = np.load(out / "weights_1.npz")
  assert sorted(ours.files) == sorted(theirs.files) and len(ours.files) > 100
  for key in ours.files:
    np.testing.assert_allclose(ours[key], theirs[key], rtol=0, atol=1e-6, err_msg=key)

  # Both hosts wrote one checkpoint series into the shared directory; process 0 alone
  # wrote the learned space, the same one both hosts computed.
  checkpoints = workdir / "space" / "checkpoints"
  assert {int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()} == {2, STEPS}
  learned = json.loads((workdir / "space" / "learned_space.json").read_text())
  assert learned["cells"] == first["records"] and learned["steps"] == STEPS
  # Stage 1 returned on neither host before process 0 had written the space (it waited
  # 3 s before writing), so both loaded the space they had learned.
  learned_space = [[cell["description"] for cell in layer] for layer in first["records"]]
  assert first["loaded_space"] == second["loaded_space"] == learned_space

  # Stage 2: the same α (trained on all-reduced gradients) and net on both hosts, and
  # each loaded the net process 0 wrote 3 s late.
  assert first["search"] == second["search"]
  assert first["search"]["steps"] > 1 and any(
      a != 0 for layer in first["search"]["alpha"] for a in layer)
  assert first["loaded_net"] == second["loaded_net"] == first["search"]["cells"]
