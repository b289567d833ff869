"""The weight-sharing supernet of stages 1 and 2, chained from the host.

Why not one jitted program with `lax.switch` over the K cells of each layer? Cells are
genomes that change every f steps, so a switch over static cells recompiles the whole
step every mutation round (seconds to minutes); a switch over genome-as-data cells
compiles once but nests 60 branches per layer, compiled for minutes, and on XLA:CPU its
backward ran 5-14x slower than a static net (measured: see benchmarks/). Instead the
host, which already knows the sampled path, runs each op of the sampled cells as its own
small jitted function (one per op kind and shape, compiled once and reused by every
genome), and `jax.value_and_grad` differentiates through that chain. Exactly the sampled
cells execute, nothing recompiles when the cells change, and per-op weights come from a
per-layer bank keyed by (op name, expansion) so the parameter tree never changes shape.
The one jitted update masks weights and optimizer state of ops that did not run.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from autospace_jax import cells
from autospace_jax import genome as genome_lib
from autospace_jax import netspec
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

  @property
  def bn(self) -> dict[str, float]:
    return {"bn_momentum": 1.0 - self.bn_momentum, "bn_epsilon": self.bn_eps}

  def net_spec(self, ops: Sequence[Op], se: bool = False) -> netspec.NetSpec:
    """The static net that runs ``ops`` in the searchable layers."""
    layers = [self.first_block] + [
        netspec.LayerSpec(s.in_channels, s.out_channels, s.stride, op,
                          "zero" if op == netspec.ZERO else "motif")
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


@functools.lru_cache(maxsize=None)
def _jitted_op(module_class: type, frozen_kwargs: tuple) -> Callable:
  """One jitted `apply` per op kind; jit's own cache then keys it by input shapes."""
  module = module_class(**dict(frozen_kwargs))

  @jax.jit
  def apply(params, batch_stats, *inputs):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    out, mutated = module.apply(variables, *inputs, train=True, mutable=["batch_stats"])
    return out, mutated.get("batch_stats", {})

  return apply


def _op_kwargs(module_class: type, kwargs: dict, bn: dict) -> tuple:
  if module_class in cells.BN_MODULES:
    kwargs = {**kwargs, **bn}
  return tuple(sorted(kwargs.items()))


def bank_entry(name: str, genome: genome_lib.Genome) -> str:
  """Bank key of an op: its name in the static cell plus the cell's expansion."""
  return f"{name}_e{genome.expansion}"


def _covering_genomes(conv_codes: Sequence[int]) -> list[genome_lib.Genome]:
  """Genomes that together touch every bank entry: all edges conv k, both mixes on."""
  all_conv = [tuple(genome_lib.NONE if e == genome_lib.UNUSED_EDGE else k
                    for e in genome_lib.EDGES) for k in conv_codes]
  return [genome_lib.Genome(edges, e_idx, (1, 1)) for edges in all_conv
          for e_idx in range(len(genome_lib.EXPANSION_RATIOS))]


def _init_layer_bank(shape: LayerShape, spec: SupernetSpec, rng: jax.Array) -> dict:
  """Variables of every op a cell in this layer may run, keyed by bank entry."""
  bank: dict[str, Any] = {}

  def record(genome):
    def apply_op(name, module_class, kwargs, *inputs):
      module = module_class(**dict(_op_kwargs(module_class, kwargs, spec.bn)))
      bank.setdefault(bank_entry(name, genome), (module, [
          jax.ShapeDtypeStruct(i.shape, i.dtype) for i in inputs]))
      return module.init_with_output(jax.random.PRNGKey(0), *inputs, train=True)[0]
    return apply_op

  x = jax.ShapeDtypeStruct((1, shape.in_size, shape.in_size, shape.in_channels), jnp.float32)
  for g in _covering_genomes(spec.conv_codes):
    jax.eval_shape(lambda x, g=g: cells.cell_dataflow(g, x, shape.out_channels, shape.stride,
                                                      False, record(g)), x)
  keys = sorted(bank)
  variables = {}
  for key, entry_rng in zip(keys, jax.random.split(rng, len(keys))):
    module, inputs = bank[key]
    zeros = [jnp.zeros(i.shape, i.dtype) for i in inputs]
    variables[key] = module.init(entry_rng, *zeros, train=True)
  return variables


def _fixed_modules(spec: SupernetSpec) -> dict[str, flax.linen.Module]:
  return {
      "stem": cells.Stem(**spec.bn, features=spec.stem_channels),
      "first_block": cells.Block(**spec.bn, layer=spec.first_block),
      "head": cells.Head(**spec.bn, features=spec.head_channels,
                         num_classes=spec.num_classes),
  }


def layer_name(index: int) -> str:
  return f"layer_{index:02d}"


