"""The backbone pass: record files through the frozen backbone, into a FeatureSet per file.

`extract_features` runs at the backbone's speed: one function traced per
backbone and batch size (the last batch padded to the full size, its
padding's rows dropped), tf.data decoding the next batches on its own threads
meanwhile, and no Python work per image. The files share the batches, each
row tagged with its file (pipeline.make_dataset's file index): bin/train's
pass over a few photos in two or three splits fills one batch and sets its
pipeline up once (measured: 0.5 s less for 20 + 8 photos than a pass per
split). Small thumbnails are made of the first few images per class of each
file only (after crop/pad, as the backbone saw them), for TensorBoard's sample
grids and the embedding projector's sprite.

With `flip`, the same pass also runs the backbone on each image's left-right
mirror, decoded once: the mirror is taken of the batch inside the backbone's
call. Under a MirroredStrategy each batch of the pass is split across the
replicas (`strategy.run` on per-replica batches from
`distribute_datasets_from_function`) and gathered back in record order: the
features equal the one-device pass's (within float tolerance, same order).

The feature cache (`feature_cache`) runs this pass once over the record shards
whose features it lacks and keeps each shard's result.
"""

import time
import weakref

import numpy as np
import tensorflow as tf
from absl import logging

from tlframe.backbone import runtime as backbone_runtime
from tlframe.train import features as features_lib
from tlframe.train.features import THUMBNAIL_SIZE
from tlframe import pipeline
from tlframe.util.progress import Progress

# Batches decoded ahead of the backbone: enough to hide a slow image or two.
_PREFETCH_BATCHES = 2


def extract_features(backbone, files, *, batch_size, image_size, resize_mode, num_classes,
                     num_thumbnails_per_class=16, total=None, flip=False, strategy=None,
                     progress=None):
  """Runs `backbone` over every record of `files`, in one pass; a FeatureSet per file.

  files: record files (a list, or a glob pattern: its matches sorted). Their
  records share the batches (a few photos in two splits' files fill one batch,
  not two padded ones); each file's FeatureSet holds its rows in record order
  and thumbnails of the first `num_thumbnails_per_class` images of each class
  in it; its `skipped` counts its records that did not decode, and its
  `extract_seconds` is the whole pass's. With `flip`, also each image's
  left-right mirror (`flipped_features`), decoded once: the mirror is taken of
  the batch inside the backbone's call. `strategy` (a MirroredStrategy, or
  None: the default device): each batch of `batch_size` images per replica
  runs on every replica at once; the rows come back in record order.
  `progress`: a Progress to count the images in (else one of `total` images is
  made).
  """
  files = pipeline.list_files(files)
  replicas = strategy.num_replicas_in_sync if strategy is not None else 1
  global_batch = batch_size * replicas
  skip_counter = pipeline.SkipCounter()

  def make_batches(input_context=None):
    dataset = pipeline.make_dataset(files, global_batch, image_size=image_size,
                                    resize_mode=resize_mode, with_filenames=True,
                                    with_file_index=True, skip_counter=skip_counter)
    # Plain functions of tensors: not autograph-converted (converting costs each run's trace).
    dataset = dataset.map(tf.autograph.experimental.do_not_convert(
        lambda *batch: _pad_batch(*batch, global_batch)))
    if strategy is not None:
      # Global batch k becomes the per-replica batches k*R .. k*R+R-1, which the
      # strategy hands to replicas 0 .. R-1 in turn: gathered back in order.
      dataset = dataset.map(tf.autograph.experimental.do_not_convert(lambda *batch: tuple(
          tf.reshape(t, [replicas, batch_size] + t.shape[1:].as_list()) for t in batch)))
      dataset = dataset.unbatch()
    # tf.data's decode and resize run on their own threads, one per op, while the
    # backbone's graph uses TF's pools: otherwise both split every op over all
    # cores and preempt each other.
    options = tf.data.Options()
    options.threading.private_threadpool_size = backbone_runtime.default_thread_counts()[0]
    options.threading.max_intra_op_parallelism = 1
    return dataset.with_options(options).prefetch(_PREFETCH_BATCHES)

  if strategy is None:
    batches, featurize = make_batches(), _featurizer(backbone, batch_size, image_size, flip)

    def gather(value):
      return value.numpy()
  else:
    batches = strategy.distribute_datasets_from_function(make_batches)
    featurize = _distributed_featurizer(strategy, backbone, batch_size, image_size, flip)

    def gather(value):
      return np.concatenate([t.numpy() for t in strategy.experimental_local_results(value)])

  start = time.monotonic()
  progress = progress or Progress(total, what="images")
  parts = [_PartRows() for _ in files]
  thumbnails_per_class = np.zeros([len(files), num_classes], np.int64)
  batches = iter(batches)   # its prefetch starts decoding the first batch now, while
  if strategy is None:      # the featurizer traces (once per run; a no-op after)
    featurize.get_concrete_function()
  for images, batch_labels, batch_filenames, batch_files in batches:
    outputs = featurize(images)
    batch_files = gather(batch_files)
    kept = batch_files >= 0   # the rest is the padding of the last batch
    batch_files = batch_files[kept]
    batch_labels = gather(batch_labels)[kept]
    batch_filenames = gather(batch_filenames)[kept]
    if flip:
      batch_features, batch_flipped = gather(outputs[0])[kept], gather(outputs[1])[kept]
    else:
      batch_features, batch_flipped = gather(outputs)[kept], None
    batch_images = None
    for index in np.unique(batch_files):
      rows = np.flatnonzero(batch_files == index)
      part = parts[index]
      labels = batch_labels[rows]
      part.features.append(batch_features[rows])
      if flip:
        part.flipped.append(batch_flipped[rows])
      part.labels.append(labels)
      part.filenames.append(batch_filenames[rows])
      shown = rows_to_show(labels, thumbnails_per_class[index], num_thumbnails_per_class)
      if len(shown):
        batch_images = gather(images)[kept] if batch_images is None else batch_images
        part.thumbnails.append(_thumbnails(batch_images[rows[shown]]).numpy())
        part.thumbnail_rows.append(part.num_rows + shown)
      part.num_rows += len(rows)
    progress.update(len(batch_files))
  if skip_counter.count:
    logging.warning("%d records in %s did not decode and were skipped (first: %s)",
                    skip_counter.count, files[0] if len(files) == 1 else
                    f"{len(files)} record files", skip_counter.filenames[:3])
  seconds = time.monotonic() - start
  return [part.feature_set(backbone.output_dim, flip, seconds, skip_counter.by_file[index])
          for index, part in enumerate(parts)]


