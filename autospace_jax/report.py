"""The run report: `report.md` and its figures, built from a finished run directory.

Every stage leaves JSON on disk (SPEC §1): stage 1 `space/learned_space.json`, stage 2
`search/<space>_<tag>/result.json`, stage 3 `train/<space>_<tag>/metrics.json`. The report
reads whatever of these exists, so a run of a single stage still gets a report, and says
which stages left nothing. The closing paragraph compares the spaces' accuracy-vs-MAdds
curves, the comparison the paper judges spaces by (SPEC §1, stage 3). Output is
deterministic: the same inputs give byte-identical files.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Sequence

from etils import epath
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import patches  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from autospace_jax import genome as genome_lib  # noqa: E402

# The file names the stages write (not imported from them, to keep the report free of JAX).
REPORT_FILE = "report.md"
FIGURES_DIR = "figures"
SPACE_JSON = os.path.join("space", "learned_space.json")
RESULT_FILE = "result.json"
METRICS_FILE = "metrics.json"
DPI = 120
# Edge colours by operator code; `none` (code 1) is never drawn.
OP_COLORS = {genome_lib.IDENTITY: "#7f7f7f", 3: "#1f77b4", 5: "#2ca02c", 7: "#ff7f0e",
             9: "#d62728"}
# Arc bend per edge slot: chain edges straight, 0->2 above, 1->3 below (0->3 is always
# `none`, SPEC §3).
EDGE_BEND = {(0, 1): 0.0, (1, 2): 0.0, (2, 3): 0.0, (0, 2): -0.55, (1, 3): 0.55}
NODE_RADIUS = 0.2
# Cell grids, in inches: a drawn cell, the title band above it, the figure header.
CELL_WIDTH, CELL_HEIGHT, CELL_TITLE, HEADER = 1.75, 0.62, 0.34, 0.75
SPACE_COLORS = {"learned": "#d62728", "irb": "#1f77b4"}
ATTENTION_COLOR = "#ffd54f"


# --- Loading --------------------------------------------------------------------------


def _load_json(path: str | os.PathLike) -> Any:
  return json.loads(epath.Path(path).read_text())


def _load_runs(workdir: str, stage: str, filename: str) -> dict[str, dict]:
  """``{run name: json}`` for every ``workdir/stage/<name>/filename``, sorted by name."""
  root = epath.Path(workdir) / stage
  if not root.is_dir():
    return {}
  return {run.name: _load_json(run / filename)
          for run in sorted(root.iterdir(), key=lambda run: run.name)
          if (run / filename).is_file()}


# --- Formatting -----------------------------------------------------------------------


def _mega(value: float) -> str:
  """Millions to three significant digits: 340M, 4.82M, 0.737M."""
  return f"{value / 1e6:.3g}M"


def _percent(fraction: float) -> str:
  return f"{100 * fraction:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
  return lines + [""]


def _missing(path: str, what: str) -> list[str]:
  return [f"_Not found: `{path}` — {what}._", ""]


def _layer_label(index: int, layer: dict) -> str:
  return (f"layer {index}: {layer['in_channels']}→{layer['out_channels']}, "
          f"s{layer['stride']}, {layer['in_size']}px")


# --- Figures --------------------------------------------------------------------------


def _write_if_changed(path: str, content: bytes) -> None:
  """Rewriting a finished run's report leaves identical files untouched (mtimes too)."""
  path = epath.Path(path)
  if path.exists() and path.read_bytes() == content:
    return
  path.write_bytes(content)


def _save(fig: plt.Figure, path: str) -> None:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
  plt.close(fig)
  _write_if_changed(path, buffer.getvalue())


def _grid(count: int, max_cols: int) -> tuple[int, int]:
  cols = min(count, max_cols)
  return -(-count // cols), cols


def _header(fig: plt.Figure, title: str, handles: Sequence[Any]) -> float:
  """Title on the first line, legend on the second; returns the top of the plot area."""
  height = fig.get_figheight()
  fig.suptitle(title, fontsize=10, x=0.01, y=1 - 0.1 / height, ha="left", va="top")
  fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, 1 - 0.36 / height),
             ncol=len(handles), fontsize=8, frameon=False)
  return 1 - HEADER / height