def init_variables(spec: SupernetSpec, rng: jax.Array) -> dict:
  """{'params': ..., 'batch_stats': ...} for the fixed parts and every layer's bank."""
  rngs = jax.random.split(rng, len(spec.layers) + 3)
  params: dict[str, Any] = {"layers": {}}
  stats: dict[str, Any] = {"layers": {}}
  last = spec.layers[-1]
  head_size = -(-last.in_size // last.stride)
  inputs = {"stem": (spec.resolution, 3),
            "first_block": (-(-spec.resolution // 2), spec.first_block.in_channels),
            "head": (head_size, last.out_channels)}
  for (name, module), r in zip(_fixed_modules(spec).items(), rngs[:3]):
    size, channels = inputs[name]
    v = module.init(r, jnp.zeros((1, size, size, channels)), train=True)
    params[name], stats[name] = v["params"], v.get("batch_stats", {})
  for i, (shape, r) in enumerate(zip(spec.layers, rngs[3:])):
    bank = _init_layer_bank(shape, spec, r)
    params["layers"][layer_name(i)] = {k: v["params"] for k, v in bank.items()}
    stats["layers"][layer_name(i)] = {k: v.get("batch_stats", {}) for k, v in bank.items()}
  return {"params": params, "batch_stats": stats}


# --- Forward through a sampled path -------------------------------------------------------


class EntryIndex:
  """A fixed numbering of the param tree's entries, for per-step `used` flags."""

  def __init__(self, params: dict):
    self.keys: list[tuple[str, ...]] = [("stem",), ("first_block",), ("head",)]
    for layer, bank in params["layers"].items():
      self.keys += [("layers", layer, entry) for entry in bank]
    self.position = {k: i for i, k in enumerate(self.keys)}
    leaves_with_path = jax.tree_util.tree_flatten_with_path(params)[0]
    self.leaf_entry = np.array([self._entry_of(path) for path, _ in leaves_with_path],
                               np.int32)

  def _entry_of(self, path) -> int:
    names = tuple(p.key for p in path)
    key = names[:3] if names[0] == "layers" else names[:1]
    return self.position[key]

  def flags(self, used: set[tuple[str, ...]]) -> np.ndarray:
    out = np.zeros(len(self.keys), bool)
    out[:3] = True
    for key in used:
      out[self.position[key]] = True
    return out


class _Probe:
  """Stands in for an activation to list the ops a genome runs, without computing."""

  shape = (1, 1, 1, 1)

  def __getitem__(self, _):
    return self

  def __add__(self, _):
    return self

  __radd__ = __add__


@functools.lru_cache(maxsize=None)
def cell_entries(op: Op) -> tuple[str, ...]:
  """Bank entries the cell ``op`` runs (none for Zero)."""
  if op == netspec.ZERO:
    return ()
  names = []

  def apply_op(name, module_class, kwargs, *inputs):
    names.append(bank_entry(name, op))
    return _Probe()

  cells.cell_dataflow(op, _Probe(), 1, 2, False, apply_op)
  return tuple(names)


@dataclasses.dataclass
class PathRun:
  """What one forward pass touched: new BN statistics and the bank entries used."""

  batch_stats: dict = dataclasses.field(default_factory=dict)
  used: set = dataclasses.field(default_factory=set)


def _cell_forward(shape: LayerShape, op: Op, x: jax.Array, params: dict, stats: dict,
                  spec: SupernetSpec, layer: str, run: PathRun | None) -> jax.Array:
  """Run one candidate; ``run`` is None for a candidate evaluated without gradients."""
  if op == netspec.ZERO:
    return cells.zero_output(x, shape.out_channels, shape.stride)

  def apply_op(name, module_class, kwargs, *inputs):
    entry = bank_entry(name, op)
    fn = _jitted_op(module_class, _op_kwargs(module_class, kwargs, spec.bn))
    p = params[entry]
    if run is None:
      p = jax.lax.stop_gradient(p)
    out, new_stats = fn(p, stats[entry], *inputs)
    if run is not None:
      run.batch_stats[("layers", layer, entry)] = new_stats
      run.used.add(("layers", layer, entry))
    return out

  return cells.cell_dataflow(op, x, shape.out_channels, shape.stride, False, apply_op)


def forward_path(spec: SupernetSpec, params: dict, batch_stats: dict, alpha: jax.Array | None,
                 images: jax.Array, candidates: Sequence[Sequence[Op]], path: Sequence[int],
                 estimator: str, run: PathRun, alpha_mask: np.ndarray | None = None
                 ) -> jax.Array:
  """Logits of the sampled path; α (L x K logits) enters through the chosen estimator.

  ``sampled``: the cell output is scaled by p_i / stop_gradient(p_i) (value 1).
  ``proxyless``: every candidate runs forward (without gradients to its weights) and the
  output gains sum_j (p_j - stop_gradient(p_j)) o_j, giving ProxylessNAS's α gradient.
  ``None`` α (warm-up) runs the path with no α at all. ``alpha_mask`` marks padding
  candidates (layers with fewer candidates than others) that get no probability.
  """
  fixed = _fixed_modules(spec)

  def run_fixed(name, x):
    fn = _jitted_op(type(fixed[name]), _fixed_kwargs(fixed[name]))
    out, new_stats = fn(params[name], batch_stats[name], x)
    run.batch_stats[(name,)] = new_stats
    return out

  x = run_fixed("first_block", run_fixed("stem", images))
  if alpha is not None and alpha_mask is not None:
    alpha = jnp.where(alpha_mask, alpha, -jnp.inf)
  probs = None if alpha is None else jax.nn.softmax(alpha, axis=-1)
  for i, (shape, ops_i, choice) in enumerate(zip(spec.layers, candidates, path)):
    name = layer_name(i)
    lp, ls = params["layers"][name], batch_stats["layers"][name]
    y = _cell_forward(shape, ops_i[choice], x, lp, ls, spec, name, run)
    if probs is not None:
      p = probs[i]
      if estimator == "sampled":
        y = y * (p[choice] / jax.lax.stop_gradient(p[choice]))
      elif estimator == "proxyless":
        others = [y if j == choice else
                  jax.lax.stop_gradient(_cell_forward(shape, op, jax.lax.stop_gradient(x),
                                                      lp, ls, spec, name, None))
                  for j, op in enumerate(ops_i)]
        gates = p - jax.lax.stop_gradient(p)
        y = y + sum(g * jax.lax.stop_gradient(o) for g, o in zip(gates, others))
      else:
        raise ValueError(f"estimator must be 'sampled' or 'proxyless', got {estimator!r}")
    x = x + y if shape.has_shortcut else y
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


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
  """Mean label-smoothed cross-entropy."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def decay_mask(params: Any) -> Any:
  """Weight decay applies to conv and dense kernels only, never to BN or biases."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def weight_optimizer(learning_rate: Any, weight_decay: float, momentum: float = 0.9,
                     nesterov: bool = True) -> optax.GradientTransformation:
  """SGD (Nesterov) with decoupled-from-BN L2 decay on kernels (SPEC §5, §7)."""
  return optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask),
                     optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))


