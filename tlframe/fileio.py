"""Atomic writes through tf.io.gfile, so local paths, gs:// and other TF filesystems work.

A reader never sees a half-written file: data goes to a temporary name in the
same directory and is renamed over the target when complete.
"""

import json
import os
import uuid

import tensorflow as tf


def temp_path_for(path):
  """A unique temporary sibling of `path` (same directory, so rename is atomic)."""
  directory, name = os.path.split(path)
  return os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex[:12]}")


def atomic_write_bytes(path, data):
  tmp = temp_path_for(path)
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(data)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def atomic_write_text(path, text):
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path):
  with tf.io.gfile.GFile(path, "r") as f:
    return json.load(f)
