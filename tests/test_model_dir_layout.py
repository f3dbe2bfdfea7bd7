"""The model dir's layout: every name in it defined once (tlframe/train/layout.py); --overwrite removes
exactly what a run writes, and nothing of the user's."""

import ast
import collections
import dataclasses
import os
import pathlib
import shutil

import pytest
import tensorflow as tf

import tlframe
from tlframe.errors import UserError
from tlframe.train import layout as model_dir_layout
from tlframe.train import model_dir as model_dir_lib
from tlframe.predict import plots
from tlframe import train
from test_finetune import TinyBatchNormBackbone
from test_train_helpers import make_records

PACKAGE = pathlib.Path(tlframe.__file__).parent
# The one module that names the entries of a model dir.
OWNER = pathlib.Path("train", "layout.py")


def _layout_names():
  """{constant: value} of the names model_dir gives to the entries of a model dir."""
  names = {name: value for name, value in vars(model_dir_layout).items()
           if name.endswith(("_FILENAME", "_DIRNAME")) and isinstance(value, str)}
  # evaluate's output folder has a confusion_matrix.png of its own (evaluation.py).
  names.pop("EARLIER_CONFUSION_FILENAME", None)
  return names


def _docstrings(tree):
  nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
  return {id(node.body[0].value) for node in ast.walk(tree)
          if isinstance(node, nodes) and node.body and isinstance(node.body[0], ast.Expr)}


def _is_path_component(text, name):
  return name in text.split("/")


def _is_model_dir(node):
  """Whether an argument of a join names a model dir (or a worker's stand-in, out_dir)."""
  name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
  return "model_dir" in name or name == "out_dir"


def _scan(values):
  """(definitions {value: [where]}, uses [where]) of the layout names in the package's code.

  A definition: `UPPER_CASE = "<name>"`. A use: any other string (docstrings
  aside) that is a file name (has a dot) or holds one as a path component; a
  plain word ("logs", "export") only as a part of a `*join(...)` under a model
  dir (elsewhere "records" is a manifest key, "checkpoints" torch's cache).
  """
  definitions, uses = collections.defaultdict(list), []
  for path in sorted(PACKAGE.rglob("*.py")):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = _docstrings(tree)
    defined, in_paths = set(), set()
    for node in ast.walk(tree):
      if (isinstance(node, ast.Assign) and len(node.targets) == 1 and
          isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper() and
          isinstance(node.value, ast.Constant) and node.value.value in values):
        definitions[node.value.value].append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
        defined.add(id(node.value))
      elif isinstance(node, ast.Call):
        function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(
            node.func, "id", "")
        if function.endswith("join") and any(map(_is_model_dir, node.args)):
          in_paths.update(id(arg) for arg in node.args if isinstance(arg, ast.Constant))
    if path.relative_to(PACKAGE) == OWNER:
      continue
    for node in ast.walk(tree):
      if (not isinstance(node, ast.Constant) or not isinstance(node.value, str) or
          id(node) in defined or id(node) in docstrings):
        continue
      for value in values:
        file_name = "." in value and _is_path_component(node.value, value)
        if file_name or id(node) in in_paths and _is_path_component(node.value, value):
          uses.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.value!r}")
  return definitions, uses


def test_every_model_dir_name_is_defined_once_and_used_by_its_constant():
  names = _layout_names()
  definitions, uses = _scan(set(names.values()))
  assert {value: len(where) for value, where in definitions.items()} == {
      value: 1 for value in names.values()}, definitions
  assert not uses, f"literal model-dir names outside {OWNER} (import them):\n" + "\n".join(
      uses)
  # The names defined outside it (records', options') are the ones it takes from them.
  assert [where for where in definitions.values() if not where[0].startswith(str(OWNER))]
  # OUTPUTS (what --overwrite removes) names the constants, never a repeated literal.
  tree = ast.parse((PACKAGE / OWNER).read_text(encoding="utf-8"))
  outputs = next(node.value for node in tree.body if isinstance(node, ast.Assign) and
                 getattr(node.targets[0], "id", None) == "OUTPUTS")
  assert all(isinstance(element, ast.Name) for element in outputs.elts)
  assert model_dir_layout.RECORDS_DIRNAME not in model_dir_layout.OUTPUTS


def _tree(directory):
  """Every file and folder under `directory`, as paths relative to it."""
  return {os.path.relpath(os.path.join(root, name), directory)
          for root, dirs, files in os.walk(directory) for name in dirs + files}


def test_overwrite_removes_exactly_what_a_run_wrote(tmp_path, skimage_photos, monkeypatch):
  monkeypatch.setenv("TLFRAME_CACHE_DIR", str(tmp_path / "cache"))
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  # The records of bin/train --image_dir, in <model_dir>/records: the model's input.
  records_dir = str(model_dir / model_dir_layout.RECORDS_DIRNAME)
  shutil.move(make_records(str(tmp_path / "data"), skimage_photos, per_class=8, size=80),
              records_dir)
  module_dir = str(tmp_path / "tiny_bn_backbone")
  tf.saved_model.save(TinyBatchNormBackbone(), module_dir)
  before = _tree(model_dir)
  # As much as a run writes: cross-validated l2 (suspected labels), a validation
  # split (calibration, report, plots), fine-tuning and the export.
  options = train.TrainOptions(
      records_dir=records_dir, model_dir=str(model_dir), backbone=module_dir,
      precision="float32", l2=None, cv_folds=2, epochs=5, batch_size=8, fine_tune=True,
      fine_tune_epochs=1, fine_tune_batch_size=8, fine_tune_learning_rate=0.01, seed=1)
  train.train(options)
  written = _tree(model_dir) - before
  entries = {path.split(os.sep)[0] for path in written}
  expected = {model_dir_layout.RUN_OPTIONS_FILENAME, model_dir_layout.METRICS_FILENAME,
              model_dir_layout.CHECKPOINT_DIRNAME, model_dir_layout.LOGS_DIRNAME,
              model_dir_layout.HEAD_DIRNAME, model_dir_layout.HEAD_CONFIG_FILENAME,
              model_dir_layout.LABELS_FILENAME, model_dir_layout.CALIBRATION_FILENAME,
              model_dir_layout.FINE_TUNED_BACKBONE_DIRNAME, model_dir_layout.EXPORT_DIRNAME,
              model_dir_layout.REPORT_FILENAME, model_dir_layout.SUSPECT_LABELS_FILENAME}
  if plots.available():
    expected.add(model_dir_layout.PLOTS_DIRNAME)
  assert expected <= entries, "the run did not write what this test means to check"
  assert entries <= set(model_dir_layout.OUTPUTS), "a run writes what --overwrite leaves"
  assert not any(path.startswith(model_dir_layout.RECORDS_DIRNAME) for path in written)

  (model_dir / "notes.txt").write_text("mine")
  records_before = {path for path in _tree(model_dir)
                    if path.startswith(model_dir_layout.RECORDS_DIRNAME)}
  # Another model into the same dir, --overwrite: what bin/train does before any work.
  other = dataclasses.replace(options, resize_mode="letterbox", overwrite=True)
  with pytest.raises(UserError, match="pass overwrite=True"):
    model_dir_lib.prepare(str(model_dir), dataclasses.replace(other, overwrite=False))
  assert model_dir_lib.prepare(str(model_dir), other) == "new"
  assert _tree(model_dir) == records_before | {"notes.txt", model_dir_layout.RUN_OPTIONS_FILENAME}
  assert (model_dir / "notes.txt").read_text() == "mine"
  assert model_dir_lib.finished_run(str(model_dir), options) is None
