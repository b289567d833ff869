"""The Colab notebook runs top to bottom and shows the run's report with its figures.

`jupyter nbconvert --execute` runs `notebooks/autospace_colab.ipynb` in a kernel started
from this interpreter (a kernelspec written under tmp_path and found through JUPYTER_PATH,
so nothing is written to the user's Jupyter or IPython directories), with the notebook's
parameters set through its AUTOSPACE_NOTEBOOK_* variables to the tiny configuration of
conftest.py (whose compiled programs the rest of the suite shares through the XLA cache).
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
NOTEBOOK = ROOT / "notebooks" / "autospace_colab.ipynb"
KERNEL = "autospace-notebook-test"

pytest.importorskip("nbconvert")
pytest.importorskip("ipykernel")


def write_kernelspec(jupyter_path):
  spec = jupyter_path / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "autospace_jax test", "language": "python"}))


def outputs(notebook):
  return [o for cell in notebook["cells"] if cell["cell_type"] == "code"
          for o in cell.get("outputs", [])]


def text_of(output, mime="text/plain"):
  if output["output_type"] == "stream":
    value = output["text"] if mime == "text/plain" else ""
  else:
    value = output.get("data", {}).get(mime, "")
  return "".join(value) if isinstance(value, list) else value


def test_notebook_runs_and_shows_the_report(tmp_path):
  jupyter = tmp_path / "jupyter"
  write_kernelspec(jupyter)
  workdir = tmp_path / "run"
  env = dict(os.environ)
  env.update({
      "JUPYTER_PATH": str(jupyter),
      "JUPYTER_DATA_DIR": str(jupyter),
      "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter_config"),
      "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter_runtime"),
      "IPYTHONDIR": str(tmp_path / "ipython"),
      "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]),
      "AUTOSPACE_NOTEBOOK_WORKDIR": str(workdir),
      "AUTOSPACE_NOTEBOOK_SMALL": "1",
      "AUTOSPACE_NOTEBOOK_PRESET": "default",
      "AUTOSPACE_NOTEBOOK_STAGES": "space,search,train",
      "AUTOSPACE_NOTEBOOK_COMPARE_IRB": "0",
      "AUTOSPACE_NOTEBOOK_WARMUP_EPOCHS": "0.1",
      "AUTOSPACE_NOTEBOOK_EPOCHS": "0.2",
  })
  executed = tmp_path / "executed.ipynb"
  result = subprocess.run(
      [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
       "--ExecutePreprocessor.timeout=600", f"--ExecutePreprocessor.kernel_name={KERNEL}",
       f"--output-dir={tmp_path}", "--output=executed", str(NOTEBOOK)],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-8000:]

  notebook = json.loads(executed.read_text())
  outs = outputs(notebook)
  assert not [o for o in outs if o["output_type"] == "error"]
  plain = "\n".join(text_of(o) for o in outs)
  # The kernel is this interpreter, the package was already importable (no pip install),
  # and the parameters came from the environment.
  assert sys.executable in plain
  assert "autospace_jax is already installed" in plain
  assert f"WORKDIR={workdir}" in plain

  report = (workdir / "report.md").read_text()
  markdown = "".join(text_of(o, "text/markdown") for o in outs)
  assert markdown.startswith("# AutoSpace run report")
  assert "## Stage 1: space evolution" in markdown and "## Final network" in markdown
  # Every figure link of report.md was replaced by the figure itself.
  assert "![" not in markdown
  figures = sorted((workdir / "figures").glob("*.png"))
  assert len(figures) >= 4
  images = [o for o in outs if "image/png" in o.get("data", {})]
  assert len(images) == report.count("](figures/")
  assert len(images) >= len(figures)
