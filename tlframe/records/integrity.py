"""Checking a finished records directory's shards before training reads them.

`check_shards` compares every shard of a split with the record count and
sha256 its sidecar recorded at conversion, and names the first damaged one
with the fix, so that a truncated copy fails at start-up rather than hours in.
"""

import hashlib

import tensorflow as tf

from tlframe.errors import UserError
from tlframe.records.layout import (MANIFEST_FILENAME, check_split, join_path, read_manifest,
                                    split_file_pattern)

# A TFRecord's framing around its data: length (8 bytes) and two CRCs (4 each).
_TFRECORD_FRAMING_BYTES = 16


def check_shards(records_dir, split):
  """Verifies a split's shards against the manifest; returns their paths.

  Every shard the manifest lists must be there with the sha256 make_tfrecords
  wrote, and no other shard may match the split's pattern (the pipeline would
  read it). A damaged shard (flipped bytes, truncated) is a UserError naming
  it, the byte offset of its first bad record, and the fix: rerunning
  make_tfrecords with the same flags rewrites exactly the damaged shards,
  byte-identical. Training must not go on without one: its images would be
  silently missing from the model and its metrics. Reads every shard once.
  """
  check_split(split)
  manifest = read_manifest(records_dir)
  listed = manifest["splits"][split]["shards"]
  fix = "rerun make_tfrecords with the same flags to rewrite it"
  unlisted = sorted(set(tf.io.gfile.glob(split_file_pattern(records_dir, split)))
                    - {join_path(records_dir, shard["name"]) for shard in listed})
  if unlisted:
    raise UserError(f"{unlisted[0]}: a {split} shard that {MANIFEST_FILENAME} does not list; "
                    f"remove it, or {fix.replace(' it', ' the directory')}")
  paths = []
  for shard in listed:
    path = join_path(records_dir, shard["name"])
    if not tf.io.gfile.exists(path):
      raise UserError(f"{path}: missing; {fix}")
    if file_sha256(path) != shard["sha256"]:
      raise UserError(f"{path}: {_first_damage(path, shard['records'])}; {fix} "
                      "(only damaged shards are rewritten)")
    paths.append(path)
  return paths


def _first_damage(path, expected_records):
  """Where a shard whose sha256 is wrong goes bad, in words."""
  offset = count = 0
  try:
    for record in tf.data.TFRecordDataset(path):
      offset += len(record.numpy()) + _TFRECORD_FRAMING_BYTES
      count += 1
  except tf.errors.DataLossError as e:
    what = "truncated" if "truncated" in e.message else "corrupt"
    return f"{what} record at byte offset {offset} (record {count + 1} of {expected_records})"
  if count != expected_records:
    return f"holds {count} records where the manifest says {expected_records}"
  return "its bytes are not the ones make_tfrecords wrote (sha256 differs from the manifest)"


def file_sha256(path):
  """The hex sha256 of a file, read in 1 MiB chunks."""
  digest = hashlib.sha256()
  with tf.io.gfile.GFile(path, "rb") as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


