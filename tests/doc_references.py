"""Every `module.name` the docs cite resolves: docs/*.md, README.md, BUILD.md and tlframe/ docstrings.

A reference is a dotted name starting with `tlframe` (`tlframe.export.export_model`) or with the
last component of a tlframe module's name (`backbone.DEFAULT_BATCH_SIZE`, `train.HeadTrainer`,
`classifier.Classifier.predict`). Module names come from walking tlframe/, so any package layout
works; a bare name several modules end with (`app` in two subpackages) resolves if it resolves in
any of them. Names resolve by reading the source (ast), nothing is imported: a submodule, a name the
module binds at top level (def, class, assignment, import: a tlframe import is followed), a name
in `__all__` or in a module `__getattr__`, then class members down the chain (methods, class
attributes, `self.x` set in a method, a tlframe base class's; a class with a base from outside
tlframe accepts any member). A chain through anything else (a function, a constant, another
library) is not followed.

Not references: URLs; names inside paths or flags (`bin/train`, `--records_dir=x.y`) or after
another dot (`self.records.x`); data file names (`metrics.json`, `labels.txt`). A Python file name
(`train.py`, `tlframe/records.py`) is checked as a file: a path with a folder must exist from the
repository root, a bare one somewhere in the repository.

Run: python tests/doc_references.py (prints the unresolved ones as file:line, exit status 1).
"""

import ast
import functools
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "tlframe"
DOC_FILES = ("README.md", "BUILD.md")
DOC_DIR = "docs"
# The last component of a dotted token that names a file of data, not a Python name.
DATA_EXTENSIONS = frozenset("""
    json txt csv tsv html md png jpg jpeg gif bmp webp pb pbtxt cfg ini toml yaml yml log sh tar gz
    tgz zip npz npy pth pt h5 keras index tfrecord tfrecords lock tmp svg pdf whl
""".split())
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+")
_DOTTED = re.compile(r"(?<![\w./\\-])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)")
_PY_FILE = re.compile(r"(?<![\w.-])((?:[\w.-]+/)*[A-Za-z_]\w*\.py)\b(?![\w/])")
_ASSIGNED = re.compile(r"(?<![\w.-])([A-Za-z_]\w*)\s*=(?!=)")
_SKIP_DIRS = frozenset({".git", ".venv", "__pycache__", "node_modules", "build", "dist"})


class Unresolved(Exception):
  pass


def _package_modules(root):
  """{dotted module name: source path} of every module and package under root/tlframe."""
  modules = {}
  for folder, dirs, files in os.walk(os.path.join(root, PACKAGE)):
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and
                     os.path.exists(os.path.join(folder, d, "__init__.py")))
    dotted = os.path.relpath(folder, root).replace(os.sep, ".")
    for name in files:
      if name == "__init__.py":
        modules[dotted] = os.path.join(folder, name)
      elif name.endswith(".py"):
        modules[f"{dotted}.{name[:-3]}"] = os.path.join(folder, name)
  return modules


