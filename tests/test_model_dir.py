"""Nothing lost: a model dir is never silently replaced, features are shared, damage is survived."""

import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from tlframe.train import feature_cache
from tlframe.train import model_dir as model_dir_lib
from tlframe.util import fileio
from tlframe import train
from tlframe.errors import UserError
from test_train_helpers import make_records, save_tiny_backbone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def task(tmp_path_factory, skimage_photos):
  """(records_dir, other records_dir, tiny backbone dir) on crops of real photos."""
  tmp = tmp_path_factory.mktemp("model_dir_task")
  photos = {name: skimage_photos[name] for name in ("chelsea", "coffee", "rocket")}
  first = make_records(str(tmp / "a"), photos, per_class=8)
  second = make_records(str(tmp / "b"), photos, per_class=6)
  return first, second, save_tiny_backbone(tmp / "tiny_backbone")


@pytest.fixture(autouse=True)
def _own_feature_cache(tmp_path, monkeypatch):
  """A fresh shared cache per test, so that "from cache" means this test's earlier run."""
  monkeypatch.setenv("TLFRAME_CACHE_DIR", str(tmp_path / "cache"))


def _options(records_dir, model_dir, backbone, **overrides):
  values = dict(records_dir=records_dir, model_dir=str(model_dir), backbone=backbone,
                loss="hinge", l2=1e-3, batch_size=8, epochs=10, checkpoint_every_epochs=5,
                export=False)
  values.update(overrides)
  return train.TrainOptions(**values)


def test_other_records_are_refused_unless_overwrite(task, tmp_path, caplog):
  first, second, backbone = task
  model_dir = tmp_path / "model"
  train.train(_options(first, model_dir, backbone))
  before = sorted(os.listdir(model_dir))
  metrics_before = (model_dir / "metrics.json").read_bytes()
  with pytest.raises(UserError, match=r"holds a model of other data.*records.*pass overwrite=True"):
    train.train(_options(second, model_dir, backbone))
  assert sorted(os.listdir(model_dir)) == before
  assert (model_dir / "metrics.json").read_bytes() == metrics_before
  caplog.set_level(logging.WARNING, logger="absl")
  metrics = train.train(_options(second, model_dir, backbone, overwrite=True))
  assert "--overwrite: removing" in caplog.text and "checkpoints" in caplog.text
  assert metrics["train"]["num_examples"] + metrics["validation"]["num_examples"] == 18


def test_a_folder_of_other_files_is_refused(task, tmp_path):
  first, _, backbone = task
  model_dir = tmp_path / "photos"
  model_dir.mkdir()
  (model_dir / "holiday.jpg").write_bytes(b"not ours")
  with pytest.raises(UserError, match="is not empty and holds no tlframe run.*holiday.jpg"):
    train.train(_options(first, model_dir, backbone))
  train.train(_options(first, model_dir, backbone, overwrite=True))
  assert (model_dir / "holiday.jpg").read_bytes() == b"not ours"  # never ours to remove


def test_other_head_settings_keep_the_earlier_logs_as_their_own_run(task, tmp_path):
  first, _, backbone = task
  model_dir = tmp_path / "model"
  train.train(_options(first, model_dir, backbone))
  earlier_events = sorted(glob.glob(str(model_dir / "logs" / "train" / "events.*")))
  metrics = train.train(_options(first, model_dir, backbone, loss="softmax"))
  assert metrics["timings"]["backbone_pass_cached"]
  moved = sorted(glob.glob(str(model_dir / "logs" / "earlier-1" / "train" / "events.*")))
  assert [os.path.basename(p) for p in moved] == [os.path.basename(p) for p in earlier_events]
  assert glob.glob(str(model_dir / "logs" / "train" / "events.*"))
  assert json.load(open(model_dir / "run_options.json"))["loss"] == "softmax"


def test_a_model_dir_of_the_old_features_name_logits_still_resumes(task, tmp_path):
  """--features=logits, classification's earlier name: a model dir whose files say it resumes."""
  first, _, backbone = task
  model_dir = tmp_path / "model"
  options = _options(first, model_dir, backbone, features="logits")
  assert options.features == "classification"
  # What a run of the earlier name left: run_options.json and metrics.json saying "logits".
  written = dict(model_dir_lib.run_identity(options), features="logits")
  model_dir.mkdir()
  (model_dir / "run_options.json").write_text(json.dumps(written))
  (model_dir / "metrics.json").write_text(json.dumps({"run_identity": written}))
  for features in ("logits", "classification"):
    again = _options(first, model_dir, backbone, features=features)
    assert model_dir_lib.finished_run(str(model_dir), again) == {"run_identity": written}
  assert model_dir_lib.prepare(str(model_dir), options) == "resume"
  assert json.loads((model_dir / "run_options.json").read_text())["features"] == "classification"


def test_a_second_model_dir_reuses_the_shared_features(task, tmp_path, caplog):
  first, _, backbone = task
  one = train.train(_options(first, tmp_path / "one", backbone))
  assert not one["timings"]["backbone_pass_cached"]
  caplog.set_level(logging.INFO, logger="absl")
  two = train.train(_options(first, tmp_path / "two", backbone, loss="softmax"))
  assert two["timings"]["backbone_pass_cached"]
  assert "Backbone pass over" not in caplog.text
  assert "skipping the backbone pass" in caplog.text
  assert not os.path.exists(tmp_path / "two" / "features")


