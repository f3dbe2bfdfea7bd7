"""Atomic writes through tf.io.gfile, so local paths, gs:// and other TF filesystems work.

A reader never sees a half-written file: data goes to a temporary name in the
same directory and is renamed over the target when complete.
"""

import json
import math
import os
import uuid

import tensorflow as tf


def temp_path_for(path):
  """A unique temporary sibling of `path` (same directory, so rename is atomic)."""
  directory, name = os.path.split(path)
  return os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex[:12]}")


def atomic_write_bytes(path, data):
  """Writes `data` to `path` atomically; on any failure (disk full, read-only) no temp stays."""
  tmp = temp_path_for(path)
  try:
    with tf.io.gfile.GFile(tmp, "wb") as f:
      f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)
  except BaseException:
    try:
      tf.io.gfile.remove(tmp)
    except tf.errors.OpError:
      pass  # never created, or the filesystem refuses even that
    raise


def atomic_write_text(path, text):
  atomic_write_bytes(path, text.encode("utf-8"))


def finite_or_none(obj):
  """`obj` with every NaN or infinite float replaced by None, recursively.

  Python's json writes NaN and Infinity, which are not JSON: other readers
  (jq, browsers, JSON.parse) reject the whole file.
  """
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {key: finite_or_none(value) for key, value in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_or_none(value) for value in obj]
  return obj


def atomic_write_json(path, obj):
  """`obj` as strict JSON (non-finite floats become null), written atomically."""
  text = json.dumps(finite_or_none(obj), indent=2, sort_keys=True, allow_nan=False)
  atomic_write_text(path, text + "\n")


def read_json(path):
  with tf.io.gfile.GFile(path, "r") as f:
    return json.load(f)
