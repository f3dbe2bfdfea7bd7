"""Any tf.io.gfile filesystem: make_tfrecords -> train -> export -> predict and evaluate on ram://.

TensorFlow's in-memory ram:// filesystem stands in for gs://, s3:// and hdfs://:
its paths are URLs (os.path.abspath or open() on one fails), it has no file
locks, and renaming a directory there moves none of its files (as on an object
store, a directory must be published file by file). So a path that bypasses
tf.io.gfile anywhere breaks these tests. ram:// lives in one process: every
step runs in this one, through the library that bin/ programs call.
"""

import dataclasses
import os
import subprocess
import sys
import uuid

import pytest
import tensorflow as tf

from tlframe.backbone import loading as backbone_lib
from tlframe.predict import evaluation
from tlframe import export
from tlframe.util import fileio
from tlframe.util import locking
from tlframe.train import layout as model_dir_layout
from tlframe.predict import prediction
from tlframe import records
from tlframe import samples
from tlframe import train
from tlframe.predict.classifier import Classifier
from tlframe.errors import UserError

CLASSES = ("astronaut", "chelsea", "coffee", "rocket")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ram_dir():
  return f"ram://tlframe-test-{uuid.uuid4().hex[:8]}"


def _files_under(directory):
  return sorted(os.path.join(root, name)[len(directory) + 1:]
                for root, _, names in tf.io.gfile.walk(directory) for name in names)


@pytest.fixture(scope="module")
def ram_run(skimage_photos, builtin_backbone_dirs):
  """Images, records, model dir, feature cache and export, all on ram://."""
  base = _ram_dir()
  image_dir = f"{base}/images"
  photos = {name: skimage_photos[name] for name in CLASSES}
  samples.write_photo_crops(image_dir, photos, per_class=12, size=160)
  # A bad file among the good ones: skipped and listed, the rest converts.
  fileio.atomic_write_bytes(f"{image_dir}/chelsea/truncated.jpg",
                            tf.io.encode_jpeg(photos["chelsea"]).numpy()[:2000])
  records_dir = f"{base}/records"
  # --num_workers=2: ram:// is not shared with worker processes, so this reads in-process.
  manifest = records.convert(records_dir, image_dir=image_dir, validation_percentage=30,
                             test_percentage=25, num_workers=2)
  # l2 fixed and few epochs: the filesystem is under test here, not the head's tuning.
  options = train.TrainOptions(records_dir=records_dir, model_dir=f"{base}/model",
                               backbone=backbone_lib.DEFAULT_HANDLE, loss="hinge", l2=1e-4,
                               epochs=30, feature_cache_dir=f"{base}/feature_cache")
  metrics = train.train(options)
  classifier = Classifier.load(options.model_dir)  # the model dir's latest export
  return dict(base=base, image_dir=image_dir, records_dir=records_dir, manifest=manifest,
              options=options, metrics=metrics, photos=photos, classifier=classifier)


def test_records_on_ram(ram_run):
  manifest, records_dir = ram_run["manifest"], ram_run["records_dir"]
  assert manifest["num_examples"] == 48 and manifest["labels"] == list(CLASSES)
  assert [entry["path"] for entry in manifest["skipped"]] == ["chelsea/truncated.jpg"]
  assert records.read_labels(records_dir) == list(CLASSES)
  counted = 0
  for split in records.SPLITS:
    paths = records.check_shards(records_dir, split)  # every shard's sha256 as the manifest says
    counted += sum(1 for _ in tf.data.TFRecordDataset(paths))
  assert counted == 48
  assert not tf.io.gfile.glob(f"{records_dir}/.*.tmp-*")
  assert not tf.io.gfile.exists(f"{records_dir}/{locking.LOCK_FILENAME}")  # released
  # A rerun finds every shard finished and rewrites nothing.
  before = {path: tf.io.gfile.stat(path).mtime_nsec
            for path in tf.io.gfile.glob(f"{records_dir}/*.tfrecord")}
  again = records.convert(records_dir, image_dir=ram_run["image_dir"], validation_percentage=30,
                          test_percentage=25)
  assert again == manifest
  assert {path: tf.io.gfile.stat(path).mtime_nsec for path in before} == before


