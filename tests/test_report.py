"""The report reads a run directory, draws every figure and stays deterministic."""

import json
import os
import shutil

import matplotlib.image
import numpy as np

from autospace_jax import genome as genome_lib
from autospace_jax import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS = [{"in_channels": 16, "out_channels": 24, "stride": 2, "in_size": 16},
          {"in_channels": 24, "out_channels": 24, "stride": 1, "in_size": 8}]
CELLS = [genome_lib.irb(3, 6),
         genome_lib.Genome((5, 3, 2, 1, 3, 2), 1, (1, 1)),  # skip edges, attention on 2, 3
         genome_lib.Genome((3, 1, 2, 1, 2, 7), 0, (0, 1))]
# (space, target, searched MAdds, top-1): learned above irb at every target.
RUNS = [("learned", 10e6, 10.4e6, 0.62), ("learned", 20e6, 19.5e6, 0.68),
        ("learned", 30e6, 30.2e6, 0.71), ("irb", 10e6, 9.8e6, 0.58),
        ("irb", 20e6, 20.6e6, 0.64), ("irb", 30e6, 29.7e6, 0.67)]


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f)


def _space(rounds=3, population=8):
  rng = np.random.default_rng(0)
  cells = [[{"matrix": genome_lib.to_matrix(g), "description": g.describe(),
             "alpha": 0.3 - 0.1 * k, "compensated_alpha": 0.35 - 0.1 * k, "alpha_steps": 12,
             "madds": 1_000_000 * (layer + 1) + 1000 * k, "birth_step": 0, "cell_id": k,
             "parent_id": -1} for k, g in enumerate(CELLS)] for layer in range(len(LAYERS))]
  history = [{"step": 40 * (r + 1), "epoch": float(r), "team_size": 3 + r,
              "alpha": rng.normal(0.1 * r, 0.05, (len(LAYERS), len(CELLS))).tolist()}
             for r in range(rounds)]
  population_madds = {name: rng.integers(500_000, 3_000_000, (len(LAYERS), population)).tolist()
                      for name in ("initial", "final")}
  return {"layers": LAYERS, "cells": cells, "history": history,
          "population_madds": population_madds, "steps": 40 * rounds}


def _full_run(workdir):
  _write(os.path.join(workdir, report.SPACE_JSON), _space())
  for space, target, madds, top1 in RUNS:
    name = f"{space}_{target / 1e6:.2f}M"
    chosen = CELLS if space == "learned" else [genome_lib.irb(5, 3), genome_lib.irb(3, 6)]
    _write(os.path.join(workdir, "search", name, "result.json"), {
        "space": space, "target_madds": int(target), "params": 500_000, "madds": int(madds),
        "madds_error": madds / target - 1, "alpha": [[0.0] * 3] * 3, "choice": [0, 1, 2],
        "cells": [g.describe() for g in chosen] + ["zero"],
        "matrices": [genome_lib.to_matrix(g) for g in chosen] + [None]})
    _write(os.path.join(workdir, "train", name, "metrics.json"), {
        "top1": top1, "top5": top1 + 0.2, "params": 500_000, "madds": int(madds),
        "steps": 100, "epochs": 2, "dtype": "bfloat16", "se": False,
        "history": [{"step": 50, "top1": top1 - 0.1, "top5": top1 + 0.1}]})


def _assert_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  image = matplotlib.image.imread(path)
  assert image.shape[0] > 100 and image.shape[1] > 100


def test_full_run_report(tmp_path):
  workdir = str(tmp_path)
  _full_run(workdir)
  path = report.write_report(workdir, {"data": "cifar10", "final": "learned_30.00M"})
  assert path == os.path.join(workdir, "report.md")
  text = open(path).read()
  for heading in ("# AutoSpace run report", "## Run summary", "## Stage 1", "## Stage 2",
                  "## Stage 3", "## Final network", "### Accuracy vs MAdds"):
    assert heading in text
  assert "Not found" not in text
  assert "`learned_30.00M`" in text and "cifar10" in text
  assert CELLS[1].describe() in text
  assert "the learned curve lies above the irb curve over the whole shared range" in text
  for name in ("alpha", "population_madds", "learned_cells", "accuracy_vs_madds",
               "final_net"):
    assert f"](figures/{name}.png)" in text
    _assert_png(os.path.join(workdir, "figures", f"{name}.png"))