def alpha_optimizer(learning_rate: float, b1: float = 0.0, b2: float = 0.999
                    ) -> optax.GradientTransformation:
  """Adam for α, no weight decay (SPEC §5)."""
  return optax.adam(learning_rate, b1=b1, b2=b2)


def masked_apply(tx: optax.GradientTransformation, params: Any, opt_state: Any, grads: Any,
                 leaf_used: jax.Array) -> tuple[Any, Any]:
  """Apply ``tx`` but keep unused leaves and their optimizer state exactly as they were.

  Momentum and decay would otherwise move weights whose gradient is zero. Optimizer
  sub-states shaped like ``params`` (traces, moments) are masked leaf by leaf.
  """
  updates, new_state = tx.update(grads, opt_state, params)
  treedef = jax.tree.structure(params)

  def keep_unused(new, old):
    leaves = [jnp.where(u, n, o) for u, n, o in
              zip(leaf_used, jax.tree.leaves(new), jax.tree.leaves(old))]
    return jax.tree.unflatten(treedef, leaves)

  new_params = keep_unused(optax.apply_updates(params, updates), params)
  is_params_like = lambda t: jax.tree.structure(t) == treedef  # noqa: E731
  new_state = jax.tree.map(
      lambda n, o: keep_unused(n, o) if is_params_like(n) else n, new_state, opt_state,
      is_leaf=is_params_like)
  return new_params, new_state


# --- The train state and step -------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Everything that changes during supernet training, as one explicit pytree."""

  params: Any
  batch_stats: Any
  opt_state: Any
  alpha: jax.Array
  alpha_opt_state: Any