class _PartRows:
  """One file's rows of the pass, batch by batch."""

  def __init__(self):
    self.features, self.flipped, self.labels, self.filenames = [], [], [], []
    self.thumbnails, self.thumbnail_rows = [], []
    self.num_rows = 0

  def feature_set(self, dim, flip, seconds, skipped):
    def rows_of(parts, empty):
      return np.concatenate(parts) if parts else empty

    no_features = np.zeros([0, dim], np.float32)
    return features_lib.FeatureSet(
        features=rows_of(self.features, no_features),
        flipped_features=rows_of(self.flipped, no_features) if flip else None,
        labels=rows_of(self.labels, np.zeros([0], np.int32)).astype(np.int32),
        filenames=np.char.decode(rows_of(self.filenames, np.zeros([0], bytes)).astype(bytes),
                                 "utf-8", "replace").astype(str),
        thumbnails=rows_of(self.thumbnails,
                           np.zeros([0, THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3], np.uint8)),
        thumbnail_rows=rows_of(self.thumbnail_rows, np.zeros([0], np.int64)).astype(np.int64),
        extract_seconds=seconds, skipped=skipped)


def _pad_batch(images, labels, names, file_indices, batch_size):
  """The batch padded up to `batch_size` (zero images, file index -1), for one fixed traced
  shape."""
  padding = batch_size - tf.shape(images)[0]
  padded = tf.pad(images, [[0, padding], [0, 0], [0, 0], [0, 0]])
  return (tf.ensure_shape(padded, [batch_size] + images.shape[1:].as_list()),
          tf.pad(labels, [[0, padding]], constant_values=-1), tf.pad(names, [[0, padding]]),
          tf.pad(file_indices, [[0, padding]], constant_values=-1))


# Traced featurizers by backbone, then (batch size, image size, flip[, strategy]):
# one trace each for the run, however many splits and batches go through.
_featurizers = weakref.WeakKeyDictionary()


def _featurizer(backbone, batch_size, image_size, flip):
  """images [batch_size, S, S, 3] -> features [batch_size, D] (and the mirrors' with `flip`)."""
  by_shape = _featurizers.setdefault(backbone, {})
  key = (batch_size, image_size, flip)
  if key not in by_shape:
    spec = tf.TensorSpec([batch_size, image_size, image_size, 3], tf.float32)

    # No autograph: `flip` is a Python bool, and converting cost every run's trace time.
    @tf.function(input_signature=[spec], autograph=False)
    def featurize(images):
      if not flip:
        return backbone(images)
      both = backbone(tf.concat([images, tf.image.flip_left_right(images)], axis=0))
      return both[:batch_size], both[batch_size:]

    by_shape[key] = featurize
  return by_shape[key]


def _distributed_featurizer(strategy, backbone, batch_size, image_size, flip):
  """Per-replica images -> per-replica features: `_featurizer` on every replica at once."""
  by_shape = _featurizers.setdefault(backbone, {})
  key = (batch_size, image_size, flip, strategy)
  if key not in by_shape:
    featurize = _featurizer(backbone, batch_size, image_size, flip)

    @tf.function(autograph=False)
    def featurize_replicas(images):
      # A plain function to run: strategy.run would clone a tf.function with
      # its input signature and bind the PerReplica batch to it.
      return strategy.run(lambda replica_images: featurize(replica_images), args=(images,))

    by_shape[key] = featurize_replicas
  return by_shape[key]


@tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)],
             autograph=False)
def _thumbnails(images):
  thumbnails = tf.image.resize(images, [THUMBNAIL_SIZE, THUMBNAIL_SIZE], antialias=True)
  return tf.cast(tf.round(tf.clip_by_value(thumbnails, 0.0, 1.0) * 255.0), tf.uint8)


def rows_to_show(batch_labels, shown_per_class, limit):
  """Rows of the batch that get thumbnails (the first `limit` of each class); counts them."""
  if not len(batch_labels) or shown_per_class.min() >= limit:
    return np.zeros([0], np.int64)
  same_class = batch_labels[:, None] == np.arange(len(shown_per_class))[None, :]   # [B, C]
  rank = (np.cumsum(same_class, axis=0) - 1)[np.arange(len(batch_labels)), batch_labels]
  rows = np.flatnonzero(shown_per_class[batch_labels] + rank < limit)
  np.add.at(shown_per_class, batch_labels[rows], 1)
  return rows