def test_training_and_export_on_ram(ram_run):
  metrics, model_dir = ram_run["metrics"], ram_run["options"].model_dir
  assert metrics["validation"]["accuracy"] >= 0.9
  assert metrics["train"]["num_examples"] + metrics["validation"]["num_examples"] + (
      metrics["test"]["num_examples"]) == 48
  written = fileio.read_json(f"{model_dir}/{model_dir_layout.METRICS_FILENAME}")
  assert written["validation"]["accuracy"] == metrics["validation"]["accuracy"]
  cache = f"{ram_run['base']}/feature_cache"  # the feature cache is on ram:// too
  assert tf.io.gfile.glob(f"{cache}/*.npz") + tf.io.gfile.glob(f"{cache}/*/*.npz")
  assert tf.io.gfile.glob(f"{model_dir}/checkpoints/*.index")
  assert tf.io.gfile.glob(f"{model_dir}/logs/train/events.out.tfevents.*")
  assert not tf.io.gfile.exists(f"{model_dir}/{locking.LOCK_FILENAME}")
  export_dir = metrics["export_dir"]
  assert export_dir == f"{model_dir}/export/1"
  files = _files_under(export_dir)
  for name in ("saved_model.pb", "variables/variables.index", "assets/labels.txt",
               export.EXPORT_INFO_FILENAME):
    assert name in files
  assert tf.io.gfile.listdir(f"{model_dir}/export") == ["1"]  # no temp dir left behind


def test_export_on_ram_predicts_real_photos(ram_run):
  classifier = ram_run["classifier"]
  assert classifier.export_dir == ram_run["metrics"]["export_dir"]
  photos = ram_run["photos"]
  # The whole photos (training saw crops of them), as pixels and as JPEG files on ram://.
  assert classifier.predict([photos[name] for name in CLASSES]).labels == list(CLASSES)
  photo_dir = f"{ram_run['base']}/photos"
  for name in CLASSES:
    fileio.atomic_write_bytes(f"{photo_dir}/{name}.jpg", tf.io.encode_jpeg(photos[name]).numpy())
  paths = prediction.list_images(photo_dir)
  rows = list(prediction.predict_files(classifier, paths, log_progress=False))
  assert [row.label for row in rows] == list(CLASSES)
  assert all(row.error is None and row.probability > 0.5 for row in rows)


def test_evaluation_report_on_ram(ram_run):
  classifier = ram_run["classifier"]
  probabilities, labels, filenames, skipped = evaluation.predict_records(
      classifier, ram_run["records_dir"], "validation")
  report = evaluation.evaluate(probabilities, labels, classifier.label_names, filenames=filenames)
  assert not skipped
  assert report["accuracy"] == pytest.approx(ram_run["metrics"]["validation"]["accuracy"])
  output_dir = f"{ram_run['base']}/evaluation"
  paths = evaluation.write_report(output_dir, report)
  assert fileio.read_json(paths[evaluation.REPORT_FILENAME])["accuracy"] == report["accuracy"]
  with tf.io.gfile.GFile(paths[evaluation.CONFUSION_PNG], "rb") as f:
    assert tf.io.decode_png(f.read()).shape[-1] == 3
  assert not tf.io.gfile.glob(f"{output_dir}/.*.tmp-*")


def test_rerun_is_up_to_date_and_a_new_head_reads_the_ram_feature_cache(ram_run):
  options = dataclasses.replace(ram_run["options"], export=False)  # export: not in the identity
  metrics = train.train(options)
  assert metrics["up_to_date"] and metrics["epochs_run_now"] == 0  # the finished run, unchanged
  assert metrics["validation"]["accuracy"] == ram_run["metrics"]["validation"]["accuracy"]
  # Another head on the same records: the features come from the ram:// cache.
  new_head = train.train(dataclasses.replace(options, l2=(options.l2 or 0.01) * 3))
  assert new_head["timings"]["backbone_pass_cached"] and new_head["epochs_run_now"] > 0