def plot_alpha(space: dict, path: str) -> None:
  """Per layer, the supernet cells' α at every evolution round: max, mean and range."""
  history, layers = space["history"], space["layers"]
  steps = np.array([h["step"] for h in history])
  alpha = np.array([h["alpha"] for h in history], np.float64)  # (rounds, layers, K)
  rows, cols = _grid(len(layers), 4)
  fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.4 * rows + HEADER), sharex=True,
                           sharey=True, squeeze=False)
  for index, ax in enumerate(axes.flat):
    if index >= len(layers):
      ax.set_visible(False)
      continue
    a = alpha[:, index, :]
    ax.fill_between(steps, a.min(axis=1), a.max(axis=1), color="#1f77b4", alpha=0.2,
                    linewidth=0)
    ax.plot(steps, a.max(axis=1), color="#d62728", marker=".", linewidth=1.3)
    ax.plot(steps, a.mean(axis=1), color="#1f77b4", marker=".", linewidth=1.3)
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_title(_layer_label(index, layers[index]), fontsize=8)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)
    if index % cols == 0:
      ax.set_ylabel("α (logit)", fontsize=8)
    if index >= len(layers) - cols:
      ax.set_xlabel("training step", fontsize=8)
      ax.tick_params(labelbottom=True)
  handles = [Line2D([], [], color="#d62728", marker=".", label="max over K cells"),
             Line2D([], [], color="#1f77b4", marker=".", label="mean over K cells"),
             patches.Patch(color="#1f77b4", alpha=0.2, label="min–max range")]
  top = _header(fig, f"Stage 1: α of the {alpha.shape[2]} supernet cells per layer at each "
                "evolution round (before mutation)", handles)
  fig.tight_layout(rect=(0, 0, 1, top))
  _save(fig, path)


def _minor_log_formatter(decades: float) -> ticker.Formatter:
  """Plain labels for a log axis's minor ticks: all of them on a short axis, else 2, 3, 5."""
  shown = range(2, 10) if decades < 1 else (2, 3, 5)

  def label(value: float, _: int) -> str:
    mantissa = round(value / 10 ** np.floor(np.log10(value)))
    return f"{value:g}" if mantissa in shown else ""
  return ticker.FuncFormatter(label)


def plot_population_madds(space: dict, path: str) -> None:
  """Per layer, box plots of the cell MAdds of the initial and of the final population."""
  layers = space["layers"]
  populations = space["population_madds"]
  colors = ["#bdbdbd", "#2ca02c"]
  width = 0.4
  fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(layers) + 2.0), 4.2))
  for r, (name, color) in enumerate(zip(("initial", "final"), colors)):
    data = [np.asarray(m, np.float64) / 1e6 for m in populations[name]]
    positions = np.arange(len(layers)) + (r - 0.5) * width
    ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True,
               whis=(5, 95), showfliers=False, boxprops={"facecolor": color, "linewidth": 0.8},
               medianprops={"color": "black"}, whiskerprops={"linewidth": 0.8},
               capprops={"linewidth": 0.8})
  ax.set_yscale("log")
  ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  low, high = ax.get_ylim()
  ax.yaxis.set_minor_formatter(_minor_log_formatter(np.log10(high / low)))
  ax.tick_params(axis="y", which="both", labelsize=8)
  ax.set_xticks(np.arange(len(layers)), [str(i) for i in range(len(layers))], fontsize=8)
  ax.set_xlim(-0.6, len(layers) - 0.4)
  ax.set_xlabel("layer")
  ax.set_ylabel("cell MAdds (millions, log scale)")
  ax.grid(axis="y", which="both", alpha=0.3)
  labels = ["initial population (step 0)", f"final population (step {space['steps']})"]
  ax.legend(handles=[patches.Patch(facecolor=c, edgecolor="black", label=label)
                     for c, label in zip(colors, labels)], fontsize=8, loc="best")
  size = len(populations["final"][0])
  ax.set_title(f"Stage 1: MAdds of the population ({size} cells per layer); whiskers 5–95%",
               fontsize=10)
  fig.tight_layout()
  _save(fig, path)


