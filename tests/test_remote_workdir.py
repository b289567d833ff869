"""A `gs://` work directory: every file the pipeline writes or reads back goes through
etils.epath (tf.io.gfile or fsspec on a real bucket; here a bucket faked on local disk),
and nothing lands in a local directory named `gs:`."""

import json
import os

import pytest
from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing

from autospace_jax import checkpointing
from autospace_jax import config_validation
from autospace_jax import main
from autospace_jax import metrics as metrics_lib
from conftest import short_schedule, tiny_config

pytestmark = pytest.mark.slow
WORKDIR = "gs://bucket/run"


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """gs:// paths map to `tmp_path/bucket-root/...`; the working directory is `tmp_path`,
  so a plain `open("gs://...")` would create `tmp_path/gs:`."""
  root = tmp_path / "bucket-root"

  def local(path):
    path = os.fspath(path)
    return str(root / path[len("gs://"):]) if path.startswith("gs://") else path

  def redirect(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def redirect_both(original, path, dst, *args, **kwargs):
    return original(local(path), local(dst), *args, **kwargs)

  fns = {name: redirect for name in ("exists", "glob", "isdir", "listdir", "makedirs",
                                     "mkdir", "open", "remove", "rmtree", "stat", "walk")}
  fns.update({name: redirect_both for name in ("copy", "rename", "replace")})
  # Orbax writes arrays through TensorStore, which would call GCS itself: checkpoints
  # go straight to the fake bucket's local directory.
  init = checkpointing.Checkpointer.__init__
  monkeypatch.setattr(checkpointing.Checkpointer, "__init__",
                      lambda self, directory, *a, **k: init(self, local(directory), *a, **k))
  monkeypatch.chdir(tmp_path)
  # With TensorFlow installed epath sends gs:// to tf.io.gfile before looking at the
  # backends mock_epath replaces.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  with epath_testing.mock_epath(**fns):
    yield root / "bucket" / "run"


def test_every_output_of_a_gs_workdir_run_lands_in_the_bucket(bucket, tmp_path):
  config = short_schedule(tiny_config())
  config.search.compare_irb = False
  epath.Path(WORKDIR).mkdir(parents=True, exist_ok=True)  # as main() does
  main.write_config_record(config, WORKDIR)
  summary = main.run_pipeline(config, WORKDIR)

  assert not (tmp_path / "gs:").exists()
  assert json.loads((bucket / "config.json").read_text())["space"]["num_cells"] == 3
  assert (bucket / "space" / "learned_space.config").is_file()
  assert (bucket / "space" / "learned_space.json").is_file()
  [search] = (bucket / "search").iterdir()
  assert {p.name for p in search.iterdir()} >= {"net.json", "result.json"}
  metrics = json.loads((bucket / "train" / search.name / "metrics.json").read_text())
  assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
  records = metrics_lib.read_jsonl(f"{WORKDIR}/{metrics_lib.JSONL_FILE}")
  assert "space" in {r["stage"] for r in records}
  assert any((bucket / "tensorboard" / "space").glob("events.out.tfevents.*"))
  assert (bucket / "report.md").is_file() and any((bucket / "figures").glob("*.png"))
  assert epath.Path(WORKDIR, "report.md").read_text() == (bucket / "report.md").read_text()

  # A rerun reads every stage's outputs back from the bucket and trains nothing again.
  assert main.run_pipeline(config, WORKDIR) == summary

  # Validation reads the bucket too: the run resumes only with its stages' settings.
  config_validation.validate(config, WORKDIR)
  config.search.epochs = 4 * config.search.epochs
  with pytest.raises(config_validation.ConfigError, match=(
      r"^search\.epochs=.* differs from .* of the run in workdir='gs://bucket/run'")):
    config_validation.validate(config, WORKDIR)
