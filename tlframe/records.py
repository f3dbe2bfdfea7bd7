"""Image files -> sharded TFRecords: the library behind bin/make_tfrecords.

Input is a folder with one sub-folder per class, or a CSV/TSV list of
`path,label`. Every file goes to the train, validation or test split by a
stable hash of its relative path (or by explicit lists), is decoded once with
`imageformat.decode_image` (so whatever lands in a record, the pipeline can read),
and is written as a TF-Slim style tf.train.Example into
`<split>-00000-of-0000N.tfrecord` shards, with `labels.txt` and `manifest.json`
beside them.

Guarantees:
- Deterministic: files are assigned to shards by sorted order before any
  decoding, and worker processes only decode, check and re-encode, so the
  output bytes are the same for any --num_workers.
- Streaming: images pass through one at a time (a small window in flight per
  worker); memory does not grow with the dataset.
- Resumable: a shard is written under a temporary name, its sidecar (record
  count, sha256, per-file results) is written next, and only then is the shard
  renamed into place. A rerun verifies finished shards against their sidecars,
  skips them, and rewrites the rest, producing byte-identical output.
- Bad files (truncated, empty, not an image, unreadable, decompression bombs,
  JPEGs that decode only partially) are skipped with a reason in the manifest;
  the rest still converts. Classes are counted after decoding.
- One run at a time per output directory (`locking.DirectoryLock`); a write
  that fails (disk full, read-only) is one UserError, with temp files removed
  and finished shards kept for the rerun.
- `check_shards` verifies a finished directory's shards before training.

A conversion is a plan (`plan_conversion`: every file's split, shard and
position, before any decoding), shards written from it (`write_shard`, here by
`convert`, or on Apache Beam by `records_beam`), and a finish common to both
(`write_conversion`): so both write the same bytes.
"""

import collections
import concurrent.futures
import ctypes
import csv
import fnmatch
import hashlib
import json
import multiprocessing
import os
import posixpath
import signal
import sys
import threading
import time
import unicodedata

from absl import logging
import tensorflow as tf

from tlframe import fileio
from tlframe import imageformat
from tlframe import locking
from tlframe.errors import UserError
from tlframe.progress import Progress

SPLITS = ("train", "validation", "test")
LABELS_FILENAME = "labels.txt"
MANIFEST_FILENAME = "manifest.json"
# 2: upright sizes (EXIF orientation), skipped files carry their label, not their sha256.
MANIFEST_VERSION = 2
# A TFRecord's framing around its data: length (8 bytes) and two CRCs (4 each).
_TFRECORD_FRAMING_BYTES = 16
# Per-shard sidecars that make a killed run resumable; kept so a rerun of a
# finished conversion is a quick no-op.
PROGRESS_DIRNAME = ".make_tfrecords"
# In PROGRESS_DIRNAME: every shard name a conversion may have put in place here,
# written before the first rename, so that a later run removes those and no other.
SHARDS_WRITTEN_FILENAME = "shards_written.json"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
DEFAULT_SHARD_SIZE = 1000
# Re-encoded JPEGs (CMYK, --max_side): high enough that the loss is invisible.
_JPEG_QUALITY = 95
# Work handed to worker processes: enough in flight to keep them busy, little
# enough that memory stays bounded (images per task x tasks x workers).
_IMAGES_PER_TASK = 16
_TASKS_IN_FLIGHT_PER_WORKER = 3
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_PARENT_POLL_SECONDS = 1.0
_FILELIST_HEADER_NAMES = ("path", "filename", "file_name", "file", "filepath", "file_path",
                          "image", "image_path")
_NOT_IN_A_CLASS_FOLDER = "not inside a class sub-folder"
# How many ignored or skipped file names the log and the summary show.
_NAMES_SHOWN = 5


# ---------------------------------------------------------------------------
# Reading a records directory (used by the pipeline's callers and training).


def split_file_pattern(records_dir, split):
  """The glob matching one split's shards, e.g. `<dir>/train-*-of-*.tfrecord`."""
  _check_split(split)
  return _join(records_dir, f"{split}-*-of-*.tfrecord")


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
  return [line for line in _text_lines(data, path) if line.strip()]