def _trimmed_arc(j: int, i: int, bend: float) -> tuple[tuple[float, float], ...]:
  """End points of the arc j -> i moved out to the node circles, given arc3's bend.

  Clipping against the node patches would do the same but costs seconds per figure.
  """
  control = ((j + i) / 2, -bend * (i - j))  # arc3's control point for a left-to-right edge
  ends = []
  for node in (j, i):
    dx, dy = control[0] - node, control[1]
    norm = float(np.hypot(dx, dy))
    ends.append((node + NODE_RADIUS * dx / norm, NODE_RADIUS * dy / norm))
  return tuple(ends)


def draw_cell(ax: plt.Axes, genome: genome_lib.Genome, title: str) -> None:
  """Draw a cell as a DAG: nodes 0..3 left to right, edges coloured by operator."""
  ax.set_xlim(-0.3, 3.3)
  ax.set_ylim(-0.7, 0.7)
  ax.set_aspect("equal")
  ax.axis("off")
  ax.set_title(title, fontsize=7, pad=2)
  for n in range(genome_lib.NUM_NODES):
    attention = n >= 2 and genome.uses_attention(n)
    ax.add_patch(patches.Circle((n, 0.0), NODE_RADIUS, linewidth=1.0, zorder=3,
                                facecolor=ATTENTION_COLOR if attention else "white",
                                edgecolor="black"))
    ax.text(n, 0.0, str(n), ha="center", va="center", fontsize=7, zorder=4)
  for (j, i), code in zip(genome_lib.EDGES, genome.edges):
    if code == genome_lib.NONE:
      continue
    start, end = _trimmed_arc(j, i, EDGE_BEND[(j, i)])
    ax.add_patch(patches.FancyArrowPatch(
        start, end, connectionstyle=f"arc3,rad={EDGE_BEND[(j, i)]}", arrowstyle="-|>",
        mutation_scale=7, linewidth=1.6, color=OP_COLORS[code], shrinkA=0, shrinkB=0,
        zorder=2))


def _cell_handles() -> list[Any]:
  handles = [Line2D([], [], color=c, linewidth=2, label=genome_lib.OP_NAMES[code])
             for code, c in OP_COLORS.items()]
  return handles + [Line2D([], [], linestyle="none", marker="o", markersize=8,
                           markerfacecolor=ATTENTION_COLOR, markeredgecolor="black",
                           label="attention-mixed node")]


def _cell_grid(rows: int, cols: int, left: float, title: str
               ) -> tuple[plt.Figure, np.ndarray]:
  """A grid of cell panels with fixed sizes in inches (tight_layout is slow on big grids)."""
  width = left + CELL_WIDTH * cols + 0.1
  height = HEADER + (CELL_TITLE + CELL_HEIGHT) * rows + 0.1
  fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
  top = _header(fig, title, _cell_handles())
  fig.subplots_adjust(left=left / width, right=1 - 0.1 / width, bottom=0.1 / height,
                      top=top - CELL_TITLE / height, wspace=0.08,
                      hspace=CELL_TITLE / CELL_HEIGHT)
  return fig, axes


def _cell_title(g: genome_lib.Genome) -> str:
  return f"e{g.expansion} mix({g.mix[0]},{g.mix[1]})"


