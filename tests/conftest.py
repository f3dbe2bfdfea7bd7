"""Shared test fixtures: real photos, the benchmark data dir, and a per-run cache."""

import atexit
import os
import pathlib
import subprocess
import sys

import pytest

from tlframe.util import native_logs
from tlframe import samples

# Passes on the stderr lines it reads on stdin that are not TensorFlow noise.
_EXIT_FILTER = ("import sys\n"
                "from tlframe.util.native_logs import pass_on\n"
                "def write(line):\n"
                "  sys.stderr.buffer.write(line)\n"
                "  sys.stderr.buffer.flush()\n"
                "pass_on(sys.stdin.buffer, write)\n")


def pytest_unconfigure(config):
  """The run ends on pytest's summary: TensorFlow's native lines as a process ends go.

  TensorFlow writes some lines while the process exits (its own exit handlers,
  C++ destructors), after pytest has printed its summary and given fd 2 back
  to the terminal, where tlframe's filter thread no longer runs. Registered now,
  this exit handler runs before TensorFlow's: it hands fd 2 to a small process
  that outlives this one and drops those lines as tlframe does.
  """
  del config
  if native_logs.enabled():
    atexit.register(_filter_stderr_in_a_process)


def _filter_stderr_in_a_process():
  try:
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    env = dict(os.environ, **{native_logs.ENV: "1"})   # the filter itself filters nothing
    subprocess.Popen([sys.executable, "-c", _EXIT_FILTER], stdin=read_end, stdout=2, stderr=2,
                     env=env, close_fds=True)
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
  except OSError:
    pass


@pytest.fixture(scope="session")
def flowers12_dir():
  """The oxford_flowers12 benchmark data; skips the test where it is absent (a user's clone)."""
  base = pathlib.Path(samples.benchmark_data_dir())
  if not (base / "oxford_flowers12").is_dir():
    pytest.skip("oxford_flowers12 not found: set TLFRAME_DATA_DIR to the folder holding it")
  return base / "oxford_flowers12"


@pytest.fixture(scope="session")
def skimage_photos():
  """Real RGB photos shipped with scikit-image, as uint8 HxWx3 arrays by name.

  chelsea: a cat, 300x451; coffee: a cup, 400x600; rocket: 427x640; astronaut: 512x512.
  """
  return samples.load_sample_photos(("chelsea", "coffee", "rocket", "astronaut"))


@pytest.fixture(scope="session")
def skimage_textures():
  """Real grayscale texture photos from scikit-image, as uint8 HxWx3 (gray replicated)."""
  return samples.load_sample_photos(("brick", "grass", "gravel"))


@pytest.fixture(scope="session", autouse=True)
def _tlframe_cache_dir(tmp_path_factory):
  """Keeps built backbones out of the user's home: one cache per test run unless set."""
  if "TLFRAME_CACHE_DIR" not in os.environ:
    os.environ["TLFRAME_CACHE_DIR"] = str(tmp_path_factory.mktemp("tlframe_cache"))
  yield


@pytest.fixture(scope="session")
def builtin_backbone_dirs(_tlframe_cache_dir):
  """The built-in backbone, built once per test run into $TLFRAME_CACHE_DIR.

  A dict "feature_vector" / "classification" -> SavedModel directory. Later
  `load_backbone("mobilenet_v2_100_224")` calls find it there and load in ~1 s.
  """
  from tlframe import backbone
  root = backbone.ensure_builtin(backbone.DEFAULT_HANDLE)
  return {kind: os.path.join(root, kind) for kind in ("feature_vector", "classification")}
