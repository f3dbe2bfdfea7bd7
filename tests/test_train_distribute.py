"""tf.distribute: mirrored over 2 logical CPUs matches default (2 local multi-worker processes:
tests/test_features_distributed.py)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from test_train_helpers import make_records, save_tiny_backbone, subprocess_env


# Runs in a fresh process: logical devices must be set before TF initializes.
_MIRRORED_SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tlframe.train import head
from tlframe import train
records_dir, backbone, out = sys.argv[1:4]
result = {}
for strategy in ("default", "mirrored"):
  options = train.TrainOptions(records_dir=records_dir, model_dir=f"{out}/{strategy}",
                               backbone=backbone, strategy=strategy, batch_size=8, epochs=15,
                               checkpoint_every_epochs=5, augment=(sys.argv[4] == "augment"))
  metrics = train.train(options)
  trained_head, _ = head.load_head(options.model_dir)
  result[strategy] = dict(replicas=metrics["num_replicas"],
                          validation=metrics["validation"]["accuracy"],
                          train=metrics["train"]["accuracy"],
                          kernel=trained_head.kernel.numpy().tolist())
print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def small_task(tmp_path_factory, skimage_photos):
  tmp = tmp_path_factory.mktemp("distribute_task")
  return make_records(str(tmp), skimage_photos), save_tiny_backbone(tmp / "tiny_backbone")


def _result(stdout):
  return json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])


def test_mirrored_on_two_cpus_matches_default(small_task, tmp_path):
  records_dir, backbone = small_task
  run = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT, records_dir, backbone,
                        str(tmp_path), "features"],
                       capture_output=True, text=True, env=subprocess_env(), timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  result = _result(run.stdout)
  assert result["default"]["replicas"] == 1 and result["mirrored"]["replicas"] == 2
  for key in ("validation", "train"):
    assert result["mirrored"][key] == pytest.approx(result["default"][key], abs=0.05)
  default_kernel = np.asarray(result["default"]["kernel"])
  mirrored_kernel = np.asarray(result["mirrored"]["kernel"])
  # Same batches, gradients all-reduced: the same weights up to float summation order.
  np.testing.assert_allclose(mirrored_kernel, default_kernel, rtol=1e-3,
                             atol=1e-3 * np.abs(default_kernel).max())
