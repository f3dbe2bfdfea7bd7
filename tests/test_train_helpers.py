"""Helpers (no tests): small real-photo records and a tiny SavedModel backbone for test_train*."""

import os
import signal
import subprocess
import time

import tensorflow as tf

from tlframe.train import distribution
from tlframe import records
from tlframe import samples

TINY_INPUT_SIZE = 64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyBackbone(tf.Module):
  """A fixed random 5x5 conv + ReLU + global average pool: a valid TF-Hub-style module."""

  def __init__(self, channels=32):
    super().__init__()
    self.kernel = tf.Variable(tf.random.stateless_normal([5, 5, 3, channels], seed=[1, 2]) * 0.3)

  @tf.function(input_signature=[tf.TensorSpec([None, TINY_INPUT_SIZE, TINY_INPUT_SIZE, 3],
                                              tf.float32)])
  def __call__(self, images):
    maps = tf.nn.relu(tf.nn.conv2d(images, self.kernel, 4, "VALID"))
    return tf.reduce_mean(maps, axis=[1, 2])


def save_tiny_backbone(directory):
  tf.saved_model.save(TinyBackbone(), str(directory))
  return str(directory)


def kill_when_written(process, path, what, timeout_s=300):
  """SIGKILLs `process` as soon as `path` exists; fails if it ends or takes longer first."""
  deadline = time.monotonic() + timeout_s
  while not path.exists() and process.poll() is None:
    assert time.monotonic() < deadline, f"no {what} written"
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL, "the run ended before the kill"


def make_records(tmp_dir, photos, per_class=12, size=80, validation_percentage=30,
                 shard_size=records.DEFAULT_SHARD_SIZE):
  image_dir = os.path.join(tmp_dir, "images")
  samples.write_photo_crops(image_dir, photos, per_class, size)
  records_dir = os.path.join(tmp_dir, "records")
  records.convert(records_dir, image_dir=image_dir, validation_percentage=validation_percentage,
                  test_percentage=0, shard_size=shard_size)
  return records_dir


def subprocess_env():
  """os.environ for a child process: this tree's tlframe first, no inherited TF_CONFIG."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
  env.pop("TF_CONFIG", None)
  return env


def run_local_workers(command, count=2, timeout=600):
  """Runs `command` as `count` MultiWorkerMirroredStrategy workers on 127.0.0.1 (TF_CONFIG).

  Returns [(returncode, stdout, stderr)] by worker index.
  """
  processes = []
  for tf_config in distribution.local_tf_configs(count):
    env = subprocess_env()
    env["TF_CONFIG"] = tf_config
    processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
  outputs = [process.communicate(timeout=timeout) for process in processes]
  return [(process.returncode, stdout, stderr)
          for process, (stdout, stderr) in zip(processes, outputs)]