def plot_learned_cells(space: dict, path: str) -> None:
  """One row per layer, its K learned cells ranked by compensated α."""
  layers, cells = space["layers"], space["cells"]
  fig, axes = _cell_grid(len(cells), max(len(c) for c in cells), 1.0,
                         "Stage 1: learned space, top cells per layer by α_c")
  for layer, row in enumerate(cells):
    for rank, ax in enumerate(axes[layer]):
      if rank >= len(row):
        ax.set_visible(False)
        continue
      cell = row[rank]
      g = genome_lib.from_matrix(cell["matrix"])
      draw_cell(ax, g, f"#{rank + 1} {_cell_title(g)}\nα_c {cell['compensated_alpha']:.3f}, "
                f"{_mega(cell['madds'])} MAdds")
    shape = layers[layer]
    axes[layer][0].text(-0.12, 0.5, f"layer {layer}\n{shape['in_channels']}→"
                        f"{shape['out_channels']} s{shape['stride']}", ha="right",
                        va="center", fontsize=8, transform=axes[layer][0].transAxes)
  _save(fig, path)


def plot_final_net(name: str, result: dict, path: str, trained: dict | None = None) -> None:
  """The final network's chosen cell in every layer (Zero layers are skipped layers),
  titled with the size of the net stage 3 trained (SE included) when there is one."""
  matrices = result["matrices"]
  size = trained or result
  rows, cols = _grid(len(matrices), 6)
  fig, axes = _cell_grid(rows, cols, 0.1, f"Final net {name}: {_mega(size['madds'])} "
                         f"MAdds, {_mega(size['params'])} params")
  for index, ax in enumerate(axes.flat):
    if index >= len(matrices):
      ax.set_visible(False)
    elif matrices[index] is None:
      ax.axis("off")
      ax.set_title(f"layer {index}", fontsize=7, pad=2)
      ax.text(0.5, 0.5, "Zero\n(layer skipped)", ha="center", va="center", fontsize=7,
              color="#555555", transform=ax.transAxes)
    else:
      g = genome_lib.from_matrix(matrices[index])
      draw_cell(ax, g, f"layer {index}: {_cell_title(g)}")
  _save(fig, path)


def _curves(points: Sequence[dict]) -> dict[str, list[dict]]:
  """Points grouped by space, each group sorted by MAdds."""
  curves: dict[str, list[dict]] = {}
  for p in sorted(points, key=lambda p: (p["space"], p["madds"], p["name"])):
    curves.setdefault(p["space"], []).append(p)
  return curves


def plot_accuracy_vs_madds(points: Sequence[dict], path: str) -> None:
  """Top-1 against MAdds, one curve per space, points labelled with their target."""
  fig, ax = plt.subplots(figsize=(6.4, 4.6))
  for index, (space, curve) in enumerate(_curves(points).items()):
    x = np.array([p["madds"] for p in curve]) / 1e6
    y = np.array([100 * p["top1"] for p in curve])
    color = SPACE_COLORS.get(space)
    ax.plot(x, y, marker="o", linewidth=1.5, color=color, label=f"{space} space")
    # Alternate spaces label above / below their points: nets of two spaces searched
    # for one target often sit close together.
    offset, align = ((4, 5), "bottom") if index % 2 == 0 else ((4, -6), "top")
    for p, xi, yi in zip(curve, x, y):
      ax.annotate(f"target {_mega(p['target'])}", (xi, yi), textcoords="offset points",
                  xytext=offset, va=align, fontsize=7, color=color)
  ax.set_xlabel("MAdds of the trained net (millions)")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_title("Stage 3: accuracy vs MAdds per search space", fontsize=10)
  ax.grid(alpha=0.3)
  ax.margins(x=0.12, y=0.12)
  ax.legend(fontsize=8)
  fig.tight_layout()
  _save(fig, path)


def plot_madds_vs_target(results: Sequence[dict], path: str) -> None:
  """Without stage 3: how far each searched net's MAdds landed from its target."""
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  spaces = sorted({r["space"] for r in results})
  for space in spaces:
    runs = sorted((r for r in results if r["space"] == space), key=lambda r: r["target_madds"])
    ax.plot([r["target_madds"] / 1e6 for r in runs], [100 * r["madds_error"] for r in runs],
            marker="o", linewidth=1.5, color=SPACE_COLORS.get(space), label=f"{space} space")
  ax.axhline(0.0, color="black", linewidth=0.8, linestyle="--", label="on target")
  ax.set_xlabel("MAdds target (millions)")
  ax.set_ylabel("searched MAdds − target (% of target)")
  ax.set_title("Stage 2: searched MAdds vs target (no stage 3 metrics)", fontsize=10)
  ax.grid(alpha=0.3)
  ax.margins(x=0.08, y=0.15)
  ax.legend(fontsize=8)
  fig.tight_layout()
  _save(fig, path)


