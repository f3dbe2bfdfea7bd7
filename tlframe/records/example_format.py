"""A record's tf.train.Example: TF-Slim's keys, written by the converter, read by the pipeline.

The keys are TF-Slim's (`image/encoded`, `image/class/label`, ...), so records
written here read in other TF-Slim style tools and the other way round.
"""

import tensorflow as tf

# TF-Slim's keys (build_image_data.py); the reader needs only the first three.
KEY_ENCODED = "image/encoded"
KEY_FORMAT = "image/format"
KEY_LABEL = "image/class/label"
KEY_LABEL_TEXT = "image/class/text"
KEY_FILENAME = "image/filename"
KEY_HEIGHT = "image/height"
KEY_WIDTH = "image/width"
READ_FEATURES = {
    KEY_ENCODED: tf.io.FixedLenFeature([], tf.string),
    KEY_LABEL: tf.io.FixedLenFeature([], tf.int64),
    KEY_FILENAME: tf.io.FixedLenFeature([], tf.string, default_value=""),
}


def make_example(encoded, image_format, label_index, label, filename, height, width):
  """A TF-Slim style tf.train.Example; serialize it with deterministic=True (sorted map keys)."""

  def bytes_feature(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

  def int_feature(value):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

  return tf.train.Example(features=tf.train.Features(feature={
      KEY_ENCODED: bytes_feature(encoded),
      KEY_FORMAT: bytes_feature(image_format.encode("utf-8")),
      KEY_LABEL: int_feature(label_index),
      KEY_LABEL_TEXT: bytes_feature(label.encode("utf-8")),
      KEY_FILENAME: bytes_feature(filename.encode("utf-8")),
      KEY_HEIGHT: int_feature(height),
      KEY_WIDTH: int_feature(width),
  }))


def parse_example(serialized):
  """A serialized record -> (encoded bytes, int32 label, filename)."""
  features = tf.io.parse_single_example(serialized, READ_FEATURES)
  return (features[KEY_ENCODED], tf.cast(features[KEY_LABEL], tf.int32),
          features[KEY_FILENAME])


def parse_filenames(serialized):
  """[B] serialized records -> their [B] filenames, without parsing the images."""
  return tf.io.parse_example(serialized, {KEY_FILENAME: READ_FEATURES[KEY_FILENAME]})[KEY_FILENAME]
