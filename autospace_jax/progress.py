"""A progress bar with live metrics, shown by process 0 only."""

from __future__ import annotations

import sys
from typing import Mapping

import jax
import tqdm


class Bar:
  """tqdm over steps; metrics are refreshed at most a few times a second."""

  def __init__(self, total: int, stage: str, initial: int = 0):
    self._bar = tqdm.tqdm(total=total, initial=initial, desc=stage, unit="step",
                          dynamic_ncols=True, file=sys.stderr, mininterval=0.5,
                          disable=jax.process_index() != 0)

  def update(self, step: int, metrics: Mapping[str, float] | None = None) -> None:
    self._bar.update(step - self._bar.n)
    # A disabled bar (processes other than 0) has no `last_print_n`.
    if metrics and not self._bar.disable and self._bar.last_print_n == self._bar.n:
      self._bar.set_postfix({k: f"{float(v):.3f}" for k, v in metrics.items()},
                            refresh=False)

  def close(self) -> None:
    self._bar.close()