# --- Reading of the curves --------------------------------------------------------------


def compare_curves(a: Sequence[dict], b: Sequence[dict]) -> dict | None:
  """Top-1 of curve ``a`` minus curve ``b`` (points sorted by MAdds) where they overlap.

  Both curves are linearly interpolated on every MAdds point of either curve inside the
  shared MAdds range. Returns None when the ranges do not overlap.
  """
  ax, ay = np.array([p["madds"] for p in a], np.float64), np.array([p["top1"] for p in a])
  bx, by = np.array([p["madds"] for p in b], np.float64), np.array([p["top1"] for p in b])
  lo, hi = max(ax[0], bx[0]), min(ax[-1], bx[-1])
  if lo > hi:
    return None
  grid = np.unique(np.concatenate([ax, bx]))
  grid = grid[(grid >= lo) & (grid <= hi)]
  diff = np.interp(grid, ax, ay) - np.interp(grid, bx, by)
  return {"low": lo, "high": hi, "points": len(grid), "above": int((diff > 0).sum()),
          "below": int((diff < 0).sum()), "mean": float(diff.mean()),
          "min": float(diff.min()), "max": float(diff.max())}


def _pp(value: float) -> str:
  return f"{100 * value:+.2f} pp"


def read_curves(points: Sequence[dict]) -> str:
  """One paragraph on which space's accuracy-vs-MAdds curve is higher, computed."""
  curves = _curves(points)
  best = {s: max(c, key=lambda p: p["top1"]) for s, c in curves.items()}
  parts = [f"The best {s}-space net reaches {_percent(p['top1'])}% top-1 at "
           f"{_mega(p['madds'])} MAdds." for s, p in best.items()]
  if len(curves) < 2:
    parts.append("Only one space has trained nets, so there is no curve to compare with.")
    return " ".join(parts)
  first, *others = sorted(curves, key=lambda s: (s != "learned", s))
  for other in others:
    c = compare_curves(curves[first], curves[other])
    if c is None:
      parts.append(f"The {first} and {other} curves cover disjoint MAdds ranges, so neither "
                   "can be said to lie above the other.")
      continue
    span = f"{_mega(c['low'])}–{_mega(c['high'])} MAdds"
    gap = f"gap {_pp(c['min'])} to {_pp(c['max'])}, mean {_pp(c['mean'])}"
    if c["above"] == c["points"]:
      verdict = f"the {first} curve lies above the {other} curve over the whole shared range"
    elif c["below"] == c["points"]:
      verdict = f"the {other} curve lies above the {first} curve over the whole shared range"
    else:
      verdict = (f"the curves cross: {first} is higher at {c['above']} and {other} at "
                 f"{c['below']} of {c['points']} compared MAdds points")
    parts.append(f"Interpolating both curves over the shared range {span}, {verdict} "
                 f"({first} minus {other}: {gap}).")
  return " ".join(parts)


# --- Report sections ----------------------------------------------------------------------


def _summary_section(config_summary: dict | None) -> list[str]:
  lines = ["## Run summary", ""]
  if not config_summary:
    return lines + ["_No run configuration was given to the report._", ""]
  rows = [(f"`{k}`", json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple))
           else v) for k, v in config_summary.items()]
  return lines + _table(["key", "value"], rows)


