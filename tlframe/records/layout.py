"""A records directory's layout: shard names, labels.txt and manifest.json.

What every reader of converted records needs (the pipeline's callers,
training, evaluation, export), apart from the converter that writes them
(tlframe.records.converter): `split_file_pattern` finds a split's shards,
`read_labels` the class names, `read_manifest` what a conversion recorded.
"""

import json
import os
import unicodedata

import tensorflow as tf

from tlframe.errors import UserError
from tlframe.util import fileio

SPLITS = ("train", "validation", "test")
LABELS_FILENAME = "labels.txt"
MANIFEST_FILENAME = "manifest.json"
# 2: upright sizes (EXIF orientation), skipped files carry their label, not their sha256.
MANIFEST_VERSION = 2


def split_file_pattern(records_dir, split):
  """The glob matching one split's shards, e.g. `<dir>/train-*-of-*.tfrecord`."""
  check_split(split)
  return join_path(records_dir, f"{split}-*-of-*.tfrecord")


def shard_filename(split, index, num_shards):
  return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def read_label_lines(path):
  """The class names of a labels file in order: one per line, exactly as written.

  UTF-8 (a byte-order mark is ignored). Lines end at "\\n" alone (a trailing
  "\\r" is dropped), so a name keeps every character a class name may hold
  (`check_class_name`): U+2028 and spaces at either end included. Blank lines
  are skipped: no class name is blank.
  """
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      data = f.read()
  except tf.errors.NotFoundError:
    raise UserError(f"{path}: no such labels file") from None
  return [line for line in text_lines(data, path) if line.strip()]


def text_lines(data, origin, arguments=()):
  """The lines of a UTF-8 text file's bytes, as spreadsheets and editors save them.

  A byte-order mark is dropped ("CSV UTF-8"); lines end at "\n" alone, a
  trailing "\r" dropped (CRLF): not at str.splitlines' other breaks (U+2028,
  U+0085, ...), which a file or class name may hold. `origin` names the file in
  a message; `arguments` are the argument names it cites (errors.UserError).
  """
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise UserError(f"{origin}: not UTF-8 text (byte {e.start}); save it as UTF-8",
                    arguments=arguments) from None
  return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def check_class_name(name, origin, arguments=()):
  """UserError unless `name` can be a class: one labels.txt line that reads back as itself.

  `origin` says where the name came from (a file, an argument) for the message;
  `arguments` are the argument names it cites (errors.UserError).
  """
  if not name.strip():
    raise UserError(f"{origin}: class name {name!r} is blank; give the class a name",
                    arguments=arguments)
  for char in name:
    category = unicodedata.category(char)
    if category in ("Cc", "Cs"):  # control characters; undecodable bytes in a file name
      what = "a control character" if category == "Cc" else "bytes that are not UTF-8"
      raise UserError(f"{origin}: class name {name!r} contains {what} (U+{ord(char):04X}), "
                      "which labels.txt cannot hold; rename it", arguments=arguments)


def labels_from_spec(spec):
  """Class names from a comma-separated list or a labels file's path; None for none."""
  if not spec:
    return None
  if "," not in spec and tf.io.gfile.exists(spec):
    return read_label_lines(spec)
  return [label.strip() for label in spec.split(",") if label.strip()]


def read_labels(records_dir):
  """The class names of a records directory, in label-index order (its labels.txt)."""
  path = join_path(records_dir, LABELS_FILENAME)
  if not tf.io.gfile.exists(path):
    raise UserError(f"{path}: not found; is {records_dir} a make_tfrecords output directory?")
  return read_label_lines(path)


def write_labels(directory, labels):
  """`directory`/labels.txt: the class names in label-index order, one per line (atomic).

  `read_labels` gives back exactly `labels`; a name it could not is a UserError.
  """
  path = join_path(directory, LABELS_FILENAME)
  for label in labels:
    check_class_name(label, path)
  fileio.atomic_write_text(path, "".join(f"{label}\n" for label in labels))


def read_manifest(records_dir):
  """The manifest make_tfrecords wrote into `records_dir`, as a dict."""
  path = join_path(records_dir, MANIFEST_FILENAME)
  if not tf.io.gfile.exists(path):
    raise UserError(f"{path}: not found; is {records_dir} a make_tfrecords output directory "
                    "(or did the conversion not finish? rerun it)")
  try:
    manifest = fileio.read_json(path)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: corrupt manifest ({e}); rerun make_tfrecords") from None
  if not isinstance(manifest, dict) or "splits" not in manifest:
    raise UserError(f"{path}: not a make_tfrecords manifest; rerun make_tfrecords")
  return manifest


def count_examples(records_dir, split):
  """How many records the split holds, from the manifest."""
  check_split(split)
  return read_manifest(records_dir)["splits"][split]["examples"]


def check_split(split):
  """Raises a UserError naming the splits unless `split` is one of them."""
  if split not in SPLITS:
    raise UserError(f"split {split!r} is not one of {', '.join(SPLITS)}")


def is_remote(path):
  """Whether `path` is on a TF filesystem (gs://, s3://, ...) rather than a local disk."""
  return "://" in path


def join_path(directory, name):
  """`directory`/`name` for local and TF filesystem paths alike."""
  if is_remote(directory):
    return directory.rstrip("/") + "/" + name
  return os.path.join(directory, name)