def _text_lines(data, origin):
  """The lines of a UTF-8 text file's bytes, as spreadsheets and editors save them.

  A byte-order mark is dropped ("CSV UTF-8"); lines end at "\n" alone, a
  trailing "\r" dropped (CRLF): not at str.splitlines' other breaks (U+2028,
  U+0085, ...), which a file or class name may hold.
  """
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise UserError(f"{origin}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
  return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def check_class_name(name, origin):
  """UserError unless `name` can be a class: one labels.txt line that reads back as itself.

  `origin` says where the name came from (a folder, a list) for the message.
  """
  if not name.strip():
    raise UserError(f"{origin}: class name {name!r} is blank; give the class a name")
  for char in name:
    category = unicodedata.category(char)
    if category in ("Cc", "Cs"):  # control characters; undecodable bytes in a file name
      what = "a control character" if category == "Cc" else "bytes that are not UTF-8"
      raise UserError(f"{origin}: class name {name!r} contains {what} (U+{ord(char):04X}), "
                      "which labels.txt cannot hold; rename it")


def labels_from_spec(spec):
  """Class names from a comma-separated list or a labels file's path; None for none."""
  if not spec:
    return None
  if "," not in spec and tf.io.gfile.exists(spec):
    return read_label_lines(spec)
  return [label.strip() for label in spec.split(",") if label.strip()]


def read_labels(records_dir):
  """The class names of a records directory, in label-index order (its labels.txt)."""
  path = _join(records_dir, LABELS_FILENAME)
  if not tf.io.gfile.exists(path):
    raise UserError(f"{path}: not found; is {records_dir} a make_tfrecords output directory?")
  return read_label_lines(path)


def write_labels(directory, labels):
  """`directory`/labels.txt: the class names in label-index order, one per line (atomic).

  `read_labels` gives back exactly `labels`; a name it could not is a UserError.
  """
  path = _join(directory, LABELS_FILENAME)
  for label in labels:
    check_class_name(label, path)
  fileio.atomic_write_text(path, "".join(f"{label}\n" for label in labels))


def read_manifest(records_dir):
  """The manifest make_tfrecords wrote into `records_dir`, as a dict."""
  path = _join(records_dir, MANIFEST_FILENAME)
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
  _check_split(split)
  return read_manifest(records_dir)["splits"][split]["examples"]


def _check_split(split):
  if split not in SPLITS:
    raise UserError(f"split {split!r} is not one of {', '.join(SPLITS)}")


# ---------------------------------------------------------------------------
# Paths: local and TF filesystems (gs://, ...) alike.


def _is_remote(path):
  return "://" in path


def _join(directory, name):
  if _is_remote(directory):
    return directory.rstrip("/") + "/" + name
  return os.path.join(directory, name)


def _resolve(base_dir, path):
  """`path` as written in a list, resolved against the list's folder."""
  if _is_remote(path):
    return path
  if _is_remote(base_dir):
    return path if path.startswith("/") else _join(base_dir, posixpath.normpath(path))
  return os.path.normpath(os.path.join(base_dir, path))


def _relative_key(root, path):
  """`path` relative to `root` ('/' separators) when inside it; else `path` itself."""
  prefix = root.rstrip("/") + "/"
  return path[len(prefix):] if path.startswith(prefix) else path


def _has_image_extension(name):
  return name.lower().endswith(IMAGE_EXTENSIONS)


# ---------------------------------------------------------------------------
# Listing the inputs.

# One input image: where to read it, its key (relative path: the split hash and
# the image/filename feature), its class name, and its split when a list fixes it.
Source = collections.namedtuple("Source", "path key label split")


def walk_files(root):
  """(files, [(directory, why not walked)]) under `root`, recursively.

  tf.io.gfile.walk follows a symlink to an ancestor forever, hence this walk,
  which does not enter a directory twice.
  """
  files, unreadable = [], []
  seen = set()
  pending = [root]
  while pending:
    directory = pending.pop()
    if not _is_remote(directory):
      real = os.path.realpath(directory)
      if real in seen:
        unreadable.append((directory, "directory symlink loop: not followed"))
        continue
      seen.add(real)
    try:
      names = tf.io.gfile.listdir(directory)
    except tf.errors.OpError as e:
      unreadable.append((directory, f"unreadable directory: {imageformat.op_error_text(e)}"))
      continue
    for name in sorted(names):
      path = _join(directory, name.rstrip("/"))
      if tf.io.gfile.isdir(path):
        pending.append(path)
      else:
        files.append(path)
  return sorted(files), sorted(unreadable)


def list_image_dir(image_dir):
  """Sources of a class-per-sub-folder tree, plus (skipped, ignored) entries for the manifest."""
  if not tf.io.gfile.isdir(image_dir):
    fileio.check_filesystem(image_dir, "--image_dir")
    raise UserError(f"--image_dir {image_dir}: no such directory")
  files, unwalked = walk_files(image_dir)
  sources, ignored = [], []
  skipped = [{"path": _relative_key(image_dir, directory), "reason": reason}
             for directory, reason in unwalked]
  for path in files:
    key = _relative_key(image_dir, path)
    name = posixpath.basename(key)
    if name.startswith(".") or not _has_image_extension(name):
      ignored.append({"path": key, "reason": "not an image file name (extension or hidden file)"})
    elif "/" not in key:
      skipped.append({"path": key, "reason": _NOT_IN_A_CLASS_FOLDER})
    else:
      sources.append(Source(path, key, key.split("/", 1)[0], None))
  return sources, skipped, ignored


def _folder_of(path):
  """The folder a list file's relative paths resolve against."""
  return posixpath.dirname(path) if _is_remote(path) else os.path.dirname(os.path.abspath(path))


def read_filelist(path, flag, need_labels=True, line_numbers=None):
  """[(resolved path, label or None)] from a CSV or TSV of `path[,label]`; optional header.

  UTF-8, as `_text_lines` reads it (a spreadsheet's "CSV UTF-8": byte-order
  mark, CRLF). Blank lines and lines starting with '#' are skipped; a first
  line whose first field is a column name such as `path` or `filename` is a
  header. A dict `line_numbers` gets each resolved path's line number, for
  messages.
  """
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      data = f.read()
  except tf.errors.NotFoundError:
    raise UserError(f"--{flag} {path}: no such file") from None
  lines = [(number, line) for number, line in enumerate(_text_lines(data, f"--{flag} {path}"), 1)
           if line.strip() and not line.startswith("#")]
  delimiter = "\t" if lines and "\t" in lines[0][1] else ","
  base_dir = _folder_of(path)
  entries = []
  for number, line in lines:
    row = [field.strip() for field in next(csv.reader([line], delimiter=delimiter))]
    if number == lines[0][0] and row[0].lower().replace(" ", "_") in _FILELIST_HEADER_NAMES:
      continue
    if len(row) > 2 or not row[0] or (need_labels and (len(row) < 2 or not row[1])):
      expected = "path,label" if need_labels else "path or path,label"
      raise UserError(f"--{flag} {path}: line {number} {line.strip()!r} is not {expected}")
    entries.append((_resolve(base_dir, row[0]), row[1] if len(row) == 2 and row[1] else None))
    if line_numbers is not None:
      line_numbers.setdefault(entries[-1][0], number)
  if not entries:
    raise UserError(f"--{flag} {path}: no entries")
  return entries


def _sources_from_filelist(filelist):
  root = _folder_of(filelist)
  return [Source(path, _relative_key(root, path), label, None)
          for path, label in read_filelist(filelist, "filelist")], root


def _apply_split_lists(sources, root, split_filelists, skipped):
  """`sources` with the explicit lists' splits set.

  A listed file that is not among `sources` is added when the list gives its label.
  """
  by_path = {source.path: i for i, source in enumerate(sources)}
  sources = list(sources)
  listed_in = {}
  for split, filelist in split_filelists.items():
    flag = f"{split}_filelist"
    for path, label in read_filelist(filelist, flag, need_labels=False):
      if path in listed_in:
        raise UserError(f"--{flag} {filelist}: {path} is also listed in "
                        f"--{listed_in[path]}_filelist; a file belongs to one split")
      listed_in[path] = split
      index = by_path.get(path)
      if index is not None:
        source = sources[index]
        if label is not None and label != source.label:
          raise UserError(f"--{flag} {filelist}: {path} is labelled {label!r} but its class is "
                          f"{source.label!r}; fix the list")
        sources[index] = source._replace(split=split)
      elif label is not None:
        by_path[path] = len(sources)
        sources.append(Source(path, _relative_key(root, path), label, split))
      else:
        reason = f"listed in --{flag} but not among the inputs and no label given"
        skipped.append({"path": _relative_key(root, path), "reason": reason})
  return sources


def stable_split(key, validation_percentage, test_percentage):
  """The split of a file by a hash of its key alone: adding or removing files moves no other."""
  bucket = int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % 10000 / 100.0
  if bucket < validation_percentage:
    return "validation"
  if bucket < validation_percentage + test_percentage:
    return "test"
  return "train"


# ---------------------------------------------------------------------------
# Reading one image: header check, decode, re-encode where needed (in workers).


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


# ---------------------------------------------------------------------------
# Workers: processes that only run `convert_image`; results come back in order.


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


def _ordered_results(paths, num_workers, max_pixels, max_side):
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


# ---------------------------------------------------------------------------
# Shards and resume.

Shard = collections.namedtuple("Shard", "split name sources fingerprint")


def _plan_shards(sources_by_split, labels, options, shard_size):
  shards = []
  for split in SPLITS:
    sources = sources_by_split[split]
    if not sources:
      continue
    num_shards = -(-len(sources) // shard_size)
    for index in range(num_shards):
      # Contiguous runs of the sorted list: shard contents depend on nothing else.
      chunk = sources[index * len(sources) // num_shards:(index + 1) * len(sources) // num_shards]
      name = shard_filename(split, index, num_shards)
      plan = json.dumps([MANIFEST_VERSION, name, labels, options,
                         [(s.path, s.key, s.label) for s in chunk]])
      shards.append(Shard(split, name, chunk, hashlib.sha256(plan.encode("utf-8")).hexdigest()))
  return shards


def _file_sha256(path):
  digest = hashlib.sha256()
  with tf.io.gfile.GFile(path, "rb") as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def progress_path(output_dir, name):
  """`name` in `output_dir`'s folder of conversion state (sidecars; kept for resuming)."""
  return _join(_join(output_dir, PROGRESS_DIRNAME), name)


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


def _finished_shard(output_dir, shard):
  """The sidecar of a shard a previous run completed with this same plan, else None."""
  shard_path = _join(output_dir, shard.name)
  if not tf.io.gfile.exists(shard_path):
    return None
  sidecar = read_sidecar(output_dir, shard)
  if sidecar is None or sidecar.get("sha256") != _file_sha256(shard_path):
    return None
  return sidecar


def write_shard(output_dir, shard, results, labels):
  """Writes one shard: temp file, sidecar, then rename; returns the sidecar.

  `results` yields `convert_image`'s result for each of `shard.sources`, in
  their order. Writing a shard twice (a retried worker) gives the same bytes.
  """
  label_index = {label: i for i, label in enumerate(labels)}
  shard_path = _join(output_dir, shard.name)
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
      example = imageformat.make_example(result["encoded"], result["format"],
                                         label_index[source.label], source.label, source.key,
                                         result["height"], result["width"])
      writer.write(example.SerializeToString(deterministic=True))
      files.append({"path": source.key, "label": source.label, "sha256": result["sha256"],
                    "reencoded": result["reencoded"]})
  sidecar = {"fingerprint": shard.fingerprint, "split": shard.split, "records": len(files),
             "sha256": _file_sha256(temp_path), "files": files, "skipped": skipped}
  fileio.atomic_write_json(sidecar_path(output_dir, shard.name), sidecar)
  tf.io.gfile.rename(temp_path, shard_path, overwrite=True)
  return sidecar


def _remove_stale_outputs(output_dir, shards):
  """Makes `output_dir` hold only what this conversion plans, before it writes anything.

  The old manifest and labels go first, so that a run killed from here on
  leaves no manifest describing shards that are not there. Then temp files of
  killed runs, and shards (with their sidecars) this conversion does not
  write, but only those an earlier conversion wrote (its sidecars or its
  manifest list them): a file a user put there, even one named like a shard,
  stays (`check_shards` names it before training reads it).
  """
  written = _shards_written_before(output_dir)
  for name in (MANIFEST_FILENAME, LABELS_FILENAME):
    if tf.io.gfile.exists(_join(output_dir, name)):
      tf.io.gfile.remove(_join(output_dir, name))
  planned = {shard.name for shard in shards}
  progress_dir = _join(output_dir, PROGRESS_DIRNAME)
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
    for path in tf.io.gfile.glob(_join(progress_dir, f"{split}-*.json")):
      if posixpath.basename(path)[:-len(".json")] not in planned:
        tf.io.gfile.remove(path)
  fileio.atomic_write_json(progress_path(output_dir, SHARDS_WRITTEN_FILENAME), sorted(planned))
  _remove_temp_files(output_dir)


def _shards_written_before(output_dir):
  """The names of the shards earlier conversions in `output_dir` may have put in place.

  Their SHARDS_WRITTEN_FILENAME lists them (a sidecar is removed when its
  shard must be rewritten, and a killed run leaves no manifest); the sidecars
  and the manifest too, for folders converted before that file existed.
  """
  names = {posixpath.basename(path)[:-len(".json")]
           for split in SPLITS for path in tf.io.gfile.glob(
               _join(_join(output_dir, PROGRESS_DIRNAME), f"{split}-*.json"))}
  for read in (lambda: fileio.read_json(progress_path(output_dir, SHARDS_WRITTEN_FILENAME)),
               lambda: [shard["name"] for info in read_manifest(output_dir)["splits"].values()
                        for shard in info["shards"]]):
    try:
      names.update(name for name in read() if isinstance(name, str))
    except (UserError, tf.errors.OpError, ValueError, KeyError, TypeError, AttributeError):
      pass  # none, or not readable: the others say
  return names


def _remove_temp_files(output_dir):
  """Removes the temp files of shards, sidecars, labels and manifest (fileio's `.name.tmp-*`).

  Only the lock holder runs this, so no other run's temp file is in the way.
  """
  progress_dir = _join(output_dir, PROGRESS_DIRNAME)
  for path in (tf.io.gfile.glob(_join(output_dir, ".*.tmp-*"))
               + tf.io.gfile.glob(_join(progress_dir, ".*.tmp-*"))):
    tf.io.gfile.remove(path)


def _write_error(error, output_dir, num_finished):
  """The one line for a write that failed (disk full, read-only, permissions)."""
  if isinstance(error, tf.errors.OpError):
    cause = imageformat.op_error_text(error)
  else:
    cause = f"{error.filename}: {error.strerror}" if error.filename else str(error)
  return (f"--output_dir {output_dir}: cannot write ({cause}); free space or fix permissions "
          f"there, then rerun the same command: the {num_finished} finished shards are kept")


# ---------------------------------------------------------------------------
# Checking a records directory before training reads it.


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
  _check_split(split)
  manifest = read_manifest(records_dir)
  listed = manifest["splits"][split]["shards"]
  fix = "rerun make_tfrecords with the same flags to rewrite it"
  unlisted = sorted(set(tf.io.gfile.glob(split_file_pattern(records_dir, split)))
                    - {_join(records_dir, shard["name"]) for shard in listed})
  if unlisted:
    raise UserError(f"{unlisted[0]}: a {split} shard that {MANIFEST_FILENAME} does not list; "
                    f"remove it, or {fix.replace(' it', ' the directory')}")
  paths = []
  for shard in listed:
    path = _join(records_dir, shard["name"])
    if not tf.io.gfile.exists(path):
      raise UserError(f"{path}: missing; {fix}")
    if _file_sha256(path) != shard["sha256"]:
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


# ---------------------------------------------------------------------------
# The conversion.


def _absolute(path):
  return path if _is_remote(path) else os.path.abspath(path)


def _collect_sources(image_dir, filelist, split_filelists, test_dir=None):
  if bool(image_dir) == bool(filelist):
    raise UserError("give exactly one of --image_dir or --filelist")
  if image_dir:
    # Absolute, so that paths in the split lists (resolved against their own folder) match.
    root = _absolute(image_dir)
    sources, skipped, ignored = list_image_dir(root)
  else:
    (sources, root), skipped, ignored = _sources_from_filelist(filelist), [], []
  duplicates = [path for path, n in collections.Counter(s.path for s in sources).items() if n > 1]
  if duplicates:
    raise UserError(f"--filelist {filelist}: {duplicates[0]} is listed more than once")
  sources = _apply_split_lists(sources, root, split_filelists, skipped)
  if test_dir:
    sources = _with_test_dir(sources, root, _absolute(test_dir), skipped, ignored)
  return sources, skipped, ignored


def _with_test_dir(sources, root, test_root, skipped, ignored):
  """`sources` plus the class folders of `test_root`, all in the test split.

  Files under `test_root` found by the main listing too (a test folder inside
  --image_dir) are the test folder's only. Keys are relative to `root` where
  the test folder is inside it, else `<test folder name>/<class>/<file>`.
  """
  test_sources, test_skipped, test_ignored = list_image_dir(test_root)
  prefix = test_root.rstrip("/") + "/"
  inside = prefix.startswith(root.rstrip("/") + "/")
  rekey = (lambda key: _relative_key(root, _join(test_root, key))) if inside else (
      lambda key: posixpath.join(posixpath.basename(test_root.rstrip("/")), key))
  kept = [source for source in sources if not source.path.startswith(prefix)]
  for entries, into in ((test_skipped, skipped), (test_ignored, ignored)):
    into[:] = [entry for entry in into if not _join(root, entry["path"]).startswith(prefix)]
    into.extend(dict(entry, path=rekey(entry["path"])) for entry in entries)
  keys = {source.key for source in kept}
  for source in test_sources:
    key = rekey(source.key)
    if key in keys:
      raise UserError(f"--test_dir {test_root}: {key} is also a training image's name; name "
                      "the test folder differently from the class folders")
    kept.append(source._replace(key=key, split="test"))
  return kept


def _without_missing_classes(sources, skipped):
  """`sources` less the classes none of whose files exists; their files are skipped.

  So a label that only names missing files (a stale list) does not become a
  class. One existing file settles a class: a check per class, not per file.
  """
  by_label = collections.defaultdict(list)
  for source in sources:
    by_label[source.label].append(source)
  kept = []
  for label, group in by_label.items():
    if any(tf.io.gfile.exists(source.path) for source in group):
      kept.extend(group)
      continue
    logging.warning("Class %r: none of its %d files exists (e.g. %s); it is not a class",
                    label, len(group), group[0].path)
    skipped.extend({"path": source.key, "reason": "unreadable: no such file"} for source in group)
  return kept


def _choose_labels(sources, labels, skipped, image_dir):
  """(sources of the classes to convert, class names in label-index order)."""
  sources = _without_missing_classes(sources, skipped)
  present = sorted({source.label for source in sources})
  for label in present:
    check_class_name(label, "--image_dir" if image_dir else "--filelist")
  if labels:
    if len(set(labels)) != len(labels):
      raise UserError(f"--labels has a duplicate class name: {labels}")
    for label in labels:
      check_class_name(label, "--labels")
    unknown = [s for s in sources if s.label not in set(labels)]
    for source in unknown:
      skipped.append({"path": source.key, "reason": f"class {source.label!r} is not in --labels"})
    sources = [s for s in sources if s.label in set(labels)]
    for label in labels:
      if label not in present:
        logging.warning("Class %r from --labels has no images", label)
  else:
    labels = present
  _check_two_classes({source.label for source in sources}, skipped, image_dir)
  return sources, list(labels)


def _check_two_classes(labels_with_images, skipped, image_dir):
  if len(labels_with_images) >= 2:
    return
  names = ", ".join(sorted(labels_with_images)) or "none"
  message = (f"found {len(labels_with_images)} class(es) with images ({names}); need at least "
             "2: one sub-folder (or list label) per class")
  loose = [entry["path"] for entry in skipped if entry["reason"] == _NOT_IN_A_CLASS_FOLDER]
  if loose:
    message += (f"; the {len(loose)} images directly in {image_dir} ({_some(loose)}) were "
                "ignored: put each class's images in a sub-folder named for the class, "
                f"e.g. {_join(image_dir, 'cat')}/{posixpath.basename(loose[0])}")
  raise UserError(message)


def _some(names):
  """'a, b, c' or 'a, b, c and 4 more': the first few of a list of names, for one line."""
  shown = ", ".join(names[:_NAMES_SHOWN])
  return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


def convert(output_dir, *, image_dir=None, filelist=None, validation_filelist=None,
            test_filelist=None, test_dir=None, labels=None, validation_percentage=10.0, test_percentage=10.0,
            shard_size=DEFAULT_SHARD_SIZE, max_side=None, max_pixels=imageformat.DEFAULT_MAX_PIXELS,
            num_workers=1, overwrite=False):
  """Converts images to sharded TFRecords in `output_dir`; returns the manifest (also written).

  Exactly one of `image_dir` (one sub-folder per class) or `filelist` (CSV/TSV
  `path,label`). `validation_filelist` / `test_filelist` fix those splits
  explicitly and replace their percentage, as does `test_dir` (a folder of
  one sub-folder per class, all test images); everything else is split by a hash
  of its relative path. `labels` fixes the class order (else sorted names).
  `max_side` downscales larger images; `max_pixels` rejects bigger headers
  before decoding. `num_workers` never changes the output. `overwrite`: convert
  into a folder that holds other files (see `write_conversion`).
  """
  if num_workers < 1:
    raise UserError("--num_workers must be positive")
  plan = plan_conversion(
      image_dir=image_dir, filelist=filelist, validation_filelist=validation_filelist,
      test_filelist=test_filelist, test_dir=test_dir, labels=labels,
      validation_percentage=validation_percentage, test_percentage=test_percentage,
      shard_size=shard_size, max_side=max_side, max_pixels=max_pixels)
  return write_conversion(output_dir, plan, lambda todo: _write_shards_locally(
      output_dir, todo, plan.labels, num_workers, max_pixels, max_side), overwrite=overwrite)


# What a conversion will write, decided before any image is decoded: the
# manifest's options, the class names, whether --labels gave them, the shards
# (each with its sources in order), and the files already skipped or ignored.
Plan = collections.namedtuple("Plan", "options labels labels_given shards skipped ignored")


def plan_conversion(*, image_dir=None, filelist=None, validation_filelist=None,
                    test_filelist=None, test_dir=None, labels=None, validation_percentage=10.0,
                    test_percentage=10.0, shard_size=DEFAULT_SHARD_SIZE, max_side=None,
                    max_pixels=imageformat.DEFAULT_MAX_PIXELS):
  """The `Plan` of a conversion (arguments as `convert`'s): lists, labels, splits and shards."""
  if test_dir and test_filelist:
    raise UserError("give one of --test_dir or --test_filelist: each is the whole test split")
  split_filelists = {split: path for split, path in
                     (("validation", validation_filelist), ("test", test_filelist)) if path}
  for split in split_filelists:
    logging.info("The %s split comes from --%s_filelist; --%s_percentage is not used",
                 split, split, split)
  validation_percentage = 0.0 if validation_filelist else validation_percentage
  if test_dir:
    logging.info("The test split is --test_dir %s; --test_percentage is not used", test_dir)
  test_percentage = 0.0 if test_filelist or test_dir else test_percentage
  if not (0 <= validation_percentage and 0 <= test_percentage and
          validation_percentage + test_percentage <= 100):
    raise UserError("--validation_percentage and --test_percentage must be >= 0 and sum to "
                    f"at most 100 (got {validation_percentage} and {test_percentage})")
  if shard_size < 1 or max_pixels < 1 or (max_side is not None and max_side < 1):
    raise UserError("--shard_size, --max_pixels and --max_side must be positive")

  sources, skipped, ignored = _collect_sources(image_dir, filelist, split_filelists, test_dir)
  if ignored:
    logging.warning("Ignored %d files that are not named like images: %s (all are listed in "
                    "the manifest)", len(ignored), _some([entry["path"] for entry in ignored]))
  labels_given = bool(labels)
  sources, labels = _choose_labels(sources, labels, skipped, image_dir)
  sources_by_split = {split: [] for split in SPLITS}
  for source in sorted(sources, key=lambda s: s.key):
    split = source.split or stable_split(source.key, validation_percentage, test_percentage)
    sources_by_split[split].append(source)

  options = {"image_dir": image_dir, "filelist": filelist,
             "validation_filelist": validation_filelist, "test_filelist": test_filelist,
             **({"test_dir": test_dir} if test_dir else {}),
             "labels": labels, "validation_percentage": validation_percentage,
             "test_percentage": test_percentage, "shard_size": shard_size,
             "max_side": max_side, "max_pixels": max_pixels}
  # Decoding options only: the sources and labels are in the fingerprint already.
  shards = _plan_shards(sources_by_split, labels, {"max_side": max_side, "max_pixels": max_pixels},
                        shard_size)
  return Plan(options, labels, labels_given, shards, skipped, ignored)


def write_conversion(output_dir, plan, write_shards, overwrite=False):
  """Carries out `plan` in `output_dir`; returns the manifest (also written).

  `write_shards(todo)` writes the shards that no previous run finished (each
  with `write_shard`, in this process or on other machines) and returns their
  sidecars by shard name. The rest is the same however the shards are
  written: the lock, resuming, the checks after decoding, labels.txt, the
  manifest, and the one error for a failed write.

  `output_dir` must be new, empty (hidden files aside) or an earlier
  conversion's; a folder holding other files is a UserError unless
  `overwrite`, which replaces the files there named like this conversion's
  outputs and keeps the rest. A conversion removes only files a conversion
  wrote: shards its sidecars or manifest list, its own temp files.
  """
  with locking.DirectoryLock(output_dir, what="make_tfrecords"):
    try:
      _check_output_dir(output_dir, overwrite)
      sidecars, todo = _finished_and_todo(output_dir, plan.shards)
      sidecars.update(write_shards(todo))
      _check_classes_after_decoding(output_dir, plan.labels, plan.labels_given, sidecars)
      manifest = _manifest(plan, sidecars)
      write_labels(output_dir, plan.labels)
      fileio.atomic_write_json(_join(output_dir, MANIFEST_FILENAME), manifest)
    except (tf.errors.OpError, OSError) as e:
      _remove_temp_files(output_dir)
      num_finished = len(tf.io.gfile.glob(_join(output_dir, "*-of-*.tfrecord")))
      raise UserError(_write_error(e, output_dir, num_finished)) from None
  return manifest


def _check_output_dir(output_dir, overwrite):
  """UserError for a folder that holds files and no earlier conversion, unless `overwrite`.

  An earlier conversion is known by its folder of sidecars (PROGRESS_DIRNAME),
  made before its first shard. With `overwrite`, the files named like a
  conversion's outputs (labels.txt, manifest.json, shards) are removed here:
  the user asked for that; all else stays.
  """
  if tf.io.gfile.isdir(_join(output_dir, PROGRESS_DIRNAME)):
    return
  names = sorted(name.rstrip("/") for name in tf.io.gfile.listdir(output_dir)
                 if not name.startswith("."))
  if not names:
    return
  like_ours = [name for name in names if name in (LABELS_FILENAME, MANIFEST_FILENAME)
               or any(fnmatch.fnmatchcase(name, f"{split}-*-of-*.tfrecord") for split in SPLITS)]
  if not overwrite:
    replaced = f"replaces {_some(like_ours)}" if like_ours else "removes none of its files"
    raise UserError(f"--output_dir {output_dir} is not empty and holds no make_tfrecords "
                    f"output ({_some(names)}): give a new or empty folder, or add --overwrite "
                    f"to convert into it ({replaced})")
  for name in like_ours:
    logging.warning("--overwrite: removing %s", _join(output_dir, name))
    tf.io.gfile.remove(_join(output_dir, name))


def _finished_and_todo(output_dir, shards):
  """(the sidecars of shards a previous run finished, by name; the other shards).

  Clears the way first: outputs this plan does not write, temp files, and the
  stale sidecars of the shards still to write (so that a sidecar there means
  its shard is done).
  """
  tf.io.gfile.makedirs(_join(output_dir, PROGRESS_DIRNAME))
  _remove_stale_outputs(output_dir, shards)
  sidecars, todo = {}, []
  for shard in shards:
    sidecar = _finished_shard(output_dir, shard)
    if sidecar is not None:
      sidecars[shard.name] = sidecar
      continue
    todo.append(shard)
    if tf.io.gfile.exists(sidecar_path(output_dir, shard.name)):
      tf.io.gfile.remove(sidecar_path(output_dir, shard.name))
  if sidecars:
    logging.info("Resuming: %d of %d shards are already complete", len(sidecars), len(shards))
  return sidecars, todo


def _write_shards_locally(output_dir, todo, labels, num_workers, max_pixels, max_side):
  """Writes `todo` here, decoding in `num_workers` processes; returns their sidecars by name."""
  progress = Progress(sum(len(shard.sources) for shard in todo), what="files")
  results = _counted(_ordered_results((s.path for shard in todo for s in shard.sources),
                                      num_workers, max_pixels, max_side), progress)
  return {shard.name: write_shard(output_dir, shard, results, labels) for shard in todo}


def _counted(results, progress):
  for result in results:
    progress.update(1)
    yield result


def _check_classes_after_decoding(output_dir, labels, labels_given, sidecars):
  """At least 2 classes with a converted image, and no class without one unless --labels named it.

  Counted after decoding: a class whose files were all skipped is no class.
  On failure, the sidecars of shards holding that class's skipped files are
  removed, so that the rerun after fixing the files decodes them again.
  """
  converted = collections.Counter(
      entry["label"] for sidecar in sidecars.values() for entry in sidecar["files"])
  skipped = [entry for sidecar in sidecars.values() for entry in sidecar["skipped"]]
  if not converted:
    first = skipped[0]
    raise UserError(f"no usable images: all {len(skipped)} files were skipped (e.g. "
                    f"{first['path']}: {first['reason']}); each file and why is logged above")
  empty = [label for label in labels if not converted[label]]
  for label in empty:
    logging.warning("Class %r has no readable image", label)
  if len(converted) >= 2 and (labels_given or not empty):
    return
  for name, sidecar in sidecars.items():
    if any(entry["label"] in empty for entry in sidecar["skipped"]):
      tf.io.gfile.remove(sidecar_path(output_dir, name))
  if len(converted) < 2:
    raise UserError(f"found {len(converted)} class(es) with readable images "
                    f"({', '.join(sorted(converted))}); need at least 2. No readable image in: "
                    f"{_some(empty)}; fix or replace their files (each skip and why is logged "
                    "above), then rerun")
  files = [entry for entry in skipped if entry["label"] == empty[0]]
  raise UserError(f"class {empty[0]!r} has no readable image: its {len(files)} files were all "
                  f"skipped (e.g. {files[0]['path']}: {files[0]['reason']}); fix or remove them, "
                  "or leave the class out with --labels, then rerun")


def _manifest(plan, sidecars):
  splits = {split: {"examples": 0, "shards": [], "per_class": {label: 0 for label in plan.labels}}
            for split in SPLITS}
  files = []
  skipped = list(plan.skipped)
  for shard in plan.shards:
    sidecar = sidecars[shard.name]
    split = splits[shard.split]
    split["examples"] += sidecar["records"]
    split["shards"].append({"name": shard.name, "records": sidecar["records"],
                            "sha256": sidecar["sha256"]})
    for entry in sidecar["files"]:
      split["per_class"][entry["label"]] += 1
      files.append(dict(entry, split=shard.split, shard=shard.name))
    skipped.extend(dict(entry, split=shard.split) for entry in sidecar["skipped"])
  return {
      "format_version": MANIFEST_VERSION,
      "options": plan.options,
      "labels": plan.labels,
      "num_examples": sum(split["examples"] for split in splits.values()),
      "splits": splits,
      "skipped": skipped,
      "ignored": plan.ignored,
      "files": files,
      "exact_duplicates": exact_duplicates(files),
  }


def exact_duplicates(files):
  """Groups of converted files with the same bytes (the manifest's sha256), reported, not removed.

  `files`: the manifest's entries (path, label, split, sha256). Each group lists
  its files (path order) and its `problems`: "across_classes" (one photo, two
  labels: one is wrong), "across_splits" (a photo both trained on and held out:
  the held-out accuracy is inflated), "within_class" (a photo counted twice in a
  class: it weighs double). Groups are in the order of their first path.
  """
  by_sha256 = collections.defaultdict(list)
  for entry in files:
    by_sha256[entry["sha256"]].append(entry)
  groups = []
  for sha256, entries in by_sha256.items():
    if len(entries) < 2:
      continue
    labels = [entry["label"] for entry in entries]
    problems = []
    if len(set(labels)) > 1:
      problems.append("across_classes")
    if len({entry["split"] for entry in entries}) > 1:
      problems.append("across_splits")
    if len(set(labels)) < len(labels):
      problems.append("within_class")
    groups.append({"sha256": sha256, "problems": problems,
                   "files": [{"path": entry["path"], "label": entry["label"],
                              "split": entry["split"]}
                             for entry in sorted(entries, key=lambda entry: entry["path"])]})
  return sorted(groups, key=lambda group: group["files"][0]["path"])


def _duplicate_lines(groups, max_lines):
  """The summary's lines on exact duplicates: counts by problem, then the groups."""
  if not groups:
    return []
  counts = collections.Counter(problem for group in groups for problem in group["problems"])
  meaning = (("across_classes", "across classes (one photo, two labels)"),
             ("across_splits", "across splits (held-out accuracy inflated)"),
             ("within_class", "within a class (weighs double)"))
  lines = [f"Exact duplicates (identical bytes): {len(groups)} groups of "
           f"{sum(len(group['files']) for group in groups)} files, kept as they are: "
           + ", ".join(f"{counts[problem]} {text}" for problem, text in meaning if counts[problem])]
  for group in groups[:max_lines]:
    problems = ", ".join(problem.replace("_", " ") for problem in group["problems"])
    lines.append(f"  {problems}: " + " = ".join(f"{entry['path']} ({entry['split']})"
                                                for entry in group["files"]))
  if len(groups) > max_lines:
    lines.append(f"  ... and {len(groups) - max_lines} more (manifest.json: exact_duplicates)")
  return lines


def summary_lines(manifest, output_dir, max_lines=20):
  """What a user wants to see after a conversion: counts, skipped files, where things are."""
  splits = manifest["splits"]
  counts = ", ".join(f"{split} {splits[split]['examples']}" for split in SPLITS)
  num_shards = sum(len(splits[split]["shards"]) for split in SPLITS)
  lines = [f"Wrote {manifest['num_examples']} examples ({counts}) of "
           f"{len(manifest['labels'])} classes in {num_shards} shards to {output_dir}"]
  skipped = manifest["skipped"]
  if skipped:
    lines.append(f"Skipped {len(skipped)} files:")
    lines.extend(f"  {entry['path']}: {entry['reason']}" for entry in skipped[:max_lines])
    if len(skipped) > max_lines:
      lines.append(f"  ... and {len(skipped) - max_lines} more")
  ignored = [entry["path"] for entry in manifest["ignored"]]
  if ignored:
    lines.append(f"Ignored {len(ignored)} files that are not named like images: {_some(ignored)}")
  empty = [label for label in manifest["labels"]
           if not sum(splits[split]["per_class"][label] for split in SPLITS)]
  if empty:
    lines.append(f"Classes from --labels with no images: {_some(empty)}")
  lines.extend(_duplicate_lines(manifest["exact_duplicates"], max_lines))
  lines.append(f"Labels: {_join(output_dir, LABELS_FILENAME)}")
  lines.append(f"Manifest: {_join(output_dir, MANIFEST_FILENAME)}")
  return lines