def test_space_only_report_names_missing_stages(tmp_path):
  workdir = str(tmp_path)
  _write(os.path.join(workdir, report.SPACE_JSON), _space(rounds=1))
  text = open(report.write_report(workdir)).read()
  assert "## Stage 1" in text and "![alpha](figures/alpha.png)" in text
  assert "Not found: `search/*/result.json`" in text
  assert "Not found: `train/*/metrics.json`" in text
  assert "No final network" in text
  assert sorted(os.listdir(os.path.join(workdir, "figures"))) == [
      "alpha.png", "learned_cells.png", "population_madds.png"]


def test_search_only_report_plots_madds_against_target(tmp_path):
  workdir = str(tmp_path)
  _full_run(workdir)
  for stage in ("space", "train"):
    shutil.rmtree(os.path.join(workdir, stage))
  text = open(report.write_report(workdir)).read()
  assert "Not found: `space/learned_space.json`" in text
  assert "Not found: `train/*/metrics.json`" in text
  assert "mean |error| irb 2.0%, learned 2.4%" in text
  assert "`learned_30.00M` (inferred" in text
  for name in ("madds_vs_target", "final_net"):
    assert f"](figures/{name}.png)" in text
    _assert_png(os.path.join(workdir, "figures", f"{name}.png"))


def test_report_is_deterministic(tmp_path):
  workdir = str(tmp_path)
  _full_run(workdir)
  first = open(report.write_report(workdir)).read()
  figure = open(os.path.join(workdir, "figures", "alpha.png"), "rb").read()
  second = open(report.write_report(workdir)).read()
  assert first == second
  assert figure == open(os.path.join(workdir, "figures", "alpha.png"), "rb").read()
  assert "inferred" in first


def test_curve_reading_follows_the_numbers():
  learned = [{"name": f"l{i}", "space": "learned", "madds": m, "top1": t}
             for i, (m, t) in enumerate([(10e6, 0.60), (30e6, 0.70)])]
  irb = [{"name": f"i{i}", "space": "irb", "madds": m, "top1": t}
         for i, (m, t) in enumerate([(10e6, 0.64), (30e6, 0.66)])]
  text = report.read_curves(learned + irb)
  assert "the curves cross" in text
  higher_irb = [dict(p, top1=p["top1"] + 0.2) for p in irb]
  assert "the irb curve lies above the learned curve" in report.read_curves(
      learned + higher_irb)
  comparison = report.compare_curves(learned, irb)
  assert np.isclose(comparison["mean"], (-0.04 + 0.04) / 2)


def test_final_net_figure_gives_the_size_of_the_net_stage_3_trained(tmp_path, monkeypatch):
  """With SE on, the trained net is larger than the searched one; the figure's title and
  the text above it must quote the same (trained) size."""
  titles = []
  save = report._save
  monkeypatch.setattr(report, "_save", lambda fig, path: (
      titles.append(fig._suptitle.get_text()), save(fig, path)))
  matrices = [genome_lib.to_matrix(g) for g in CELLS]
  searched = {"madds": 30_000_000, "params": 1_000_000, "matrices": matrices}
  trained = {"madds": 31_000_000, "params": 1_500_000}
  report.plot_final_net("learned_30.00M", searched, str(tmp_path / "a.png"), trained)
  report.plot_final_net("learned_30.00M", searched, str(tmp_path / "b.png"))
  assert titles == ["Final net learned_30.00M: 31M MAdds, 1.5M params",
                    "Final net learned_30.00M: 30M MAdds, 1M params"]
