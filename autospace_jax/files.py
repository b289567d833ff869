"""Output files that a rerun trusts (a stage's results, the net and space files) are
written whole or not at all."""

from __future__ import annotations

import os

from etils import epath


def write_text(path: str | os.PathLike, text: str) -> None:
  """Write ``text`` to a hidden sibling, then move it over ``path``.

  A run killed mid-write then leaves no truncated file, which a rerun would take for a
  finished stage and fail to parse. Local moves are atomic renames; on GCS a move copies
  and deletes, and objects appear whole either way.
  """
  path = epath.Path(path)
  partial = path.with_name(f".{path.name}.partial")
  partial.write_text(text)
  partial.replace(path)
