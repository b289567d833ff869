"""Compiled supernet programs kept on disk between runs, so that a rerun skips tracing.

JAX's persistent compilation cache skips XLA's compile, but not the tracing and lowering
that compute its key: ~25 ms of Python per supernet program, ~5 s for the ~200 programs
stage 1's first steps call, all of it holding the GIL the training loop needs. Programs
that declare a stable identity (`supernet.PlatformJit`'s ``cache_id``: what their code
and closure compute) are stored here once compiled, keyed by that identity, their
argument signature and everything else a compile depends on (`environment`), and a
later process loads them (~2 ms each) instead of tracing them again.

The store lives beside the persistent cache (`jax_compilation_cache_dir`, which `main`
sets) and is off without one. Entries are pickles, trusted as that cache's executables
are; one that fails to load is ignored (the program is traced and stored again).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import os
import pickle
import threading
from typing import Any, Callable

from etils import epath
import jax
from jax.experimental import serialize_executable

from autospace_jax import files

SUBDIRECTORY = "autospace_programs"


def directory() -> str | None:
  """Where entries live: under the persistent compilation cache, if one is set."""
  cache = jax.config.jax_compilation_cache_dir
  return os.path.join(cache, SUBDIRECTORY) if cache else None


@functools.cache
def environment() -> str:
  """What a stored program's validity depends on besides its own identity: library
  versions, backend and device kind, XLA flags, precision settings and the source of
  this package (which holds every program's code and its compile options)."""
  package = os.path.dirname(os.path.abspath(__file__))
  source = hashlib.sha256()
  for name in sorted(os.listdir(package)):
    if name.endswith(".py"):
      with open(os.path.join(package, name), "rb") as f:
        source.update(name.encode() + f.read())
  device = jax.devices()[0]
  parts = [f"{name}={importlib.metadata.version(name)}"
           for name in ("jax", "jaxlib", "flax", "optax")]
  parts += [device.platform, device.device_kind, device.client.platform_version,
            os.environ.get("XLA_FLAGS", ""), str(jax.config.jax_enable_x64),
            str(jax.config.jax_default_matmul_precision), source.hexdigest()]
  return "|".join(parts)


def salt() -> str:
  """A short digest of `environment`, put in stored programs' names (`renamed`)."""
  return hashlib.sha256(environment().encode()).hexdigest()[:10]


def renamed(fun: Callable) -> Callable:
  """``fun`` under a name that carries `salt`: the name enters JAX's persistent cache
  key, so a program compiled for a new environment misses that cache and compiles
  afresh. One JAX loads from its cache cannot be stored here: on XLA:CPU its
  serialization lacks the compiled kernels (it fails to run: "Function ... not found")."""
  @functools.wraps(fun)
  def program(*args, **kwargs):
    return fun(*args, **kwargs)
  program.__name__ = f"{getattr(fun, '__name__', 'program')}_{salt()}"
  return program


_compiles = threading.local()  # per thread: how many compiles JAX's cache answered


def _count_cache_hits(event: str, **kwargs: Any) -> None:
  if event == "/jax/compilation_cache/cache_hits":
    _compiles.cache_hits = getattr(_compiles, "cache_hits", 0) + 1


jax.monitoring.register_event_listener(_count_cache_hits)


def compile_fresh(lowered: Any) -> tuple[Any, bool]:
  """``lowered.compile()``, and whether XLA compiled it (rather than JAX's persistent
  cache returning it): only then can it be stored (`renamed`)."""
  hits = getattr(_compiles, "cache_hits", 0)
  compiled = lowered.compile()
  return compiled, getattr(_compiles, "cache_hits", 0) == hits


def entry_key(identity: str) -> str | None:
  """The file name of what ``identity`` (a program and its arguments, or a value's
  inputs) names in this environment; None for an identity that names an object by its
  address, which another process may reuse for something else."""
  if " at 0x" in identity:
    return None
  return hashlib.sha256(f"{environment()}|{identity}".encode()).hexdigest()


def _path(key: str | None) -> epath.Path | None:
  folder = directory()
  return None if folder is None or key is None else epath.Path(folder) / key


def _read(key: str | None) -> Any | None:
  path = _path(key)
  try:
    if path is None or not path.exists():
      return None
    return pickle.loads(path.read_bytes())
  except Exception as error:  # pylint: disable=broad-except
    logging.warning("ignoring unreadable stored program %s: %r", path, error)
    return None


def _write(key: str | None, value: Any) -> None:
  """Write whole or not at all (`files.write_bytes`); a failure only costs the next run
  a trace."""
  path = _path(key)
  if path is None:
    return
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_bytes(path, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
  except Exception as error:  # pylint: disable=broad-except
    logging.warning("could not store a compiled program in %s: %r", path.parent, error)


def load_executable(identity: str, device: jax.Device) -> tuple[Any, Any] | None:
  """The stored ``(compiled, out_avals)`` of ``identity``, loaded onto ``device``; None
  if there is none (or it cannot be loaded)."""
  stored = _read(entry_key(identity))
  if stored is None:
    return None
  payload, in_tree, out_tree, out_avals = stored
  try:
    compiled = serialize_executable.deserialize_and_load(
        payload, in_tree, out_tree, backend=device.platform, execution_devices=[device])
  except Exception as error:  # pylint: disable=broad-except
    logging.warning("ignoring a stored program that does not load: %r", error)
    return None
  return compiled, out_avals


def save_executable(identity: str, compiled: Any, out_avals: Any) -> None:
  """Store a compiled program with its output shapes (``out_avals``: a pytree of
  `jax.ShapeDtypeStruct`, weak types included)."""
  if directory() is None:
    return
  try:
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
  except Exception as error:  # pylint: disable=broad-except
    logging.warning("could not serialize a compiled program: %r", error)
    return
  _write(entry_key(identity), (payload, in_tree, out_tree, out_avals))


def cached_value(identity: str, compute: Callable[[], Any]) -> Any:
  """``compute()``, stored under ``identity`` and read back by later processes (for
  picklable results of tracing, such as shapes)."""
  value = _read(entry_key(identity))
  if value is None:
    value = compute()
    _write(entry_key(identity), value)
  return value
