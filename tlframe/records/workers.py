"""Worker processes that decode, check and re-encode images for the converter.

Workers only run `convert_image` on the paths handed to them; results come
back in input order (`ordered_results`), so that the output bytes are the same
for any number of workers. A worker dies with its parent (prctl
PR_SET_PDEATHSIG on Linux, a polling thread elsewhere), so that a killed
conversion leaves no orphans.
"""

import concurrent.futures
import collections
import ctypes
import hashlib
import multiprocessing
import os
import signal
import sys
import threading
import time

from absl import logging
import tensorflow as tf

from tlframe import imageformat

# Re-encoded JPEGs (CMYK, --max_side): high enough that the loss is invisible.
_JPEG_QUALITY = 95
# Work handed to worker processes: enough in flight to keep them busy, little
# enough that memory stays bounded (images per task x tasks x workers).
_IMAGES_PER_TASK = 16
_TASKS_IN_FLIGHT_PER_WORKER = 3
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_PARENT_POLL_SECONDS = 1.0


def convert_image(path, max_pixels, max_side):
  """Reads, checks and encodes one file. Returns a dict; `encoded` is None when skipped."""
  result = {"sha256": None, "encoded": None, "reason": None}
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      data = f.read()
  except (tf.errors.OpError, OSError) as e:
    result["reason"] = f"unreadable: {imageformat.op_error_text(e)}"
    return result
  try:
    image, source_format, note = imageformat.decode_checked(data, max_pixels, "--max_pixels")
  except imageformat.ImageError as e:
    result["reason"] = str(e)
    return result
  result["sha256"] = hashlib.sha256(data).hexdigest()
  # Upright pixels re-encoded carry no EXIF orientation; the stored bytes of a
  # kept file carry theirs, which decode_image applies on every read.
  reencode = source_format not in ("jpeg", "png") or note is not None
  height, width = image.shape[:2]
  if max_side and max(height, width) > max_side:
    scale = max_side / max(height, width)
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    image = tf.cast(tf.round(tf.image.resize(image, size, antialias=True)), tf.uint8)
    height, width = size
    reencode = True
  if not reencode:
    result.update(encoded=data, format=source_format)
  elif source_format == "jpeg":
    result.update(encoded=tf.io.encode_jpeg(image, quality=_JPEG_QUALITY).numpy(), format="jpeg")
  else:
    result.update(encoded=tf.io.encode_png(image).numpy(), format="png")
  result.update(height=int(height), width=int(width), reencoded=reencode)
  return result


def _init_worker(threads, parent_pid):
  _die_with_parent(parent_pid)
  # The cores are shared out among the workers instead of oversubscribed.
  tf.config.threading.set_intra_op_parallelism_threads(threads)
  tf.config.threading.set_inter_op_parallelism_threads(1)


def _die_with_parent(parent_pid):
  """Ends this worker when the parent dies in any way (kill -9 included), not 51 s later.

  Linux: the kernel sends SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG).
  Elsewhere, or if that fails: a thread that polls the parent's PID.
  """
  if sys.platform.startswith("linux"):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
      if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)
      return

  def watch():
    while os.getppid() == parent_pid:
      time.sleep(_PARENT_POLL_SECONDS)
    os._exit(1)

  threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _convert_images(paths, max_pixels, max_side):
  return [convert_image(path, max_pixels, max_side) for path in paths]


def _chunks(iterable, size):
  chunk = []
  for item in iterable:
    chunk.append(item)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def ordered_results(paths, num_workers, max_pixels, max_side):
  """convert_image over `paths`, in order, with at most a small window in flight."""
  paths = list(paths)  # the plan's own strings: 8 bytes a path
  if num_workers > 1 and any(path.startswith("ram://") for path in paths):
    # TensorFlow's ram:// filesystem lives in one process: workers would find no file there.
    logging.info("Reading the ram:// inputs in this process: --num_workers=%d is not used",
                 num_workers)
    num_workers = 1
  if num_workers <= 1:
    for path in paths:
      yield convert_image(path, max_pixels, max_side)
    return
  threads_per_worker = max(1, (os.cpu_count() or 1) // num_workers)
  # spawn, not fork: forking a process that already runs TensorFlow's threads can deadlock.
  with concurrent.futures.ProcessPoolExecutor(
      num_workers, mp_context=multiprocessing.get_context("spawn"),
      initializer=_init_worker, initargs=(threads_per_worker, os.getpid())) as executor:
    in_flight = collections.deque()
    # Chunks of images per task: one round trip per image costs more than a small decode.
    for chunk in _chunks(paths, _IMAGES_PER_TASK):
      in_flight.append(executor.submit(_convert_images, chunk, max_pixels, max_side))
      if len(in_flight) >= num_workers * _TASKS_IN_FLIGHT_PER_WORKER:
        yield from in_flight.popleft().result()
    while in_flight:
      yield from in_flight.popleft().result()


