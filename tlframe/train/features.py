"""One backbone pass over a split's records, cached on disk as one file per record shard.

The backbone pass is nearly all of a cached-features training run, so its
result is kept in a cache shared by every model dir: the entry
`<cache>/<split>-<key>/` (`cache_dir()`: `feature_cache_dir`, default
`$TLFRAME_CACHE_DIR/features`, on any tf.io.gfile filesystem: gs://, ram://,
...) holds `part-00003-of-00008.npz` for record shard 3 of 8. The key digests
what the features depend on: the backbone's `cache_key` (module, size, kind,
precision), the record shards (path, size, modification time), the labels,
image size, resize mode and storage type. A rerun with other head settings, or
a run into another model dir on the same records, finds the parts and skips
the backbone; changing the records or the backbone changes the key. Each part
is written atomically, so a killed run, or a worker that dies, leaves whole
parts only, and the next run redoes just the missing ones; two processes
filling the same part at once are safe (the last rename wins, with the same
content). An unreadable part is logged with its path and recomputed.

Distributed (`cached_features(strategy=..., worker=...)`): under a MirroredStrategy each
batch of the pass is split across the replicas (`strategy.run` on per-replica
batches from `distribute_datasets_from_function`) and gathered back in record
order; under multi-worker, worker i extracts the parts of shards i, i + M, ...
(M workers) into the shared cache, then reads the others' parts as they
appear. The features equal the one-device pass's (within float tolerance, same
order), so the key does not depend on the strategy.

Beyond memory: a split whose features exceed `max_in_memory_features` float
values is not loaded; its FeatureSet holds labels, file names and thumbnails,
and its features stay in the parts (`FeatureSet.stream`), read part by part
(`parts`, `average_flip_scores`, `subset`) or streamed by tf.data
(trainer.streamed_feature_batches). `storage="float16"` halves the cache;
features are float32 again when read.

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

from tlframe.backbone import loading as backbone_lib
from tlframe.backbone import runtime as backbone_runtime
from tlframe.util import fileio
from tlframe.train import head as head_lib
from tlframe import options as options_lib
from tlframe import pipeline
from tlframe import records
from tlframe.errors import UserError
from tlframe.util.progress import Progress

CACHE_DIRNAME = "features"
THUMBNAIL_SIZE = 48
STORAGES = options_lib.FEATURE_STORAGES
# Bump when the file layout changes so old caches are recomputed, not misread.
# 2: one file per record shard in a folder per entry.
_FORMAT_VERSION = 2
# Batches decoded ahead of the backbone: enough to hide a slow image or two.
_PREFETCH_BATCHES = 2
# How often a worker waiting for the other workers' parts looks, and says so.
_WAIT_POLL_S = 0.5
_WAIT_LOG_S = 60.0


@dataclasses.dataclass(frozen=True)
class Stream:
  """Where a streamed split's features are: its cache parts, in record order."""
  paths: tuple
  rows: tuple   # rows of each part
  dim: int
  flip: bool


