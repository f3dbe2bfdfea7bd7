"""The real TensorBoard server over a finished run's logs, read back through its HTTP API.

The installed `tensorboard` entry point (as the README tells users to start it)
serves model_dir/logs of a small run (real photos, a tiny backbone) on
127.0.0.1; the test reads what its dashboards would show: runs, scalar tags and
a series, an image summary (a PNG), the hparams session, and the projector's
config and sprite; then stops it by its PID.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
import tensorflow as tf

from tlframe import train
from tlframe.train.features import THUMBNAIL_SIZE
from test_train_helpers import make_records, save_tiny_backbone

pytestmark = pytest.mark.slow  # a training run and a server start: ~30 s on 2 cores

START_TIMEOUT_S = 90
EPOCHS = 12


def _tensorboard_program():
  path = os.path.join(os.path.dirname(sys.executable), "tensorboard")
  return path if os.path.exists(path) else shutil.which("tensorboard")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, skimage_photos):
  """(model_dir, metrics) of a finished small run: 4 photo classes, 64 px tiny backbone."""
  tmp = tmp_path_factory.mktemp("tensorboard_run")
  records_dir = make_records(str(tmp), skimage_photos)
  model_dir = str(tmp / "model")
  metrics = train.train(train.TrainOptions(
      records_dir=records_dir, model_dir=model_dir, backbone=save_tiny_backbone(tmp / "tiny"),
      batch_size=8, epochs=EPOCHS, checkpoint_every_epochs=6, log_every_steps=2,
      num_thumbnails_per_class=4, export=False))
  return model_dir, metrics


@pytest.fixture(scope="module")
def server(finished_run):
  """Base URL of `tensorboard --logdir=model_dir/logs` on 127.0.0.1; stopped by PID after."""
  program = _tensorboard_program()
  assert program, "the tensorboard entry point is not installed"
  model_dir, _ = finished_run
  port = _free_port()
  process = subprocess.Popen(
      [program, f"--logdir={os.path.join(model_dir, 'logs')}", "--host=127.0.0.1",
       f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  base = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + START_TIMEOUT_S
    # Up, and done loading: both runs listed and the training scalars there.
    while not ({"train", "validation"} <= set(_try_json(f"{base}/data/runs") or []) and
               "epoch/loss" in (_try_json(f"{base}/data/plugin/scalars/tags") or {}).get(
                   "train", {})):
      if process.poll() is not None:
        pytest.fail(f"tensorboard exited {process.returncode}: "
                    f"{process.stderr.read().decode()[-2000:]}")
      if time.monotonic() > deadline:
        pytest.fail(f"tensorboard did not serve the run within {START_TIMEOUT_S} s")
      time.sleep(0.5)
    yield base
  finally:
    os.kill(process.pid, signal.SIGTERM)
    try:
      process.wait(timeout=20)
    except subprocess.TimeoutExpired:
      os.kill(process.pid, signal.SIGKILL)
      process.wait()
    process.stderr.close()


def _try_json(url):
  try:
    return _get_json(url)
  except (urllib.error.URLError, ConnectionError, ValueError):
    return None


def _get(url, body=None):
  request = urllib.request.Request(url, data=body)
  if body is not None:
    request.add_header("Content-Type", "application/json")
  with urllib.request.urlopen(request, timeout=30) as response:
    return response.read(), response.headers.get("Content-Type", "")


def _get_json(url, body=None):
  return json.loads(_get(url, body)[0])


def _query(**params):
  return urllib.parse.urlencode(params)


def test_runs_and_scalars(server, finished_run):
  _, metrics = finished_run
  assert {"train", "validation"} <= set(_get_json(f"{server}/data/runs"))
  tags = _get_json(f"{server}/data/plugin/scalars/tags")
  assert {"step/loss", "step/accuracy", "step/learning_rate", "epoch/loss",
          "epoch/accuracy"} <= set(tags["train"])
  assert {"epoch/loss", "epoch/accuracy", "precision/chelsea", "recall/rocket"} <= set(
      tags["validation"])
  series = _get_json(f"{server}/data/plugin/scalars/scalars?" +
                     _query(run="validation", tag="epoch/accuracy"))
  steps = [step for _, step, _ in series]
  values = [value for _, _, value in series]
  assert len(series) == EPOCHS and steps == sorted(steps)
  assert all(0 <= value <= 1 for value in values)
  # The last epoch's validation accuracy is the run's (metrics.json).
  assert values[-1] == pytest.approx(metrics["validation"]["accuracy"], abs=1e-6)


def test_image_summary_is_a_png(server, finished_run):
  _, metrics = finished_run
  tags = _get_json(f"{server}/data/plugin/images/tags")
  assert "evaluation/confusion_matrix" in tags["validation"]
  assert {"inputs/astronaut", "inputs/chelsea", "inputs/coffee", "inputs/rocket"} <= set(
      tags["train"])
  entries = _get_json(f"{server}/data/plugin/images/images?" +
                      _query(run="validation", tag="evaluation/confusion_matrix"))
  assert entries and entries[-1]["step"] >= entries[0]["step"]
  data, content_type = _get(f"{server}/data/plugin/images/individualImage?"
                            f"{entries[-1]['query']}")
  assert content_type == "image/png" and data.startswith(b"\x89PNG\r\n\x1a\n")
  image = tf.io.decode_png(data).numpy()
  num_classes = len(metrics["validation"]["per_class"])
  assert image.shape[0] == image.shape[1] and image.shape[0] % num_classes == 0
  # Each cell's shade is its fraction of the row, white (0) to dark blue (1): the run's matrix.
  cell = image.shape[0] // num_classes
  red = image[cell // 2::cell, cell // 2::cell, 0].astype(float)
  confusion = np.asarray(metrics["validation"]["confusion_matrix"], float)
  np.testing.assert_allclose((255 - red) / (255 - 8),
                             confusion / confusion.sum(axis=1, keepdims=True), atol=0.01)


def test_hparams_session(server, finished_run):
  model_dir, metrics = finished_run
  experiment = _get_json(f"{server}/data/plugin/hparams/experiment",
                         json.dumps({"experimentName": ""}).encode())
  hparam_names = {info["name"] for info in experiment["hparamInfos"]}
  assert {"loss", "l2", "epochs", "batch_size"} <= hparam_names
  metric_tags = {info["name"]["tag"] for info in experiment["metricInfos"]}
  assert "final/validation_accuracy" in metric_tags
  groups = _get_json(f"{server}/data/plugin/hparams/session_groups", json.dumps(
      {"experimentName": "", "startIndex": 0, "sliceSize": 10,
       "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                           "STATUS_RUNNING"]}).encode())
  assert groups["totalSize"] == 1
  session = groups["sessionGroups"][0]
  assert session["hparams"]["epochs"] == EPOCHS and session["hparams"]["batch_size"] == 8
  final = {value["name"]["tag"]: value["value"] for value in session["metricValues"]}
  assert final["final/validation_accuracy"] == pytest.approx(
      metrics["validation"]["accuracy"], abs=1e-6)


def test_projector_config_and_sprite(server, finished_run):
  model_dir, metrics = finished_run
  assert "validation" in _get_json(f"{server}/data/plugin/projector/runs")
  config = _get_json(f"{server}/data/plugin/projector/info?" + _query(run="validation"))
  (embedding,) = config["embeddings"]
  assert embedding["tensorName"] == "validation_features"
  assert embedding["sprite"]["singleImageDim"] == [THUMBNAIL_SIZE, THUMBNAIL_SIZE]
  metadata, _ = _get(f"{server}/data/plugin/projector/metadata?" +
                     _query(run="validation", name="validation_features"))
  rows = metadata.decode().strip().split("\n")
  assert rows[0] == "label\tfilename" and len(rows) > 4
  assert {row.split("\t")[0] for row in rows[1:]} <= set(metrics["validation"]["per_class"])
  data, content_type = _get(f"{server}/data/plugin/projector/sprite_image?" +
                            _query(run="validation", name="validation_features"))
  assert content_type == "image/png"
  sprite = tf.io.decode_png(data).numpy()
  columns = int(np.ceil(np.sqrt(len(rows) - 1)))
  size = THUMBNAIL_SIZE
  assert sprite.shape == (size * (-(-(len(rows) - 1) // columns)), size * columns, 3)
  assert sprite[:size, :size].std() > 5  # a real thumbnail, not an empty cell
  with open(os.path.join(model_dir, "logs", "validation", "projector_sprite.png"), "rb") as f:
    assert f.read() == data
