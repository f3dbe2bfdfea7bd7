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

Distributed (`cached_features(strategy=..., worker=...)`): under a
MirroredStrategy each part's pass is split across the replicas
(`extraction.extract_features`); under multi-worker, worker i extracts the
parts of shards i, i + M, ... (M workers) into the shared cache, then reads
the others' parts as they appear. The features equal the one-device pass's
(within float tolerance, same order), so the key does not depend on the
strategy.

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


def cached_features(backbone, records_dir, split, *, batch_size, image_size, resize_mode,
                    num_classes, num_thumbnails_per_class=16, flip=False, feature_cache_dir="",
                    storage="float32", max_in_memory_features=None, strategy=None,
                    worker=(0, 1)):
  """The split's FeatureSet from the cache parts whose key matches; missing parts extracted.

  `flip`: the set also holds the mirrored images' features (one cache entry
  holding both, keyed apart from the entry without them). `feature_cache_dir`:
  the cache folder, on any TensorFlow filesystem (default: `feature_cache_dir()`).
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
    part = extraction.extract_features(
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
            "or give a writable feature_cache_dir", arguments=["feature_cache_dir"]) from None
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
