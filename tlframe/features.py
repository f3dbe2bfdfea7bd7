"""One backbone pass over a split's records, cached on disk as float32 features.

The backbone pass is nearly all of a cached-features training run, so its
result is kept in a cache shared by every model dir:
`$TLFRAME_CACHE_DIR/features/<split>-<key>.npz` (`cache_dir()`). The key
digests what the features depend on: the backbone's `cache_key` (module, size,
kind, precision), the record shards (absolute path, size, modification time),
the labels, image size and resize mode. A rerun with other head settings, or a
run into another model dir on the same records, finds the file and skips the
backbone; changing the records or the backbone changes the key. Files are
written atomically, so two processes filling the same entry at once are safe
(the last rename wins, with the same content); an unreadable entry is logged
with its path and recomputed.

Alongside the features it keeps small thumbnails of the first few images per
class (after crop/pad, as the backbone saw them) for TensorBoard's sample
grids and the embedding projector's sprite.
"""

import dataclasses
import hashlib
import io
import json
import os
import time
import zipfile

import numpy as np
import tensorflow as tf
from absl import logging

from tlframe import backbone as backbone_lib
from tlframe import fileio
from tlframe import pipeline
from tlframe import records
from tlframe.progress import Progress

CACHE_DIRNAME = "features"
THUMBNAIL_SIZE = 48
# Bump when the file layout changes so old caches are recomputed, not misread.
_FORMAT_VERSION = 1


@dataclasses.dataclass
class FeatureSet:
  """A split's features [N, D] float32 and labels [N] int32, in record order.

  thumbnails: uint8 [K, THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3] of up to
  `num_thumbnails_per_class` images per class; thumbnail_rows: their row in
  `features`. extract_seconds: time this run spent getting the features (the
  backbone pass, or loading the cache when from_cache).
  """
  features: np.ndarray
  labels: np.ndarray
  filenames: np.ndarray
  thumbnails: np.ndarray
  thumbnail_rows: np.ndarray
  extract_seconds: float = 0.0
  from_cache: bool = False
  skipped: int = 0

  @property
  def thumbnail_labels(self):
    return self.labels[self.thumbnail_rows]


def extract_features(backbone, file_pattern, *, batch_size, image_size, resize_mode,
                     num_classes, num_thumbnails_per_class=16, total=None):
  """Runs `backbone` over every record matching `file_pattern`, in order."""
  skip_counter = pipeline.SkipCounter()
  dataset = pipeline.make_dataset(file_pattern, batch_size, image_size=image_size,
                                  resize_mode=resize_mode, with_filenames=True,
                                  skip_counter=skip_counter)

  @tf.function
  def featurize(images):
    thumbnails = tf.image.resize(images, [THUMBNAIL_SIZE, THUMBNAIL_SIZE], antialias=True)
    return backbone(images), tf.cast(tf.round(thumbnails * 255.0), tf.uint8)

  start = time.monotonic()
  progress = Progress(total, what="images")
  features, labels, filenames, thumbnails, thumbnail_rows = [], [], [], [], []
  thumbnails_per_class = np.zeros([num_classes], np.int64)
  row = 0
  for images, batch_labels, batch_filenames in dataset:
    batch_features, batch_thumbnails = featurize(images)
    batch_labels = batch_labels.numpy()
    features.append(batch_features.numpy())
    labels.append(batch_labels)
    filenames.extend(name.decode("utf-8", "replace") for name in batch_filenames.numpy())
    for i, label in enumerate(batch_labels):
      if thumbnails_per_class[label] < num_thumbnails_per_class:
        thumbnails_per_class[label] += 1
        thumbnails.append(batch_thumbnails[i].numpy())
        thumbnail_rows.append(row + i)
    row += len(batch_labels)
    progress.update(len(batch_labels))
  if skip_counter.count:
    logging.warning("%d records in %s did not decode and were skipped (first: %s)",
                    skip_counter.count, file_pattern, skip_counter.filenames[:3])
  dim = backbone.output_dim
  return FeatureSet(
      features=np.concatenate(features) if features else np.zeros([0, dim], np.float32),
      labels=np.concatenate(labels).astype(np.int32) if labels else np.zeros([0], np.int32),
      filenames=np.asarray(filenames, dtype=str),
      thumbnails=(np.stack(thumbnails) if thumbnails else
                  np.zeros([0, THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3], np.uint8)),
      thumbnail_rows=np.asarray(thumbnail_rows, np.int64),
      extract_seconds=time.monotonic() - start, skipped=skip_counter.count)