class SupernetTrainer:
  """Owns the jitted pieces of a supernet step; the state itself stays a pytree."""

  def __init__(self, spec: SupernetSpec, weight_tx: optax.GradientTransformation,
               alpha_tx: optax.GradientTransformation, label_smoothing: float,
               estimator: str, parallel: DataParallel,
               alpha_mask: np.ndarray | None = None):
    self.spec = spec
    self.weight_tx = weight_tx
    self.alpha_tx = alpha_tx
    self.label_smoothing = label_smoothing
    self.estimator = estimator
    self.parallel = parallel
    self.alpha_mask = alpha_mask
    self.entries: EntryIndex | None = None
    self._zeros = None
    self._update = jax.jit(self._apply_updates, donate_argnums=(0, 1))
    self._alpha_update = jax.jit(self._apply_alpha)

  def init(self, rng: jax.Array, num_candidates: int) -> TrainState:
    variables = init_variables(self.spec, rng)
    params = variables["params"]
    self.entries = EntryIndex(params)
    state = TrainState(params, variables["batch_stats"], self.weight_tx.init(params),
                       jnp.zeros((len(self.spec.layers), num_candidates), jnp.float32), None)
    state = state.replace(alpha_opt_state=self.alpha_tx.init(state.alpha))
    return self.place(state)

  def place(self, state: TrainState) -> TrainState:
    """Replicate the state over the mesh (no-op without one)."""
    if self.entries is None:
      self.entries = EntryIndex(state.params)
    return self.parallel.replicate(state)

  def _apply_updates(self, params, opt_state, grads, flags):
    leaf_used = flags[self.entries.leaf_entry]
    return masked_apply(self.weight_tx, params, opt_state, grads, leaf_used)

  def _apply_alpha(self, alpha, alpha_opt_state, alpha_grad):
    updates, new_state = self.alpha_tx.update(alpha_grad, alpha_opt_state, alpha)
    return optax.apply_updates(alpha, updates), new_state

  def loss_and_grads(self, state: TrainState, batch: dict, candidates: Sequence[Sequence[Op]],
                     path: Sequence[int], train_alpha: bool,
                     alpha_loss: Callable[[jax.Array, jax.Array], jax.Array] | None = None):
    """Forward the path and differentiate; returns (metrics, grads, alpha_grad, run)."""
    images, labels = self.shard(batch)
    run = PathRun()

    def loss_fn(trainable, alpha):
      full = {**trainable, "layers": {
          name: {**bank, **trainable["layers"].get(name, {})}
          for name, bank in state.params["layers"].items()}}
      logits = forward_path(self.spec, full, state.batch_stats,
                            alpha if train_alpha else None, images, candidates, path,
                            self.estimator, run, self.alpha_mask)
      ce = cross_entropy(logits, labels, self.label_smoothing)
      # New BN statistics leave through aux: stored from inside they would leak tracers.
      return ce, (logits, run.batch_stats)

    trainable = self._trainable_subtree(state.params, candidates, path)
    (ce, (logits, run.batch_stats)), (grads, alpha_grad) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(trainable, state.alpha)
    if alpha_loss is not None and train_alpha:
      alpha_grad = alpha_loss(state.alpha, ce, alpha_grad)
    metrics = {"loss": ce, "accuracy": accuracy(logits, labels)}
    return metrics, grads, alpha_grad, run

  def _trainable_subtree(self, params, candidates, path) -> dict:
    """Only the bank entries of the sampled cells are differentiated."""
    layers = {}
    for i, (ops, choice) in enumerate(zip(candidates, path)):
      name = layer_name(i)
      layers[name] = {e: params["layers"][name][e] for e in cell_entries(ops[choice])}
    return {"stem": params["stem"], "first_block": params["first_block"],
            "head": params["head"], "layers": layers}

  def shard(self, batch: dict) -> tuple[jax.Array, jax.Array]:
    batch = self.parallel.global_batch({"image": batch["image"], "label": batch["label"]})
    return batch["image"], batch["label"]

  def apply(self, state: TrainState, grads: dict, alpha_grad: jax.Array | None,
            run: PathRun) -> TrainState:
    """Masked weight update, α update (when given), BN statistics of the ops that ran."""
    zeros = self._zeros_like_params(state.params)
    full_grads = {**grads, "layers": {name: {**bank, **grads["layers"].get(name, {})}
                                      for name, bank in zeros["layers"].items()}}
    flags = self.entries.flags(run.used)
    params, opt_state = self._update(state.params, state.opt_state, full_grads, flags)
    stats = {**state.batch_stats, "layers": dict(state.batch_stats["layers"])}
    for key, new in run.batch_stats.items():
      if key[0] == "layers":
        stats["layers"][key[1]] = {**stats["layers"][key[1]], key[2]: new}
      else:
        stats[key[0]] = new
    state = state.replace(params=params, opt_state=opt_state, batch_stats=stats)
    if alpha_grad is not None:
      alpha, alpha_opt_state = self._alpha_update(state.alpha, state.alpha_opt_state,
                                                  alpha_grad)
      state = state.replace(alpha=alpha, alpha_opt_state=alpha_opt_state)
    return state

  def _zeros_like_params(self, params) -> dict:
    """Gradient stand-in for entries that did not run (kept; the update masks them)."""
    if self._zeros is None:
      self._zeros = jax.tree.map(jnp.zeros_like, params)
    return self._zeros

  def reset_alpha(self, state: TrainState, alpha: np.ndarray) -> TrainState:
    """New cells took the slots: their α, and a fresh α optimizer state (the slots'
    second-moment estimates belonged to the cells that left)."""
    alpha = jnp.asarray(alpha, jnp.float32)
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
