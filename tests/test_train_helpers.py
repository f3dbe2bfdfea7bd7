"""Helpers (no tests): small real-photo records and a tiny SavedModel backbone for test_train*."""

import os

import numpy as np
import tensorflow as tf
from PIL import Image

from tlframe import records

TINY_INPUT_SIZE = 64


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


def write_photo_crops(image_dir, photos, per_class, size, seed=0):
  """Random crops (half of them mirrored) of each photo as JPEGs, one folder per photo."""
  rng = np.random.default_rng(seed)
  for name, photo in photos.items():
    os.makedirs(os.path.join(image_dir, name), exist_ok=True)
    height, width, _ = photo.shape
    for i in range(per_class):
      scale = rng.uniform(0.5, 0.9)
      crop_h, crop_w = int(height * scale), int(width * scale)
      top = rng.integers(0, height - crop_h + 1)
      left = rng.integers(0, width - crop_w + 1)
      crop = photo[top:top + crop_h, left:left + crop_w]
      if i % 2:
        crop = crop[:, ::-1]
      Image.fromarray(np.ascontiguousarray(crop)).resize((size, size)).save(
          os.path.join(image_dir, name, f"{i:03d}.jpg"), quality=90)


def make_records(tmp_dir, photos, per_class=12, size=80, validation_percentage=30):
  image_dir = os.path.join(tmp_dir, "images")
  write_photo_crops(image_dir, photos, per_class, size)
  records_dir = os.path.join(tmp_dir, "records")
  records.convert(records_dir, image_dir=image_dir, validation_percentage=validation_percentage,
                  test_percentage=0)
  return records_dir
