"""bin/train and tlframe.train on real photos: outputs, feature cache, TensorBoard, CV, errors."""

import dataclasses
import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from tlframe.backbone import loading as backbone_lib
from tlframe.backbone import runtime as backbone_runtime
from tlframe.train import feature_cache
from tlframe.train import head as head_lib
from tlframe import train
from tlframe.train import tuning
from test_train_helpers import make_records, save_tiny_backbone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "bin", "train")


@pytest.fixture(scope="module")
def small_task(tmp_path_factory, skimage_photos):
  """(records_dir, tiny backbone dir): crops of 4 photos, 12 per class, 64 px backbone."""
  tmp = tmp_path_factory.mktemp("small_task")
  return make_records(str(tmp), skimage_photos), save_tiny_backbone(tmp / "tiny_backbone")


def _options(records_dir, model_dir, backbone, **overrides):
  values = dict(records_dir=records_dir, model_dir=str(model_dir), backbone=backbone,
                loss="hinge", l2=1e-3, feature_normalization="standardize", batch_size=8,
                epochs=30, checkpoint_every_epochs=10, log_every_steps=2, export=False)
  values.update(overrides)
  return train.TrainOptions(**values)


def _cached_features(options, split):
  """The split's features and labels from the shared feature cache (no backbone pass)."""
  backbone = backbone_lib.load_backbone(options.backbone)
  cached = feature_cache.cached_features(
      backbone, options.records_dir, split, batch_size=options.extract_batch_size,
      image_size=backbone.input_size, resize_mode=options.resize_mode, num_classes=4,
      num_thumbnails_per_class=options.num_thumbnails_per_class)
  assert cached.from_cache
  return {"features": cached.features, "labels": cached.labels}


@pytest.fixture(scope="module")
def trained(small_task, tmp_path_factory):
  """One default-mode run on the small task: (options, metrics)."""
  records_dir, backbone = small_task
  options = _options(records_dir, tmp_path_factory.mktemp("model"), backbone)
  return options, train.train(options)


def test_train_writes_the_model_dir(trained):
  options, metrics = trained
  model_dir = options.model_dir
  assert metrics["train"]["accuracy"] >= 0.9
  assert metrics["validation"]["accuracy"] >= 0.75
  assert metrics["epochs_completed"] == 30 and not metrics["stopped_early"]
  on_disk = json.load(open(os.path.join(model_dir, "metrics.json")))
  assert on_disk["validation"]["accuracy"] == metrics["validation"]["accuracy"]
  assert set(on_disk["validation"]["per_class"]) == {"astronaut", "chelsea", "coffee", "rocket"}
  assert on_disk["timings"]["backbone_pass_s"] > 0 and on_disk["timings"]["head_training_s"] > 0
  labels = open(os.path.join(model_dir, "labels.txt")).read().split()
  assert labels == ["astronaut", "chelsea", "coffee", "rocket"]
  assert glob.glob(os.path.join(model_dir, "checkpoints", "ckpt-30.index"))
  # The labelled confusion matrix is in plots/; no unlabelled copy beside it any more.
  assert not os.path.exists(os.path.join(model_dir, "confusion_matrix.png"))
  confusion = tf.io.decode_png(open(os.path.join(model_dir, "plots", "confusion_matrix.png"),
                                    "rb").read())
  assert confusion.shape[0] > 100 and confusion.shape[1] > 100
  # The saved head alone reproduces the run's validation predictions.
  head, config = head_lib.load_head(model_dir)
  assert config.labels == labels and config.image_size == 64
  cached = _cached_features(options, "validation")
  predictions = np.argmax(head(tf.constant(cached["features"])).numpy(), axis=1)
  confusion = np.asarray(metrics["validation"]["confusion_matrix"])
  assert np.mean(predictions == cached["labels"]) == pytest.approx(
      np.trace(confusion) / confusion.sum())


