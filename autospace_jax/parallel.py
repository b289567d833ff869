"""Data parallelism: one mesh axis `data` over every device of every host.

Parameters are replicated and the global batch is split along `data`. Under global-view
`jit` a batch mean over the sharded batch is an all-reduce, so BatchNorm statistics are
synchronised across replicas (the same numbers as one device on the whole batch).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


class DataParallel:
  """The mesh and the two shardings every stage uses."""

  def __init__(self, devices: Any = None):
    devices = np.asarray(jax.devices() if devices is None else devices)
    self.mesh = jax.sharding.Mesh(devices.reshape(-1), ("data",))
    self.batch = NamedSharding(self.mesh, PartitionSpec("data"))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  def global_batch(self, local_batch: dict) -> dict:
    """Assemble each host's slice of the batch into global arrays sharded on `data`."""
    return {k: jax.make_array_from_process_local_data(self.batch, np.asarray(v))
            for k, v in local_batch.items()}

  def global_batch_shapes(self, local_batch: dict) -> dict:
    """The shapes and shardings `global_batch` gives (for compile-only passes): each host
    holds an equal slice of the global batch."""
    return {k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(), *v.shape[1:]),
                                    v.dtype, sharding=self.batch)
            for k, v in local_batch.items()}

  def replicate(self, tree: Any) -> Any:
    """Every leaf on every device. A jax.Array not yet replicated goes through host memory:
    `device_put` of an array on one local device onto a mesh that spans other processes
    gives an array whose shards cannot be read (Orbax then fails to save it)."""
    def put(x):
      if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        if x.sharding == self.replicated:
          return x
        x = np.asarray(x)
      return jax.device_put(x, self.replicated)
    return jax.tree.map(put, tree)