def _space_section(workdir: str, figures: str) -> list[str]:
  lines = ["## Stage 1: space evolution", ""]
  path = os.path.join(workdir, SPACE_JSON)
  if not epath.Path(path).is_file():
    return lines + _missing(SPACE_JSON, "stage 1 (space evolution) did not run here")
  space = _load_json(path)
  layers, cells, history = space["layers"], space["cells"], space["history"]
  team_sizes = sorted({h["team_size"] for h in history})
  lines += [f"{len(cells)} searchable layers, {max(len(c) for c in cells)} cells per layer "
            f"in the learned space, {space['steps']} training steps, {len(history)} evolution "
            f"rounds" + (f" (tournament team sizes {', '.join(map(str, team_sizes))})."
                         if team_sizes else "."), ""]
  lines += _table(["layer", "C_in → C_out", "stride", "input size", "best α_c"],
                  [(i, f"{s['in_channels']} → {s['out_channels']}", s["stride"],
                    f"{s['in_size']}px", f"{max(c['compensated_alpha'] for c in cells[i]):.4f}")
                   for i, s in enumerate(layers)])
  lines += ["### Learned cells", "",
            "Ranked by compensated fitness α_c (SPEC §6); α is the raw fitness, "
            "steps the α updates the cell received.", ""]
  lines += _table(["layer", "rank", "cell", "α", "α_c", "α steps", "MAdds"],
                  [(layer, rank + 1, f"`{c['description']}`", f"{c['alpha']:.4f}",
                    f"{c['compensated_alpha']:.4f}", c["alpha_steps"], _mega(c["madds"]))
                   for layer, row in enumerate(cells) for rank, c in enumerate(row)])
  plot_learned_cells(space, os.path.join(figures, "learned_cells.png"))
  lines += ["![learned cells](figures/learned_cells.png)", ""]
  plot_population_madds(space, os.path.join(figures, "population_madds.png"))
  lines += ["### Population MAdds", "", "![population MAdds](figures/population_madds.png)", ""]
  if not history:
    return lines + ["_No evolution round was recorded (the run ended in warm-up), so there "
                    "is no α figure._", ""]
  plot_alpha(space, os.path.join(figures, "alpha.png"))
  return lines + ["### α during evolution", "", "![alpha](figures/alpha.png)", ""]


def _search_section(results: dict[str, dict]) -> list[str]:
  lines = ["## Stage 2: architecture search", ""]
  if not results:
    return lines + _missing(os.path.join("search", "*", RESULT_FILE),
                            "stage 2 (architecture search) did not run here")
  order = sorted(results.items(), key=lambda kv: (kv[1]["space"], kv[1]["target_madds"]))
  return lines + _table(
      ["run", "space", "target", "MAdds", "error %", "params", "Zero layers"],
      [(name, r["space"], _mega(r["target_madds"]), _mega(r["madds"]),
        f"{100 * r['madds_error']:+.1f}", _mega(r["params"]),
        f"{r['cells'].count('zero')} / {len(r['cells'])}") for name, r in order])


def _train_points(metrics: dict[str, dict], results: dict[str, dict]) -> list[dict]:
  points = []
  for name, m in metrics.items():
    result = results.get(name, {})
    points.append({"name": name, "space": result.get("space", "—"),
                   "target": result.get("target_madds", 0), "madds": m["madds"],
                   "params": m["params"], "top1": m["top1"], "top5": m["top5"],
                   "epochs": m["epochs"], "se": m["se"]})
  return points


