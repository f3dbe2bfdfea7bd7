"""kill -9 in the middle of bin/train, rerun the same command: same result as one whole run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tlframe.train import head as head_lib
from test_train_helpers import kill_when_written, make_records, save_tiny_backbone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 600


def _command(records_dir, backbone, model_dir):
  # Many short epochs and frequent checkpoints make a run last seconds, so the
  # kill lands mid-run; early stopping is on to check its state resumes too.
  return [sys.executable, os.path.join(REPO, "bin", "train"), f"--records_dir={records_dir}",
          f"--model_dir={model_dir}", f"--backbone={backbone}", "--batch_size=4",
          f"--epochs={EPOCHS}", "--checkpoint_every_epochs=20", "--patience=400",
          "--loss=softmax", "--seed=3"]


@pytest.mark.slow
def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path, skimage_photos):
  records_dir = make_records(str(tmp_path), skimage_photos, per_class=8)
  backbone = save_tiny_backbone(tmp_path / "tiny_backbone")
  whole = subprocess.run(_command(records_dir, backbone, tmp_path / "whole"),
                         capture_output=True, text=True, timeout=600)
  assert whole.returncode == 0, whole.stderr[-3000:]

  model_dir = tmp_path / "killed"
  process = subprocess.Popen(_command(records_dir, backbone, model_dir),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  kill_when_written(process, model_dir / "checkpoints" / "checkpoint", "checkpoint")
  assert not (model_dir / "metrics.json").exists()

  resumed = subprocess.run(_command(records_dir, backbone, model_dir), capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from" in resumed.stderr
  metrics = json.load(open(model_dir / "metrics.json"))
  reference = json.load(open(tmp_path / "whole" / "metrics.json"))
  assert 0 < metrics["epochs_run_now"] < reference["epochs_run_now"]
  assert metrics["epochs_completed"] == reference["epochs_completed"]
  assert metrics["best_epoch"] == reference["best_epoch"]
  assert metrics["validation"]["accuracy"] == reference["validation"]["accuracy"]
  resumed_head, _ = head_lib.load_head(str(model_dir))
  reference_head, _ = head_lib.load_head(str(tmp_path / "whole"))
  kernel = reference_head.kernel.numpy()
  np.testing.assert_allclose(resumed_head.kernel.numpy(), kernel, rtol=1e-4,
                             atol=1e-4 * np.abs(kernel).max())
