"""Stored programs: a later process loads the supernet's compiled programs instead of
tracing them, computes the same step with them, and never stores or loads a broken one."""

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autospace_jax import program_store
from autospace_jax import supernet

ROOT = Path(__file__).resolve().parents[1]

# A compile-only pass over one path, then one step on it: which programs the pass traced,
# and what the step computed.
_PASS_THEN_STEP = textwrap.dedent('''
    import json, threading
    import jax, numpy as np
    from test_supernet import batch, candidates_for, make_trainer, step

    traced = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: traced.append(kw.get("fun_name"))
        if event == "/jax/core/compile/jaxpr_trace_duration" else None)
    spec, trainer = make_trainer()
    state = trainer.init(0, 3)
    cands, path = candidates_for(spec), [0, 1, 2, 2, 1, 0]
    traced.clear()  # the initial state's own programs are not the pass's
    trainer.compile_path(state, batch(1), cands, path, True)
    pass_traced = list(traced)
    state, metrics = step(trainer, state, cands, path, 1)
    print(json.dumps({"traced": pass_traced, "loss": float(metrics["loss"]),
                      "weights": [float(np.asarray(leaf, np.float64).sum())
                                  for leaf in jax.tree.leaves(state.params)]}))
''')


def pass_then_step(cache: Path) -> dict:
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache),
         "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
  out = subprocess.run([sys.executable, "-c", _PASS_THEN_STEP], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def stored_programs(cache: Path) -> int:
  """Stored executables (the store also keeps traced shapes, which are not programs)."""
  entries = [pickle.loads(path.read_bytes())
             for path in (cache / program_store.SUBDIRECTORY).iterdir()]
  return sum(isinstance(e, tuple) and len(e) == 4 and isinstance(e[0], bytes)
             for e in entries)


def test_a_later_process_loads_the_passs_programs_instead_of_tracing_and_steps_alike(
    tmp_path):
  first = pass_then_step(tmp_path)
  second = pass_then_step(tmp_path)
  assert len(first["traced"]) > 50  # every op's forward and backward, the glue, the loss
  # Only the trainer's own programs (its learning-rate schedule, α's update), whose
  # closures have no stable name, are traced again, and the process's one probe of the
  # CPU compile options (`supernet.compile_options`).
  assert sorted(set(second["traced"])) == ["<lambda>", "_apply_alpha", "negative"]
  assert second["loss"] == first["loss"]
  assert second["weights"] == first["weights"]


def test_a_program_jaxs_own_cache_returned_is_not_stored_and_nothing_breaks(tmp_path):
  # On XLA:CPU an executable JAX loaded from its persistent cache serializes without
  # its kernels: stored, it would fail to run in the next process.
  first = pass_then_step(tmp_path)
  store = tmp_path / program_store.SUBDIRECTORY
  for entry in store.iterdir():
    entry.unlink()
  second = pass_then_step(tmp_path)  # JAX's cache answers every compile
  third = pass_then_step(tmp_path)
  assert stored_programs(tmp_path) == 0
  assert first["loss"] == second["loss"] == third["loss"]


def test_an_unreadable_entry_is_ignored_and_the_program_traced_again(tmp_path):
  first = pass_then_step(tmp_path)
  for entry in (tmp_path / program_store.SUBDIRECTORY).iterdir():
    entry.write_bytes(b"not a pickle")
  second = pass_then_step(tmp_path)
  assert len(second["traced"]) == len(first["traced"])
  assert second["loss"] == first["loss"]


@pytest.mark.parametrize("identity", ["op:Conv(features=8)", "op:<function f at 0x7f00>"])
def test_identities_are_named_per_environment_and_never_by_an_address(identity):
  key = program_store.entry_key(identity)
  if " at 0x" in identity:
    assert key is None  # another process may hold something else at that address
  else:
    assert key == program_store.entry_key(identity) != program_store.entry_key(identity + "!")
    assert len(key) == 64


def test_a_program_runs_what_was_loaded_for_a_call_signature_and_jits_the_rest():
  program = supernet.PlatformJit(lambda x: x + 1, cache_id="plus_one")
  times_ten = jax.jit(lambda x: x * 10)
  three, four = jnp.ones(3), jnp.ones(4)
  assert program(four).tolist() == [2.0] * 4  # nothing loaded: jit
  # A stand-in that computes something else shows which one ran.
  program.load(supernet.call_signature((three,), {}), times_ten.trace(three).lower().compile())
  assert program(three).tolist() == [10.0] * 3
  assert program(four).tolist() == [2.0] * 4  # no program loaded for this signature
  program.load(supernet.call_signature((four,), {}), times_ten.trace(four).lower().compile())
  assert program(four).tolist() == [10.0] * 4  # the call it missed before now matches
  assert program(np.ones(3, np.float32)).tolist() == [10.0] * 3  # NumPy: matched by shape