@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped_byte", "zip_then_garbage"])
def test_a_damaged_feature_cache_is_named_and_recomputed(task, tmp_path, caplog, damage):
  first, _, backbone = task
  reference = train.train(_options(first, tmp_path / "one", backbone))
  for path in glob.glob(os.path.join(feature_cache.feature_cache_dir(), "*", "part-*.npz")):
    data = open(path, "rb").read()
    if damage == "truncated":
      data = data[:len(data) // 2]
    elif damage == "empty":
      data = b""
    elif damage == "flipped_byte":
      data = data[:200] + bytes([data[200] ^ 0xFF]) + data[201:]
    else:
      data = b"PK\x03\x04" + os.urandom(300)
    open(path, "wb").write(data)
  caplog.set_level(logging.WARNING, logger="absl")
  again = train.train(_options(first, tmp_path / "two", backbone))
  assert "Ignoring unreadable feature cache " + feature_cache.feature_cache_dir() in caplog.text
  assert again["validation"]["accuracy"] == reference["validation"]["accuracy"]
  assert again["train"]["accuracy"] == reference["train"]["accuracy"]


def test_a_diverging_head_stops_the_run_and_writes_no_head(task, tmp_path):
  first, _, backbone = task
  options = _options(first, tmp_path / "model", backbone, optimizer="sgd", momentum=0.0,
                     learning_rate=1e38, loss="squared_hinge", lr_schedule="constant")
  with pytest.raises(UserError, match="training diverged.*lower learning_rate"):
    train.train(options)
  assert not os.path.exists(tmp_path / "model" / "head")
  assert not os.path.exists(tmp_path / "model" / "metrics.json")


def test_json_we_write_is_strict_json(tmp_path):
  path = str(tmp_path / "m.json")
  fileio.atomic_write_json(path, {"a": float("nan"), "b": [1.0, float("inf")], "c": 0.5})
  text = open(path).read()
  assert json.loads(text, parse_constant=lambda name: pytest.fail(name)) == {
      "a": None, "b": [1.0, None], "c": 0.5}
  assert os.listdir(tmp_path) == ["m.json"]


@pytest.mark.slow
def test_two_train_runs_on_one_model_dir_the_second_refuses(task, tmp_path):
  first, _, backbone = task
  model_dir = tmp_path / "model"
  command = [sys.executable, os.path.join(REPO, "bin", "train"), f"--records_dir={first}",
             f"--model_dir={model_dir}", f"--backbone={backbone}", "--batch_size=4",
             "--epochs=3000", "--checkpoint_every_epochs=100", "--noexport"]
  env = dict(os.environ)
  holder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
  try:
    deadline = time.monotonic() + 120
    while not (model_dir / "run_options.json").exists() and time.monotonic() < deadline:
      time.sleep(0.2)
    assert holder.poll() is None, "the first run ended before the second started"
    second = subprocess.run(command[:-2] + ["--epochs=5", "--l2=0.1"], capture_output=True,
                            text=True, timeout=120, env=env)
    assert second.returncode == 2, second.stderr[-2000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"PID {holder.pid}" in errors[0], second.stderr[-2000:]
    assert holder.poll() is None  # the first run goes on undisturbed
  finally:
    holder.kill()
    holder.wait()
  # The holder died: its lock died with it, and the same command resumes.
  rerun = subprocess.run(command[:-2] + ["--epochs=200", "--noexport"], capture_output=True,
                         text=True, timeout=300, env=env)
  assert rerun.returncode == 0, rerun.stderr[-2000:]


def _copy_records(records_dir, tmp_path):
  copy = tmp_path / "records"
  shutil.copytree(records_dir, copy)
  return copy


def test_a_corrupt_shard_stops_training_naming_the_shard(task, tmp_path):
  first, _, backbone = task
  records_dir = _copy_records(first, tmp_path)
  shard = sorted(records_dir.glob("train-*.tfrecord"))[0]
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0xFF
  shard.write_bytes(bytes(data))
  with pytest.raises(UserError, match=rf"{shard}: .*rerun make_tfrecords"):
    train.train(_options(str(records_dir), tmp_path / "model", backbone))


def test_an_undecodable_image_in_a_valid_record_is_skipped_and_counted(task, tmp_path):
  """The steps come from what was read, not from the manifest's count."""
  from tlframe.records import example_format  # pylint: disable=g-import-not-at-top
  first, _, backbone = task
  records_dir = _copy_records(first, tmp_path)
  shard = sorted(records_dir.glob("train-*.tfrecord"))[0]
  good = [bytes(r) for r in tf.data.TFRecordDataset(str(shard)).as_numpy_iterator()]
  bad = example_format.make_example(b"\xff\xd8\xff\xe0 not really a jpeg", "jpeg", 0, "chelsea",
                                 "chelsea/broken.jpg", 80, 80).SerializeToString()
  with tf.io.TFRecordWriter(str(shard)) as writer:
    for record in good + [bad]:
      writer.write(record)
  manifest_path = records_dir / "manifest.json"
  manifest = json.load(open(manifest_path))
  entry = next(s for s in manifest["splits"]["train"]["shards"] if s["name"] == shard.name)
  entry["records"] += 1
  entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
  manifest["splits"]["train"]["examples"] += 1
  manifest_path.write_text(json.dumps(manifest))
  metrics = train.train(_options(str(records_dir), tmp_path / "model", backbone, batch_size=None))
  assert metrics["train"]["num_examples"] == manifest["splits"]["train"]["examples"] - 1
  assert metrics["skipped_records"]["train"] == 1
