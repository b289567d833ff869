"""Result files are written whole or not at all."""

import pytest

from autospace_jax import files


def test_a_write_that_fails_midway_leaves_the_previous_file_and_no_partial_one(tmp_path,
                                                                             monkeypatch):
  path = tmp_path / "result.json"
  files.write_text(path, '{"done": 1}')
  assert path.read_text() == '{"done": 1}'

  def crash(self, target):
    raise KeyboardInterrupt  # killed between writing the text and moving it into place

  monkeypatch.setattr(type(files.epath.Path(path)), "replace", crash)
  with pytest.raises(KeyboardInterrupt):
    files.write_text(path, '{"done": 2}')
  assert path.read_text() == '{"done": 1}'
  assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["result.json"]
