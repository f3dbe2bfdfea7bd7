"""The import graph follows the stages: files -> records -> pipeline -> backbone ->
train -> export -> predict / serve, each importing only its own stage and earlier
ones; and reading a model (`tlframe.Classifier`) loads no trainer."""

import ast
import importlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.join(ROOT, "tlframe")

# Stage of each top-level part of tlframe; a module imports only its own stage or earlier.
# Modules shared by every stage (errors, options, imageformat, util, _lazy) have stage 0.
STAGES = {
    "records": 1,
    "pipeline": 2,
    "backbone": 3,
    "train": 4,
    "export": 5,
    "predict": 6,
    "serve": 6,
    # Programs' helpers and benchmark data: above every stage.
    "cli": 7, "samples": 7, "benchmark_data": 7,
}
# Edges against the flow, each with its reason.
_TRAINING_REPORT = ("bin/train's report.html evaluates the new head on validation with "
                    "evaluation's own code, report and plots")
BACKWARD_EDGES = {
    ("tlframe.train.run", "tlframe.export.exporter"):
        "a run ends by exporting the model it trained (TrainOptions.export)",
    ("tlframe.train.training_report", "tlframe.predict.evaluation"): _TRAINING_REPORT,
    ("tlframe.train.training_report", "tlframe.predict.report"): _TRAINING_REPORT,
    ("tlframe.train.training_report", "tlframe.predict.plots"): _TRAINING_REPORT,
}


def _module_name(path):
  relative = os.path.relpath(path, ROOT)[:-len(".py")].replace(os.sep, ".")
  return relative[:-len(".__init__")] if relative.endswith(".__init__") else relative


def _modules():
  for directory, _, files in os.walk(PACKAGE_DIR):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        yield _module_name(path), path


def _is_module(name):
  path = os.path.join(ROOT, *name.split("."))
  return os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))


def _lazy_exports(package):
  """{name: defining module} of a package that re-exports lazily (tlframe._lazy), else {}."""
  getattr_ = getattr(importlib.import_module(package), "__getattr__", None)
  exports = getattr(getattr_, "exports", {})
  return {name: module if "." in module else f"{package}.{module}"
          for name, module in exports.items()}


def _imports(path):
  """The tlframe modules the file imports, at any depth, resolving names a package
  re-exports lazily to the module that defines them (`records.read_labels` ->
  tlframe.records.layout), as they load."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  imported, package_aliases = set(), {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      imported.update(a.name for a in node.names if a.name.startswith("tlframe."))
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and (
        node.module == "tlframe" or node.module.startswith("tlframe.")):
      exports = _lazy_exports(node.module) if _is_module(node.module) else {}
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        if _is_module(full):
          if _lazy_exports(full):
            package_aliases[alias.asname or alias.name] = full
          else:
            imported.add(full)
        else:
          imported.add(exports.get(alias.name, node.module))
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in package_aliases):
      package = package_aliases[node.value.id]
      imported.add(_lazy_exports(package).get(node.attr, package))
  return imported - {"tlframe"}


def _stage(module):
  parts = module.split(".")
  return STAGES.get(parts[1], 0) if len(parts) > 1 else 0


@pytest.fixture(scope="module")
def graph():
  # The package itself is the API's front door (`tlframe.Classifier`), above every stage.
  return {name: _imports(path) for name, path in _modules() if name != "tlframe"}


def test_the_graph_is_read_from_every_module(graph):
  assert {"tlframe.records.converter", "tlframe.pipeline", "tlframe.train.run",
          "tlframe.export.layout", "tlframe.serve.app"} <= set(graph)
  # The resolution sees through lazy packages: the converter's readers import the layout.
  assert "tlframe.records.layout" in graph["tlframe.train.model_dir"]
  assert "tlframe.export.layout" in graph["tlframe.predict.classifier"]


def test_every_import_goes_with_the_flow(graph):
  backward = sorted(f"{module} ({_stage(module)}) imports {target} ({_stage(target)})"
                    for module, targets in graph.items() for target in targets
                    if _stage(target) > _stage(module)
                    and (module, target) not in BACKWARD_EDGES)
  assert not backward, "\n".join(backward)


def test_records_never_import_training_or_serving(graph):
  for module, targets in graph.items():
    if module.startswith("tlframe.records"):
      assert not {t for t in targets if t.startswith(("tlframe.train", "tlframe.serve"))}, module


def test_the_pipeline_imports_nothing_from_the_backbone(graph):
  assert not {t for t in graph["tlframe.pipeline"] if t.startswith("tlframe.backbone")}


def test_readers_of_an_export_import_its_format_not_the_exporter(graph):
  for module, targets in graph.items():
    if module.startswith(("tlframe.predict", "tlframe.serve")):
      assert "tlframe.export.exporter" not in targets, module


def test_the_backward_edges_listed_still_exist(graph):
  for module, target in BACKWARD_EDGES:
    assert target in graph[module], f"{module} no longer imports {target}: drop the exception"


def _loaded_after(statement):
  code = (f"import json, sys\n{statement}\n"
          "print(json.dumps(sorted(sys.modules)))")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=True)
  return set(json.loads(result.stdout.splitlines()[-1]))


def test_the_classifier_loads_no_trainer():
  loaded = _loaded_after("import tlframe\ntlframe.Classifier")
  assert "tlframe.predict.classifier" in loaded
  # The model dir's file names (tlframe.train.layout) are the one part of training it reads.
  training = sorted(m for m in loaded if m.startswith(("tlframe.train.", "tlframe.export.exporter",
                                                       "tlframe.backbone", "tensorboard"))
                    and m != "tlframe.train.layout")
  assert not training


def test_the_export_format_loads_without_the_exporter():
  loaded = _loaded_after("import tlframe.export\ntlframe.export.resolve_export_dir")
  assert "tlframe.export.layout" in loaded
  assert not {m for m in loaded if m.startswith(("tlframe.export.exporter", "tlframe.train."))
              and m != "tlframe.train.layout"}


def test_the_exporter_loads_no_trainer():
  # It puts a model's fine-tuned blocks back (train.tuned_blocks), not the loop that trained them.
  loaded = _loaded_after("import tlframe.export.exporter")
  assert "tlframe.train.tuned_blocks" in loaded
  assert not {m for m in loaded if m in ("tlframe.train.finetune", "tlframe.train.trainer",
                                          "tlframe.train.fit_loop", "tlframe.train.tuning",
                                          "tlframe.train.summaries")}


def test_programs_load_no_keras_until_it_is_used():
  # What bin/train and bin/predict load, after `from tlframe import cli` as every program
  # starts (tlframe/util/lazy_keras.py); then tf.keras still works, loaded on first use.
  statement = ("from tlframe import cli\nimport tensorflow as tf\n"
               "from tlframe.train import run, finetune, summaries\n"
               "from tlframe.predict import evaluation, classifier\n"
               "before = 'keras' in sys.modules\n"
               "layer = tf.keras.layers.Dense(2)\n"
               "assert layer(tf.ones([1, 3])).shape == (1, 2)\n"
               "assert not before and 'keras' in sys.modules")
  loaded = _loaded_after(statement)
  assert "tlframe.train.finetune" in loaded and "keras" in loaded


def test_the_library_alone_leaves_tensorflow_importing_keras():
  loaded = _loaded_after("import tlframe\nimport tensorflow")
  assert "keras" in loaded
