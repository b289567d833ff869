"""Output files that a rerun trusts (a stage's results, the net and space files) are
written whole or not at all."""

from __future__ import annotations

import os
import threading

from etils import epath


def write_text(path: str | os.PathLike, text: str) -> None:
  """`write_bytes` of ``text`` in UTF-8."""
  write_bytes(path, text.encode())


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Write ``data`` to a hidden sibling, then move it over ``path``.

  A run killed mid-write then leaves no truncated file, which a rerun would take for a
  finished stage and fail to parse. Local moves are atomic renames; on GCS a move copies
  and deletes, and objects appear whole either way. Each writer has a sibling of its
  own, so that two writing one path at once (pytest workers, threads) do not mix.
  """
  path = epath.Path(path)
  partial = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.partial")
  partial.write_bytes(data)
  partial.replace(path)
