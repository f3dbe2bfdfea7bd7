"""Concatenated backbones (`--backbone=a,b`): features side by side, one training, one export."""

import numpy as np
import pytest
import tensorflow as tf

from tlframe.backbone import loading as backbone_lib
from tlframe.train import head as head_lib
from tlframe.records import example_format
from tlframe import pipeline
from tlframe import records
from tlframe import train
from tlframe.errors import UserError
from test_backbone import save_conv_module
from test_train_helpers import TINY_INPUT_SIZE, make_records, save_tiny_backbone

SMALL_SIZE = 48  # the second part's input size, below TinyBackbone's 64


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
  """(64 px TinyBackbone dir, 48 px conv module dir): two tiny real SavedModel backbones."""
  tmp = tmp_path_factory.mktemp("parts")
  return (save_tiny_backbone(tmp / "tiny64"),
          save_conv_module(tmp / "conv48", SMALL_SIZE, dim=8))


def _photo_batch(photos, size):
  return tf.stack([pipeline.preprocess(photos[name], size)
                   for name in ("chelsea", "coffee", "rocket", "astronaut")])


def test_features_are_the_parts_side_by_side(parts, skimage_photos, tmp_path):
  big_dir, small_dir = parts
  big, small = backbone_lib.load_backbone(big_dir), backbone_lib.load_backbone(small_dir)
  both = backbone_lib.load_backbone(f"{big_dir},{small_dir}")
  assert both.input_size == TINY_INPUT_SIZE == big.input_size and small.input_size == SMALL_SIZE
  assert both.output_dim == big.output_dim + small.output_dim == 32 + 8
  assert big.cache_key in both.cache_key and small.cache_key in both.cache_key
  swapped = backbone_lib.load_backbone(f"{small_dir},{big_dir}")
  assert swapped.cache_key != both.cache_key and swapped.input_size == TINY_INPUT_SIZE

  images = _photo_batch(skimage_photos, TINY_INPUT_SIZE)
  featurize = tf.function(lambda x: both(x))  # as the feature pass calls it
  features = featurize(images).numpy()
  # The smaller part sees the images resized to its own size inside the call.
  resized = tf.image.resize(images, [SMALL_SIZE, SMALL_SIZE], antialias=True)
  np.testing.assert_allclose(features, np.concatenate(
      [big(images).numpy(), small(resized).numpy()], axis=1), atol=1e-6)
  np.testing.assert_allclose(swapped(images).numpy(), np.concatenate(
      [small(resized).numpy(), big(images).numpy()], axis=1), atol=1e-6)
  # Resizing the 64 px crop down is close to cropping the photo at 48 px directly.
  direct = small(_photo_batch(skimage_photos, SMALL_SIZE)).numpy()
  assert np.abs(features[:, 32:] - direct).max() < 0.05 * np.abs(direct).max()

  # Its module is one tf.Module that a SavedModel holds, and it loads back as a handle.
  saved = str(tmp_path / "concatenated")
  tf.saved_model.save(both.module, saved)
  reloaded = backbone_lib.load_backbone(saved)
  assert (reloaded.input_size, reloaded.output_dim) == (TINY_INPUT_SIZE, 40)
  np.testing.assert_allclose(reloaded(images).numpy(), features, atol=1e-6)


def test_sizes_and_bad_handles(parts, tmp_path):
  big_dir, small_dir = parts
  assert backbone_lib.load_backbone(f"{big_dir}, {small_dir}", input_size=64).input_size == 64
  with pytest.raises(UserError, match="largest part .* takes 64x64 images; leave it unset or set 64"):
    backbone_lib.load_backbone(f"{big_dir},{small_dir}", input_size=48)
  with pytest.raises(UserError, match="two or more handles separated by commas"):
    backbone_lib.load_backbone(f"{big_dir},")
  any_size = save_conv_module(tmp_path / "any_size", None, dim=4)
  with pytest.raises(UserError, match="accepts any image size: set input_size \\(at least 64\\)"):
    backbone_lib.load_backbone(f"{big_dir},{any_size}")
  with_any = backbone_lib.load_backbone(f"{big_dir},{any_size}", input_size=96)
  assert (with_any.input_size, with_any.output_dim) == (96, 36)
  assert with_any(tf.zeros([2, 96, 96, 3])).shape == (2, 36)


@pytest.mark.slow  # a training run and an export: ~20 s on 2 cores
def test_train_and_export_round_trip(parts, skimage_photos, tmp_path):
  """bin/train's library path with --backbone=a,b, then its export on the validation bytes."""
  big_dir, small_dir = parts
  records_dir = make_records(str(tmp_path), skimage_photos)
  handle = f"{big_dir},{small_dir}"
  metrics = train.train(train.TrainOptions(
      records_dir=records_dir, model_dir=str(tmp_path / "model"), backbone=handle, loss="hinge",
      l2=1e-3, epochs=30, batch_size=8, checkpoint_every_epochs=10, log_every_steps=5))
  assert metrics["backbone"]["output_dim"] == 40 and metrics["backbone"]["input_size"] == 64
  assert metrics["validation"]["accuracy"] >= 0.75

  pattern = records.split_file_pattern(records_dir, "validation")
  examples = [example_format.parse_example(serialized)
              for serialized in tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern)))]
  exported = tf.saved_model.load(metrics["export_dir"])
  outputs = exported.signatures["serving_default"](
      image_bytes=tf.stack([encoded for encoded, _, _ in examples]))
  head, config = head_lib.load_head(str(tmp_path / "model"))
  assert config.backbone == handle and config.num_features == 40
  backbone = backbone_lib.load_backbone(config.backbone, input_size=config.image_size)
  dataset = pipeline.make_dataset(pattern, 64, image_size=config.image_size,
                                  resize_mode=config.resize_mode)
  expected = np.concatenate([head(backbone(images)).numpy() for images, _ in dataset])
  np.testing.assert_allclose(outputs["scores"].numpy(), expected, atol=1e-4, rtol=0)
  labels = np.array([int(label) for _, label, _ in examples])
  assert np.mean(outputs["classes"].numpy() == labels) == pytest.approx(
      metrics["validation"]["accuracy"])
