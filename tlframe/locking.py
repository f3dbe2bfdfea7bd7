"""One run at a time per directory: an exclusive lock for a records dir or a model dir.

  with locking.DirectoryLock(output_dir, what="make_tfrecords"):
    ...  # nobody else holding a DirectoryLock on output_dir runs this now

The lock is `fcntl.flock` on `<dir>/.tlframe.lock`, which also holds the
holder's PID, host, program and start time, so the second run's error can say
who holds it. The kernel releases a flock when its holder exits in any way
(an exception, kill -9, a crash), so a lock is never left stale by a dead
holder; the file itself is removed on a clean release and harmlessly reused
after a crash.

Where it works: local disks, and NFSv4 (Linux maps flock to NFS byte-range
locks). Not on TensorFlow's remote filesystems (gs://, s3://, hdfs://), which
have no lock primitive: there the lock is skipped with a warning, and keeping
two runs off one remote directory is up to the user. Not on Windows (no fcntl)
either, also with a warning.
"""

import datetime
import json
import os
import socket
import time

from absl import logging

from tlframe.errors import UserError

try:
  import fcntl
except ImportError:  # Windows
  fcntl = None

LOCK_FILENAME = ".tlframe.lock"
_HOLDER_READ_TRIES = 20


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

  def acquire(self):
    if "://" in self.directory or fcntl is None:
      where = "remote filesystems" if "://" in self.directory else "this platform"
      logging.warning("%s: not locked (no file locks on %s); make sure no other run uses it "
                      "at the same time", self.directory, where)
      return self
    try:
      os.makedirs(self.directory, exist_ok=True)
      while self._fd is None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
      os.write(self._fd, json.dumps({
          "pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
          "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      }).encode("utf-8"))
    except OSError as e:
      self.release()
      raise UserError(f"{self.directory}: cannot create the lock file {self.path}: "
                      f"{e.strerror}; check the path and its permissions and free space") from None
    return self

  def release(self):
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


def _same_file(fd, path):
  try:
    return os.path.samestat(os.fstat(fd), os.stat(path))
  except FileNotFoundError:
    return False


def _read_holder(fd):
  """'make_tfrecords (PID 123 on host, since ...)' from a held lock file."""
  # The holder writes right after locking: give it a moment to have done so.
  for _ in range(_HOLDER_READ_TRIES):
    try:
      holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
      return (f"{holder['what']} (PID {holder['pid']} on {holder['host']}, "
              f"since {holder['since']})")
    except (OSError, ValueError, KeyError, TypeError):
      time.sleep(0.05)
  return "another run (its PID and host are not in the lock file)"
