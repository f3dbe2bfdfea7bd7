"""Writing one shard, resumably: the temporary name, the sidecar, the rename.

A shard is written under a temporary name, its sidecar (record count, sha256,
per-file results) next, and only then is the shard renamed into place; a rerun
reads the sidecars (`read_sidecar`) and skips finished shards. Both the local
converter and the Beam pipeline write shards with `write_shard`.
"""

import collections
import json
import posixpath

from absl import logging
import tensorflow as tf

from tlframe import imageformat
from tlframe.records import example_format
from tlframe.errors import UserError
from tlframe.records.integrity import file_sha256
from tlframe.records.layout import (LABELS_FILENAME, MANIFEST_FILENAME, SPLITS, join_path,
                                    read_manifest, split_file_pattern)
from tlframe.util import fileio

# Per-shard sidecars that make a killed run resumable; kept so a rerun of a
# finished conversion is a quick no-op.
PROGRESS_DIRNAME = ".make_tfrecords"
# In PROGRESS_DIRNAME: every shard name a conversion may have put in place here,
# written before the first rename, so that a later run removes those and no other.
SHARDS_WRITTEN_FILENAME = "shards_written.json"
Shard = collections.namedtuple("Shard", "split name sources fingerprint")


def progress_path(output_dir, name):
  """`name` in `output_dir`'s folder of conversion state (sidecars; kept for resuming)."""
  return join_path(join_path(output_dir, PROGRESS_DIRNAME), name)


def sidecar_path(output_dir, shard_name):
  """Where `write_shard` puts the sidecar of shard `shard_name`."""
  return progress_path(output_dir, shard_name + ".json")


def read_sidecar(output_dir, shard):
  """The sidecar `write_shard` wrote for `shard` with this same plan, else None."""
  path = sidecar_path(output_dir, shard.name)
  if not tf.io.gfile.exists(path):
    return None
  try:
    sidecar = fileio.read_json(path)
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None
  return sidecar if sidecar.get("fingerprint") == shard.fingerprint else None


def finished_shard(output_dir, shard):
  """The sidecar of a shard a previous run completed with this same plan, else None."""
  shard_path = join_path(output_dir, shard.name)
  if not tf.io.gfile.exists(shard_path):
    return None
  sidecar = read_sidecar(output_dir, shard)
  if sidecar is None or sidecar.get("sha256") != file_sha256(shard_path):
    return None
  return sidecar


def write_shard(output_dir, shard, results, labels):
  """Writes one shard: temp file, sidecar, then rename; returns the sidecar.

  `results` yields `convert_image`'s result for each of `shard.sources`, in
  their order. Writing a shard twice (a retried worker) gives the same bytes.
  """
  label_index = {label: i for i, label in enumerate(labels)}
  shard_path = join_path(output_dir, shard.name)
  temp_path = fileio.temp_path_for(shard_path)
  files, skipped = [], []
  with tf.io.TFRecordWriter(temp_path) as writer:
    # Sources first: zip stops there without taking the next shard's first result.
    for source, result in zip(shard.sources, results):
      if result["encoded"] is None:
        logging.warning("Skipping %s: %s", source.path, result["reason"])
        # No sha256 of a skipped file: it may be anything a list named (/etc/shadow).
        skipped.append({"path": source.key, "label": source.label, "reason": result["reason"]})
        continue
      example = example_format.make_example(result["encoded"], result["format"],
                                         label_index[source.label], source.label, source.key,
                                         result["height"], result["width"])
      writer.write(example.SerializeToString(deterministic=True))
      files.append({"path": source.key, "label": source.label, "sha256": result["sha256"],
                    "reencoded": result["reencoded"]})
  sidecar = {"fingerprint": shard.fingerprint, "split": shard.split, "records": len(files),
             "sha256": file_sha256(temp_path), "files": files, "skipped": skipped}
  fileio.atomic_write_json(sidecar_path(output_dir, shard.name), sidecar)
  tf.io.gfile.rename(temp_path, shard_path, overwrite=True)
  return sidecar


def remove_stale_outputs(output_dir, shards):
  """Makes `output_dir` hold only what this conversion plans, before it writes anything.

  The old manifest and labels go first, so that a run killed from here on
  leaves no manifest describing shards that are not there. Then temp files of
  killed runs, and shards (with their sidecars) this conversion does not
  write, but only those an earlier conversion wrote (its sidecars or its
  manifest list them): a file a user put there, even one named like a shard,
  stays (`check_shards` names it before training reads it).
  """
  written = shards_written_before(output_dir)
  for name in (MANIFEST_FILENAME, LABELS_FILENAME):
    if tf.io.gfile.exists(join_path(output_dir, name)):
      tf.io.gfile.remove(join_path(output_dir, name))
  planned = {shard.name for shard in shards}
  progress_dir = join_path(output_dir, PROGRESS_DIRNAME)
  for split in SPLITS:
    for path in tf.io.gfile.glob(split_file_pattern(output_dir, split)):
      name = posixpath.basename(path)
      if name in planned:
        continue
      if name in written:
        logging.info("Removing %s: not part of this conversion", path)
        tf.io.gfile.remove(path)
      else:
        logging.warning("Keeping %s: named like a shard, but no conversion here wrote it "
                        "(training refuses a shard the manifest does not list)", path)
    for path in tf.io.gfile.glob(join_path(progress_dir, f"{split}-*.json")):
      if posixpath.basename(path)[:-len(".json")] not in planned:
        tf.io.gfile.remove(path)
  fileio.atomic_write_json(progress_path(output_dir, SHARDS_WRITTEN_FILENAME), sorted(planned))
  remove_temp_files(output_dir)


def shards_written_before(output_dir):
  """The names of the shards earlier conversions in `output_dir` may have put in place.

  Their SHARDS_WRITTEN_FILENAME lists them (a sidecar is removed when its
  shard must be rewritten, and a killed run leaves no manifest); the sidecars
  and the manifest too, for folders converted before that file existed.
  """
  names = {posixpath.basename(path)[:-len(".json")]
           for split in SPLITS for path in tf.io.gfile.glob(
               join_path(join_path(output_dir, PROGRESS_DIRNAME), f"{split}-*.json"))}
  for read in (lambda: fileio.read_json(progress_path(output_dir, SHARDS_WRITTEN_FILENAME)),
               lambda: [shard["name"] for info in read_manifest(output_dir)["splits"].values()
                        for shard in info["shards"]]):
    try:
      names.update(name for name in read() if isinstance(name, str))
    except (UserError, tf.errors.OpError, ValueError, KeyError, TypeError, AttributeError):
      pass  # none, or not readable: the others say
  return names


def remove_temp_files(output_dir):
  """Removes the temp files of shards, sidecars, labels and manifest (fileio's `.name.tmp-*`).

  Only the lock holder runs this, so no other run's temp file is in the way.
  """
  progress_dir = join_path(output_dir, PROGRESS_DIRNAME)
  for path in (tf.io.gfile.glob(join_path(output_dir, ".*.tmp-*"))
               + tf.io.gfile.glob(join_path(progress_dir, ".*.tmp-*"))):
    tf.io.gfile.remove(path)


def write_error(error, output_dir, num_finished):
  """The one line for a write that failed (disk full, read-only, permissions); it cites the
  argument output_dir."""
  if isinstance(error, tf.errors.OpError):
    cause = imageformat.op_error_text(error)
  else:
    cause = f"{error.filename}: {error.strerror}" if error.filename else str(error)
  return (f"output_dir={output_dir}: cannot write ({cause}); free space or fix permissions "
          f"there, then rerun the same command: the {num_finished} finished shards are kept")


