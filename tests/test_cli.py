"""The programs as a user meets them: quiet start-up, flag errors, `~` paths, --help."""

import atexit
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TensorFlow's native log lines ("I0000 00:00:1795760330.016530 19932 port.cc:153] ...",
# "E0000 ... cuda_platform.cc:52] failed call to cuInit") and absl's banner before them.
NATIVE_LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ \S+\.(cc|h):\d+\]|"
                             r"absl::InitializeLog|Improper call to JPEG library", re.M)
# INFO lines that TensorFlow's Python modules log through absl (checkpoints, exports).
TENSORFLOW_INFO_LINE = re.compile(
    r"^I\d{4} [\d:.]+\s+\d+ (functional_saver|signature_serialization|fingerprinting_utils|"
    r"builder_impl|save)\.py:\d+\]", re.M)


def run_bin(program, *args, env=None, cwd=REPO, timeout=600):
  return subprocess.run([sys.executable, os.path.join(REPO, "bin", program), *args],
                        capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def assert_one_error_line(result, *fragments):
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, result.stderr[-2000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  assert "Traceback" not in result.stderr and "FATAL" not in result.stderr
  return errors[0]


def test_help_exits_0_without_tensorflow_noise():
  result = run_bin("train", "--help")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "--records_dir" in result.stdout and "--l2_grid" in result.stdout
  assert not NATIVE_LOG_LINE.search(result.stdout + result.stderr), result.stderr


def run_train_watching_tensorflow(*args):
  """bin/train with `args` in a process that prints, as it exits, its status and whether
  TensorFlow was imported ("exit 2 False")."""
  code = (f"import runpy, sys\n"
          f"sys.argv = ['train', *{list(args)!r}]\n"
          f"try:\n"
          f"  runpy.run_path({os.path.join(REPO, 'bin', 'train')!r}, run_name='__main__')\n"
          f"except SystemExit as e:\n"
          f"  print('exit', e.code, 'tensorflow' in sys.modules)\n")
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120, cwd=REPO)


def test_help_and_flag_checks_answer_before_tensorflow_loads():
  """bin/train parses and checks its flags first: TensorFlow is imported only to run."""
  result = run_train_watching_tensorflow("--records_dir=r", "--model_dir=m", "--l2=nan")
  assert result.stdout.split()[-3:] == ["exit", "2", "False"], result.stderr[-2000:]


def test_tensorflow_noise_is_there_to_filter():
  """The filter's reason to exist, seen through the same pattern the tests use."""
  result = subprocess.run([sys.executable, "-c", "import tensorflow as tf; tf.constant(1) + 1"],
                          capture_output=True, text=True, timeout=120)
  if not result.stderr.strip():
    pytest.skip("TensorFlow printed nothing at start-up on this machine")
  assert NATIVE_LOG_LINE.search(result.stderr), result.stderr[-2000:]


def test_unknown_flag_is_one_error_line():
  result = run_bin("train", "--no_such_flag=1")
  line = assert_one_error_line(result, "--no_such_flag=1", "unknown flag")
  assert "did you mean" not in line


@pytest.mark.parametrize("typo, suggested", [("--records_dri=r", "--records_dir"),
                                             ("--lerning_rate=0.1", "--learning_rate"),
                                             ("--lr=0.1", "--learning_rate"),
                                             ("--noaugmnt", "--noaugment")])
def test_an_unknown_flag_suggests_the_nearest(typo, suggested):
  result = run_bin("train", typo)
  line = assert_one_error_line(result, typo, "unknown flag", "did you mean")
  assert suggested in line.split("did you mean", 1)[1].split("?")[0], line


# Runs a bin/ program twice in one interpreter (TensorFlow, which most programs
# import at the top, loads once): with --help, then with argv[2:]. The program's
# flags are removed between the runs, as a fresh process would not have them.
_HELP_THEN_RUN = """
import runpy, sys
from absl import flags
path, bad_flag = sys.argv[1:3]
defined = set(flags.FLAGS)
def run(*args):
  sys.argv = [path, *args]
  try:
    runpy.run_path(path, run_name="__main__")
  except SystemExit as e:
    return e.code
  return 0
print("--help exit status:", run("--help"), flush=True)
for name in set(flags.FLAGS) - defined:
  delattr(flags.FLAGS, name)
flags.FLAGS.unparse_flags()
sys.exit(run(bad_flag))
"""


def _misspelled(name):
  """`name` with two neighbouring letters swapped (the first pair that differs)."""
  i = next(i for i in range(1, len(name) - 1) if name[i] != name[i + 1] and "_" not in
           name[i:i + 2])
  return name[:i] + name[i + 1] + name[i] + name[i + 2:]


@pytest.mark.parametrize("program", sorted(os.listdir(os.path.join(REPO, "bin"))))
def test_every_program_answers_help_and_suggests_a_flag_for_a_typo(program):
  """--help exits 0; an unknown flag exits 2 with one `error:` line naming the nearest flag."""
  path = os.path.join(REPO, "bin", program)
  source = open(path, encoding="utf-8").read()
  flag = next(name for name in re.findall(r'flags\.DEFINE_\w+\(\s*"(\w+)"', source)
              if len(name) >= 5)
  typo = f"--{_misspelled(flag)}=1"
  result = subprocess.run([sys.executable, "-c", _HELP_THEN_RUN, path, typo],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
  first_line = result.stdout.splitlines()[0] if result.stdout else ""
  assert "--help exit status: 0" in result.stdout, (result.stdout[-2000:], result.stderr[-2000:])
  assert f"--{flag}" in result.stdout.split("--help exit status")[0], first_line
  line = assert_one_error_line(result, typo, "unknown flag", f"did you mean --{flag}")
  assert not NATIVE_LOG_LINE.search(result.stderr), result.stderr[-2000:]
  assert line == result.stderr.strip(), result.stderr[-2000:]


def test_flag_errors_in_a_flagfile_name_the_file_and_line(tmp_path):
  flagfile = tmp_path / "my.cfg"
  flagfile.write_text("# my settings\n--records_dir=r\n--epochs=abc\n")
  result = run_bin("train", f"--flagfile={flagfile}")
  assert_one_error_line(result, f"{flagfile} line 3", "--epochs")
  flagfile.write_text("--records_dir=r\n\n--lr=0.1\n")
  result = run_bin("train", f"--flagfile={flagfile}")
  assert_one_error_line(result, f"{flagfile} line 3", "--lr", "unknown flag")


def test_a_missing_flagfile_is_one_error_line(tmp_path):
  result = run_bin("train", f"--flagfile={tmp_path}/missing.cfg")
  assert_one_error_line(result, f"--flagfile={tmp_path}/missing.cfg", "cannot open")


@pytest.mark.parametrize("flag", ["--l2=nan", "--l2=inf", "--learning_rate=inf",
                                  "--momentum=nan", "--warmup_epochs=nan", "--l2_grid=1e-3,nan"])
def test_non_finite_numbers_are_refused(flag, tmp_path):
  result = run_bin("train", "--records_dir=r", f"--model_dir={tmp_path}/m", flag)
  assert_one_error_line(result, flag.split("=")[0], "finite")
  assert not os.path.exists(tmp_path / "m")


def test_tilde_in_path_flags_is_the_home_folder(tmp_path, skimage_photos):
  from tlframe import samples  # pylint: disable=g-import-not-at-top
  home = tmp_path / "home"
  samples.write_photo_crops(str(home / "photos"), {name: skimage_photos[name]
                                                   for name in ("chelsea", "coffee")},
                            per_class=3, size=64)
  env = dict(os.environ, HOME=str(home))
  result = run_bin("make_tfrecords", "--image_dir=~/photos", "--output_dir=~/records",
                   "--validation_percentage=0", "--test_percentage=0", env=env)
  assert result.returncode == 0, result.stderr[-2000:]
  assert (home / "records" / "labels.txt").exists()
  assert not (tmp_path / "~").exists() and not os.path.exists(os.path.join(REPO, "~"))
  result = run_bin("train", "--records_dir=~/no_records", "--model_dir=~/model", env=env)
  assert_one_error_line(result, f"--records_dir={home}/no_records does not exist")


def test_every_train_option_has_a_flag_and_every_flag_an_option():
  """bin/train binds flags to TrainOptions by name: a mismatch would fail only at run time."""
  from tlframe import options  # pylint: disable=g-import-not-at-top
  source = open(os.path.join(REPO, "bin", "train")).read()
  defined = set(re.findall(r'flags\.DEFINE_\w+\(\s*"(\w+)"', source))
  thread_flags = {"intra_op_threads", "inter_op_threads"}  # process settings, not the run's
  assert set(options.field_names()) == defined - thread_flags


def _python_programs():
  programs = []
  for name in sorted(os.listdir(os.path.join(REPO, "bin"))):
    path = os.path.join(REPO, "bin", name)
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        first_line = f.readline()
      if first_line.startswith("#!") and "python" in first_line:
        programs.append(name)
  return programs


@pytest.mark.parametrize("program", _python_programs())
def test_every_program_quiets_tensorflow_before_loading_it(program):
  """tlframe.cli filters TensorFlow's native start-up lines only if it is imported first."""
  lines = open(os.path.join(REPO, "bin", program), encoding="utf-8").read().splitlines()
  imports = [i for i, line in enumerate(lines) if re.match(r"(from|import) ", line)]
  first_tlframe = next(i for i in imports if "tlframe" in lines[i])
  assert lines[first_tlframe].startswith("from tlframe import cli"), (program,
                                                                       lines[first_tlframe])
  assert not any("tensorflow" in lines[i] for i in imports if i < first_tlframe), program


def test_printed_commands_run_as_printed_without_an_activated_venv(monkeypatch, tmp_path):
  """tensorboard and tlframe-<program> in hints: the interpreter's own copy when PATH lacks it."""
  from tlframe import cli  # pylint: disable=g-import-not-at-top
  own_bin = os.path.dirname(sys.executable)
  if not os.access(os.path.join(own_bin, "tensorboard"), os.X_OK):
    pytest.skip(f"no tensorboard beside {sys.executable}")
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("PATH", "/usr/bin:/bin")
  printed = cli.command("tensorboard")
  assert os.path.isabs(printed) and os.access(printed, os.X_OK), printed
  assert shutil.which(printed) == os.path.join(own_bin, "tensorboard")
  monkeypatch.setenv("PATH", f"{own_bin}:/usr/bin:/bin")
  assert cli.command("tensorboard") == "tensorboard"
  monkeypatch.setenv("PATH", "/usr/bin:/bin")
  predict = cli.program("predict").split()
  assert os.access(predict[0], os.X_OK), predict
  assert predict[-1].endswith("tlframe-predict") or predict[-1].endswith("bin/predict"), predict


def test_a_missing_records_dir_is_refused_before_tensorflow_loads(tmp_path):
  result = run_train_watching_tensorflow(f"--records_dir={tmp_path}/nope",
                                         f"--model_dir={tmp_path}/m")
  assert result.stdout.split()[-3:] == ["exit", "2", "False"], result.stderr[-2000:]
  assert result.stderr.strip() == (f"error: --records_dir={tmp_path}/nope does not exist: run "
                                   "bin/make_tfrecords first"), result.stderr[-2000:]
  assert not os.path.exists(tmp_path / "m")


@pytest.mark.parametrize("flag, choices", [
    ("resize_mode", "RESIZE_MODES"), ("loss", "LOSSES"), ("precision", "PRECISIONS"),
    ("feature_normalization", "FEATURE_NORMALIZATIONS"), ("optimizer", "OPTIMIZERS"),
    ("lr_schedule", "LR_SCHEDULES"), ("class_weight", "CLASS_WEIGHTS"),
    ("features", "FEATURES"), ("feature_storage", "FEATURE_STORAGES")])
def test_the_template_explains_every_choice_of_a_flag(flag, choices):
  """configs/template.cfg's comment above --flag names each value bin/train accepts."""
  from tlframe import options  # pylint: disable=g-import-not-at-top
  lines = open(os.path.join(REPO, "configs", "template.cfg"), encoding="utf-8").read().splitlines()
  index = next(i for i, line in enumerate(lines) if re.match(rf"#?--(no)?{flag}(=|$)", line))
  comment = []
  for line in reversed(lines[:index]):
    if not line.startswith("# ") or line.startswith("# ---"):
      break
    comment.append(line)
  text = " ".join(comment)
  missing = [value for value in getattr(options, choices) if not re.search(rf"\b{value}\b", text)]
  assert not missing, (flag, missing, text)


def test_native_line_at_exit():
  """Writes a TensorFlow-like native line as the process exits (see the test below)."""
  atexit.register(os.write, 2, b"E0000 00:00:1796330988.407006    8957 cuda_platform.cc:52] "
                               b"failed call to cuInit: UNKNOWN ERROR (303)\n")


def test_the_run_ends_on_pytests_summary():
  """TensorFlow's native lines at a test process's exit do not follow pytest's summary."""
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_cli.py::test_native_line_at_exit"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert result.stdout.rstrip().splitlines()[-1].startswith("1 passed"), result.stdout[-2000:]
  assert not NATIVE_LOG_LINE.search(result.stderr), result.stderr[-2000:]
