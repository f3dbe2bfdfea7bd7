"""Atomic writes through tf.io.gfile, so local paths, gs:// and other TF filesystems work.

A reader never sees a half-written file: data goes to a temporary name in the
same directory and is renamed over the target when complete.

Every path a user gives may be local or on any filesystem tf.io.gfile knows
(gs://, s3:// and hdfs:// with tensorflow-io, ram://). What rename means there:
- local disks and HDFS rename a file or a whole directory atomically;
- object stores (gs://, s3://) have no rename: TensorFlow copies the object and
  deletes the source, so a reader may see the old or the new file but never a
  half-written one (an object appears only when complete), and a directory
  "rename" is one such copy per file. `publish_directory` therefore moves a
  directory's files one by one on those filesystems, with the file that marks a
  directory complete (a SavedModel's saved_model.pb) last.
"""

import json
import math
import os
import posixpath
import uuid

import tensorflow as tf

from tlframe.errors import UserError


# Filesystems whose rename of a directory is one atomic step ("" is a local path).
_ATOMIC_DIRECTORY_RENAME_SCHEMES = ("", "file", "hdfs", "viewfs")
# Filesystems that TensorFlow itself lacks and tensorflow-io adds when imported.
_TENSORFLOW_IO_SCHEMES = ("s3", "hdfs", "viewfs", "har", "az")


def check_filesystem(path, argument=None):
  """UserError when `path` is on a filesystem this TensorFlow lacks (s3:// without tensorflow-io).

  `argument` names the argument the path came from (`records_dir`), for the
  message, which cites it (errors.UserError).
  """
  if "://" not in path:
    return
  scheme = path.split("://", 1)[0]
  registered = tf.io.gfile.get_registered_schemes()
  if scheme in registered:
    return
  fix = "check the path"
  if scheme in _TENSORFLOW_IO_SCHEMES:
    try:
      import tensorflow_io  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import  (registers them)
      fix = (f"the tensorflow-io installed does not load into TensorFlow {tf.__version__}: "
             "install its release built for this TensorFlow, or use a mounted local path")
    except ImportError:
      fix = (f"{scheme}:// comes with tensorflow-io: pip install tensorflow-io (its release built "
             f"for TensorFlow {tf.__version__}), or use a mounted local path")
    registered = tf.io.gfile.get_registered_schemes()
    if scheme in registered:
      return
  known = ", ".join(f"{name}://" for name in sorted(registered) if name)
  where = f"{argument}={path}" if argument else path
  raise UserError(f"{where}: TensorFlow {tf.__version__} here has no {scheme}:// filesystem (it "
                  f"has {known} and local paths); {fix}", arguments=[argument] if argument else [])


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


def publish_directory(tmp, target, last_name):
  """Moves the finished directory `tmp` to `target`; AlreadyExistsError if `target` is taken.

  Local and HDFS: one atomic rename. Elsewhere (gs://, s3://, ram://) the files
  move one by one, `last_name` (relative to `tmp`) last, so that a reader who
  waits for that file sees a complete directory; the first file's move fails
  if another writer already took `target`. Empty subdirectories are kept.
  """
  scheme = tmp.split("://", 1)[0] if "://" in tmp else ""
  if scheme in _ATOMIC_DIRECTORY_RENAME_SCHEMES:
    try:
      tf.io.gfile.rename(tmp, target)
    except tf.errors.OpError:
      if tf.io.gfile.exists(target):  # taken between the check and the rename
        raise tf.errors.AlreadyExistsError(None, None, f"{target} already exists") from None
      raise
    return
  prefix = tmp.rstrip("/") + "/"
  files, directories = [], []
  for directory, subdirectories, names in tf.io.gfile.walk(tmp):
    relative = directory[len(prefix):] if directory.startswith(prefix) else ""
    directories.extend(posixpath.join(relative, name.rstrip("/")) for name in subdirectories)
    files.extend(posixpath.join(relative, name) for name in names)
  files.sort(key=lambda name: (name == last_name, name))
  if tf.io.gfile.exists(target):
    raise tf.errors.AlreadyExistsError(None, None, f"{target} already exists")

  def move(name):
    tf.io.gfile.makedirs(posixpath.dirname(posixpath.join(target, name)))
    tf.io.gfile.rename(posixpath.join(tmp, name), posixpath.join(target, name), overwrite=False)

  for name in files[:-1]:
    move(name)
  for directory in directories:
    tf.io.gfile.makedirs(posixpath.join(target, directory))
  if files:
    move(files[-1])
  if tf.io.gfile.exists(tmp):  # the folders left; on an object store maybe nothing
    tf.io.gfile.rmtree(tmp)


def read_json(path):
  with tf.io.gfile.GFile(path, "r") as f:
    return json.load(f)
