"""Features beyond memory, on real photos: a head trained on features streamed from the cache
parts equals the in-memory one; l2 is then cross-validated on a stratified subsample; float16
storage halves the cache and keeps the features."""

import glob
import logging
import os

import numpy as np
import pytest

from tlframe.backbone import loading as backbone_lib
from tlframe.train import feature_cache
from tlframe.train import features
from tlframe.train import head as head_lib
from tlframe import train
from tlframe.errors import UserError
from test_train_helpers import make_records, save_tiny_backbone


@pytest.fixture(scope="module")
def task(tmp_path_factory, skimage_photos):
  """(records_dir, tiny backbone dir): 12 crops per class of 4 photos, in shards of 16 images."""
  tmp = tmp_path_factory.mktemp("stream_task")
  return (make_records(str(tmp), skimage_photos, shard_size=16),
          save_tiny_backbone(tmp / "tiny_backbone"))


def _options(task, model_dir, **overrides):
  records_dir, backbone = task
  values = dict(records_dir=records_dir, model_dir=str(model_dir), backbone=backbone,
                loss="softmax", l2=1e-3, epochs=15, checkpoint_every_epochs=5, export=False)
  values.update(overrides)
  return train.TrainOptions(**values)


def test_streamed_head_equals_the_in_memory_head(task, tmp_path):
  """A budget of 1 value streams every split; with one batch per epoch the steps are the same."""
  memory = train.train(_options(task, tmp_path / "memory"))
  streamed = train.train(_options(task, tmp_path / "streamed", max_in_memory_features=1))
  assert memory["streamed_splits"] == [] and streamed["streamed_splits"] == ["train",
                                                                             "validation"]
  assert streamed["timings"]["backbone_pass_cached"]   # the same cache parts
  for split in ("train", "validation"):
    assert streamed[split]["accuracy"] == memory[split]["accuracy"]
    assert streamed[split]["num_examples"] == memory[split]["num_examples"]
    np.testing.assert_array_equal(streamed[split]["confusion_matrix"],
                                  memory[split]["confusion_matrix"])
  assert streamed["calibration"]["temperature"] == pytest.approx(
      memory["calibration"]["temperature"], rel=1e-3)
  memory_head, _ = head_lib.load_head(tmp_path / "memory")
  streamed_head, _ = head_lib.load_head(tmp_path / "streamed")
  np.testing.assert_allclose(streamed_head.feature_shift.numpy(),
                             memory_head.feature_shift.numpy(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(streamed_head.feature_scale.numpy(),
                             memory_head.feature_scale.numpy(), rtol=1e-4)
  kernel = memory_head.kernel.numpy()
  np.testing.assert_allclose(streamed_head.kernel.numpy(), kernel, rtol=1e-3,
                             atol=1e-3 * np.abs(kernel).max())


def test_streamed_minibatches_with_mirrors_train_as_well(task, tmp_path):
  """Batches of 8 from shuffled parts, mirrors included: other batches, the same quality."""
  options = dict(batch_size=8, flip_features=True, epochs=20)
  memory = train.train(_options(task, tmp_path / "memory", **options))
  streamed = train.train(_options(task, tmp_path / "streamed", max_in_memory_features=1,
                                  **options))
  assert streamed["streamed_splits"] == ["train", "validation"]
  assert streamed["train"]["accuracy"] >= 0.9
  assert streamed["validation"]["accuracy"] == pytest.approx(memory["validation"]["accuracy"],
                                                             abs=0.11)


def test_streamed_l2_is_cross_validated_on_a_stratified_subsample(task, tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="absl")
  budget = 20 * 32   # 20 rows of the tiny backbone's 32 features: 5 folds x 4 classes
  metrics = train.train(_options(task, tmp_path / "model", l2=None, max_in_memory_features=budget,
                                 epochs=10))
  cv = metrics["cross_validation"]
  assert cv["subsample"] and cv["examples"] == 20 < metrics["train"]["num_examples"] == 29
  assert "l2 is cross-validated on a stratified subsample of 20 of the 29" in caplog.text
  assert metrics["l2"] in cv["grid"] and metrics["train"]["accuracy"] >= 0.9


def test_stratified_rows_keep_each_class_share():
  labels = np.repeat(np.arange(4), [40, 20, 10, 2])
  rows = features.stratified_rows(labels, 36, seed=0)
  assert np.all(np.diff(rows) > 0)
  np.testing.assert_array_equal(np.bincount(labels[rows]), [20, 10, 5, 1])
  np.testing.assert_array_equal(features.stratified_rows(labels, 100, seed=0), np.arange(72))


def test_float16_storage_halves_the_parts_and_keeps_the_features(task):
  records_dir, backbone_dir = task
  backbone = backbone_lib.load_backbone(backbone_dir)
  kwargs = dict(batch_size=8, image_size=64, resize_mode="center_crop", num_classes=4)
  full = feature_cache.cached_features(backbone, records_dir, "train", **kwargs)
  half = feature_cache.cached_features(backbone, records_dir, "train", storage="float16", **kwargs)
  again = feature_cache.cached_features(backbone, records_dir, "train", storage="float16", **kwargs)
  assert again.from_cache
  # The run that extracted them trains on what the cache gives later: float16-rounded values.
  np.testing.assert_array_equal(again.features, half.features)
  assert half.features.dtype == np.float32
  np.testing.assert_allclose(half.features, full.features, rtol=1e-3, atol=1e-4)
  assert not np.array_equal(half.features, full.features)

  def entry_bytes(storage):
    key = feature_cache.cache_key(backbone, records_dir, "train", image_size=64,
                                  resize_mode="center_crop", num_thumbnails_per_class=16,
                                  storage=storage)
    return sum(os.path.getsize(path) for path in
               glob.glob(os.path.join(feature_cache.entry_dir("train", key), "part-*.npz")))

  # Keyed apart, and all else in the parts the same: float16 saves 2 of 4 bytes per value.
  assert entry_bytes("float32") - entry_bytes("float16") == pytest.approx(
      full.features.nbytes / 2, rel=0.01)



def test_patience_with_streamed_validation_is_refused_before_the_backbone_pass(task, tmp_path):
  """The split sizes are in the records' manifest: no image is decoded before the refusal."""
  cache = tmp_path / "cache"
  with pytest.raises(UserError, match="^patience checks the validation features"):
    train.train(_options(task, tmp_path / "model", max_in_memory_features=1, patience=3,
                         feature_cache_dir=str(cache)))
  assert not glob.glob(str(cache / "**" / "*.npz"), recursive=True)
