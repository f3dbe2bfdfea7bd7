"""One run at a time per directory: an exclusive lock for a records dir or a model dir.

  with locking.DirectoryLock(output_dir, what="make_tfrecords"):
    ...  # nobody else holding a DirectoryLock on output_dir runs this now

The lock is the file `<dir>/.tlframe.lock`, which holds the holder's PID, host,
program and start time, so the second run's error can say who holds it.

Local directories (and NFSv4, where Linux maps flock to NFS byte-range locks):
the lock is `fcntl.flock` on that file. The kernel releases a flock when its
holder exits in any way (an exception, kill -9, a crash), so a lock is never
left stale by a dead holder; the file itself is removed on a clean release and
harmlessly reused after a crash.

TensorFlow's other filesystems (gs://, s3://, hdfs://, ram://) have no lock
primitive: there the lock is the file's existence. A run writes the file under
a temporary name and renames it into place without overwriting, then reads it
back to check that it is its own (two runs that start within the same moment
on an object store, whose rename is a check, a copy and a delete, could both
pass the check: the last copy stands, and the run that reads back another's
file gives way). A clean release removes the file. A holder that died without
releasing (kill -9, a lost machine) leaves it behind: a later run on the same
host takes it over when that PID no longer runs; anywhere else the error says
which file to remove once that run is known to be gone.

Not on Windows (no fcntl): the lock is skipped there with a warning.
"""

import datetime
import errno
import json
import os
import socket
import stat
import time
import uuid

from absl import logging
import tensorflow as tf

from tlframe.util import fileio
from tlframe.errors import UserError

try:
  import fcntl
except ImportError:  # Windows
  fcntl = None

LOCK_FILENAME = ".tlframe.lock"
_HOLDER_READ_TRIES = 20
# How long a run on a filesystem without locks waits before reading its lock
# file back: longer than an object store's check-and-copy of a small file.
_LOCK_FILE_SETTLE_SECONDS = 0.5


