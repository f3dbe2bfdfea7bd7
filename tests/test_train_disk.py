"""bin/train on a full or read-only disk: one line, exit 2, no temp files, a rerun completes."""

import os
import subprocess
import sys

import pytest

from test_train_helpers import make_records, save_tiny_backbone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def small_disk(tmp_path):
  """A 64 KiB tmpfs at tmp_path/disk (root only); yields its path, unmounts after."""
  mount_point = tmp_path / "disk"
  mount_point.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                           capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): needs root")
  yield mount_point
  subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _train(records_dir, backbone, model_dir):
  return subprocess.run(
      [sys.executable, os.path.join(REPO, "bin", "train"), f"--records_dir={records_dir}",
       f"--model_dir={model_dir}", f"--backbone={backbone}", "--epochs=5", "--batch_size=8",
       "--noexport"], capture_output=True, text=True, timeout=300)


def _one_error_line(result):
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  return errors[0]


@pytest.mark.slow
def test_full_then_freed_disk_and_read_only_disk(small_disk, tmp_path, skimage_photos):
  photos = {name: skimage_photos[name] for name in ("chelsea", "coffee")}
  records_dir = make_records(str(tmp_path / "data"), photos, per_class=6)
  backbone = save_tiny_backbone(tmp_path / "tiny_backbone")
  model_dir = small_disk / "model"

  error = _one_error_line(_train(records_dir, backbone, model_dir))
  assert "no space left on device" in error and str(small_disk) in error
  leftovers = [os.path.join(d, f) for d, _, files in os.walk(small_disk) for f in files
               if ".tmp-" in f or f.endswith(".tempstate")]
  assert not leftovers

  subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
  rerun = _train(records_dir, backbone, model_dir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "train accuracy" in rerun.stdout

  subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
  error = _one_error_line(_train(records_dir, backbone, small_disk / "other_model"))
  assert "read-only" in error.lower() and str(small_disk) in error
