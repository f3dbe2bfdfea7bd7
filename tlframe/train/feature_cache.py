"""The feature cache: a split's backbone pass kept on disk, one file per record shard.

The backbone pass is nearly all of a cached-features training run, so its
result is kept in a cache shared by every model dir: the entry
`<cache>/<split>-<key>/` (`feature_cache_dir()`: the `feature_cache_dir`
argument, default `$TLFRAME_CACHE_DIR/features`, on any tf.io.gfile
filesystem: gs://, ram://, ...) holds `part-00003-of-00008.npz` for record shard 3 of 8. The key digests
what the features depend on: the backbone's `cache_key` (module, size, kind,
precision), the record shards (path, size, modification time), the labels,
image size, resize mode and storage type. A rerun with other head settings, or
a run into another model dir on the same records, finds the parts and skips
the backbone; changing the records or the backbone changes the key. Each part
is written atomically, so a killed run, or a worker that dies, leaves whole
parts only, and the next run redoes just the missing ones; two processes
filling the same part at once are safe (the last rename wins, with the same
content). An unreadable part is logged with its path and recomputed.
`cached_feature_sets` gets several splits at once: the parts missing from all
of them go through one backbone pass (bin/train's train, validation and test).

Distributed (`cached_feature_sets(strategy=..., worker=...)`): under a
MirroredStrategy each batch of the pass is split across the replicas
(`extraction.extract_features`); under multi-worker, worker i extracts the
parts of each split's shards i, i + M, ... (M workers) into the shared cache,
then reads the others' parts as they appear. The features equal the
one-device pass's (within float tolerance, same order), so the key does not
depend on the strategy.

Beyond memory: a split whose features exceed `max_in_memory_features` float
values is not loaded; its FeatureSet's features stay in the parts (`Stream`).
`storage="float16"` halves the cache; features are float32 again when read.
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

from tlframe.backbone import loading as backbone_lib
from tlframe.util import fileio
from tlframe.train import extraction
from tlframe.train import features as features_lib
from tlframe import options as options_lib
from tlframe import records
from tlframe.errors import UserError
from tlframe.util.progress import Progress

CACHE_DIRNAME = "features"
STORAGES = options_lib.FEATURE_STORAGES
# Bump when the file layout changes so old caches are recomputed, not misread.
# 2: one file per record shard in a folder per entry.
_FORMAT_VERSION = 2
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

  def parts(self):
    """(features, flipped or None, labels) of each part, read in order."""
    for path in self.paths:
      part = read_part(path)
      yield part["features"], part.get("flipped_features"), part["labels"]


def feature_cache_dir(option=""):
  """The feature cache's folder: `option` (the feature_cache_dir option), else
  `$TLFRAME_CACHE_DIR/features`."""
  return option or os.path.join(backbone_lib.cache_root(), CACHE_DIRNAME)


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
                  thumbnail_size=features_lib.THUMBNAIL_SIZE)
  if flip:  # only then, so entries without mirrors keep their keys
    identity["flip"] = True
  if storage != "float32":
    identity["storage"] = storage
  return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def entry_dir(split, key, option=""):
  """The cache entry's folder: `<cache>/<split>-<key>`, `<cache>` being `feature_cache_dir(option)`."""
  return os.path.join(feature_cache_dir(option), f"{split}-{key}")


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


def cached_features(backbone, records_dir, split, **kwargs):
  """The split's FeatureSet: `cached_feature_sets` of that one split."""
  return cached_feature_sets(backbone, records_dir, [split], **kwargs)[split]


