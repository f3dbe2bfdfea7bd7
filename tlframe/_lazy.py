"""Lazy re-exports for package `__init__`s (PEP 562).

A package names its public API once, as {submodule: names}; a name's submodule
is imported on first use. So `tlframe.export.export_model` still works while
`tlframe.export.resolve_export_dir` loads only the export's format, not the
exporter and the trainer behind it; and `import tlframe.util` loads no
TensorFlow before `tlframe/__init__.py` has set its environment.
"""

import importlib


def exports(package, names_by_module):
  """Returns `(__all__, __getattr__, __dir__)` for `package` re-exporting `names_by_module`.

  Args:
    package: the package's `__name__`.
    names_by_module: {module: tuple of its names to re-export}; a module is a
      submodule's name, or an absolute name (`tlframe.options`).
  """
  module_of = {name: module for module, names in names_by_module.items() for name in names}
  public = sorted(module_of)

  def __getattr__(name):  # pylint: disable=invalid-name
    if name not in module_of:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    module = module_of[name]
    return getattr(importlib.import_module(module if "." in module else f"{package}.{module}"),
                   name)

  def __dir__():  # pylint: disable=invalid-name
    return public + sorted(m for m in names_by_module if "." not in m)

  __getattr__.exports = module_of  # {name: module}, for tests/test_import_graph.py
  return public, __getattr__, __dir__
