"""A UserError speaks of the library's arguments; a program's `error:` line of its flags.

The library's calls raise messages that cite Python argument names
(`records_dir=/x`, `pass overwrite=True`); the same error through a bin/
program is one line with the program's flags (`--records_dir=/x`, `pass
--overwrite`), exit status 2, no traceback.
"""

import ast
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tlframe import options as options_lib
from tlframe.cli import conversion_flags
from tlframe.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bin(program, *args):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, os.path.join(REPO, "bin", program), *map(str, args)],
                        capture_output=True, text=True, timeout=300, env=env)


def one_error_line(result):
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  return line


def test_with_flags_rewrites_the_declared_names_as_whole_words():
  error = UserError("model_dir=/data/model_dir/x is inside records_dir=/data: use another "
                    "model_dir, or pass overwrite=True (not fine_tune=False; model_dirs, "
                    "model_dir.txt, --model_dir and labels stay)",
                    arguments=["model_dir", "records_dir", "overwrite", "fine_tune"])
  flags = {name: name for name in ("model_dir", "records_dir", "overwrite", "fine_tune", "labels")}
  assert error.with_flags(flags) == (
      "--model_dir=/data/model_dir/x is inside --records_dir=/data: use another --model_dir, "
      "or pass --overwrite (not --nofine_tune; model_dirs, model_dir.txt, --model_dir and "
      "labels stay)")
  # str() is the library's wording; a name the program lacks stays as it is; a map renames.
  assert str(error).startswith("model_dir=/data/model_dir/x is inside records_dir=/data")
  assert error.with_flags({"records_dir": "records"}) == str(error).replace(
      "records_dir=/data", "--records=/data")


def test_declared_arguments_must_be_python_names():
  with pytest.raises(ValueError, match="'--records_dir' is not a Python name"):
    UserError("--records_dir=/x does not exist", arguments=["--records_dir"])


def test_a_library_call_names_the_argument(tmp_path):
  records_dir = tmp_path / "records"
  options = options_lib.TrainOptions(records_dir=str(records_dir),
                                     model_dir=str(records_dir / "model"), warmup_epochs=5,
                                     epochs=3)
  with pytest.raises(UserError) as error:
    options_lib.check(options)
  assert str(error.value).startswith(f"model_dir={records_dir / 'model'} is inside "
                                     f"records_dir={records_dir}: ")
  assert "with overwrite=True removes" in str(error.value)
  assert "--overwrite" not in str(error.value) and "--model_dir" not in str(error.value)
  assert set(error.value.arguments) == {"model_dir", "records_dir", "overwrite"}

  from tlframe import train  # pylint: disable=import-outside-toplevel  (TensorFlow)
  missing = tmp_path / "nonexistent"
  with pytest.raises(UserError, match=f"^records_dir={missing} does not exist: run "
                                      "bin/make_tfrecords first$"):
    train.train(options_lib.TrainOptions(records_dir=str(missing), model_dir=str(tmp_path / "m")))


def test_the_same_error_through_a_program_names_its_flags(tmp_path):
  records_dir = tmp_path / "records"
  records_dir.mkdir()
  model_dir = records_dir / "model"
  with pytest.raises(UserError) as error:
    options_lib.check(options_lib.TrainOptions(records_dir=str(records_dir),
                                               model_dir=str(model_dir)))
  line = one_error_line(run_bin("train", f"--records_dir={records_dir}",
                                f"--model_dir={model_dir}", "--overwrite"))
  assert line == "error: " + error.value.with_flags(
      {name: name for name in error.value.arguments})
  assert line.startswith(f"error: --model_dir={model_dir} is inside --records_dir={records_dir}")
  assert "with --overwrite removes" in line and "give a --model_dir outside" in line

  missing = tmp_path / "nonexistent"
  line = one_error_line(run_bin("train", f"--records_dir={missing}", f"--model_dir={tmp_path}/m"))
  assert line == f"error: --records_dir={missing} does not exist: run bin/make_tfrecords first"
  line = one_error_line(run_bin("train", f"--records_dir={records_dir}",
                                f"--model_dir={tmp_path}/m", "--warmup_epochs=5", "--epochs=3"))
  assert line == "error: --warmup_epochs=5.0 must be less than --epochs=3"


def test_a_program_maps_an_argument_to_its_flag_of_another_name(tmp_path):
  """bin/predict's --images is prediction.list_images' `spec`."""
  line = one_error_line(run_bin("predict", f"--model={tmp_path}",
                                f"--images={tmp_path}/nonexistent"))
  assert line.startswith(f"error: --images={tmp_path}/nonexistent: no such file or folder; ")


def test_every_flag_a_program_maps_to_is_its_own():
  for program in sorted(os.listdir(os.path.join(REPO, "bin"))):
    with open(os.path.join(REPO, "bin", program), encoding="utf-8") as f:
      source = f.read()
    defined = set(re.findall(r"flags\.DEFINE_\w+\(\s*\"(\w+)\"", source))
    if "conversion_flags.define(" in source:
      defined |= set(conversion_flags.NAMES)
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, ast.keyword) and node.arg == "flag_names":
        mapping = ast.literal_eval(node.value)
        assert set(mapping.values()) <= defined, (program, mapping)
        assert not set(mapping) & defined, (program, "maps an argument that is a flag too")


def test_every_declared_argument_is_in_its_message():
  """A name in `arguments=[...]` that its message never writes is a typo `with_flags` misses."""
  missing = []
  for path in sorted(pathlib.Path(REPO, "tlframe").rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args):
        continue
      if node.func.id == "UserError":
        declared = [keyword.value for keyword in node.keywords if keyword.arg == "arguments"]
        names = declared[0].elts if declared and isinstance(declared[0], ast.List) else []
      elif node.func.id == "bad":  # options.check's shorthand: bad(message, *arguments)
        names = node.args[1:]
      else:
        continue
      message = ast.unparse(node.args[0])
      for name in names:
        if isinstance(name, ast.Constant) and not re.search(
            rf"(?<![\w-]){re.escape(name.value)}(?!\w)", message):
          missing.append(f"{path.relative_to(REPO)}:{node.lineno}: {name.value}")
  assert not missing