class DirectoryLock:
  """An exclusive lock on `directory` (created if missing) for one run of `what`.

  Use as a context manager, or call `acquire()` and `release()`. A second
  holder, in this or another process, gets a UserError naming the first
  holder's program, PID and host. Not re-entrant.
  """

  def __init__(self, directory, what):
    self.directory = directory
    self.what = what
    self.path = os.path.join(directory, LOCK_FILENAME)
    self._fd = None
    self._token = None  # the lock file's mark of this holder, on filesystems without locks

  def acquire(self):
    if "://" in self.directory:
      return self._acquire_lock_file()
    if fcntl is None:
      logging.warning("%s: not locked (no file locks on this platform); make sure no other "
                      "run uses it at the same time", self.directory)
      return self
    try:
      os.makedirs(self.directory, exist_ok=True)
      while self._fd is None:
        fd = self._open_lock_file()
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
          holder = _read_holder(fd)
          os.close(fd)
          raise UserError(f"{self.directory} is in use by {holder}; wait for that run to end "
                          "or use another directory") from None
        # The previous holder may have removed the file between our open and our
        # flock: then we locked an orphan inode, and must try the path again.
        if _same_file(fd, self.path):
          self._fd = fd
        else:
          os.close(fd)
      os.ftruncate(self._fd, 0)
      os.write(self._fd, json.dumps(_holder_fields(self.what)).encode("utf-8"))
    except OSError as e:
      self.release()
      raise UserError(f"{self.directory}: cannot create the lock file {self.path}: "
                      f"{e.strerror}; check the path and its permissions and free space") from None
    return self

  def _open_lock_file(self):
    """The lock file's descriptor: never through a symlink, never anything but a plain file.

    In a shared or group-writable folder, another user could plant a link at
    the lock's path to make this run overwrite any file it may write.
    """
    kind = None
    try:
      # O_NONBLOCK: opening a planted FIFO must not wait for a writer.
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                   | os.O_CLOEXEC, 0o644)
    except OSError as e:
      if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
        raise
      kind = "a symbolic link" if os.path.islink(self.path) else "not a regular file"
    else:
      info = os.fstat(fd)
      if not stat.S_ISREG(info.st_mode):
        kind = "not a regular file"
      elif info.st_nlink > 1:  # 0 is a file its holder just removed: the loop retries
        kind = "a file with other hard links"
      if kind:
        os.close(fd)
    if kind:
      raise UserError(f"{self.directory}: the lock file {self.path} is {kind}, which tlframe "
                      "never writes through; remove it (and see who put it there), then rerun")
    return fd

  def _acquire_lock_file(self):
    """The lock as a file created without overwriting, for gs://, s3://, hdfs://, ram://."""
    token = uuid.uuid4().hex
    try:
      tf.io.gfile.makedirs(self.directory)
      while not self._create_lock_file(json.dumps(dict(_holder_fields(self.what), token=token))):
        held = _read_lock_file(self.path)
        if held is None and not tf.io.gfile.exists(self.path):
          continue  # released meanwhile
        if held is None or not _is_stale(held):
          raise self._held_error(held)
        logging.warning("%s: taking over the lock of %s, which no longer runs", self.directory,
                        _describe(held))
        tf.io.gfile.remove(self.path)
      time.sleep(_LOCK_FILE_SETTLE_SECONDS)
      held = _read_lock_file(self.path)
    except tf.errors.OpError as e:
      fileio.check_filesystem(self.directory)
      raise UserError(f"{self.directory}: cannot create the lock file {self.path}: {e.message}; "
                      "check the path and its permissions") from None
    if held is None or held.get("token") != token:
      raise self._held_error(held)
    self._token = token
    return self

  def _create_lock_file(self, text):
    """Writes the lock file unless it exists; whether it did."""
    tmp = fileio.temp_path_for(self.path)
    try:
      with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
      tf.io.gfile.rename(tmp, self.path, overwrite=False)
      return True
    except tf.errors.AlreadyExistsError:
      return False
    finally:
      if tf.io.gfile.exists(tmp):
        tf.io.gfile.remove(tmp)

  def _held_error(self, held):
    holder = _describe(held) if held else "another run"
    return UserError(f"{self.directory} is in use by {holder}; wait for that run to end or use "
                     f"another directory (if that run is gone, remove {self.path})")

  def release(self):
    if self._token is not None:
      held = _read_lock_file(self.path)
      if held is not None and held.get("token") == self._token:
        tf.io.gfile.remove(self.path)
      self._token = None
    if self._fd is not None:
      try:
        os.remove(self.path)  # still holding the lock: nobody else removes it meanwhile
      except OSError:
        pass  # a read-only directory made read-only while we ran: the flock still goes
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc_info):
    self.release()


def _holder_fields(what):
  return {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
          "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _describe(holder):
  """'make_tfrecords (PID 123 on host, since ...)'."""
  return f"{holder['what']} (PID {holder['pid']} on {holder['host']}, since {holder['since']})"


def _read_lock_file(path):
  """The holder fields of a lock file on a filesystem without locks; None if gone or unreadable."""
  try:
    holder = fileio.read_json(path)
  except (tf.errors.OpError, ValueError):
    return None
  fields = ("pid", "host", "what", "since")
  return holder if isinstance(holder, dict) and all(name in holder for name in fields) else None


def _is_stale(holder):
  """Whether the holder ran on this host under a PID that no longer runs."""
  if holder["host"] != socket.gethostname() or not isinstance(holder["pid"], int):
    return False
  if fcntl is None:  # Windows: os.kill(pid, 0) would end that process, not test it
    return False
  try:
    os.kill(holder["pid"], 0)
  except ProcessLookupError:
    return True
  except OSError:
    pass  # it runs, as another user
  return False


def _same_file(fd, path):
  try:
    return os.path.samestat(os.fstat(fd), os.lstat(path))
  except FileNotFoundError:
    return False


def _read_holder(fd):
  """'make_tfrecords (PID 123 on host, since ...)' from a held lock file."""
  # The holder writes right after locking: give it a moment to have done so.
  for _ in range(_HOLDER_READ_TRIES):
    try:
      return _describe(json.loads(os.pread(fd, 4096, 0).decode("utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
      time.sleep(0.05)
  return "another run (its PID and host are not in the lock file)"
