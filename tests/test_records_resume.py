"""make_tfrecords output is the same bytes whatever the worker count, and after kill -9 + rerun."""

import io
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

from tlframe import records

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
MAKE_TFRECORDS = REPO_ROOT / "bin" / "make_tfrecords"
NUM_IMAGES = 240
SHARD_SIZE = 12


def command(image_dir, output_dir, num_workers):
  return [sys.executable, str(MAKE_TFRECORDS), f"--image_dir={image_dir}",
          f"--output_dir={output_dir}", f"--shard_size={SHARD_SIZE}",
          f"--num_workers={num_workers}", "--max_side=320"]


def output_bytes(output_dir):
  """Every file the conversion leaves, by relative path (the resume sidecars included)."""
  return {str(path.relative_to(output_dir)): path.read_bytes()
          for path in sorted(output_dir.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, skimage_photos):
  """NUM_IMAGES distinct JPEGs: crops (up to 480x480) of real photos, big enough to take a while."""
  root = tmp_path_factory.mktemp("many_photos")
  rng = np.random.default_rng(0)
  names = sorted(skimage_photos)
  for i in range(NUM_IMAGES):
    photo = skimage_photos[names[i % len(names)]]
    top, left = rng.integers(0, 40, size=2)
    crop = photo[top:top + 480, left:left + 480]
    folder = root / names[i % len(names)]
    folder.mkdir(exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(crop)).save(buffer, "JPEG", quality=90)
    (folder / f"{i:04d}.jpg").write_bytes(buffer.getvalue())
  return root


@pytest.fixture(scope="module")
def reference(photo_dir, tmp_path_factory):
  """An uninterrupted single-worker run."""
  output_dir = tmp_path_factory.mktemp("reference")
  subprocess.run(command(photo_dir, output_dir, 1), check=True, capture_output=True, timeout=300)
  return output_bytes(output_dir)


def test_two_workers_write_the_same_bytes(photo_dir, reference, tmp_path):
  subprocess.run(command(photo_dir, tmp_path, 2), check=True, capture_output=True, timeout=300)
  assert output_bytes(tmp_path) == reference
  manifest = records.read_manifest(str(tmp_path))
  assert manifest["num_examples"] == NUM_IMAGES
  assert "num_workers" not in manifest["options"]


def test_kill_9_mid_run_then_rerun_gives_the_same_output(photo_dir, reference, tmp_path):
  progress_dir = tmp_path / records.PROGRESS_DIRNAME
  process = subprocess.Popen(command(photo_dir, tmp_path, 1), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 120
    while not (progress_dir.is_dir() and len(list(progress_dir.glob("*.tfrecord.json"))) >= 3):
      assert process.poll() is None, "finished before it could be killed"
      assert time.monotonic() < deadline
      time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
  finally:
    process.wait()
  assert process.returncode == -signal.SIGKILL

  # What the kill left: no manifest, fewer shards than planned, and every shard
  # under a final name is complete (matches its sidecar).
  shards = sorted(tmp_path.glob("*.tfrecord"))
  assert not (tmp_path / records.MANIFEST_FILENAME).exists()
  assert 0 < len(shards) < len([name for name in reference if name.endswith(".tfrecord")])
  for shard in shards:
    assert output_bytes(tmp_path)[shard.name] == reference[shard.name]

  # Corrupt one finished shard too: the rerun must notice and rewrite it.
  shards[0].write_bytes(shards[0].read_bytes()[:-10])
  rerun = subprocess.run(command(photo_dir, tmp_path, 1), capture_output=True, text=True,
                         timeout=300)
  assert rerun.returncode == 0, rerun.stderr
  assert "Resuming:" in rerun.stderr
  assert output_bytes(tmp_path) == reference  # no temp files left behind either
