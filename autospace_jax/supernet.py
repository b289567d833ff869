"""The weight-sharing supernet of stages 1 and 2, chained from the host.

Why not one jitted program with `lax.switch` over the K cells of each layer? Cells are
genomes that change every f steps, so a switch over static cells recompiles the whole
step every mutation round (seconds to minutes); a switch over genome-as-data cells
compiles once but nests 60 branches per layer, compiled for minutes, and on XLA:CPU its
backward ran 5-14x slower than a static net (measured: see benchmarks/). Instead the
host, which already knows the sampled path, runs each op of the sampled cells as its own
small jitted function (one per op kind and shape, compiled once and reused by every
genome). Each returns its output and its VJP (residuals as a pytree); the host records
them on a tape and runs the VJPs backward, each a jitted call too. (Eager
`jax.value_and_grad` over the same chain did the same maths at twice the step time:
tracing and linearising every call in Python.) Exactly the sampled cells execute,
nothing recompiles when the cells change, and per-op weights come from a per-layer bank
keyed by (op name, expansion) so the parameter tree never changes shape. Only the bank
entries that ran are updated, so weights and optimizer state of ops that did not run
cannot move. The same path code, run as a compile-only pass (`PathRun.compile_only`),
compiles a step's programs without running them, which lets precompile.py compile ahead
on background threads; the programs such a pass compiles are stored on disk
(program_store.py), and a later run's passes load them (~2 ms each) instead of tracing
and lowering them again (~25 ms each, holding the GIL).
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import functools
import logging
import os
import threading
import weakref
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from autospace_jax import cells
from autospace_jax import genome as genome_lib
from autospace_jax import netspec
from autospace_jax import ops
from autospace_jax import program_store
from autospace_jax import seeding
from autospace_jax.parallel import DataParallel

Op = Any  # a Genome or netspec.ZERO


@dataclasses.dataclass(frozen=True)
class LayerShape:
  """Where a searchable layer sits: channels, stride, input spatial size."""

  in_channels: int
  out_channels: int
  stride: int
  in_size: int

  @property
  def has_shortcut(self) -> bool:
    return self.stride == 1 and self.in_channels == self.out_channels


@dataclasses.dataclass(frozen=True)
class SupernetSpec:
  """The macro-network around the searchable layers, and the ops the bank must hold."""

  layers: tuple[LayerShape, ...]
  first_block: netspec.LayerSpec
  stem_channels: int
  head_channels: int
  num_classes: int
  resolution: int
  conv_codes: tuple[int, ...] = (3, 5)
  bn_momentum: float = 0.1  # PyTorch convention, as in NetSpec.
  bn_eps: float = 1e-3
  # Stage 2: each layer's (padded) candidates, every one with its own weights, as the
  # candidate ops of a ProxylessNAS mixed op. None (stage 1): the K cells of a layer share
  # its bank keyed by (op name, expansion), SPEC §5, and mutated cells inherit weights.
  slot_cells: tuple[tuple[Op, ...], ...] | None = None

  @property
  def bn(self) -> dict[str, float]:
    return {"bn_momentum": 1.0 - self.bn_momentum, "bn_epsilon": self.bn_eps}

  def net_spec(self, ops: Sequence[Op], se: bool = False) -> netspec.NetSpec:
    """The static net that runs ``ops`` in the searchable layers."""
    layers = [self.first_block] + [
        netspec.LayerSpec(s.in_channels, s.out_channels, s.stride, op,
                          netspec.block_kind(op))
        for s, op in zip(self.layers, ops)]
    return netspec.NetSpec(tuple(layers), self.stem_channels, self.head_channels,
                           self.num_classes, self.resolution, self.bn_momentum, self.bn_eps,
                           se)


def supernet_spec_from_net(net: netspec.NetSpec, conv_codes: Sequence[int]) -> SupernetSpec:
  """The supernet whose searchable layers are ``net``'s layers after the first block."""
  size = -(-net.resolution // 2)
  size = -(-size // net.layers[0].stride)
  shapes = []
  for layer in net.layers[1:]:
    shapes.append(LayerShape(layer.in_channels, layer.out_channels, layer.stride, size))
    size = -(-size // layer.stride)
  return SupernetSpec(tuple(shapes), net.layers[0], net.stem_channels, net.head_channels,
                      net.num_classes, net.resolution, tuple(conv_codes), net.bn_momentum,
                      net.bn_eps)


# --- Jitted ops ---------------------------------------------------------------------------

# XLA:CPU options for the supernet's few hundred small programs, whose compiles the first
# steps wait for: together they halve them at the same step time and the same numerics up
# to float rounding (jax 0.10, the default's programs for one path through each of 5
# candidates: 21.3 s -> 10.7 s; stage 3's whole-net step: 4.4 -> 2.9 s). They are used
# together or not at all: jax 0.12 lacks the first, and the second alone changed its
# results (one vs eight devices differed 5.7e-5 in the weights instead of 4e-7). Other
# platforms keep XLA's defaults (there the device computes while the host compiles).
CPU_COMPILE_OPTIONS = {"xla_cpu_use_fusion_emitters": False,
                       "xla_backend_optimization_level": 1}


@functools.lru_cache(maxsize=None)
def compile_options(platform: str) -> dict[str, Any]:
  """`CPU_COMPILE_OPTIONS` on "cpu" if this XLA accepts all of them; otherwise none."""
  if platform != "cpu":
    return {}
  try:
    jax.jit(jnp.negative, compiler_options=CPU_COMPILE_OPTIONS).lower(
        jax.ShapeDtypeStruct((), jnp.float32)).compile()
  except jax.errors.JaxRuntimeError as error:
    if "No such compile option" not in str(error):
      raise
    return {}
  return dict(CPU_COMPILE_OPTIONS)


_UNSEEN = object()


class PlatformJit:
  """``jax.jit(fun, **kwargs)`` compiled with `compile_options` of the default backend,
  chosen at the first call or lowering (import time is too early to ask for a backend).

  ``cache_id``, if given, names what ``fun`` computes, closure included, stably across
  processes: compile-only passes then store its compiled programs (`program_store`) and
  later processes load them instead of tracing; calls with a loaded program's argument
  signature run it directly (`Compiled` call, as fast as jit's own dispatch).
  """

  def __init__(self, fun: Callable, cache_id: str | None = None, **kwargs: Any):
    functools.update_wrapper(self, fun)
    self._fun, self._kwargs = fun, kwargs
    self.cache_id = cache_id
    self._lock = threading.Lock()
    self._jitted: Callable | None = None
    self._loaded: dict[tuple, Any] = {}  # call signature -> loaded `Compiled`
    self._loaded_by_avals: dict[tuple, Any] = {}  # the same (or None), found by avals

  def _get(self) -> Any:
    if self._jitted is None:
      with self._lock:
        if self._jitted is None:
          fun = self._fun
          if self.cache_id and program_store.directory():
            fun = program_store.renamed(fun)
          self._jitted = jax.jit(fun, **self._kwargs, compiler_options=compile_options(
              jax.default_backend()) or None)
    return self._jitted

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    if self._loaded:
      compiled = self._find_loaded(args, kwargs)
      if compiled is not None:
        return compiled(*args)
    return self._get()(*args, **kwargs)

  def _find_loaded(self, args: tuple, static: dict) -> Any | None:
    """The loaded program for this call, if any. Looked up by the arguments' avals, an
    attribute of every array (4 us per call for 30 arrays), which `call_signature`
    (12 us, ~100 calls per step) matches once per new combination."""
    leaves, tree = jax.tree.flatten(args)
    try:
      key = (tree, tuple([leaf.aval for leaf in leaves]), tuple(static.items()))
    except AttributeError:  # a Python scalar or a NumPy array among the arguments
      return self._loaded.get(call_signature(args, static))
    compiled = self._loaded_by_avals.get(key, _UNSEEN)
    if compiled is _UNSEEN:  # (`load` may clear the table meanwhile, on a pass's thread)
      compiled = self._loaded_by_avals[key] = self._loaded.get(call_signature(args, static))
    return compiled

  def trace(self, *args: Any, **kwargs: Any) -> Any:
    return self._get().trace(*args, **kwargs)

  def load(self, signature: tuple, compiled: Any) -> None:
    """Run ``compiled`` for calls with this `call_signature` (static arguments by
    keyword, as `compile_path` passes them)."""
    self._loaded[signature] = compiled
    self._loaded_by_avals.clear()  # calls it did not match may match now


def _leaf_signature(leaf: Any) -> tuple:
  if hasattr(leaf, "shape"):
    return tuple(leaf.shape), leaf.dtype, getattr(leaf, "weak_type", False)
  return (type(leaf),)


def call_signature(args: tuple, static: dict) -> tuple:
  """What selects a compiled program for a call: the arguments' tree, each leaf's shape,
  dtype and weak type (arrays, tracers and `jax.ShapeDtypeStruct` alike), and the static
  arguments. Shardings are not in it: stored programs are single-device."""
  leaves, tree = jax.tree.flatten(args)
  return tree, tuple(map(_leaf_signature, leaves)), tuple(sorted(static.items()))


def _signature_text(cache_id: str, signature: tuple) -> str:
  """`call_signature` as text that is the same in every process."""
  tree, leaves, static = signature
  return repr((cache_id, str(tree), [(s[0], str(s[1]), s[2]) if len(s) == 3 else
                                     s[0].__qualname__ for s in leaves], static))


def _module_apply(module: flax.linen.Module) -> Callable:
  """``(params, batch_stats, *inputs) -> (output, new batch_stats)`` in training mode."""
  def apply(params, batch_stats, *inputs):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    out, mutated = module.apply(variables, *inputs, train=True, mutable=["batch_stats"])
    return out, mutated.get("batch_stats", {})
  return apply


def _built_once(factory: Callable) -> Callable:
  """Cache ``factory``'s results, building each once even when threads ask at the same
  time: the training loop and precompile threads must share one jitted function per op,
  as its compiled programs live in it."""
  cached = functools.lru_cache(maxsize=None)(factory)
  lock = threading.Lock()

  @functools.wraps(factory)
  def build(*args):
    with lock:
      return cached(*args)

  return build


def _op_id(module_class: type, frozen_kwargs: tuple) -> str:
  """A stable name for an op kind: its module class and settings (`PlatformJit.cache_id`)."""
  return f"{module_class.__module__}.{module_class.__qualname__}{frozen_kwargs!r}"


@_built_once
def _jitted_op(module_class: type, frozen_kwargs: tuple) -> Callable:
  """One jitted forward per op kind (no gradients); jit's cache keys it by shapes."""
  return PlatformJit(_module_apply(module_class(**dict(frozen_kwargs))),
                     cache_id="op:" + _op_id(module_class, frozen_kwargs))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Forwarded:
  """Stands, among the residuals a forward program returns, for one that is the
  program's ``index``-th argument leaf (an op's input or weights). jit copies every
  output, so returning such residuals would copy each activation once more per op; the
  backward program takes the forward's arguments instead (`Pullback`)."""

  index: int


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _VjpTree:
  """Names, among a forward program's outputs, the tree its residuals unflatten to (a
  VJP function, `_vjp_trees`): the program's `_signature_text`, the same in every
  process. The VJP's own tree holds a function of one trace, which could be neither
  stored with the program nor matched by a program loaded from disk."""

  name: str


_vjp_trees: dict[_VjpTree, Any] = {}  # registered when a forward program is traced
_vjp_sources: dict[_VjpTree, tuple] = {}  # (program, args, static) of loaded forwards


def _forwarding_inputs(fun: Callable, cache_id: str) -> Callable:
  """``fun(*args) -> (out, vjp, *aux)`` as ``(out, (_VjpTree, residuals), *aux)``: the
  VJP's residual leaves, those that are leaves of ``args`` replaced by `_Forwarded`
  (tracers are told apart by identity), and the name of its tree."""
  @functools.wraps(fun)
  def forward(*args, **static):
    out, vjp, *aux = fun(*args, **static)
    residuals, tree = jax.tree.flatten(vjp)
    name = _VjpTree(_signature_text(cache_id, call_signature(args, static)))
    _vjp_trees[name] = tree
    index = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(args))}
    return (out, (name, tuple(_Forwarded(index[id(r)]) if id(r) in index else r
                              for r in residuals)), *aux)
  return forward


def _vjp_program(fun: Callable, cache_id: str, **kwargs: Any) -> PlatformJit:
  """A jitted `_forwarding_inputs` forward."""
  return PlatformJit(_forwarding_inputs(fun, cache_id), cache_id=cache_id, **kwargs)


@dataclasses.dataclass(frozen=True)
class Pullback:
  """A taped VJP: its residuals, and the leaves of the arguments of the forward program
  that made them, which the `_Forwarded` residuals refer to."""

  residuals: tuple  # (_VjpTree, residual leaves)
  arguments: tuple


def _vjp_tree(name: _VjpTree) -> Any:
  """The VJP tree ``name`` stands for; a forward that was loaded, not traced, is traced
  now (once, the first time a backward program of it must be)."""
  if name not in _vjp_trees:
    program, args, static = _vjp_sources[name]
    program.trace(*args, **static)  # registers it
  return _vjp_trees[name]


def _restored(residuals: tuple, arguments: tuple) -> Callable:
  """The VJP with its `_Forwarded` residuals replaced by the arguments they stand for."""
  name, leaves = residuals
  return jax.tree.unflatten(_vjp_tree(name), [
      arguments[r.index] if isinstance(r, _Forwarded) else r for r in leaves])


@functools.partial(PlatformJit, cache_id="backward")
def _backward(residuals: tuple, arguments: tuple, cotangent: Any) -> Any:
  return _restored(residuals, arguments)(cotangent)


@functools.partial(PlatformJit, cache_id="backward_to_inputs")
def _backward_to_inputs(residuals: tuple, arguments: tuple, cotangent: Any) -> Any:
  """`_backward` without the parameters' cotangent, whose computation XLA then drops."""
  return _restored(residuals, arguments)(cotangent)[1:]


@_built_once
def _jitted_op_vjp(module_class: type, frozen_kwargs: tuple, wrt_inputs: bool) -> Callable:
  """The op's forward that also returns its VJP: ``(out, residuals, new_stats)``.

  The residuals come from `_forwarding_inputs`; `_backward` applies the VJP to the
  output's cotangent and returns cotangents for the params (and the inputs, if
  ``wrt_inputs``).
  """
  apply = _module_apply(module_class(**dict(frozen_kwargs)))

  def forward(params, batch_stats, *inputs):
    differentiated, constant = (inputs, ()) if wrt_inputs else ((), inputs)
    return jax.vjp(lambda p, *x: apply(p, batch_stats, *x, *constant), params,
                   *differentiated, has_aux=True)

  return _vjp_program(forward, f"op_vjp:{_op_id(module_class, frozen_kwargs)}:{wrt_inputs}")


def _op_kwargs(module_class: type, kwargs: dict, bn: dict) -> tuple:
  if module_class in cells.BN_MODULES:
    kwargs = {**kwargs, **bn}
  return tuple(sorted(kwargs.items()))


def bank_entry(name: str, genome: genome_lib.Genome) -> str:
  """Bank key of an op: its name in the static cell plus the cell's expansion."""
  return f"{name}_e{genome.expansion}"


def slot_entry(spec: SupernetSpec, slot: int, entry: str) -> str:
  """The bank key ``entry`` of candidate ``slot``: itself in a shared bank, else prefixed
  by the slot (`SupernetSpec.slot_cells`)."""
  return entry if spec.slot_cells is None else f"slot{slot}_{entry}"


def _covering_genomes(conv_codes: Sequence[int]) -> list[genome_lib.Genome]:
  """Genomes that together touch every bank entry: all edges conv k, both mixes on."""
  all_conv = [tuple(genome_lib.NONE if e == genome_lib.UNUSED_EDGE else k
                    for e in genome_lib.EDGES) for k in conv_codes]
  return [genome_lib.Genome(edges, e_idx, (1, 1)) for edges in all_conv
          for e_idx in range(len(genome_lib.EXPANSION_RATIOS))]


@functools.lru_cache(maxsize=None)
def _abstract_init(module: flax.linen.Module, inputs: tuple) -> tuple[Any, Any]:
  """Shapes of an op's output and variables (ops recur across genomes and layers): traced
  once, then read from `program_store` (~25 ms of tracing each, ~100 per supernet)."""
  return program_store.cached_value(
      f"abstract_init:{module!r}:{[(i.shape, str(i.dtype)) for i in inputs]}",
      lambda: jax.eval_shape(
          lambda *x: module.init_with_output(jax.random.PRNGKey(0), *x, train=True), *inputs))


def _bank_modules(shape: LayerShape, spec: SupernetSpec, layer: int) -> dict[str, Any]:
  """Abstract variables of every op a cell in this layer may run, keyed by bank entry."""
  bank: dict[str, Any] = {}

  def record(genome, slot):
    def apply_op(name, module_class, kwargs, *inputs):
      module = module_class(**dict(_op_kwargs(module_class, kwargs, spec.bn)))
      out, variables = _abstract_init(module, tuple(
          jax.ShapeDtypeStruct(i.shape, i.dtype) for i in inputs))
      bank.setdefault(slot_entry(spec, slot, bank_entry(name, genome)), variables)
      return out
    return apply_op

  def add(*inputs):  # a node's inputs all have its shape
    return inputs[0]

  def subsample(v, stride):
    return v if stride == 1 else jax.ShapeDtypeStruct(
        (v.shape[0], -(-v.shape[1] // stride), -(-v.shape[2] // stride), v.shape[3]), v.dtype)

  x = jax.ShapeDtypeStruct((1, shape.in_size, shape.in_size, shape.in_channels), jnp.float32)
  slotted = (enumerate(_covering_genomes(spec.conv_codes)) if spec.slot_cells is None else
             ((slot, g) for slot, g in enumerate(spec.slot_cells[layer]) if g != netspec.ZERO))
  for slot, g in slotted:
    cells.cell_dataflow(g, x, shape.out_channels, shape.stride, False, record(g, slot), add,
                        subsample)
  return dict(sorted(bank.items()))


def _fixed_modules(spec: SupernetSpec) -> dict[str, flax.linen.Module]:
  return {
      "stem": cells.Stem(**spec.bn, features=spec.stem_channels),
      "first_block": cells.Block(**spec.bn, layer=spec.first_block),
      "head": cells.Head(**spec.bn, features=spec.head_channels,
                         num_classes=spec.num_classes),
  }


def _fixed_inputs(spec: SupernetSpec) -> dict[str, jax.ShapeDtypeStruct]:
  last = spec.layers[-1]
  sizes = {"stem": (spec.resolution, 3),
           "first_block": (-(-spec.resolution // 2), spec.first_block.in_channels),
           "head": (-(-last.in_size // last.stride), last.out_channels)}
  return {name: jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
          for name, (size, channels) in sizes.items()}


def layer_name(index: int) -> str:
  return f"layer_{index:02d}"


def init_variables(spec: SupernetSpec, seed: int) -> dict:
  """{'params': ..., 'batch_stats': ...} for the fixed parts and every layer's bank."""
  host_rng = seeding.generator(seed, "supernet_weights")
  params: dict[str, Any] = {"layers": {}}
  stats: dict[str, Any] = {"layers": {}}
  inputs = _fixed_inputs(spec)
  for name, module in _fixed_modules(spec).items():
    abstract = jax.eval_shape(lambda x, m=module: m.init(jax.random.PRNGKey(0), x, train=True),
                              inputs[name])
    v = cells.host_init(abstract, host_rng)
    params[name], stats[name] = v["params"], v.get("batch_stats", {})
  for i, shape in enumerate(spec.layers):
    bank = cells.host_init(_bank_modules(shape, spec, i), host_rng)
    params["layers"][layer_name(i)] = {k: v["params"] for k, v in bank.items()}
    stats["layers"][layer_name(i)] = {k: v.get("batch_stats", {}) for k, v in bank.items()}
  return {"params": params, "batch_stats": stats}


# --- Forward through a sampled path -------------------------------------------------------


class _Probe:
  """Stands in for an activation to list the calls a genome makes, without computing."""

  shape = (1, 1, 1, 1)


@functools.lru_cache(maxsize=None)
def cell_calls(op: Op) -> tuple[tuple, ...]:
  """The program calls the cell ``op`` makes, in order and without computing anything:
  ``("op", bank entry, number of inputs)``, ``("add", expansion, number of inputs)`` and
  ``("subsample", expansion)``. Within one layer these fix which programs run."""
  if op == netspec.ZERO:
    return ()
  calls = []

  def apply_op(name, module_class, kwargs, *inputs):
    calls.append(("op", bank_entry(name, op), len(inputs)))
    return _Probe()

  def add(*inputs):
    calls.append(("add", op.expansion, len(inputs)))
    return _Probe()

  def subsample(x, stride):
    if stride > 1:
      calls.append(("subsample", op.expansion))
    return _Probe()

  cells.cell_dataflow(op, _Probe(), 1, 2, False, apply_op, add, subsample)
  return tuple(calls)


def cell_entries(op: Op) -> tuple[str, ...]:
  """Bank entries the cell ``op`` runs (none for Zero)."""
  return tuple(call[1] for call in cell_calls(op) if call[0] == "op")


@dataclasses.dataclass(frozen=True)
class Leaf:
  """A differentiated input that is not an activation: a bank or fixed entry, or α."""

  key: tuple


ALPHA = Leaf(("alpha",))


@dataclasses.dataclass
class EntryOptimizer:
  """Applies the weight optimizer to each parameter entry as soon as a `PathRun.backward`
  reaches it, inside that op's backward program: one program call per op instead of
  two. An entry is reached once per step (each op of a cell has its own entry)."""

  backward_update: Callable  # (residuals, arguments, ct, params, opt_state, lr) program
  params: dict
  opt_state: dict
  learning_rate: Any
  updated: dict = dataclasses.field(default_factory=dict)  # key -> (params, opt_state)

  @staticmethod
  def trains(source: Any) -> bool:
    """Whether ``source`` is a parameter entry (a `Leaf` other than α)."""
    return isinstance(source, Leaf) and source != ALPHA

  def backward(self, run: "PathRun", key: tuple, pullback: Pullback, cotangent: Any
               ) -> tuple:
    """The op's input cotangents; its entry's new weights and state go to ``updated``."""
    if key in self.updated:
      raise ValueError(f"entry {key} ran twice in one step; its update would be applied "
                       "twice")
    params, opt_state, input_cotangents = run.call(
        self.backward_update, pullback.residuals, pullback.arguments, cotangent,
        _get(self.params, key), _get(self.opt_state, key), self.learning_rate)
    self.updated[key] = (params, opt_state)
    return input_cotangents


@dataclasses.dataclass
class PathRun:
  """What one forward pass touched: new BN statistics, and the tape that runs it
  backward.

  Each tape record is ``(output, pullback, sources)``: the `Pullback` maps the output's
  cotangent to one cotangent per source (an activation array, a `Leaf`, or None for
  inputs that need none); ``pullback`` None marks a sum, whose sources all get the
  output's cotangent.
  """

  batch_stats: dict = dataclasses.field(default_factory=dict)
  tape: list = dataclasses.field(default_factory=list)
  compile_only: bool = False
  optimizer: EntryOptimizer | None = None
  weight_grads: bool = True  # False: `backward` skips the parameter entries' cotangents
  compiles: list = dataclasses.field(default_factory=list)  # compile-only: queued compiles
  # Compile-only: asked before each program; once true the pass stops (CancelledError).
  cancelled: Callable[[], bool] | None = None

  def call(self, program: Callable, *args: Any, **static: Any) -> Any:
    """Run a jitted program; in a compile-only pass, compile it (jit's caches keep the
    executable for the real call) and return the shapes of its outputs instead (the
    compile may still be running: see `compiles`)."""
    if self.compile_only:
      return _compile_once(program, args, static, self)
    return program(*args, **static)

  def call_vjp(self, program: Callable, *args: Any, **static: Any) -> tuple:
    """`call` a `_forwarding_inputs` program: ``(out, Pullback, *aux)``."""
    out, residuals, *aux = self.call(program, *args, **static)
    return (out, Pullback(residuals, tuple(jax.tree.leaves(args))), *aux)

  def record(self, output: jax.Array, pullback: Pullback | None, sources: Sequence[Any]
             ) -> jax.Array:
    self.tape.append((output, pullback, tuple(sources)))
    return output

  def add(self, *inputs: jax.Array) -> jax.Array:
    return self.record(self.call(_jitted_add, *inputs), None, inputs)

  def subsample(self, x: jax.Array, stride: int) -> jax.Array:
    if stride == 1:
      return x
    out, pullback = self.call_vjp(_subsample_vjp, x, stride=stride)
    return self.record(out, pullback, (x,))

  def backward(self, output: jax.Array, cotangent: jax.Array) -> dict[tuple, Any]:
    """Cotangents of every `Leaf` that ``output`` depends on, keyed by the leaf's key;
    with an ``optimizer``, the entries it trains are updated instead (`EntryOptimizer`).

    Records run in reverse; an activation's cotangent is complete when its producer is
    reached, since every consumer was recorded after it. Sources are kept alive by the
    tape, so their ids stay unique while it runs.
    """
    pending = {id(output): cotangent}
    leaves: dict[tuple, Any] = {}
    for out, pullback, sources in reversed(self.tape):
      ct = pending.pop(id(out), None)
      if ct is None:
        continue  # nothing downstream used it (e.g. it fed a Zero cell)
      if pullback is None:
        cotangents = (ct,) * len(sources)
      elif self.optimizer is not None and self.optimizer.trains(sources[0]):
        cotangents = (None, *self.optimizer.backward(self, sources[0].key, pullback, ct))
      elif not self.weight_grads and EntryOptimizer.trains(sources[0]):
        if len(sources) == 1:
          continue  # an op on the images: nothing upstream needs a cotangent
        cotangents = (None, *self.call(_backward_to_inputs, pullback.residuals,
                                       pullback.arguments, ct))
      else:
        cotangents = self.call(_backward, pullback.residuals, pullback.arguments, ct)
      for source, source_ct in zip(sources, cotangents):
        if source is None or source_ct is None:
          continue
        bucket, key = (leaves, source.key) if isinstance(source, Leaf) else (pending,
                                                                             id(source))
        bucket[key] = (source_ct if key not in bucket
                       else self.call(_accumulate, bucket[key], source_ct))
    return leaves


@dataclasses.dataclass
class _Compiling:
  """A program's output shapes, known once it is lowered, and its compile."""

  outputs: concurrent.futures.Future = dataclasses.field(
      default_factory=concurrent.futures.Future)
  compiled: concurrent.futures.Future = dataclasses.field(
      default_factory=concurrent.futures.Future)
  job: concurrent.futures.Future | None = None  # the compile, while queued on the pool


# Per program, by argument signature. Weakly keyed: a trainer's own programs (its α update,
# its learning-rate schedule) and their entries go with the trainer.
_compilations: weakref.WeakKeyDictionary[Callable, dict[tuple, _Compiling]] = (
    weakref.WeakKeyDictionary())
_compilations_lock = threading.Lock()
# XLA compiles release the GIL: while they run, a pass traces and lowers its next programs.
_compiler = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1, "autospace-compile")


def cancel_queued_compiles() -> None:
  """Drop the compiles still queued on the pool, for a closing `Precompiler` (whose passes
  stop through `PathRun.cancelled`): what they would have compiled compiles when a step
  (or a later pass) first needs it."""
  with _compilations_lock:
    cancelled = [(program, key, compiling) for program, table in _compilations.items()
                 for key, compiling in table.items()
                 if compiling.job is not None and compiling.job.cancel()]
    for program, key, _ in cancelled:
      del _compilations[program][key]
  for _, _, compiling in cancelled:
    _fail(compiling, concurrent.futures.CancelledError())


def shapes_of(tree: Any) -> Any:
  """``tree`` with each array replaced by its shape, dtype, weak type and sharding: all a
  compile-only pass needs of it, without keeping its memory alive."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=getattr(x, "sharding", None),
      weak_type=getattr(x, "weak_type", False)), tree)


def _compile_once(program: Callable, args: tuple, static: dict, run: PathRun) -> Any:
  """Lower ``program`` for these arguments' shapes and shardings, queue its compile (added
  to ``run.compiles``) and return its output shapes; a program another compile-only pass
  compiles (or compiled) is not compiled again, and one stored by an earlier process
  (`program_store`) is loaded instead. Static arguments must be passed by keyword
  (positional ones are keyed by type only)."""
  if run.cancelled is not None and run.cancelled():
    raise concurrent.futures.CancelledError()
  leaf_keys = tuple((a.shape, a.dtype, getattr(a, "weak_type", False),
                     getattr(a, "sharding", None)) if hasattr(a, "shape") else type(a)
                    for a in jax.tree.leaves(args))
  key = (jax.tree.structure(args), leaf_keys, tuple(sorted(static.items())))
  with _compilations_lock:
    table = _compilations.setdefault(program, {})
    compiling = table.get(key)
    compiling_here = compiling is None
    if compiling_here:
      compiling = table[key] = _Compiling()
  if compiling_here:
    try:
      device = _single_device(args)
      signature = call_signature(args, static)
      stored_as = (_signature_text(program.cache_id, signature)
                   if device is not None and getattr(program, "cache_id", None) else None)
      loaded = stored_as and program_store.load_executable(stored_as, device)
      if loaded:
        _use_loaded(program, signature, args, static, *loaded)
        compiling.outputs.set_result(_replicated_outputs(loaded[1], args))
        compiling.compiled.set_result(None)
      else:
        traced = program.trace(*args, **static)
        lowered = traced.lower()
        if device is None:
          compiled = lowered.compile().out_info
          compiling.outputs.set_result(_output_shapes(
              traced.out_avals, jax.tree.map(lambda o: o.sharding, compiled)))
          compiling.compiled.set_result(None)
        else:
          outputs = _replicated_outputs(traced.out_avals, args)
          compiling.outputs.set_result(outputs)
          with _compilations_lock:  # so that `cancel_queued_compiles` sees every job
            compiling.job = _compiler.submit(_compile, program, lowered, outputs, key,
                                             compiling, signature, stored_as)
    except BaseException as error:
      _failed(program, key, compiling, error)
  run.compiles.append(compiling.compiled)
  # Fresh leaves for every call: the tape tells activations apart by identity, and two
  # calls of one program (two identical edges from one node) must not share outputs.
  return jax.tree.map(copy.copy, compiling.outputs.result())


def _use_loaded(program: PlatformJit, signature: tuple, args: tuple, static: dict,
                compiled: Any, out_avals: Any) -> None:
  """Let calls with this `call_signature` run a program loaded from disk; a loaded forward
  is remembered, in case a backward of it must be traced (`_vjp_tree`)."""
  program.load(signature, compiled)
  residuals = out_avals[1] if isinstance(out_avals, tuple) and len(out_avals) > 1 else None
  if isinstance(residuals, tuple) and residuals and isinstance(residuals[0], _VjpTree):
    _vjp_sources.setdefault(residuals[0], (program, args, static))


def _single_device(args: tuple) -> jax.Device | None:
  """The device of arguments placed on a one-device mesh, where every output is
  replicated, so that a lowered program's outputs are known before it compiles; None on
  a larger mesh, where XLA's sharding propagation decides them."""
  mesh = next((a.sharding.mesh for a in jax.tree.leaves(args)
               if isinstance(getattr(a, "sharding", None), NamedSharding)), None)
  return None if mesh is None or mesh.size != 1 else mesh.devices.flat[0]


def _replicated_outputs(out_avals: Any, args: tuple) -> Any:
  """Output shapes of a program on the one-device mesh of its ``args``."""
  mesh = next(a.sharding.mesh for a in jax.tree.leaves(args)
              if isinstance(getattr(a, "sharding", None), NamedSharding))
  replicated = NamedSharding(mesh, PartitionSpec())
  return _output_shapes(out_avals, jax.tree.map(lambda _: replicated, out_avals))


def _output_shapes(out_avals: Any, shardings: Any) -> Any:
  """Outputs as the real call returns them: shapes, dtypes and weak types from the trace
  (`out_info` lacks the weak types, which key jit's caches), with these shardings."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s,
                                                        weak_type=a.weak_type),
                      out_avals, shardings)


def _compile(program: Callable, lowered: Any, outputs: Any, key: tuple,
             compiling: _Compiling, signature: tuple, stored_as: str | None) -> None:
  """Compile on the pool; calls with this `call_signature` then run the result (rather
  than count on jit's own caches, which may have let it go by the time a step calls it),
  and it is stored under ``stored_as`` (if any) for later processes."""
  try:
    compiled, fresh = program_store.compile_fresh(lowered)
  except BaseException as error:
    _failed(program, key, compiling, error)
    return
  if stored_as and fresh:
    program_store.save_executable(stored_as, compiled, jax.tree.map(
        lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, weak_type=o.weak_type), outputs))
  compiled_outputs = compiled.out_info
  if ([o.sharding for o in jax.tree.leaves(compiled_outputs)]
      != [o.sharding for o in jax.tree.leaves(outputs)]):
    logging.warning("%s: output shardings differ from those its pass assumed; steps "
                    "will compile their own copy", getattr(program, "__name__", program))
  elif hasattr(program, "load"):
    program.load(signature, compiled)
  compiling.compiled.set_result(None)


def _failed(program: Callable, key: tuple, compiling: _Compiling, error: BaseException
            ) -> None:
  """Forget a failed compile, so that a later pass tries again, and fail its futures."""
  with _compilations_lock:
    _compilations.get(program, {}).pop(key, None)
  _fail(compiling, error)


def _fail(compiling: _Compiling, error: BaseException) -> None:
  for future in (compiling.outputs, compiling.compiled):
    if not future.done():
      future.set_exception(error)


# Sums cotangents that reach one source from several consumers (arrays or param trees).
_accumulate = PlatformJit(lambda a, b: jax.tree.map(jnp.add, a, b), cache_id="accumulate")


@functools.partial(_vjp_program, cache_id="subsample_vjp", static_argnames="stride")
def _subsample_vjp(x: jax.Array, stride: int) -> tuple[jax.Array, Any]:
  return jax.vjp(lambda v: ops.subsample(v, stride), x)


def _cell_forward(shape: LayerShape, op: Op, slot: int, x: jax.Array, params: dict,
                  stats: dict, spec: SupernetSpec, layer: str, run: PathRun,
                  differentiate: bool = True) -> jax.Array:
  """Run candidate ``slot``; with ``differentiate`` False, evaluate it without gradients
  or new statistics (nothing is recorded on the tape)."""
  if op == netspec.ZERO:
    return cells.zero_output(x, shape.out_channels, shape.stride)

  def apply_op(name, module_class, kwargs, *inputs):
    entry = slot_entry(spec, slot, bank_entry(name, op))
    frozen = _op_kwargs(module_class, kwargs, spec.bn)
    if not differentiate:
      return run.call(_jitted_op(module_class, frozen), params[entry], stats[entry],
                      *inputs)[0]
    out, pullback, new_stats = run.call_vjp(_jitted_op_vjp(module_class, frozen, True),
                                            params[entry], stats[entry], *inputs)
    key = ("layers", layer, entry)
    run.batch_stats[key] = new_stats
    return run.record(out, pullback, (Leaf(key), *inputs))

  def untaped_subsample(v, stride):
    return v if stride == 1 else run.call(_subsample_vjp, v, stride=stride)[0]

  add, subsample = ((run.add, run.subsample) if differentiate else
                    (functools.partial(run.call, _jitted_add), untaped_subsample))
  return cells.cell_dataflow(op, x, shape.out_channels, shape.stride, False, apply_op, add,
                             subsample)


# Glue between ops: each is one cached program call.
_jitted_add = PlatformJit(cells.add_all, cache_id="add")
_zeros_like = PlatformJit(jnp.zeros_like, cache_id="zeros_like")


@functools.partial(_vjp_program, cache_id="gate_vjp", static_argnames="estimator")
def _gate_vjp(y: jax.Array, alpha: jax.Array, mask: jax.Array | None, layer: int,
              choice: int, others: tuple[jax.Array, ...], estimator: str
              ) -> tuple[jax.Array, Any]:
  """Layer ``layer``'s output with α's path into it (the value stays ``y``), and its VJP
  with respect to (y, α).

  ``sampled``: y * p_c / stop_gradient(p_c). ``proxyless``: y + sum_j (p_j -
  stop_gradient(p_j)) o_j over every candidate's output ``others`` (constants here).
  """
  def gate(y, alpha):
    if mask is not None:
      alpha = jnp.where(mask, alpha, -jnp.inf)
    p = jax.nn.softmax(alpha[layer])
    if estimator == "sampled":
      return y * (p[choice] / jax.lax.stop_gradient(p[choice]))
    gates = p - jax.lax.stop_gradient(p)
    return y + sum(gates[j] * o for j, o in enumerate(others))
  return jax.vjp(gate, y, alpha)


def forward_path(spec: SupernetSpec, params: dict, batch_stats: dict, alpha: jax.Array | None,
                 images: jax.Array, candidates: Sequence[Sequence[Op]], path: Sequence[int],
                 estimator: str, run: PathRun, alpha_mask: np.ndarray | None = None
                 ) -> jax.Array:
  """Logits of the sampled path, recorded on ``run``'s tape for `PathRun.backward`.

  α (L x K logits) enters through the chosen estimator. ``sampled``: the cell output is
  scaled by p_i / stop_gradient(p_i) (value 1). ``proxyless``: every candidate runs
  forward (without gradients to its weights) and the output gains
  sum_j (p_j - stop_gradient(p_j)) o_j, giving ProxylessNAS's α gradient. ``None`` α
  (warm-up) runs the path with no α at all. ``alpha_mask`` marks padding candidates
  (layers with fewer candidates than others) that get no probability.
  """
  fixed = _fixed_modules(spec)

  def run_fixed(name, x, wrt_inputs=True):
    fn = _jitted_op_vjp(type(fixed[name]), _fixed_kwargs(fixed[name]), wrt_inputs)
    out, pullback, run.batch_stats[(name,)] = run.call_vjp(fn, params[name],
                                                           batch_stats[name], x)
    return run.record(out, pullback, (Leaf((name,)), x) if wrt_inputs else (Leaf((name,)),))

  if estimator not in ("sampled", "proxyless"):
    raise ValueError(f"estimator must be 'sampled' or 'proxyless', got {estimator!r}")
  mask = None if alpha_mask is None else jnp.asarray(alpha_mask)
  x = run_fixed("first_block", run_fixed("stem", images, wrt_inputs=False))
  for i, (shape, ops_i, choice) in enumerate(zip(spec.layers, candidates, path)):
    name = layer_name(i)
    lp, ls = params["layers"][name], batch_stats["layers"][name]
    y = _cell_forward(shape, ops_i[choice], choice, x, lp, ls, spec, name, run)
    if alpha is not None:
      others = ()
      if estimator == "proxyless":  # padding (p_j = 0) adds nothing: it does not run
        others = tuple(y if j == choice or (alpha_mask is not None and not alpha_mask[i, j])
                       else _cell_forward(shape, op, j, x, lp, ls, spec, name, run, False)
                       for j, op in enumerate(ops_i))
      gated, pullback = run.call_vjp(_gate_vjp, y, alpha, mask, i, choice, others,
                                     estimator=estimator)
      y = run.record(gated, pullback, (y, ALPHA))
    x = run.add(x, y) if shape.has_shortcut else y
  return run_fixed("head", x)


def _fixed_kwargs(module: flax.linen.Module) -> tuple:
  fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
            if f.name not in ("parent", "name")}
  return tuple(sorted(fields.items()))


def sample_path(probabilities: np.ndarray, rng: np.random.Generator) -> list[int]:
  """One candidate index per layer, drawn from each row of ``probabilities``."""
  cumulative = np.cumsum(probabilities, axis=-1)
  draws = rng.random((probabilities.shape[0], 1)) * cumulative[:, -1:]
  return [int(i) for i in np.minimum((draws > cumulative).sum(-1),
                                     probabilities.shape[1] - 1)]


# --- Losses and optimizers ----------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="label_smoothing")
def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
  """Mean label-smoothed cross-entropy."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


_cross_entropy_and_grad = PlatformJit(jax.value_and_grad(cross_entropy),
                                      cache_id="cross_entropy_and_grad",
                                      static_argnames="label_smoothing")


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, -1) == labels)


_jitted_accuracy = PlatformJit(accuracy, cache_id="accuracy")


def decay_mask(params: Any) -> Any:
  """The conv and dense kernels: all but BN parameters and biases."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def weight_optimizer(learning_rate: Any, weight_decay: float, momentum: float = 0.9,
                     decay_bn_and_bias: bool = False, nesterov: bool = True
                     ) -> optax.GradientTransformation:
  """SGD (Nesterov) with L2 weight decay on the kernels, and on BN parameters and biases
  too if ``decay_bn_and_bias`` (the search stages' default, as in ProxylessNAS's search;
  SPEC §7 retrains with kernels only)."""
  mask = None if decay_bn_and_bias else decay_mask
  return optax.chain(optax.add_decayed_weights(weight_decay, mask=mask),
                     optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))


def alpha_optimizer(learning_rate: float, b1: float = 0.0, b2: float = 0.999
                    ) -> optax.GradientTransformation:
  """Adam for α, no weight decay (SPEC §5)."""
  return optax.adam(learning_rate, b1=b1, b2=b2)


# --- The train state and step -------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Everything that changes during supernet training, as one explicit pytree.

  ``opt_state`` holds one weight-optimizer state per parameter entry (the fixed parts and
  every bank entry), laid out like ``params`` down to the entry level.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  alpha: jax.Array
  alpha_opt_state: Any


def entry_keys(params: dict) -> list[tuple[str, ...]]:
  """Keys of the independently updated entries: fixed parts, then each bank entry."""
  return [(name,) for name in params if name != "layers"] + [
      ("layers", layer, entry) for layer, bank in params["layers"].items() for entry in bank]


def _get(tree: dict, key: tuple[str, ...]) -> Any:
  for k in key:
    tree = tree[k]
  return tree


def _with_entries(tree: dict, values: dict[tuple[str, ...], Any]) -> dict:
  """A copy of ``tree`` with the entries in ``values`` replaced (others shared)."""
  out = {**tree, "layers": dict(tree["layers"])}
  for key, value in values.items():
    if key[0] == "layers":
      out["layers"][key[1]] = {**out["layers"][key[1]], key[2]: value}
    else:
      out[key[0]] = value
  return out


@functools.lru_cache(maxsize=None)
def _jitted_entry_updates(weight_decay: float, momentum: float, decay_bn_and_bias: bool
                          ) -> tuple[Callable, Callable]:
  """One entry's optimizer step at a given learning rate, on its own and fused into an
  op's backward (`EntryOptimizer`); shared by every trainer with these settings, so
  their programs compile once per entry (or op) shape per process."""
  tx = weight_optimizer(1.0, weight_decay, momentum, decay_bn_and_bias)

  def update(params, opt_state, grads, learning_rate):
    unit_updates, opt_state = tx.update(grads, opt_state, params)
    return jax.tree.map(lambda p, u: p + learning_rate * u, params, unit_updates), opt_state

  def backward_update(residuals, arguments, cotangent, params, opt_state, learning_rate):
    grads, *input_cotangents = _restored(residuals, arguments)(cotangent)
    return (*update(params, opt_state, grads, learning_rate), tuple(input_cotangents))

  settings = f"{weight_decay!r},{momentum!r},{decay_bn_and_bias}"
  return (PlatformJit(update, cache_id=f"entry_update:{settings}"),
          PlatformJit(backward_update, cache_id=f"backward_update:{settings}"))


def _zero_state(tx: optax.GradientTransformation, params: Any) -> Any:
  """``tx.init(params)`` for an optimizer whose state starts at zero (SGD's momentum),
  made on the host: eager `init` compiles a zeros program per entry shape."""
  return jax.tree.map(lambda leaf: jax.device_put(np.zeros(leaf.shape, leaf.dtype)),
                      jax.eval_shape(tx.init, params))


class SupernetTrainer:
  """Owns the jitted pieces of a supernet step; the state itself stays a pytree.

  Only the entries that ran are updated, each inside its op's backward program (compiled
  once per op kind and shape, shared by all layers and genomes): weights and momentum of
  ops that did not run cannot move, because nothing touches them. One masked update over
  the whole bank compiled for 30 s even on a toy supernet (~900 leaves). The learning-rate
  schedule follows the global step, so it is applied here (one small program per step)
  rather than inside each entry's optimizer.
  """

  def __init__(self, spec: SupernetSpec, learning_rate: optax.ScalarOrSchedule,
               weight_decay: float, momentum: float,
               alpha_tx: optax.GradientTransformation, label_smoothing: float,
               estimator: str, parallel: DataParallel,
               alpha_mask: np.ndarray | None = None, decay_bn_and_bias: bool = False):
    self.spec = spec
    schedule = (learning_rate if callable(learning_rate)
                else optax.constant_schedule(learning_rate))
    # The step's learning rate and the next step count: one program per step.
    self._schedule_and_next_step = PlatformJit(lambda step: (schedule(step), step + 1))
    # A unit step, scaled by the learning rate in each entry's update.
    self.weight_tx = weight_optimizer(1.0, weight_decay, momentum, decay_bn_and_bias)
    self._entry_update, self._backward_update = _jitted_entry_updates(
        weight_decay, momentum, decay_bn_and_bias)
    self.alpha_tx = alpha_tx
    self.label_smoothing = label_smoothing
    self.estimator = estimator
    self.parallel = parallel
    self.alpha_mask = alpha_mask
    self._alpha_update = PlatformJit(self._apply_alpha)

  def init(self, seed: int, num_candidates: int) -> TrainState:
    variables = init_variables(self.spec, seed)
    params = variables["params"]
    opt_state = _with_entries(params, {k: _zero_state(self.weight_tx, _get(params, k))
                                       for k in entry_keys(params)})
    alpha = jnp.zeros((len(self.spec.layers), num_candidates), jnp.float32)
    state = TrainState(jnp.zeros((), jnp.int32), params, variables["batch_stats"], opt_state,
                       alpha, self.alpha_tx.init(alpha))
    return self.place(state)

  def place(self, state: TrainState) -> TrainState:
    """Replicate the state over the mesh (no-op without one)."""
    return self.parallel.replicate(state)

  def _apply_alpha(self, alpha, alpha_opt_state, alpha_grad):
    updates, new_state = self.alpha_tx.update(alpha_grad, alpha_opt_state, alpha)
    return optax.apply_updates(alpha, updates), new_state

  def loss_and_grads(self, state: TrainState, batch: dict, candidates: Sequence[Sequence[Op]],
                     path: Sequence[int], train_alpha: bool,
                     alpha_loss: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
                     label_smoothing: float | None = None, weight_grads: bool = True):
    """Forward the path and run its tape backward; returns (metrics, grads, alpha_grad,
    run). ``grads`` holds an entry for every fixed part and every bank entry of the
    sampled cells (zeros where the loss does not depend on it, as autodiff would give);
    None without ``weight_grads`` (stage 2's α steps, which then cost the backward to
    the activations only). ``label_smoothing`` overrides the trainer's (α steps use plain
    CE)."""
    run = PathRun(weight_grads=weight_grads)
    metrics, leaves = self._forward_backward(state, *self.shard(batch), candidates, path,
                                             train_alpha, run, label_smoothing)
    alpha_grad = (self._alpha_grad(state, leaves, metrics["loss"], run, alpha_loss)
                  if train_alpha else None)
    if not weight_grads:
      return metrics, None, alpha_grad, run
    grads = {"layers": {}}
    for key in self._trained_entries(state.params, candidates, path):
      grad = leaves.get(key)
      if grad is None:
        grad = jax.tree.map(jnp.zeros_like, _get(state.params, key))
      if key[0] == "layers":
        grads["layers"].setdefault(key[1], {})[key[2]] = grad
      else:
        grads[key[0]] = grad
    return metrics, grads, alpha_grad, run

  @staticmethod
  def _alpha_grad(state: TrainState, leaves: dict, loss: jax.Array, run: PathRun,
                  alpha_loss: Callable[[jax.Array, jax.Array], jax.Array] | None = None
                  ) -> jax.Array:
    """α's cotangent (zeros if no gate reached the loss), through ``alpha_loss`` if given."""
    alpha_grad = leaves.get(ALPHA.key)
    if alpha_grad is None:
      alpha_grad = run.call(_zeros_like, state.alpha)
    return alpha_grad if alpha_loss is None else alpha_loss(state.alpha, loss, alpha_grad)

  def _forward_backward(self, state: TrainState, images: jax.Array, labels: jax.Array,
                        candidates: Sequence[Sequence[Op]], path: Sequence[int],
                        train_alpha: bool, run: PathRun,
                        label_smoothing: float | None = None) -> tuple[dict, dict]:
    """Metrics (loss, accuracy) and leaf cotangents of one step on ``path`` over the global
    batch (``images``, ``labels``), taped on ``run``."""
    logits = forward_path(self.spec, state.params, state.batch_stats,
                          state.alpha if train_alpha else None, images, candidates, path,
                          self.estimator, run, self.alpha_mask)
    smoothing = self.label_smoothing if label_smoothing is None else label_smoothing
    ce, logits_ct = run.call(_cross_entropy_and_grad, logits, labels,
                             label_smoothing=smoothing)
    metrics = {"loss": ce, "accuracy": run.call(_jitted_accuracy, logits, labels)}
    return metrics, run.backward(logits, logits_ct)

  def compile_path(self, state: TrainState, batch: dict, candidates: Sequence[Sequence[Op]],
                   path: Sequence[int], train_alpha: bool, update_weights: bool = True,
                   label_smoothing: float | None = None,
                   cancelled: Callable[[], bool] | None = None) -> None:
    """Compile, without running anything, the programs a `train_step` on ``path`` calls:
    op forwards, backwards with their entries' updates, the glue between them, the
    learning rate and the α update; with ``update_weights`` False, those of a
    `loss_and_grads` step without weight gradients instead (stage 2's α steps, with their
    ``label_smoothing``).
    ``state`` and the host's ``batch`` may be arrays or `shapes_of` them. `Precompiler`
    runs this on background threads, which ``cancelled`` stops."""
    run = PathRun(compile_only=True, weight_grads=update_weights, cancelled=cancelled)
    if update_weights:
      run.optimizer = self._entry_optimizer(state, run)[0]
    shapes = self.parallel.global_batch_shapes({k: batch[k] for k in ("image", "label")})
    metrics, leaves = self._forward_backward(state, shapes["image"], shapes["label"],
                                             candidates, path, train_alpha, run,
                                             label_smoothing)
    if train_alpha and update_weights:
      run.call(self._alpha_update, state.alpha, state.alpha_opt_state,
               self._alpha_grad(state, leaves, metrics["loss"], run))
    for compiled in concurrent.futures.as_completed(run.compiles):
      compiled.result()  # raises if a compile failed

  def _entry_optimizer(self, state: TrainState, run: PathRun
                       ) -> tuple[EntryOptimizer, jax.Array]:
    """The step's `EntryOptimizer`, and the step count after it."""
    learning_rate, next_step = run.call(self._schedule_and_next_step, state.step)
    return EntryOptimizer(self._backward_update, state.params, state.opt_state,
                          learning_rate), next_step

  def _trained_entries(self, params, candidates, path) -> list[tuple[str, ...]]:
    """The fixed parts and the bank entries of the sampled cells."""
    return [(name,) for name in params if name != "layers"] + [
        ("layers", layer_name(i), slot_entry(self.spec, choice, e))
        for i, (ops_i, choice) in enumerate(zip(candidates, path))
        for e in cell_entries(ops_i[choice])]

  def shard(self, batch: dict) -> tuple[jax.Array, jax.Array]:
    batch = self.parallel.global_batch({"image": batch["image"], "label": batch["label"]})
    return batch["image"], batch["label"]

  def train_step(self, state: TrainState, batch: dict, candidates: Sequence[Sequence[Op]],
                 path: Sequence[int], train_alpha: bool) -> tuple[TrainState, dict]:
    """One step on ``path``: the entries that ran get the weight optimizer's update on
    their gradients (weights, momentum, BN statistics), α its own if ``train_alpha``.
    The same update as `weight_optimizer` on `loss_and_grads`'s gradients, applied inside
    each op's backward program (`EntryOptimizer`). Returns (new state, metrics)."""
    run = PathRun()
    optimizer, next_step = self._entry_optimizer(state, run)
    run.optimizer = optimizer
    metrics, leaves = self._forward_backward(state, *self.shard(batch), candidates, path,
                                             train_alpha, run)
    for key in self._trained_entries(state.params, candidates, path):
      if key not in optimizer.updated:  # the loss does not reach it: a zero gradient
        params = _get(state.params, key)
        optimizer.updated[key] = self._entry_update(
            params, _get(state.opt_state, key), jax.tree.map(jnp.zeros_like, params),
            optimizer.learning_rate)
    state = state.replace(
        step=next_step,
        params=_with_entries(state.params, {k: p for k, (p, _) in optimizer.updated.items()}),
        opt_state=_with_entries(state.opt_state,
                                {k: o for k, (_, o) in optimizer.updated.items()}),
        batch_stats=_with_entries(state.batch_stats, run.batch_stats))
    if train_alpha:
      state = self._step_alpha(state, self._alpha_grad(state, leaves, metrics["loss"], run))
    return state, metrics

  def apply_alpha(self, state: TrainState, alpha_grad: jax.Array, run: PathRun
                  ) -> TrainState:
    """An α-only step (stage 2's, on held-out data): α and the BN statistics of the ops
    that ran change (their BN runs in training mode, as in ProxylessNAS); weights, their
    optimizer state and the step counter that drives the learning rate do not."""
    return self._step_alpha(
        state.replace(batch_stats=_with_entries(state.batch_stats, run.batch_stats)),
        alpha_grad)

  def _step_alpha(self, state: TrainState, alpha_grad: jax.Array) -> TrainState:
    alpha, alpha_opt_state = self._alpha_update(state.alpha, state.alpha_opt_state,
                                                alpha_grad)
    return state.replace(alpha=alpha, alpha_opt_state=alpha_opt_state)

  def reset_alpha(self, state: TrainState, alpha: np.ndarray) -> TrainState:
    """New cells took the slots: their α, and a fresh α optimizer state (the slots'
    second-moment estimates belonged to the cells that left). **[choice]**: with Adam's
    β1 = 0 the first α step after each round moves every α by about ±lr (its v̂ is g²);
    the alternative, Adam state kept per cell in the population, costs P x L floats."""
    alpha = np.asarray(alpha, np.float32)  # on the host: no conversion program to compile
    return self.parallel.replicate(state.replace(alpha=alpha,
                                                 alpha_opt_state=self.alpha_tx.init(alpha)))


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
  """Epoch counts may be fractional (short test runs); at least one step if positive."""
  steps = int(round(epochs * steps_per_epoch))
  return max(steps, 1) if epochs > 0 else 0


def cosine_schedule(learning_rate: float, total_steps: int, warmup_steps: int = 0
                    ) -> optax.Schedule:
  """Linear warm-up to ``learning_rate``, then cosine decay to zero."""
  return optax.warmup_cosine_decay_schedule(0.0 if warmup_steps else learning_rate,
                                            learning_rate, warmup_steps,
                                            max(total_steps, warmup_steps + 1))


def softmax_np(logits: np.ndarray) -> np.ndarray:
  z = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


class NonFiniteLoss(RuntimeError):
  """The loss became NaN or Inf; training stops and the last good checkpoint stays."""


def check_finite(loss: Any, stage: str, step: int) -> None:
  value = float(loss)
  if not np.isfinite(value):
    raise NonFiniteLoss(f"{stage}: the loss is {value} at step {step}; stopping. The last "
                        "good checkpoint is kept: lower the learning rate and rerun to resume.")
