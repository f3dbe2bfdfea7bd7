"""The README's walk-through, run step by step as a new user runs it, and the library's quiet.

The commands and what each prints are parsed out of README.md's marked block,
so the README cannot drift from the programs: a step must exit 0, print each
line written under it (`…` stands for anything), and print no TensorFlow
noise. The steps run in a fresh folder through the venv's own python, with
PATH lacking the venv (as before `source .venv/bin/activate`), so the hints
the programs print must work as printed there.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from test_cli import NATIVE_LOG_LINE, TENSORFLOW_INFO_LINE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "<!-- walk-through:"
VENV_PYTHON = ".venv/bin/python"
# PATH of a shell whose venv is not activated.
PLAIN_PATH = "/usr/local/bin:/usr/bin:/bin"


def walk_through_steps(readme_path=os.path.join(REPO, "README.md")):
  """[(command, [expected line patterns])] of README.md's marked sh block."""
  with open(readme_path, encoding="utf-8") as f:
    text = f.read()
  assert MARKER in text, f"README.md has no {MARKER} block"
  block = text.split(MARKER, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
  steps = []
  for line in block.splitlines():
    if line.startswith("#"):
      steps[-1][1].append(line.lstrip("#").strip())
    elif line.strip():
      steps.append((line.strip(), []))
  return steps


def _pattern(expected):
  return re.compile(".*".join(re.escape(part) for part in expected.split("…")))


@pytest.fixture(scope="module")
def walk_through(tmp_path_factory):
  """Runs every step in a fresh folder holding the clone's bin/ and configs/ and `.venv`."""
  if sys.prefix == sys.base_prefix:
    pytest.skip("the README's walk-through runs in a venv (.venv/bin/python); this is not one")
  folder = tmp_path_factory.mktemp("readme")
  for name in ("bin", "configs"):
    os.symlink(os.path.join(REPO, name), folder / name)
  # `.venv` itself: the venv's python then reports it as .venv/bin/python, as for a user.
  os.symlink(sys.prefix, folder / ".venv")
  env = dict(os.environ, PATH=PLAIN_PATH, PYTHONPATH=REPO)
  env.pop("VIRTUAL_ENV", None)
  results = []
  for command, expected in walk_through_steps():
    argv = shlex.split(command)
    assert argv[0] == VENV_PYTHON, command
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=folder,
                            env=env)
    results.append((command, expected, result))
    assert result.returncode == 0, (command, result.stderr[-3000:])
  return folder, results, env


@pytest.mark.slow
def test_each_step_prints_what_the_readme_says(walk_through):
  _, results, _ = walk_through
  assert [command.split()[1] for command, _, _ in results][:2] == ["bin/make_sample_images"] * 2
  for command, expected, result in results:
    lines = result.stdout.splitlines()
    for line in expected:
      assert any(_pattern(line).fullmatch(printed.strip()) for printed in lines), (
          command, line, result.stdout[-3000:])
    assert not NATIVE_LOG_LINE.search(result.stderr), (command, result.stderr[-3000:])
    assert not TENSORFLOW_INFO_LINE.search(result.stderr), (command, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, (command, result.stderr[-3000:])


@pytest.mark.slow
def test_the_printed_hints_run_as_printed(walk_through):
  """bin/train's TensorBoard and predict commands name programs that exist, PATH as it is."""
  folder, results, env = walk_through
  hints = [line.split(": ", 1)[1] for _, _, result in results
           for line in result.stdout.splitlines() if line.startswith("TensorBoard: ")]
  hints += [line.split("; ", 1)[1] for _, _, result in results
            for line in result.stdout.splitlines() if line.startswith("export: ")]
  assert len(hints) == 2, hints
  for hint in hints:
    program = shlex.split(hint)[0]
    found = shutil.which(program, path=env["PATH"]) if "/" not in program else (
        os.path.join(folder, program))
    assert found and os.access(found, os.X_OK), (hint, program)


# The Python API of the README in a user's script: a good image, then a bad one.
_LIBRARY_SCRIPT = """
import sys
import tlframe
from tlframe.errors import UserError
classifier = tlframe.Classifier.load(sys.argv[1])
print(classifier.predict([sys.argv[2]]).labels[0])
try:
  classifier.predict([b"not an image"])
except UserError as e:
  print("UserError:", e)
"""


@pytest.mark.slow
def test_the_library_writes_no_tensorflow_noise(walk_through):
  """`tlframe.Classifier.load(...).predict(...)`: nothing on stderr; TLFRAME_NATIVE_LOGS=1 shows it."""
  folder, _, env = walk_through
  photo = os.path.join(folder, "runs", "demo", "held_out", "chelsea", "000.jpg")
  result = subprocess.run([sys.executable, "-c", _LIBRARY_SCRIPT, "runs/demo/model", photo],
                          capture_output=True, text=True, timeout=300, cwd=folder, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines()[0] == "chelsea", result.stdout
  assert "UserError: image 0: not an image" in result.stdout, result.stdout
  assert result.stderr == "", result.stderr[-3000:]
  verbose = subprocess.run([sys.executable, "-c", "import tlframe, tensorflow as tf; tf.constant(1)"],
                           capture_output=True, text=True, timeout=300, cwd=folder,
                           env=dict(env, TLFRAME_NATIVE_LOGS="1"))
  if not verbose.stderr.strip():
    pytest.skip("TensorFlow printed nothing at start-up on this machine")
  assert NATIVE_LOG_LINE.search(verbose.stderr), verbose.stderr[-2000:]


@pytest.mark.slow
def test_predict_says_it_read_a_list_and_names_the_line(walk_through):
  """`--images=notes.txt` that is not a list of images: each row names its line."""
  folder, _, env = walk_through
  (folder / "notes.txt").write_text("buy milk\n\n# call Bob\nrunps/demo/held_out/grass/000.jpg\n"
                                    "runs/demo/held_out/grass/001.jpg\n")
  result = subprocess.run([os.path.join(folder, VENV_PYTHON), "bin/predict",
                           "--model=runs/demo/model", "--images=notes.txt"],
                          capture_output=True, text=True, timeout=300, cwd=folder, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Read --images=notes.txt as a list of image paths (one per line): 3 paths" in result.stderr
  rows = result.stdout.splitlines()
  assert rows[0].endswith("(line 1 of notes.txt, read as a list of image paths)"), rows
  assert rows[1].endswith("(line 4 of notes.txt, read as a list of image paths)"), rows
  assert "grass/001.jpg  grass" in rows[2], rows
  assert not NATIVE_LOG_LINE.search(result.stderr), result.stderr[-3000:]
