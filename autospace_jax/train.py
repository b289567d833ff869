"""Stage 3: train a net JSON from scratch and evaluate it (SPEC §7).

A static Flax net, one jitted data-parallel train step: SGD Nesterov, lr per 256 images
with linear warm-up and cosine decay, weight decay (kernels only by default), label
smoothing, optional bf16 compute and SE. Writes `metrics.json` with top-1/top-5, params and MAdds.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from etils import epath
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from autospace_jax import cells
from autospace_jax import checkpointing
from autospace_jax import counting
from autospace_jax import files
from autospace_jax import input_pipeline
from autospace_jax import netspec
from autospace_jax import progress
from autospace_jax import seeding
from autospace_jax import supernet
from autospace_jax.parallel import DataParallel

METRICS_FILE = "metrics.json"
GIVEN_NET_RUN = "net"  # the directory under train/ of the net `train.net` names
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def train_step(model: cells.Net, tx: optax.GradientTransformation, label_smoothing: float,
               state: TrainState, batch: dict) -> tuple[TrainState, dict]:
  """One SGD step on a global batch (pure; jitted by the caller)."""

  def loss_fn(params):
    logits, mutated = model.apply({"params": params, "batch_stats": state.batch_stats},
                                  batch["image"], train=True, mutable=["batch_stats"])
    return supernet.cross_entropy(logits, batch["label"], label_smoothing), (logits, mutated)

  (loss, (logits, mutated)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  state = TrainState(state.step + 1, optax.apply_updates(state.params, updates),
                     mutated["batch_stats"], opt_state)
  return state, {"loss": loss, "accuracy": supernet.accuracy(logits, batch["label"])}


def eval_step(model: cells.Net, state: TrainState, batch: dict) -> dict:
  """Summed top-1/top-5 hits and example count over the real (unpadded) examples."""
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                       batch["image"], train=False)
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  hits1 = (top5[:, 0] == batch["label"]) * batch["mask"]
  hits5 = jnp.any(top5 == batch["label"][:, None], axis=-1) * batch["mask"]
  return {"top1": hits1.sum(), "top5": hits5.sum(), "count": batch["mask"].sum()}


class Trainer:
  """Stage 3 for one net: build, train with checkpoints, evaluate, write metrics."""

  def __init__(self, config: ml_collections.ConfigDict, net: netspec.NetSpec, workdir: str,
               parallel: DataParallel | None = None, writer: Any = None, tag: str = "train"):
    self.config = config
    self.cfg = config.train
    self.workdir = workdir
    self.tag = tag
    self.parallel = parallel or DataParallel()
    self.writer = writer
    if self.cfg.se and not net.se:
      net = netspec.NetSpec(net.layers, net.stem_channels, net.head_channels,
                            net.num_classes, net.resolution, net.bn_momentum, net.bn_eps, True)
    self.net = net
    self.model = cells.Net(net, dtype=DTYPES[self.cfg.dtype])
    self.steps_per_epoch = input_pipeline.steps_per_epoch(config.data, "train",
                                                          self.cfg.batch_size)
    self.total_steps = supernet.epochs_to_steps(self.cfg.epochs, self.steps_per_epoch)
    lr = self.cfg.learning_rate * self.cfg.batch_size / 256
    schedule = supernet.cosine_schedule(
        lr, self.total_steps, supernet.epochs_to_steps(self.cfg.warmup_epochs,
                                                       self.steps_per_epoch))
    self.tx = supernet.weight_optimizer(schedule, self.cfg.weight_decay, self.cfg.momentum,
                                        self.cfg.decay_bn_and_bias)
    # With the supernet's CPU compile options: a third less compile, the same step time.
    self._train_step = supernet.PlatformJit(functools.partial(
        train_step, self.model, self.tx, self.cfg.label_smoothing), donate_argnums=0)
    self._eval_step = supernet.PlatformJit(functools.partial(eval_step, self.model))

  def init_state(self) -> TrainState:
    _, variables = cells.init_net(self.net, seeding.generator(self.config.seed, "net_weights"))
    params = variables["params"]
    return self.parallel.replicate(TrainState(jnp.zeros((), jnp.int32), params,
                                              variables["batch_stats"], self.tx.init(params)))

  def evaluate(self, state: TrainState) -> dict:
    totals = {"top1": 0.0, "top5": 0.0, "count": 0.0}
    for batch in input_pipeline.make_iterator(
        self.config.data, "eval", self.cfg.batch_size, seed=self.config.seed,
        process_index=jax.process_index(), process_count=jax.process_count()):
      out = self._eval_step(state, self.parallel.global_batch(batch))
      for k in totals:
        totals[k] += float(out[k])
    return {"top1": totals["top1"] / totals["count"], "top5": totals["top5"] / totals["count"]}

  def run(self) -> dict:
    epath.Path(self.workdir).mkdir(parents=True, exist_ok=True)
    with checkpointing.Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                    self.config.checkpoint.max_to_keep) as ckpt:
      step, state, meta = ckpt.restore_or_init(self.init_state, self.parallel, self.tag)
      history = list(meta["history"]) if meta else []  # evaluations before a restart
      state, step = self._train(state, step, history, ckpt)
    final = self.evaluate(state)
    cost = counting.net_cost(self.net)
    metrics = {"top1": final["top1"], "top5": final["top5"], "params": cost.params,
               "madds": cost.madds, "steps": step, "epochs": self.cfg.epochs,
               "dtype": self.cfg.dtype, "se": self.net.se, "history": history}
    if self.writer is not None:
      self.writer.write_scalars(step, {"eval_top1": final["top1"], "eval_top5": final["top5"]},
                                self.tag)
    if jax.process_index() == 0:
      files.write_text(os.path.join(self.workdir, METRICS_FILE), json.dumps(metrics, indent=1))
    print(f"{self.tag}: top-1 {final['top1']:.2%} top-5 {final['top5']:.2%} "
          f"params={cost.params:,} madds={cost.madds:,}")
    return metrics

  def _train(self, state: TrainState, step: int, history: list,
             ckpt: checkpointing.Checkpointer) -> tuple[TrainState, int]:
    """The training loop from ``step`` on; its evaluations are appended to ``history``."""
    data = input_pipeline.make_iterator(
        self.config.data, "train", self.cfg.batch_size, seed=self.config.seed,
        start_step=step, process_index=jax.process_index(), process_count=jax.process_count())
    bar = progress.Bar(self.total_steps, self.tag, initial=step)
    eval_every = supernet.epochs_to_steps(self.cfg.eval_every_epochs, self.steps_per_epoch)
    previous_loss = None  # checked once the next step is queued
    while step < self.total_steps:
      state, metrics = self._train_step(state, self.parallel.global_batch(next(data)))
      step += 1
      # Waiting for each step's loss would idle the devices while the host queues the next
      # step and copies its batch: a non-finite loss stops the run one step later, or at
      # once where its state would be evaluated or saved.
      if previous_loss is not None:
        supernet.check_finite(previous_loss, self.tag, step - 1)
      previous_loss = metrics["loss"]
      check = functools.partial(supernet.check_finite, metrics["loss"], self.tag, step)
      bar.update(step, metrics)
      if self.writer is not None and step % self.config.log_every_steps == 0:
        self.writer.write_scalars(step, {k: float(v) for k, v in metrics.items()}, self.tag)
      if eval_every and step % eval_every == 0 and step < self.total_steps:
        check()
        history.append({"step": step, **self.evaluate(state)})
      ckpt.save_on_schedule(step, state,
                            lambda: {"step": step, "history": list(history)},  # a snapshot
                            self.config.checkpoint.every_steps, self.total_steps, check)
    bar.close()
    return state, step


def load_net(config: ml_collections.ConfigDict, net_path: str) -> netspec.NetSpec:
  """The net in ``net_path`` with the configured data set's classes and resolution."""
  net = netspec.load_net(net_path)
  info = input_pipeline.dataset_info(config.data.name)
  if net.num_classes != info.num_classes or net.resolution != config.data.image_size:
    net = netspec.NetSpec(net.layers, net.stem_channels, net.head_channels, info.num_classes,
                          config.data.image_size, net.bn_momentum, net.bn_eps, net.se)
  return net