def cached_feature_sets(backbone, records_dir, splits, *, batch_size, image_size, resize_mode,
                        num_classes, num_thumbnails_per_class=16, flip=False,
                        feature_cache_dir="", storage="float32", max_in_memory_features=None,
                        strategy=None, worker=(0, 1)):
  """{split: FeatureSet} of `splits`, from the cache parts whose key matches.

  The missing parts of all the splits are extracted in one backbone pass
  (`extraction.extract_features` over their record shards: a few photos in
  two splits fill one batch, and the pass is set up once). `flip`: the sets
  also hold the mirrored images' features (one cache entry holding both,
  keyed apart from the entry without them). `feature_cache_dir`: the cache
  folder, on any TensorFlow filesystem (default: `feature_cache_dir()`).
  `batch_size`: images per batch (per replica), at most; the pass takes as
  many batches as that needs, equally full (`balanced_batch_size`).
  `storage`: float32 or float16 on disk. `max_in_memory_features`: above this
  many float values (rows x dim, mirrors included) a set is streamed, not
  loaded (None: no limit). `strategy`: a MirroredStrategy whose replicas
  split each batch (distribution.extraction_strategy), or None. `worker`:
  (index, count) of this process among the workers sharing the cache
  (distribution.worker_index_and_count): of each split it extracts the parts
  of shards index, index + count, ..., then reads the others' as they appear.
  Each set's `extract_seconds` is the time of this whole call.
  """
  if storage not in STORAGES:
    raise ValueError(f"storage {storage!r} is not one of {STORAGES}")
  manifest_splits = records.read_manifest(records_dir)["splits"]
  shards, paths, streamed = {}, {}, {}
  for split in splits:
    key = cache_key(backbone, records_dir, split, image_size=image_size,
                    resize_mode=resize_mode, num_thumbnails_per_class=num_thumbnails_per_class,
                    flip=flip, storage=storage)
    entry = entry_dir(split, key, feature_cache_dir)
    shards[split] = manifest_splits[split]["shards"]
    if not shards[split]:
      raise UserError(f"{records_dir} has no {split} records: nothing to extract")
    paths[split] = [part_path(entry, index, len(shards[split]))
                    for index in range(len(shards[split]))]
    streamed[split] = will_stream(records_dir, split, backbone.output_dim, flip,
                                  max_in_memory_features)
  worker_index, num_workers = worker
  task = f"worker {worker_index} of {num_workers}"
  start = time.monotonic()
  parts = {}        # (split, shard index) -> the part's arrays as kept
  extracted = []    # the (split, shard index) of the parts extracted here

  def extract(wanted):
    """Extracts the parts `wanted` in one pass; writes and keeps them."""
    if not wanted:
      return
    for split in sorted({split for split, _ in wanted}):
      # A damaged shard stops the run here, named, not deep inside tf.data.
      records.check_shards(records_dir, split)
    logging.info("Backbone pass over the %s records (%s): %d part(s) to extract here",
                 " and ".join(sorted({split for split, _ in wanted})), backbone, len(wanted))
    num_records = sum(shards[split][index]["records"] for split, index in wanted)
    extracted_sets = extraction.extract_features(
        backbone, [os.path.join(records_dir, shards[split][index]["name"])
                   for split, index in wanted],
        batch_size=balanced_batch_size(num_records, batch_size,
                                       strategy.num_replicas_in_sync if strategy else 1),
        image_size=image_size, resize_mode=resize_mode, num_classes=num_classes,
        num_thumbnails_per_class=num_thumbnails_per_class, flip=flip, strategy=strategy,
        progress=Progress(num_records, what="images"))
    for (split, index), part in zip(wanted, extracted_sets):
      logging.info("Backbone pass over %s (part %d of %d of the %s features, by %s): %d images "
                   "decoded, %d skipped, in %.1f s (the pass)", shards[split][index]["name"],
                   index + 1, len(shards[split]), split, task, len(part.labels), part.skipped,
                   part.extract_seconds)
      data = _part_data(part, storage, task)
      _write_extracted(paths[split][index], data, split,
                       streamed[split] or num_workers > 1,
                       "they stream from it" if streamed[split] else "the other workers read it")
      parts[split, index] = _kept(data, streamed[split])
      extracted.append((split, index))

  def read(split, index):
    """Keeps the part when its file reads; returns whether it did."""
    path = paths[split][index]
    data = read_part(path) if tf.io.gfile.exists(path) else None
    if data is not None:
      parts[split, index] = _kept(data, streamed[split])
    return data is not None

  mine = [(split, index) for split in splits for index in range(len(shards[split]))
          if index % num_workers == worker_index]
  extract([part for part in mine if not read(*part)])
  for split in splits:
    for index in range(len(shards[split])):
      if (split, index) not in parts:   # another worker's
        _wait_for(paths[split][index], f"another worker's part of the {split} features")
        if not read(split, index):
          extract([(split, index)])

  seconds = time.monotonic() - start
  feature_sets = {}
  for split in splits:
    count = len(shards[split])
    feature_set = _joined([parts[split, index] for index in range(count)],
                          backbone.output_dim, flip, num_thumbnails_per_class, num_classes)
    extracted_here = [index for extracted_split, index in extracted if extracted_split == split]
    feature_set.from_cache = not extracted_here
    feature_set.extract_seconds = seconds
    if streamed[split]:
      feature_set.stream = Stream(paths=tuple(paths[split]), rows=tuple(
          len(parts[split, index]["labels"]) for index in range(count)),
                                  dim=backbone.output_dim, flip=flip)
    where = "streamed from the cache" if streamed[split] else "in memory"
    if extracted_here:
      logging.info("%s features: %d x %d (%d of %d parts extracted here), %s", split,
                   len(feature_set.labels), backbone.output_dim, len(extracted_here), count,
                   where)
    else:
      logging.info("Loaded cached %s features from %s: skipping the backbone pass (%d x %d, "
                   "%s)", split, os.path.dirname(paths[split][0]), len(feature_set.labels),
                   backbone.output_dim, where)
    feature_sets[split] = feature_set
  return feature_sets


def balanced_batch_size(num_images, batch_size, replicas=1):
  """The per-replica batch of a pass over `num_images`: as many batches as `batch_size` needs,
  each as full as the others, so the last one is padded by fewer than one image per batch.

  A few photos take one batch of their number, not one padded to a full batch;
  70 images at 32 take 3 batches of 24 (72 images through the backbone), not 96.
  """
  per_replica = -(-num_images // replicas)
  num_batches = -(-per_replica // batch_size)
  return max(1, -(-per_replica // max(1, num_batches)))


def _write_extracted(path, data, split, required, why_required):
  """Writes an extracted part into the cache; a failure stops the run only when the part is
  `required` there (`why_required` says why), else it is logged and the run goes on."""
  try:
    tf.io.gfile.makedirs(os.path.dirname(path))
    _write_part(path, data)
  except (OSError, tf.errors.OpError) as e:
    reason = getattr(e, "message", None) or e
    if required:
      raise UserError(
          f"cannot write {path} ({reason}): the {split} features must be in the cache "
          f"({why_required}); free space or give a writable feature_cache_dir",
          arguments=["feature_cache_dir"]) from None
    # The features are in memory: this run goes on, only later ones pay the pass again.
    logging.warning("Could not cache the %s features in %s (%s): continuing without the "
                    "cache", split, path, reason)


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
  shown = extraction.rows_to_show(labels[thumbnail_rows], np.zeros([num_classes], np.int64),
                                  num_thumbnails_per_class)
  in_memory = "features" in parts[0]

  def features_of(name):
    return (np.concatenate([part[name] for part in parts]).reshape(-1, dim)
            .astype(np.float32))

  return features_lib.FeatureSet(
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