def _train_section(metrics: dict[str, dict], results: dict[str, dict], figures: str
                   ) -> list[str]:
  lines = ["## Stage 3: retraining", ""]
  points = _train_points(metrics, results)
  if points:
    points.sort(key=lambda p: (p["space"], p["target"], p["name"]))
    lines += _table(["run", "space", "target", "top-1 %", "top-5 %", "params", "MAdds",
                     "epochs", "SE"],
                    [(p["name"], p["space"], _mega(p["target"]) if p["target"] else "—",
                      _percent(p["top1"]), _percent(p["top5"]), _mega(p["params"]),
                      _mega(p["madds"]), p["epochs"], "yes" if p["se"] else "no")
                     for p in points])
  else:
    lines += _missing(os.path.join("train", "*", METRICS_FILE),
                      "stage 3 (retraining) did not run here")
  searched = [p for p in points if p["name"] in results]
  if searched:
    plot_accuracy_vs_madds(searched, os.path.join(figures, "accuracy_vs_madds.png"))
    return lines + ["### Accuracy vs MAdds", "",
                    "![accuracy vs MAdds](figures/accuracy_vs_madds.png)", "",
                    read_curves(searched), ""]
  if not results:
    return lines
  plot_madds_vs_target(list(results.values()), os.path.join(figures, "madds_vs_target.png"))
  errors: dict[str, list[float]] = {}
  for r in results.values():
    errors.setdefault(r["space"], []).append(abs(r["madds_error"]))
  return lines + [
      "### Searched MAdds vs target", "",
      "![searched MAdds vs target](figures/madds_vs_target.png)", "",
      "No searched net was retrained, so there is no accuracy curve to compare; the figure "
      "shows how close stage 2 came to its MAdds targets: mean |error| " + ", ".join(
          f"{s} {100 * float(np.mean(e)):.1f}%" for s, e in sorted(errors.items())) + ".", ""]


def _final_section(final: str | None, inferred: bool, results: dict[str, dict],
                   metrics: dict[str, dict], figures: str) -> list[str]:
  lines = ["## Final network", ""]
  if final is None:
    return lines + ["_No final network: no search result and no trained net was found._", ""]
  how = " (inferred: the largest-target net of the learned space)" if inferred else ""
  lines += [f"Final net: `{final}`{how}.", ""]
  if final in metrics:
    m = metrics[final]
    lines += [f"Top-1 {_percent(m['top1'])}%, top-5 {_percent(m['top5'])}%, "
              f"{_mega(m['params'])} params, {_mega(m['madds'])} MAdds after "
              f"{m['epochs']} epochs ({m['dtype']}, SE {'on' if m['se'] else 'off'}).", ""]
  if final not in results:
    return lines + [f"_No search result for `{final}` (`search/{final}/{RESULT_FILE}`), so "
                    "its cells are not drawn._", ""]
  plot_final_net(final, results[final], os.path.join(figures, "final_net.png"),
                 metrics.get(final))
  cells = results[final]["cells"]
  return lines + _table(["layer", "cell"], [(i, f"`{c}`") for i, c in enumerate(cells)]) + [
      "![final net](figures/final_net.png)", ""]


def _pick_final(config_summary: dict | None, results: dict[str, dict]
                ) -> tuple[str | None, bool]:
  """The final net's run name and whether it was inferred rather than given."""
  if config_summary and config_summary.get("final"):
    return str(config_summary["final"]), False
  learned = [n for n, r in results.items() if r["space"] == "learned"] or list(results)
  if not learned:
    return None, False
  return max(learned, key=lambda n: (results[n]["target_madds"], n)), True


def write_report(workdir: str, config_summary: dict | None = None) -> str:
  """Write ``workdir/report.md`` and its figures from whatever stages left outputs.

  ``config_summary`` (key/value pairs shown in the report) may name the final net as
  ``final`` = ``<space>_<tag>``; without it the largest-target learned-space net is shown.
  Returns the report's path.
  """
  figures = os.path.join(workdir, FIGURES_DIR)
  epath.Path(figures).mkdir(parents=True, exist_ok=True)
  results = _load_runs(workdir, "search", RESULT_FILE)
  metrics = _load_runs(workdir, "train", METRICS_FILE)
  final, inferred = _pick_final(config_summary, results)
  lines = ["# AutoSpace run report", ""]
  lines += _summary_section(config_summary)
  lines += _space_section(workdir, figures)
  lines += _search_section(results)
  lines += _train_section(metrics, results, figures)
  lines += _final_section(final, inferred, results, metrics, figures)
  path = os.path.join(workdir, REPORT_FILE)
  _write_if_changed(path, ("\n".join(lines).rstrip("\n") + "\n").encode())
  return path
