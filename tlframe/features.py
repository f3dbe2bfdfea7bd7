"""One backbone pass over a split's records, cached on disk as float32 features.

The backbone pass is nearly all of a cached-features training run, so its
result is kept in a cache shared by every model dir:
`$TLFRAME_CACHE_DIR/features/<split>-<key>.npz` (`cache_dir()`). The key
digests what the features depend on: the backbone's `cache_key` (module, size,
kind, precision), the record shards (absolute path, size, modification time),
the labels, image size and resize mode. A rerun with other head settings, or a
run into another model dir on the same records, finds the file and skips the
backbone (`feature_cache_dir` puts the cache elsewhere, on any tf.io.gfile
filesystem: gs://, ram://, ...); changing the records or the backbone changes the key. Files are
written atomically, so two processes filling the same entry at once are safe
(the last rename wins, with the same content); an unreadable entry is logged
with its path and recomputed.

With `flip`, the same pass also runs the backbone on each image's left-right
mirror: `FeatureSet.flipped_features`, extra training examples
(`training_examples`) and a second view whose scores evaluation averages with
the first (`average_flip_scores`; the export does the same).

The pass runs at the backbone's speed: one function traced per backbone and
batch size (the last batch padded to the full size, its padding's rows
dropped), tf.data decoding the next batches on its own threads meanwhile, and
no Python work per image. Small thumbnails are made of the first few images
per class only (after crop/pad, as the backbone saw them), for TensorBoard's
sample grids and the embedding projector's sprite.
"""

import dataclasses
import hashlib
import io
import json
import os
import time
import weakref
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
# Batches decoded ahead of the backbone: enough to hide a slow image or two.
_PREFETCH_BATCHES = 2