@dataclasses.dataclass
class FeatureSet:
  """A split's features [N, D] float32 and labels [N] int32, in record order.

  flipped_features: [N, D] features of the left-right mirrored images, row
  for row, when extracted with `flip` (else None): extra training examples,
  and a second view whose scores `average_flip_scores` averages with the first.
  thumbnails: uint8 [K, THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3] of up to
  `num_thumbnails_per_class` images per class; thumbnail_rows: their row in
  `features`. extract_seconds: time this run spent getting the features (the
  backbone pass, or loading the cache when from_cache). stream: set (and
  features None) when the features stay in the cache parts (`streamed`).
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
  stream: Stream = None

  @property
  def thumbnail_labels(self):
    return self.labels[self.thumbnail_rows]

  @property
  def streamed(self):
    return self.stream is not None

  @property
  def has_flips(self):
    return self.stream.flip if self.streamed else self.flipped_features is not None

  @property
  def num_training_examples(self):
    return len(self.labels) * (2 if self.has_flips else 1)

  def training_examples(self):
    """(features, labels) to train a head on: the mirrors' rows follow the originals' when kept."""
    if self.flipped_features is None:
      return self.features, self.labels
    return (np.concatenate([self.features, self.flipped_features]),
            np.concatenate([self.labels, self.labels]))

  def parts(self):
    """(features, flipped or None, labels) of each cache part in order; one when in memory."""
    if not self.streamed:
      yield self.features, self.flipped_features, self.labels
      return
    for path in self.stream.paths:
      part = read_part(path)
      yield part["features"], part.get("flipped_features"), part["labels"]

  def subset(self, rows):
    """An in-memory FeatureSet of the given rows (sorted), with their thumbnails."""
    rows = np.sort(np.asarray(rows, np.int64))
    if self.streamed:
      wanted = np.zeros(len(self.labels), bool)
      wanted[rows] = True
      picked = [(f[wanted[start:start + len(y)]],
                 None if flipped is None else flipped[wanted[start:start + len(y)]])
                for (f, flipped, y), start in zip(self.parts(), np.cumsum((0,) + self.stream.rows))]
      features = np.concatenate([f for f, _ in picked])
      flipped = np.concatenate([f for _, f in picked]) if self.has_flips else None
    else:
      features = self.features[rows]
      flipped = None if self.flipped_features is None else self.flipped_features[rows]
    shown = np.isin(self.thumbnail_rows, rows)
    return FeatureSet(features=features, flipped_features=flipped, labels=self.labels[rows],
                      filenames=self.filenames[rows], thumbnails=self.thumbnails[shown],
                      thumbnail_rows=np.searchsorted(rows, self.thumbnail_rows[shown]),
                      from_cache=self.from_cache)

  def thumbnail_subset(self):
    """The rows that have thumbnails, in memory (the embedding projector's points)."""
    return self.subset(self.thumbnail_rows)


def average_flip_scores(scores_of, feature_set):
  """[N, C] scores of each image: `scores_of(features)` averaged over it and its mirror.

  The plain scores when the set has no flipped features; part by part when
  streamed. The export averages the same two scores (export.ClassifierModule's
  `average_flips`).
  """
  scores = []
  for features, flipped, _ in feature_set.parts():
    part = scores_of(features)
    scores.append(part if flipped is None else (part + scores_of(flipped)) / 2)
  return np.concatenate(scores)


def normalization_constants(feature_set, feature_normalization):
  """head.normalization_constants of the set's training examples; over the parts when streamed."""
  if not feature_set.streamed:
    return head_lib.normalization_constants(feature_set.training_examples()[0],
                                            feature_normalization)
  if feature_normalization != "standardize":
    return head_lib.normalization_constants(np.zeros([0, feature_set.stream.dim], np.float32),
                                            feature_normalization)
  total = np.zeros([feature_set.stream.dim], np.float64)
  squares = np.zeros_like(total)
  for features, flipped, _ in feature_set.parts():
    for rows in (features, flipped) if flipped is not None else (features,):
      total += rows.sum(axis=0, dtype=np.float64)
      squares += np.square(rows, dtype=np.float64).sum(axis=0)
  count = feature_set.num_training_examples
  mean = total / count
  std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
  return head_lib.standardization_constants(mean, std)


def stratified_rows(labels, max_rows, seed):
  """Sorted rows, `max_rows` of them (all when fewer), each class kept in its share.

  Each class gets its share rounded down (at least one row), and the rows left
  over go to the classes with the largest remainders.
  """
  if len(labels) <= max_rows:
    return np.arange(len(labels))
  classes, counts = np.unique(labels, return_counts=True)
  quotas = counts * max_rows / len(labels)
  taken = np.minimum(counts, np.maximum(1, np.floor(quotas))).astype(np.int64)
  by_remainder = np.argsort(-(quotas - np.floor(quotas)), kind="stable")
  for index in by_remainder[:max(0, max_rows - taken.sum())]:
    taken[index] += taken[index] < counts[index]
  rng = np.random.default_rng(seed)
  rows = [rng.permutation(np.flatnonzero(labels == label))[:take]
          for label, take in zip(classes, taken)]
  return np.sort(np.concatenate(rows))


# ---------------------------------------------------------------------------
# The backbone pass.


def extract_features(backbone, file_pattern, *, batch_size, image_size, resize_mode,
                     num_classes, num_thumbnails_per_class=16, total=None, flip=False,
                     strategy=None, progress=None):
  """Runs `backbone` over every record matching `file_pattern`, in order.

  With `flip`, also over each image's left-right mirror (`flipped_features`),
  decoded once: the mirror is taken of the batch inside the backbone's call.
  `strategy` (a MirroredStrategy, or None: the default device): each batch of
  `batch_size` images per replica runs on every replica at once; the rows come
  back in record order. `progress`: a Progress to count the images in (else
  one of `total` images is made).
  """
  replicas = strategy.num_replicas_in_sync if strategy is not None else 1
  global_batch = batch_size * replicas
  skip_counter = pipeline.SkipCounter()

  def make_batches(input_context=None):
    dataset = pipeline.make_dataset(file_pattern, global_batch, image_size=image_size,
                                    resize_mode=resize_mode, with_filenames=True,
                                    skip_counter=skip_counter)
    # Plain functions of tensors: not autograph-converted (converting costs each run's trace).
    dataset = dataset.map(tf.autograph.experimental.do_not_convert(
        lambda images, labels, names: _pad_batch(images, labels, names, global_batch)))
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
  features, flipped, labels, filenames, thumbnails, thumbnail_rows = [], [], [], [], [], []
  thumbnails_per_class = np.zeros([num_classes], np.int64)
  row = 0
  batches = iter(batches)   # its prefetch starts decoding the first batch now, while
  if strategy is None:      # the featurizer traces (once per run; a no-op after)
    featurize.get_concrete_function()
  for images, batch_labels, batch_filenames in batches:
    outputs = featurize(images)
    batch_labels = gather(batch_labels)
    kept = batch_labels >= 0   # the rest is the padding of the last batch
    batch_labels = batch_labels[kept]
    count = len(batch_labels)
    if flip:
      features.append(gather(outputs[0])[kept])
      flipped.append(gather(outputs[1])[kept])
    else:
      features.append(gather(outputs)[kept])
    labels.append(batch_labels)
    filenames.append(gather(batch_filenames)[kept])
    shown = _rows_to_show(batch_labels, thumbnails_per_class, num_thumbnails_per_class)
    if len(shown):
      thumbnails.append(_thumbnails(tf.gather(gather(images), shown)).numpy())
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


def _pad_batch(images, labels, names, batch_size):
  """The batch padded up to `batch_size` (zero images, label -1), for one fixed traced shape."""
  padding = batch_size - tf.shape(images)[0]
  padded = tf.pad(images, [[0, padding], [0, 0], [0, 0], [0, 0]])
  return (tf.ensure_shape(padded, [batch_size] + images.shape[1:].as_list()),
          tf.pad(labels, [[0, padding]], constant_values=-1), tf.pad(names, [[0, padding]]))


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


def _rows_to_show(batch_labels, shown_per_class, limit):
  """Rows of the batch that get thumbnails (the first `limit` of each class); counts them."""
  if not len(batch_labels) or shown_per_class.min() >= limit:
    return np.zeros([0], np.int64)
  same_class = batch_labels[:, None] == np.arange(len(shown_per_class))[None, :]   # [B, C]
  rank = (np.cumsum(same_class, axis=0) - 1)[np.arange(len(batch_labels)), batch_labels]
  rows = np.flatnonzero(shown_per_class[batch_labels] + rank < limit)
  np.add.at(shown_per_class, batch_labels[rows], 1)
  return rows


# ---------------------------------------------------------------------------
# The cache.


def cache_dir(feature_cache_dir=""):
  """Where feature files are cached: `feature_cache_dir`, or `$TLFRAME_CACHE_DIR/features`."""
  return feature_cache_dir or os.path.join(backbone_lib.cache_dir(), CACHE_DIRNAME)


def _absolute(path):
  """`path` made absolute when local; a URL (gs://, ram://, ...) is already."""
  return path if "://" in path else os.path.abspath(path)


def cache_key(backbone, records_dir, split, *, image_size, resize_mode,
              num_thumbnails_per_class, flip=False, storage="float32"):
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
  if storage != "float32":
    identity["storage"] = storage
  return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def entry_dir(split, key, feature_cache_dir=""):
  """The cache entry's folder: `<cache>/<split>-<key>`."""
  return os.path.join(cache_dir(feature_cache_dir), f"{split}-{key}")


def part_path(entry, index, num_parts):
  """The part of record shard `index` of `num_parts`: `<entry>/part-00003-of-00008.npz`."""
  return os.path.join(entry, f"part-{index:05d}-of-{num_parts:05d}.npz")


def will_stream(records_dir, split, output_dim, flip, max_in_memory_features):
  """Whether cached_features streams the split: known from the manifest, before any pass.

  Its features take records x output_dim float values (twice that with
  mirrors); above `max_in_memory_features` (None: no limit) they stay on disk.
  """
  shards = records.read_manifest(records_dir)["splits"][split]["shards"]
  num_values = sum(shard["records"] for shard in shards) * output_dim * (1 + flip)
  return max_in_memory_features is not None and num_values > max_in_memory_features


def cached_features(backbone, records_dir, split, *, batch_size, image_size, resize_mode,
                    num_classes, num_thumbnails_per_class=16, flip=False, feature_cache_dir="",
                    storage="float32", max_in_memory_features=None, strategy=None,
                    worker=(0, 1)):
  """The split's FeatureSet from the cache parts whose key matches; missing parts extracted.

  `flip`: the set also holds the mirrored images' features (one cache entry
  holding both, keyed apart from the entry without them). `feature_cache_dir`:
  the cache folder, on any TensorFlow filesystem (default: `cache_dir()`).
  `storage`: float32 or float16 on disk. `max_in_memory_features`: above this
  many float values (rows x dim, mirrors included) the set is streamed, not
  loaded (None: no limit). `strategy`: a MirroredStrategy whose replicas
  split each batch (distribution.extraction_strategy), or None. `worker`:
  (index, count) of this process among the workers sharing the cache
  (distribution.worker_index_and_count): it extracts the parts of shards
  index, index + count, ..., then reads the others' as they appear.
  """
  if storage not in STORAGES:
    raise ValueError(f"storage {storage!r} is not one of {STORAGES}")
  key = cache_key(backbone, records_dir, split, image_size=image_size,
                  resize_mode=resize_mode, num_thumbnails_per_class=num_thumbnails_per_class,
                  flip=flip, storage=storage)
  entry = entry_dir(split, key, feature_cache_dir)
  shards = records.read_manifest(records_dir)["splits"][split]["shards"]
  if not shards:
    raise UserError(f"{records_dir} has no {split} records: nothing to extract")
  paths = [part_path(entry, index, len(shards)) for index in range(len(shards))]
  streamed = will_stream(records_dir, split, backbone.output_dim, flip, max_in_memory_features)
  worker_index, num_workers = worker
  task = f"worker {worker_index} of {num_workers}"
  mine = [index for index in range(len(shards)) if index % num_workers == worker_index]
  others = [index for index in range(len(shards)) if index % num_workers != worker_index]
  start = time.monotonic()
  extracted = []

  def extract(index, progress):
    if not extracted:  # a damaged shard stops the run here, named, not deep inside tf.data
      records.check_shards(records_dir, split)
    extracted.append(index)
    part = extract_features(
        backbone, os.path.join(records_dir, shards[index]["name"]), batch_size=batch_size,
        image_size=image_size, resize_mode=resize_mode, num_classes=num_classes,
        num_thumbnails_per_class=num_thumbnails_per_class, flip=flip, strategy=strategy,
        progress=progress)
    logging.info("Backbone pass over %s (part %d of %d of the %s features, by %s): %d images "
                 "decoded, %d skipped, in %.1f s", shards[index]["name"], index + 1, len(shards),
                 split, task, len(part.labels), part.skipped,
                 part.extract_seconds)
    data = _part_data(part, storage, task)
    try:
      tf.io.gfile.makedirs(entry)
      _write_part(paths[index], data)
    except (OSError, tf.errors.OpError) as e:
      reason = getattr(e, "message", None) or e
      if streamed or num_workers > 1:
        raise UserError(
            f"cannot write {paths[index]} ({reason}): the {split} features must be in the cache "
            f"({'they stream from it' if streamed else 'the other workers read it'}); free space "
            "or give a writable --feature_cache_dir") from None
      # The features are in memory: this run goes on, only later ones pay the pass again.
      logging.warning("Could not cache the %s features in %s (%s): continuing without the "
                      "cache", split, paths[index], reason)
    return data

  def get(index, progress):
    data = read_part(paths[index]) if tf.io.gfile.exists(paths[index]) else None
    return data if data is not None else extract(index, progress)

  missing = [index for index in mine if not tf.io.gfile.exists(paths[index])]
  if missing:
    logging.info("Backbone pass over the %s records (%s): %d of %d parts to extract here", split,
                 backbone, len(missing), len(shards))
  progress = Progress(sum(shards[index]["records"] for index in missing), what="images")
  parts = {index: _kept(get(index, progress), streamed) for index in mine}
  for index in others:
    _wait_for(paths[index], f"another worker's part of the {split} features")
    parts[index] = _kept(get(index, progress), streamed)
  feature_set = _joined([parts[index] for index in range(len(shards))], backbone.output_dim,
                        flip, num_thumbnails_per_class, num_classes)
  feature_set.from_cache = not extracted
  feature_set.extract_seconds = time.monotonic() - start
  if streamed:
    feature_set.stream = Stream(paths=tuple(paths), rows=tuple(len(parts[index]["labels"])
                                                               for index in range(len(shards))),
                                dim=backbone.output_dim, flip=flip)
  where = "streamed from the cache" if streamed else "in memory"
  if extracted:
    logging.info("%s features: %d x %d (%d of %d parts extracted here), %s, in %.1f s", split,
                 len(feature_set.labels), backbone.output_dim, len(extracted), len(shards),
                 where, feature_set.extract_seconds)
  else:
    logging.info("Loaded cached %s features from %s: skipping the backbone pass (%d x %d, %s)",
                 split, entry, len(feature_set.labels), backbone.output_dim, where)
  return feature_set


def _wait_for(path, what):
  """Returns when `path` exists; says so every _WAIT_LOG_S seconds meanwhile."""
  since = logged = time.monotonic()
  while not tf.io.gfile.exists(path):
    if time.monotonic() - logged > _WAIT_LOG_S:
      logging.info("Waiting %.0f s for %s (%s)", time.monotonic() - since, path, what)
      logged = time.monotonic()
    time.sleep(_WAIT_POLL_S)


def _part_data(part, storage, task):
  """A part's arrays as written (features in `storage`) and as read back."""
  data = dict(features=part.features.astype(storage), labels=part.labels,
              filenames=part.filenames, thumbnails=part.thumbnails,
              thumbnail_rows=part.thumbnail_rows, skipped=np.int64(part.skipped),
              extracted_by=np.str_(task))
  if part.flipped_features is not None:
    data["flipped_features"] = part.flipped_features.astype(storage)
  return data


def _kept(data, streamed):
  """The part as this run keeps it: features float32, or none when the set is streamed."""
  kept = dict(data)
  for name in ("features", "flipped_features"):
    if name in kept:
      if streamed:
        del kept[name]
      else:
        kept[name] = kept[name].astype(np.float32)
  return kept


def _joined(parts, dim, flip, num_thumbnails_per_class, num_classes):
  """One FeatureSet of the parts in order (no features when they were not kept)."""
  offsets = np.cumsum([0] + [len(part["labels"]) for part in parts])
  labels = np.concatenate([part["labels"] for part in parts]).astype(np.int32)
  thumbnail_rows = np.concatenate([part["thumbnail_rows"] + offset
                                   for part, offset in zip(parts, offsets)]).astype(np.int64)
  thumbnails = np.concatenate([part["thumbnails"] for part in parts])
  # Each part holds the first few of each class in it; the set keeps the first overall.
  shown = _rows_to_show(labels[thumbnail_rows], np.zeros([num_classes], np.int64),
                        num_thumbnails_per_class)
  in_memory = "features" in parts[0]

  def features_of(name):
    return (np.concatenate([part[name] for part in parts]).reshape(-1, dim)
            .astype(np.float32))

  return FeatureSet(
      features=features_of("features") if in_memory else None,
      flipped_features=features_of("flipped_features") if in_memory and flip else None,
      labels=labels, filenames=np.concatenate([part["filenames"] for part in parts]).astype(str),
      thumbnails=thumbnails[shown], thumbnail_rows=thumbnail_rows[shown],
      skipped=int(sum(part["skipped"] for part in parts)))


def _write_part(path, data):
  buffer = io.BytesIO()
  np.savez(buffer, **data)
  fileio.atomic_write_bytes(path, buffer.getvalue())


def read_part(path):
  """The arrays of the cache part `path` (features float32), or None (logged) if unreadable."""
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      with np.load(io.BytesIO(f.read()), allow_pickle=False) as data:
        part = {name: data[name] for name in data.files}
    for name in ("features", "flipped_features"):
      if name in part:
        part[name] = part[name].astype(np.float32)
    part["skipped"] = int(part["skipped"])
    part["extracted_by"] = str(part["extracted_by"])
    if len(part["features"]) != len(part["labels"]):
      raise ValueError(f"{len(part['features'])} feature rows for {len(part['labels'])} labels")
    return part
  # Whatever a truncated, emptied or overwritten file raises (np.load of a
  # damaged zip: BadZipFile, a CRC error, EOFError, ...): the part is redone.
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, tf.errors.OpError) as e:
    logging.warning("Ignoring unreadable feature cache %s (%s: %s): recomputing", path,
                    type(e).__name__, e)
    return None