def test_rerun_with_other_head_settings_skips_the_backbone(trained, caplog):
  options, _ = trained
  caplog.set_level(logging.INFO, logger="absl")
  metrics = train.train(dataclasses.replace(options, loss="softmax", epochs=20))
  assert metrics["timings"]["backbone_pass_cached"]
  assert "skipping the backbone pass" in caplog.text
  assert "training a new head" in caplog.text
  assert metrics["epochs_run_now"] == 20 and metrics["options"]["loss"] == "softmax"
  again = train.train(dataclasses.replace(options, loss="softmax", epochs=20))
  assert again["epochs_run_now"] == 0  # same settings: the finished run is resumed, not redone
  assert again["validation"]["accuracy"] == metrics["validation"]["accuracy"]


def _tags(log_dir):
  accumulator = event_accumulator.EventAccumulator(
      log_dir, size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  return set(accumulator.Tags()["tensors"]), accumulator


def test_tensorboard_event_files_hold_the_expected_tags(small_task, tmp_path):
  records_dir, backbone = small_task
  options = _options(records_dir, tmp_path / "model", backbone)
  train.train(options)
  train_tags, accumulator = _tags(os.path.join(options.model_dir, "logs", "train"))
  for tag in ("step/loss", "step/accuracy", "step/learning_rate", "step/weight_norm",
              "epoch/loss", "epoch/accuracy", "epoch/learning_rate", "epoch/weight_norm",
              "inputs/chelsea", "final/validation_accuracy", "_hparams_/session_start_info"):
    assert tag in train_tags, tag
  epochs = [event.step for event in accumulator.Tensors("epoch/loss")]
  assert epochs == list(range(1, 31))
  losses = [float(tf.make_ndarray(event.tensor_proto)) for event in
            accumulator.Tensors("epoch/loss")]
  assert losses[-1] < losses[0]
  validation_tags, accumulator = _tags(os.path.join(options.model_dir, "logs", "validation"))
  for tag in ("epoch/loss", "epoch/accuracy", "evaluation/confusion_matrix", "evaluation/scores",
              "precision/coffee", "recall/rocket"):
    assert tag in validation_tags, tag
  assert [e.step for e in accumulator.Tensors("evaluation/confusion_matrix")] == [10, 20, 30]
  png = accumulator.Tensors("evaluation/confusion_matrix")[-1].tensor_proto.string_val[2]
  assert tf.io.decode_png(png).shape == (4 * 12, 4 * 12, 3)
  projector = os.path.join(options.model_dir, "logs", "validation")
  config = open(os.path.join(projector, "projector_config.pbtxt")).read()
  assert "projector_sprite.png" in config and "projector_metadata.tsv" in config
  metadata = open(os.path.join(projector, "projector_metadata.tsv")).read().splitlines()
  features = open(os.path.join(projector, "projector_features.tsv")).read().splitlines()
  assert metadata[0] == "label\tfilename" and len(metadata) == len(features) + 1 > 4


def test_unset_l2_is_cross_validated_and_the_head_retrained(small_task, tmp_path):
  records_dir, backbone = small_task
  grid = (1e-4, 1e-2, 10.0)
  options = _options(records_dir, tmp_path / "model", backbone, l2=None, l2_grid=grid,
                     cv_folds=3)
  metrics = train.train(options)
  cv = metrics["cross_validation"]
  tried = [row["l2"] for row in cv["rows"]]
  assert tried == sorted(tried) and set(grid) <= set(tried) and cv["grid"] == tried
  # l2=10 shrinks the weights towards 0: the held-out loss rises towards 1 (hinge at 0).
  by_l2 = {row["l2"]: row for row in cv["rows"]}
  assert by_l2[10.0]["loss"] > 2 * max(by_l2[1e-4]["loss"], by_l2[1e-2]["loss"])
  # The documented rule: highest held-out accuracy, then the lowest calibrated held-out loss.
  top = max(row["accuracy"] for row in cv["rows"])
  best = min((row for row in cv["rows"] if row["accuracy"] == top),
             key=lambda row: row["calibrated_loss"])["l2"]
  assert cv["best_l2"] == best and metrics["l2"] == cv["best_l2"]
  assert metrics["options"]["l2"] == cv["best_l2"]  # the final head was retrained with it
  assert all(row["loss_std"] >= 0 and row["accuracy_std"] >= 0 for row in cv["rows"])


def test_the_l2_search_widens_until_the_best_is_inside():
  """Many examples, weak noisy features: the best l2 is far above a grid that ends at 1e-3."""
  rng = np.random.default_rng(0)
  num_examples, dim = 1500, 48
  labels = rng.integers(0, 3, num_examples).astype(np.int32)
  centers = rng.normal(size=(3, dim)).astype(np.float32) * 0.15
  features = (centers[labels] + rng.normal(size=(num_examples, dim))).astype(np.float32)
  options = train.TrainOptions(records_dir="r", model_dir="m", l2=None,
                               l2_grid=(1e-4, 3e-4, 1e-3), epochs=60, loss="softmax",
                               feature_normalization="standardize")
  shift, scale = head_lib.normalization_constants(features, options.feature_normalization)
  best, rows, out_of_fold = tuning.tune_l2(tf.distribute.get_strategy(), options, features,
                                           labels, 3, shift=shift, scale=scale)
  tried = [row["l2"] for row in rows]
  assert tried == sorted(set(tried)) and len(tried) > 3        # one row per value tried
  assert {1e-4, 3e-4, 1e-3} <= set(tried)
  assert min(tried) < best < max(tried)                          # inside the widened grid
  assert best > 1e-3 and out_of_fold.shape == (num_examples, 3)


def test_the_l2_search_does_not_widen_along_a_plateau():
  """Separable classes: every l2 up to the grid's top holds out perfectly. A tie at the edge
  is no sign of a better l2 beyond it, so the grid stays as given, and the calibrated
  held-out loss, not the grid's edge, chooses on the plateau."""
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(2), 30).astype(np.int32)
  features = (np.eye(2, 16)[labels] * 4 + rng.normal(size=(60, 16)) * 0.1).astype(np.float32)
  grid = (1e-3, 1e-2, 0.1)
  options = train.TrainOptions(records_dir="r", model_dir="m", l2=None, l2_grid=grid,
                               epochs=60, loss="softmax", feature_normalization="none")
  shift, scale = head_lib.normalization_constants(features, options.feature_normalization)
  best, rows, _ = tuning.tune_l2(tf.distribute.get_strategy(), options, features, labels, 2,
                                 shift=shift, scale=scale)
  assert [row["accuracy"] for row in rows] == [1.0] * len(grid)   # the plateau
  assert [row["l2"] for row in rows] == pytest.approx(list(grid))  # not widened
  assert best == min(rows, key=lambda row: row["calibrated_loss"])["l2"]
  assert all(0 < row["temperature"] and row["calibrated_loss"] < 0.1 for row in rows)