@dataclasses.dataclass
class FeatureSet:
  """A split's features [N, D] float32 and labels [N] int32, in record order.

  flipped_features: [N, D] features of the left-right mirrored images, row
  for row, when extracted with `flip` (else None): extra training examples,
  and a second view whose scores `average_flip_scores` averages with the first.
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
  flipped_features: np.ndarray = None

  @property
  def thumbnail_labels(self):
    return self.labels[self.thumbnail_rows]

  def training_examples(self):
    """(features, labels) to train a head on: the mirrors' rows follow the originals' when kept."""
    if self.flipped_features is None:
      return self.features, self.labels
    return (np.concatenate([self.features, self.flipped_features]),
            np.concatenate([self.labels, self.labels]))


def average_flip_scores(scores_of, feature_set):
  """[N, C] scores of each image: `scores_of(features)` averaged over it and its mirror.

  The plain scores when the set has no flipped features. The export averages
  the same two scores (export.ClassifierModule's `average_flips`).
  """
  scores = scores_of(feature_set.features)
  if feature_set.flipped_features is None:
    return scores
  return (scores + scores_of(feature_set.flipped_features)) / 2


def extract_features(backbone, file_pattern, *, batch_size, image_size, resize_mode,
                     num_classes, num_thumbnails_per_class=16, total=None, flip=False):
  """Runs `backbone` over every record matching `file_pattern`, in order.

  With `flip`, also over each image's left-right mirror (`flipped_features`),
  decoded once: the mirror is taken of the batch inside the backbone's call.
  """
  skip_counter = pipeline.SkipCounter()
  dataset = pipeline.make_dataset(file_pattern, batch_size, image_size=image_size,
                                  resize_mode=resize_mode, with_filenames=True,
                                  skip_counter=skip_counter)
  dataset = dataset.map(lambda images, labels, names: (_pad_batch(images, batch_size), labels,
                                                        names))
  # tf.data's decode and resize run on their own threads, one per op, while the
  # backbone's graph uses TF's pools: otherwise both split every op over all
  # cores and preempt each other.
  options = tf.data.Options()
  options.threading.private_threadpool_size = backbone_lib.default_thread_counts()[0]
  options.threading.max_intra_op_parallelism = 1
  dataset = dataset.with_options(options).prefetch(_PREFETCH_BATCHES)
  featurize = _featurizer(backbone, batch_size, image_size, flip)

  start = time.monotonic()
  progress = Progress(total, what="images")
  features, flipped, labels, filenames, thumbnails, thumbnail_rows = [], [], [], [], [], []
  thumbnails_per_class = np.zeros([num_classes], np.int64)
  row = 0
  for images, batch_labels, batch_filenames in dataset:
    outputs = featurize(images)
    batch_labels = batch_labels.numpy()
    count = len(batch_labels)  # the rows past it are the padding of the last batch
    if flip:
      features.append(outputs[0].numpy()[:count])
      flipped.append(outputs[1].numpy()[:count])
    else:
      features.append(outputs.numpy()[:count])
    labels.append(batch_labels)
    filenames.append(batch_filenames.numpy())
    shown = _rows_to_show(batch_labels, thumbnails_per_class, num_thumbnails_per_class)
    if len(shown):
      thumbnails.append(_thumbnails(tf.gather(images, shown)).numpy())
      thumbnail_rows.append(row + shown)
    row += count
    progress.update(count)
  if skip_counter.count:
    logging.warning("%d records in %s did not decode and were skipped (first: %s)",
                    skip_counter.count, file_pattern, skip_counter.filenames[:3])
  dim = backbone.output_dim

  def rows_of(parts, empty):
    return np.concatenate(parts) if parts else empty

  no_features = np.zeros([0, dim], np.float32)
  return FeatureSet(
      features=rows_of(features, no_features),
      flipped_features=rows_of(flipped, no_features) if flip else None,
      labels=rows_of(labels, np.zeros([0], np.int32)).astype(np.int32),
      filenames=np.char.decode(rows_of(filenames, np.zeros([0], bytes)).astype(bytes), "utf-8",
                               "replace").astype(str),
      thumbnails=rows_of(thumbnails,
                         np.zeros([0, THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3], np.uint8)),
      thumbnail_rows=rows_of(thumbnail_rows, np.zeros([0], np.int64)).astype(np.int64),
      extract_seconds=time.monotonic() - start, skipped=skip_counter.count)


def _pad_batch(images, batch_size):
  """The batch with zero images appended up to `batch_size`, for one fixed traced shape."""
  padding = batch_size - tf.shape(images)[0]
  padded = tf.pad(images, [[0, padding], [0, 0], [0, 0], [0, 0]])
  return tf.ensure_shape(padded, [batch_size] + images.shape[1:].as_list())


# Traced featurizers by backbone, then (batch size, image size, flip): one
# trace each for the run, however many splits and batches go through.
_featurizers = weakref.WeakKeyDictionary()


def _featurizer(backbone, batch_size, image_size, flip):
  """images [batch_size, S, S, 3] -> features [batch_size, D] (and the mirrors' with `flip`)."""
  by_shape = _featurizers.setdefault(backbone, {})
  key = (batch_size, image_size, flip)
  if key not in by_shape:
    spec = tf.TensorSpec([batch_size, image_size, image_size, 3], tf.float32)

    @tf.function(input_signature=[spec])
    def featurize(images):
      if not flip:
        return backbone(images)
      both = backbone(tf.concat([images, tf.image.flip_left_right(images)], axis=0))
      return both[:batch_size], both[batch_size:]

    by_shape[key] = featurize
  return by_shape[key]


@tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
def _thumbnails(images):
  thumbnails = tf.image.resize(images, [THUMBNAIL_SIZE, THUMBNAIL_SIZE], antialias=True)
  return tf.cast(tf.round(tf.clip_by_value(thumbnails, 0.0, 1.0) * 255.0), tf.uint8)


def _rows_to_show(batch_labels, shown_per_class, limit):
  """Rows of the batch that get thumbnails (the first `limit` of each class); counts them."""
  if not len(batch_labels) or shown_per_class.min() >= limit:
    return np.zeros([0], np.int64)
  same_class = batch_labels[:, None] == np.arange(len(shown_per_class))[None, :]   # [B, C]
  rank = (np.cumsum(same_class, axis=0) - 1)[np.arange(len(batch_labels)), batch_labels]
  rows = np.flatnonzero(shown_per_class[batch_labels] + rank < limit)
  np.add.at(shown_per_class, batch_labels[rows], 1)
  return rows


def cache_dir(feature_cache_dir=""):
  """Where feature files are cached: `feature_cache_dir`, or `$TLFRAME_CACHE_DIR/features`."""
  return feature_cache_dir or os.path.join(backbone_lib.cache_dir(), CACHE_DIRNAME)


def _absolute(path):
  """`path` made absolute when local; a URL (gs://, ram://, ...) is already."""
  return path if "://" in path else os.path.abspath(path)


def cache_key(backbone, records_dir, split, *, image_size, resize_mode,
              num_thumbnails_per_class, flip=False):
  """A digest of everything the split's features depend on."""
  shards = []
  for path in sorted(tf.io.gfile.glob(records.split_file_pattern(records_dir, split))):
    stat = tf.io.gfile.stat(path)
    shards.append([_absolute(path), stat.length, stat.mtime_nsec])
  identity = dict(version=_FORMAT_VERSION, backbone=backbone.cache_key, shards=shards,
                  labels=records.read_labels(records_dir), image_size=image_size,
                  resize_mode=resize_mode, thumbnails=num_thumbnails_per_class,
                  thumbnail_size=THUMBNAIL_SIZE)
  if flip:  # only then, so entries without mirrors keep their keys
    identity["flip"] = True
  return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def cached_features(backbone, records_dir, split, *, batch_size, image_size, resize_mode,
                    num_classes, num_thumbnails_per_class=16, flip=False, feature_cache_dir=""):
  """The split's FeatureSet from the cache if its key matches, else a backbone pass.

  `flip`: the set also holds the mirrored images' features (one cache entry
  holding both, keyed apart from the entry without them). `feature_cache_dir`:
  the cache folder, on any TensorFlow filesystem (default: `cache_dir()`).
  """
  key = cache_key(backbone, records_dir, split, image_size=image_size,
                  resize_mode=resize_mode, num_thumbnails_per_class=num_thumbnails_per_class,
                  flip=flip)
  directory = cache_dir(feature_cache_dir)
  path = os.path.join(directory, f"{split}-{key}.npz")
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
      num_thumbnails_per_class=num_thumbnails_per_class, flip=flip,
      total=records.count_examples(records_dir, split))
  logging.info("%s features: %d x %d in %.1f s", split, *feature_set.features.shape,
               feature_set.extract_seconds)
  try:
    tf.io.gfile.makedirs(directory)
    _write(path, feature_set)
  except (OSError, tf.errors.OpError) as e:
    # The features are in memory: this run goes on, only later ones pay the pass again.
    logging.warning("Could not cache the %s features in %s (%s): continuing without the cache",
                    split, path, getattr(e, "message", None) or e)
  return feature_set


def _write(path, feature_set):
  buffer = io.BytesIO()
  flipped = {} if feature_set.flipped_features is None else dict(
      flipped_features=feature_set.flipped_features)
  np.savez(buffer, features=feature_set.features, labels=feature_set.labels,
           filenames=feature_set.filenames, thumbnails=feature_set.thumbnails,
           thumbnail_rows=feature_set.thumbnail_rows, skipped=feature_set.skipped, **flipped)
  fileio.atomic_write_bytes(path, buffer.getvalue())


def _read(path):
  """The FeatureSet in `path`, or None (logged) if the file is unreadable."""
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      data = np.load(io.BytesIO(f.read()), allow_pickle=False)
      return FeatureSet(features=data["features"], labels=data["labels"],
                        filenames=data["filenames"], thumbnails=data["thumbnails"],
                        thumbnail_rows=data["thumbnail_rows"], from_cache=True,
                        skipped=int(data["skipped"]),
                        flipped_features=(data["flipped_features"] if "flipped_features" in data
                                          else None))
  # Whatever a truncated, emptied or overwritten file raises (np.load of a
  # damaged zip: BadZipFile, a CRC error, EOFError, ...): the entry is redone.
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, tf.errors.OpError) as e:
    logging.warning("Ignoring unreadable feature cache %s (%s: %s): recomputing", path,
                    type(e).__name__, e)
    return None