def test_lock_on_ram():
  directory = _ram_dir()
  lock_path = f"{directory}/{locking.LOCK_FILENAME}"
  with locking.DirectoryLock(directory, what="bin/train"):
    holder = fileio.read_json(lock_path)
    assert holder["pid"] == os.getpid() and holder["what"] == "bin/train"
    with pytest.raises(UserError) as error:
      locking.DirectoryLock(directory, what="make_tfrecords").acquire()
    message = str(error.value)
    assert "\n" not in message
    assert f"in use by bin/train (PID {os.getpid()} on " in message
    assert f"remove {lock_path}" in message
  assert not tf.io.gfile.exists(lock_path)  # a clean release removes it
  assert not tf.io.gfile.glob(f"{directory}/.*.tmp-*")

  # A holder on this host whose PID no longer runs (killed, crashed): taken over.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  stale = dict(holder, pid=dead.pid, what="make_tfrecords")
  fileio.atomic_write_json(lock_path, stale)
  with locking.DirectoryLock(directory, what="bin/train"):
    assert fileio.read_json(lock_path)["pid"] == os.getpid()
  # A holder on another machine cannot be checked: refused, naming the file to remove.
  fileio.atomic_write_json(lock_path, dict(holder, host="another-host"))
  with pytest.raises(UserError, match=f"in use by bin/train .* on another-host.*remove "
                     f"{lock_path}"):
    locking.DirectoryLock(directory, what="bin/train").acquire()
  assert fileio.read_json(lock_path)["host"] == "another-host"  # left as it was


def test_atomic_writes_on_ram():
  directory = _ram_dir()
  path = f"{directory}/metrics.json"
  fileio.atomic_write_json(path, {"accuracy": 0.5, "loss": float("nan")})
  assert fileio.read_json(path) == {"accuracy": 0.5, "loss": None}
  with pytest.raises(TypeError):
    fileio.atomic_write_bytes(path, object())  # fails mid-write
  assert fileio.read_json(path)["accuracy"] == 0.5  # the old file stands
  assert tf.io.gfile.listdir(directory) == ["metrics.json"]  # and no temp is left

  # A directory published file by file: all of it, empty folders too, and never over another.
  tmp, target = f"{directory}/.tmp-export", f"{directory}/1"
  for name in ("variables", "assets", "empty"):
    tf.io.gfile.makedirs(f"{tmp}/{name}")
  for name, data in (("saved_model.pb", b"graph"), ("variables/variables.index", b"index"),
                     ("assets/labels.txt", b"a\nb\n")):
    fileio.atomic_write_bytes(f"{tmp}/{name}", data)
  fileio.publish_directory(tmp, target, last_name="saved_model.pb")
  assert _files_under(target) == ["assets/labels.txt", "saved_model.pb",
                                  "variables/variables.index"]
  assert tf.io.gfile.isdir(f"{target}/empty") and not tf.io.gfile.exists(tmp)
  with tf.io.gfile.GFile(f"{target}/variables/variables.index", "rb") as f:
    assert f.read() == b"index"
  fileio.atomic_write_bytes(f"{tmp}/saved_model.pb", b"other graph")
  with pytest.raises(tf.errors.AlreadyExistsError):
    fileio.publish_directory(tmp, target, last_name="saved_model.pb")
  with tf.io.gfile.GFile(f"{target}/saved_model.pb", "rb") as f:
    assert f.read() == b"graph"
  assert _files_under(tmp) == ["saved_model.pb"]  # kept for the caller to retry or remove


def test_a_filesystem_tensorflow_lacks_is_one_line_naming_tensorflow_io(tmp_path):
  if "hdfs" in tf.io.gfile.get_registered_schemes():
    pytest.skip("this TensorFlow has hdfs:// (tensorflow-io loaded)")
  with pytest.raises(UserError, match=r"^records_dir=hdfs://namenode/records: TensorFlow .* "
                     r"has no hdfs:// filesystem \(it has .*gs://.*\); .*tensorflow-io"):
    train.train(train.TrainOptions(records_dir="hdfs://namenode/records", model_dir=str(tmp_path)))
  with pytest.raises(UserError, match="no s3:// filesystem"):
    Classifier.load("s3://bucket/model")
  # The programs say so before any work, for any flag that names such a path.
  env = dict(os.environ, PYTHONPATH=REPO)
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "bin", "make_tfrecords"), f"--image_dir={tmp_path}",
       "--output_dir=s3://bucket/records"], capture_output=True, text=True, timeout=300, env=env)
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert errors[0].startswith("error: --output_dir=s3://bucket/records: TensorFlow ")
  assert "tensorflow-io" in errors[0]