class _Index:
  """Top-level names of the package's modules, read with ast and cached."""

  def __init__(self, root):
    self.root = root
    self.modules = _package_modules(root)
    self.by_last = {}
    for dotted in self.modules:
      self.by_last.setdefault(dotted.rsplit(".", 1)[-1], []).append(dotted)

  @functools.lru_cache(maxsize=None)
  def tree(self, module):
    with open(self.modules[module], encoding="utf-8") as f:
      return ast.parse(f.read(), self.modules[module])

  @functools.lru_cache(maxsize=None)
  def bindings(self, module):
    """{name: ("class", ClassDef) | ("module", dotted) | ("from", dotted, name) | ("other",)}."""
    found = {}
    is_package = self.modules[module].endswith("__init__.py")
    _bind_statements(self.tree(module).body, module, is_package, found)
    return found

  def _module_getattr_names(self, module):
    names = set()
    for node in self.tree(module).body:
      if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
        names |= {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
      # `__all__ = [...]`, or `__all__, __getattr__, __dir__ = lazy_exports(...)`: its strings.
      if isinstance(node, ast.Assign) and any(
          isinstance(n, ast.Name) and n.id in ("__all__", "__getattr__")
          for target in node.targets for n in ast.walk(target)):
        names |= {n.value for n in ast.walk(node.value) if isinstance(n, ast.Constant)
                  and isinstance(n.value, str)}
    return names

  def resolve_module(self, module, attrs):
    if not attrs:
      return
    name, rest = attrs[0], attrs[1:]
    if f"{module}.{name}" in self.modules:
      return self.resolve_module(f"{module}.{name}", rest)
    binding = self.bindings(module).get(name)
    if binding is None:
      if name in self._module_getattr_names(module):
        return
      raise Unresolved(f"{module} has no {name!r}")
    self._resolve_binding(binding, module, rest)

  def _resolve_binding(self, binding, module, rest):
    kind = binding[0]
    if kind == "class":
      self.resolve_class(binding[1], module, rest)
    elif kind == "module" and binding[1] in self.modules:
      self.resolve_module(binding[1], rest)
    elif kind == "from" and binding[1] in self.modules:
      self.resolve_module(binding[1], [binding[2]] + rest)
    # Anything else (a function, a value, another library's name): not followed.

  def resolve_class(self, node, module, attrs):
    if not attrs:
      return
    name = attrs[0]
    members = {}
    for statement in node.body:
      if isinstance(statement, ast.ClassDef):
        members[statement.name] = ("class", statement)
      elif isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
        members[statement.name] = ("other",)
        for target in ast.walk(statement):
          if (isinstance(target, ast.Attribute) and isinstance(target.ctx, ast.Store) and
              isinstance(target.value, ast.Name) and target.value.id == "self"):
            members.setdefault(target.attr, ("other",))
      else:
        _bind_statements([statement], module, False, members)
    if name in members:
      return self._resolve_binding(members[name], module, attrs[1:])
    for base in node.bases:
      base_binding = self.bindings(module).get(base.id) if isinstance(base, ast.Name) else None
      base_class = self._class_of(base_binding, module)
      if base_class is None:
        return  # A base from outside tlframe (tf.Module, NamedTuple, Enum...): members unknown.
      try:
        return self.resolve_class(base_class[0], base_class[1], attrs)
      except Unresolved:
        pass
    raise Unresolved(f"{module}.{node.name} has no {name!r}")

  def _class_of(self, binding, module):
    """(ClassDef, its module) a binding in `module` names in tlframe, or None."""
    if binding and binding[0] == "class":
      return binding[1], module
    if binding and binding[0] == "from" and binding[1] in self.modules:
      return self._class_of(self.bindings(binding[1]).get(binding[2]), binding[1])
    return None

  def check(self, reference):
    """Raises Unresolved unless the dotted `reference` names something in tlframe."""
    parts = reference.split(".")
    if parts[0] == PACKAGE:
      return self.resolve_module(PACKAGE, parts[1:])
    errors = []
    for module in self.by_last[parts[0]]:
      try:
        return self.resolve_module(module, parts[1:])
      except Unresolved as e:
        errors.append(str(e))
    raise Unresolved("; ".join(errors))


def _bind_statements(statements, module, is_package, found):
  package = module if is_package else module.rsplit(".", 1)[0]
  for node in statements:
    if isinstance(node, ast.ClassDef):
      found[node.name] = ("class", node)
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      found[node.name] = ("other",)
    elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      for target in targets:
        for name in ast.walk(target):
          if isinstance(name, ast.Name):
            found[name.id] = ("other",)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.asname:
          found[alias.asname] = ("module", alias.name)
        else:
          found[alias.name.split(".")[0]] = ("module", alias.name.split(".")[0])
    elif isinstance(node, ast.ImportFrom):
      source = node.module or ""
      if node.level:
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        source = f"{base}.{source}" if source else base
      for alias in node.names:
        if alias.name != "*":
          found[alias.asname or alias.name] = ("from", source, alias.name)
    elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
      for block in ("body", "orelse", "finalbody"):
        _bind_statements(getattr(node, block, []), module, is_package, found)
      for handler in getattr(node, "handlers", []):
        _bind_statements(handler.body, module, is_package, found)


def _py_file_exists(root, name):
  if "/" in name:
    return os.path.isfile(os.path.join(root, name))
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
    if name in files:
      return True
  return False


def _texts(root, index):
  """(path relative to root, first line number, text, local names) of each doc file's prose and
  fenced code blocks, and of each tlframe docstring (its function's parameters are local)."""
  names = [n for n in DOC_FILES if os.path.exists(os.path.join(root, n))]
  docs = os.path.join(root, DOC_DIR)
  if os.path.isdir(docs):
    names += sorted(os.path.join(DOC_DIR, n) for n in os.listdir(docs) if n.endswith(".md"))
  for name in names:
    with open(os.path.join(root, name), encoding="utf-8") as f:
      lines = f.read().splitlines()
    start = 0
    for number, line in enumerate(lines + ["```"]):
      if line.lstrip().startswith("```"):
        yield name, start + 1, "\n".join(lines[start:number]), set()
        start = number
  for module in sorted(index.modules):
    path = os.path.relpath(index.modules[module], root)
    for node in ast.walk(index.tree(module)):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
            isinstance(body[0].value.value, str):
          arguments = getattr(node, "args", None)
          parameters = {a.arg for a in ast.walk(arguments) if isinstance(a, ast.arg)} if arguments else set()
          yield path, body[0].value.lineno, body[0].value.value, parameters


def unresolved_references(root=ROOT):
  """["file:line: reference: why"] for each cited name that does not resolve."""
  index = _Index(root)
  problems = []
  for path, first_line, text, local_names in _texts(root, index):
    # A variable or parameter named like a module (`classifier = tlframe.Classifier.load(...)`,
    # `options` of a function) is not the module: what it cites need not resolve there.
    local_names = local_names | set(_ASSIGNED.findall(text))
    for offset, line in enumerate(text.splitlines()):
      line = _URL.sub(" ", line)
      where = f"{path}:{first_line + offset}"
      for match in _PY_FILE.finditer(line):
        if not _py_file_exists(root, match.group(1)):
          problems.append(f"{where}: {match.group(1)}: no such file")
      for match in _DOTTED.finditer(line):
        reference = match.group(1)
        parts = reference.split(".")
        if parts[-1] in DATA_EXTENSIONS or parts[-1] == "py":
          continue
        if parts[0] != PACKAGE and parts[0] not in index.by_last:
          continue
        try:
          index.check(reference)
        except Unresolved as e:
          if parts[0] not in local_names:
            problems.append(f"{where}: {reference}: {e}")
  return problems


def main():
  problems = unresolved_references(sys.argv[1] if len(sys.argv) > 1 else ROOT)
  print("\n".join(problems))
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
