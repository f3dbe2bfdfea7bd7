"""The small-data path: calibration and the l2 choice on tiny sets, bin/train from photos in
one command (and its resume after kill -9), and the rerun of a finished model dir."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tlframe import options as options_lib
from tlframe import records
from tlframe import samples
from tlframe.train import tuning
from test_train_helpers import save_tiny_backbone, subprocess_env

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bin", "train")


def test_the_l2_plateau_is_decided_by_the_calibrated_loss_not_the_grid_edge():
  rows = [dict(l2=l2, accuracy=accuracy, calibrated_loss=loss) for l2, accuracy, loss in [
      (1e-3, 0.9, 0.01), (1e-2, 1.0, 0.30), (0.1, 1.0, 0.12), (1.0, 1.0, 0.20), (10.0, 1.0, 0.25)]]
  assert tuning.best_l2(rows) == 0.1            # the plateau's lowest calibrated loss
  rows[3]["calibrated_loss"] = 0.12
  assert tuning.best_l2(rows) == 1.0            # an exact tie: the more regularized
  rows[0]["accuracy"] = 1.01
  assert tuning.best_l2(rows) == 1e-3           # accuracy first


def test_normalizations_at_the_same_accuracy_tie_unless_the_loss_is_clearly_lower():
  """The second normalization takes the choice from the first only with a higher held-out
  accuracy, or the same and a calibrated loss lower beyond the noise of its difference."""
  rng = np.random.default_rng(0)
  first = dict(accuracy=1.0, losses=rng.uniform(0.0, 0.2, size=20))
  # Lower on average, by much less than its spread: a tie, which the first keeps.
  noisy = dict(accuracy=1.0, losses=first["losses"] - 0.002 + 0.05 * np.resize([1, -1], 20))
  assert noisy["losses"].mean() < first["losses"].mean()
  assert not tuning.clearly_better(noisy, first)
  # Lower on every example: clearly better.
  assert tuning.clearly_better(dict(accuracy=1.0, losses=first["losses"] * 0.9), first)
  # Accuracy first, whatever the losses.
  assert tuning.clearly_better(dict(accuracy=1.01, losses=first["losses"] + 1), first)
  assert not tuning.clearly_better(dict(accuracy=0.99, losses=first["losses"] * 0.5), first)
  # An identical result does not take the choice.
  assert not tuning.clearly_better(dict(first), first)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, skimage_photos):
  """30 real photo crops per class (4 classes), left at their size: a conversion worth killing."""
  image_dir = tmp_path_factory.mktemp("photos") / "images"
  samples.write_photo_crops(str(image_dir), skimage_photos, per_class=30)
  return image_dir


def _train_command(image_dir, model_dir, backbone, *extra):
  return [sys.executable, TRAIN, f"--image_dir={image_dir}", f"--model_dir={model_dir}",
          f"--backbone={backbone}", "--validation_percentage=30", "--test_percentage=0",
          "--shard_size=3", "--epochs=20", "--cv_folds=3", "--l2_grid=0.001,0.1,10", *extra]


def _files(directory):
  """{relative path: (bytes, mtime_ns)} of every file under `directory`."""
  return {str(path.relative_to(directory)): (path.read_bytes(), path.stat().st_mtime_ns)
          for path in sorted(directory.rglob("*")) if path.is_file()}


def test_photos_to_an_export_in_one_command_resuming_after_kill_9_then_up_to_date(
    photo_dir, tmp_path):
  backbone = save_tiny_backbone(tmp_path / "tiny_backbone")
  model_dir = tmp_path / "model"
  command = _train_command(photo_dir, model_dir, backbone)
  progress_dir = model_dir / options_lib.RECORDS_DIRNAME / records.PROGRESS_DIRNAME
  process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 120
  while not (progress_dir.is_dir() and len(list(progress_dir.glob("*.json"))) >= 2):
    assert process.poll() is None, "bin/train ended before the conversion could be killed"
    assert time.monotonic() < deadline
    time.sleep(0.005)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (model_dir / options_lib.RECORDS_DIRNAME / records.MANIFEST_FILENAME).exists()

  # An empty cache: the export's template is traced while the backbone pass runs, and the first
  # model's export written from it.
  empty_cache = dict(subprocess_env(), TLFRAME_CACHE_DIR=str(tmp_path / "cache"))
  done = subprocess.run(command, env=empty_cache, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Export written from the template" in done.stderr
  assert re.search(r"Resuming: [1-9]\d* of 40 shards are already complete", done.stderr)
  assert "Wrote 120 examples" in done.stdout and "up to date" not in done.stdout
  records_dir = str(model_dir / options_lib.RECORDS_DIRNAME)
  manifest = records.read_manifest(records_dir)
  assert manifest["num_examples"] == 120 and not manifest["skipped"]
  for split in ("train", "validation"):
    records.check_shards(records_dir, split)   # every shard whole, its sha256 as recorded
  metrics = json.loads((model_dir / "metrics.json").read_text())
  assert metrics["validation"]["accuracy"] >= 0.9 and metrics["calibration"]["temperature"] > 0
  # The export classifies a photo's bytes.
  export_dir = model_dir / "export" / "1"
  model = tf.saved_model.load(str(export_dir))
  photo = sorted((photo_dir / "rocket").glob("*.jpg"))[0]
  outputs = model.signatures["serving_default"](image_bytes=tf.constant([photo.read_bytes()]))
  assert outputs["labels"].numpy()[0].decode() == "rocket"

  # Nothing changed: no conversion, no CV, no export; not one file written.
  before = _files(model_dir)
  again = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "is up to date" in again.stdout and "cross-validation" not in again.stdout
  assert _files(model_dir) == before

  # --force_export redoes the run: a new export version.
  forced = subprocess.run(command + ["--force_export"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
  assert forced.returncode == 0, forced.stderr[-3000:]
  assert "cross-validation" in forced.stdout and (model_dir / "export" / "2").is_dir()


def test_split_flags_without_photos_are_refused_at_once(tmp_path):
  result = subprocess.run([sys.executable, TRAIN, f"--records_dir={tmp_path}",
                           f"--model_dir={tmp_path / 'model'}", "--validation_percentage=20"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert "--validation_percentage is a setting of the conversion from photos" in result.stderr
  assert "Traceback" not in result.stderr
  # The shared conversion flags are listed in --help as bin/train's own.
  usage = subprocess.run([sys.executable, TRAIN, "--help"], env=subprocess_env(),
                         capture_output=True, text=True, timeout=120).stdout
  assert all(f"  --{name}:" in usage for name in ("image_dir", "filelist", "validation_percentage",
                                                  "test_filelist", "[no]force_export"))