def _scaled_task(informative_scale, noise_scale, seed=0):
  """3 classes told apart by 8 dimensions, next to 120 noise dimensions, each at its scale."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(3), 40).astype(np.int32)
  centers = rng.normal(size=(3, 8)) * 1.5
  informative = (centers[labels] + rng.normal(size=(len(labels), 8))) * informative_scale
  noise = rng.normal(size=(len(labels), 120)) * noise_scale
  return np.concatenate([informative, noise], axis=1).astype(np.float32), labels


@pytest.mark.parametrize("informative_scale, noise_scale, expected", [
    (1.0, 0.01, "none"),         # standardizing would blow the faint noise up to the signal's size
    (0.01, 1.0, "standardize"),  # unstandardized, l2 penalizes the faint signal's large weights
])
def test_auto_normalization_is_cross_validated_with_l2(informative_scale, noise_scale,
                                                       expected):
  features, labels = _scaled_task(informative_scale, noise_scale)
  options = train.TrainOptions(records_dir="r", model_dir="m", l2=None, epochs=60,
                               l2_grid=(1e-3, 1e-2, 0.1, 1.0), loss="softmax")
  assert options.feature_normalization == "auto"   # the default
  normalization, l2, rows, scores, _ = tuning.tune_head(
      tf.distribute.get_strategy(), options, features, labels, 3,
      normalization_constants=lambda name: head_lib.normalization_constants(features, name))
  assert normalization == expected
  by_normalization = {name: [row for row in rows if row["feature_normalization"] == name]
                      for name in ("standardize", "none")}
  assert all(len(found) >= 4 for found in by_normalization.values())  # a grid for each
  # The chosen normalization holds out at least as well as the other.
  assert max(row["accuracy"] for row in by_normalization[normalization]) == max(
      row["accuracy"] for row in rows)
  assert any(row["l2"] == l2 for row in by_normalization[normalization])
  assert scores.shape == (len(labels), 3)


def test_a_restarted_cross_validation_trainer_scores_as_a_new_one():
  """tune_head trains each normalization's folds on one trainer, restarted in between: its
  out-of-fold scores are exactly those of a trainer made for that normalization alone."""
  features, labels = _scaled_task(0.01, 1.0)
  options = train.TrainOptions(records_dir="r", model_dir="m", l2=None, epochs=20,
                               loss="softmax")
  strategy = tf.distribute.get_strategy()

  def scores(normalization, trainers):
    return tuning.out_of_fold_scores(
        strategy, dataclasses.replace(options, feature_normalization=normalization), features,
        labels, 3, l2_values=[1e-3, 0.1], trainers=trainers,
        **dict(zip(("shift", "scale"), head_lib.normalization_constants(features,
                                                                        normalization))))

  trainers = {}
  scores("none", trainers)
  restarted = scores("standardize", trainers)
  assert len(trainers) == 1
  np.testing.assert_array_equal(restarted, scores("standardize", None))


def test_stratified_folds_spread_each_class():
  labels = np.repeat(np.arange(3), [5, 9, 2])
  folds = tuning.stratified_folds(labels, 3, seed=0)
  for label in range(3):
    counts = np.bincount(folds[labels == label], minlength=3)
    assert counts.max() - counts.min() <= 1


def test_augmented_mode_trains_through_the_backbone(small_task, tmp_path):
  records_dir, backbone = small_task
  options = _options(records_dir, tmp_path / "model", backbone, augment=True, epochs=6,
                     checkpoint_every_epochs=3)
  metrics = train.train(options)
  assert metrics["epochs_completed"] == 6
  assert metrics["train"]["accuracy"] >= 0.75
  assert glob.glob(os.path.join(options.model_dir, "checkpoints", "ckpt-6.index"))


def test_real_photos_reach_high_validation_accuracy(builtin_backbone_dirs, skimage_photos,
                                                     skimage_textures, tmp_path):
  """The built-in MobileNetV2 on crops of 7 real photos: the default head nails it."""
  photos = dict(skimage_photos, **skimage_textures)
  records_dir = make_records(str(tmp_path), photos, per_class=8, size=160,
                             validation_percentage=35)
  options = train.TrainOptions(records_dir=records_dir, model_dir=str(tmp_path / "model"),
                               backbone=backbone_lib.DEFAULT_HANDLE)
  metrics = train.train(options)
  assert metrics["validation"]["num_examples"] >= 10
  assert metrics["validation"]["accuracy"] >= 0.95
  assert metrics["train"]["accuracy"] == 1.0


def _run_train(*args, env=None):
  return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True,
                        env=env, timeout=300)


@pytest.mark.parametrize("flags, message", [
    (["--records_dir={missing}", "--model_dir={tmp}/m"], "does not exist: run bin/make_tfrecords"),
    (["--records_dir={records}", "--model_dir={tmp}/m", "--loss=hnge"], "--loss=hnge is unknown"),
    (["--records_dir={records}", "--model_dir={tmp}/m", "--cv_folds=1"],
     "--cv_folds=1 must be at least 2"),
    (["--records_dir={records}", "--model_dir={tmp}/m", "--strategy=multi_worker"],
     "needs the TF_CONFIG environment variable"),
])
def test_bad_flags_give_one_line_errors(small_task, tmp_path, flags, message):
  records_dir, _ = small_task
  env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
  args = [flag.format(missing=tmp_path / "nope", tmp=tmp_path, records=records_dir)
          for flag in flags]
  result = _run_train(*args, env=env)
  assert result.returncode == 2, result.stderr[-2000:]
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_template_config_lists_and_parses_every_flag(tmp_path):
  source = open(TRAIN).read()
  defined = set(re.findall(r'flags\.DEFINE_\w+\(\s*"(\w+)"', source))
  template = open(os.path.join(REPO, "configs", "template.cfg")).read()
  assert len(defined) > 25
  assert not [name for name in defined if not re.search(rf"^#?--(no)?{name}\b", template, re.M)]
  # absl parses the whole file; the run then stops at the template's example records path.
  result = _run_train("--flagfile=" + os.path.join(REPO, "configs", "template.cfg"))
  assert result.returncode == 2
  assert "error: --records_dir=runs/my_task/records does not exist" in result.stderr


def test_feature_cache_key_follows_backbone_records_and_preprocessing(small_task, tmp_path):
  records_dir, backbone_dir = small_task
  copy = tmp_path / "records"
  shutil.copytree(records_dir, copy)
  backbone = backbone_lib.load_backbone(backbone_dir)

  def key(**overrides):
    args = dict(image_size=64, resize_mode="center_crop", num_thumbnails_per_class=16)
    args.update(overrides)
    return feature_cache.cache_key(backbone, str(copy), "train", **args)

  first = key()
  assert key() == first
  assert key(resize_mode="letterbox") != first
  assert feature_cache.cache_key(backbone, str(copy), "validation", image_size=64,
                                 resize_mode="center_crop", num_thumbnails_per_class=16) != first
  shard = sorted(copy.glob("train-*.tfrecord"))[0]
  stat = shard.stat()
  os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  assert key() != first


def test_early_stopping_keeps_the_best_epoch(small_task, tmp_path):
  records_dir, backbone = small_task
  options = _options(records_dir, tmp_path / "model", backbone, loss="softmax", epochs=400,
                     patience=5, lr_schedule="constant", learning_rate=0.05,
                     checkpoint_every_epochs=50)
  metrics = train.train(options)
  assert metrics["stopped_early"]
  assert metrics["epochs_completed"] == metrics["best_epoch"] + 5 < 400
  # The saved head is the best epoch's: its validation loss is the run's minimum.
  _, accumulator = _tags(os.path.join(options.model_dir, "logs", "validation"))
  losses = {event.step: float(tf.make_ndarray(event.tensor_proto))
            for event in accumulator.Tensors("epoch/loss")}
  assert min(losses, key=losses.get) == metrics["best_epoch"]
  head, _ = head_lib.load_head(options.model_dir)
  cached = _cached_features(options, "validation")
  scores = head(tf.constant(cached["features"]))
  loss = np.mean(head_lib.softmax_loss(scores, cached["labels"]).numpy())
  assert loss == pytest.approx(losses[metrics["best_epoch"]], rel=1e-4)


def test_auto_precision_is_the_default_and_float32_without_native_bfloat16(monkeypatch):
  assert train.TrainOptions(records_dir="r", model_dir="m").precision == "auto"
  monkeypatch.setenv("TLFRAME_DISABLE_BF16", "1")
  assert backbone_lib.resolve_precision("auto") == "float32"
  monkeypatch.delenv("TLFRAME_DISABLE_BF16")
  native = bool(backbone_runtime._cpu_flags() & {"amx_bf16", "avx512_bf16"})  # pylint: disable=protected-access
  assert backbone_lib.resolve_precision("auto") == ("bfloat16" if native else "float32")


def test_flip_features_train_on_mirrors_and_export_averages_them(small_task, tmp_path):
  records_dir, backbone = small_task
  options = _options(records_dir, tmp_path / "model", backbone, flip_features=True, export=True)
  metrics = train.train(options)
  assert json.load(open(tmp_path / "model" / "head_config.json"))["flip_features"]
  export_info = json.load(open(os.path.join(metrics["export_dir"], "tlframe_export.json")))
  assert export_info["average_flips"]
  # Scores on the validation split are the mean over each image and its mirror.
  head, _ = head_lib.load_head(options.model_dir)
  mirrored = feature_cache.cached_features(
      backbone_lib.load_backbone(backbone), records_dir, "validation", batch_size=32,
      image_size=64, resize_mode="center_crop", num_classes=4, flip=True)
  averaged = (head(tf.constant(mirrored.features)) +
              head(tf.constant(mirrored.flipped_features))).numpy() / 2
  accuracy = np.mean(np.argmax(averaged, axis=1) == mirrored.labels)
  assert accuracy == pytest.approx(metrics["validation"]["accuracy"])