def check_net_record(workdir: str, net: netspec.NetSpec) -> None:
  """Raise ValueError if ``workdir`` trained, or began training, another net than
  ``net``: its checkpoints and metrics belong to that one."""
  record = epath.Path(workdir) / netspec.NET_FILE
  if record.exists() and netspec.load_net(record) != net:
    raise ValueError(f"{workdir} trained another net (its {netspec.NET_FILE}); remove that "
                     "directory to train this one there, or use another --workdir")


def run(config: ml_collections.ConfigDict, net_path: str, workdir: str, writer: Any = None,
        parallel: DataParallel | None = None, tag: str = "train") -> dict:
  """Train ``net_path`` into ``workdir`` unless its metrics already exist; the directory
  keeps a copy of the net, and refuses another one."""
  net = load_net(config, net_path)
  check_net_record(workdir, net)
  path = epath.Path(workdir) / METRICS_FILE
  if path.exists():
    return json.loads(path.read_text())
  record = epath.Path(workdir) / netspec.NET_FILE
  if jax.process_index() == 0 and not record.exists():
    record.parent.mkdir(parents=True, exist_ok=True)
    netspec.save_net(net, record)
  return Trainer(config, net, workdir, parallel, writer, tag).run()


def accuracy_summary(metrics: dict) -> str:
  return f"top-1 {metrics['top1']:.2%}, top-5 {metrics['top5']:.2%}"