def cache_dir():
  """Where feature files are cached: `$TLFRAME_CACHE_DIR/features`."""
  return os.path.join(backbone_lib.cache_dir(), CACHE_DIRNAME)


def cache_key(backbone, records_dir, split, *, image_size, resize_mode,
              num_thumbnails_per_class):
  """A digest of everything the split's features depend on."""
  shards = []
  for path in sorted(tf.io.gfile.glob(records.split_file_pattern(records_dir, split))):
    stat = tf.io.gfile.stat(path)
    shards.append([os.path.abspath(path), stat.length, stat.mtime_nsec])
  identity = dict(version=_FORMAT_VERSION, backbone=backbone.cache_key, shards=shards,
                  labels=records.read_labels(records_dir), image_size=image_size,
                  resize_mode=resize_mode, thumbnails=num_thumbnails_per_class,
                  thumbnail_size=THUMBNAIL_SIZE)
  return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def cached_features(backbone, records_dir, split, *, batch_size, image_size, resize_mode,
                    num_classes, num_thumbnails_per_class=16):
  """The split's FeatureSet from the cache if its key matches, else a backbone pass."""
  key = cache_key(backbone, records_dir, split, image_size=image_size,
                  resize_mode=resize_mode, num_thumbnails_per_class=num_thumbnails_per_class)
  path = os.path.join(cache_dir(), f"{split}-{key}.npz")
  start = time.monotonic()
  if tf.io.gfile.exists(path):
    loaded = _read(path)
    if loaded is not None:
      loaded.extract_seconds = time.monotonic() - start
      logging.info("Loaded cached %s features from %s: skipping the backbone pass", split, path)
      return loaded
  # A damaged shard stops the run here, named, rather than deep inside tf.data.
  records.check_shards(records_dir, split)
  logging.info("Backbone pass over the %s records (%s)", split, backbone)
  feature_set = extract_features(
      backbone, records.split_file_pattern(records_dir, split), batch_size=batch_size,
      image_size=image_size, resize_mode=resize_mode, num_classes=num_classes,
      num_thumbnails_per_class=num_thumbnails_per_class,
      total=records.count_examples(records_dir, split))
  logging.info("%s features: %d x %d in %.1f s", split, *feature_set.features.shape,
               feature_set.extract_seconds)
  try:
    tf.io.gfile.makedirs(cache_dir())
    _write(path, feature_set)
  except (OSError, tf.errors.OpError) as e:
    # The features are in memory: this run goes on, only later ones pay the pass again.
    logging.warning("Could not cache the %s features in %s (%s): continuing without the cache",
                    split, path, getattr(e, "message", None) or e)
  return feature_set


def _write(path, feature_set):
  buffer = io.BytesIO()
  np.savez(buffer, features=feature_set.features, labels=feature_set.labels,
           filenames=feature_set.filenames, thumbnails=feature_set.thumbnails,
           thumbnail_rows=feature_set.thumbnail_rows, skipped=feature_set.skipped)
  fileio.atomic_write_bytes(path, buffer.getvalue())


def _read(path):
  """The FeatureSet in `path`, or None (logged) if the file is unreadable."""
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      data = np.load(io.BytesIO(f.read()), allow_pickle=False)
      return FeatureSet(features=data["features"], labels=data["labels"],
                        filenames=data["filenames"], thumbnails=data["thumbnails"],
                        thumbnail_rows=data["thumbnail_rows"], from_cache=True,
                        skipped=int(data["skipped"]))
  # Whatever a truncated, emptied or overwritten file raises (np.load of a
  # damaged zip: BadZipFile, a CRC error, EOFError, ...): the entry is redone.
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, tf.errors.OpError) as e:
    logging.warning("Ignoring unreadable feature cache %s (%s: %s): recomputing", path,
                    type(e).__name__, e)
    return None
