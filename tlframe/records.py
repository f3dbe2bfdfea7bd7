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
- Bad files (truncated, empty, not an image, unreadable, decompression bombs)
  are skipped with a reason in the manifest; the rest still converts.
"""

import collections
import concurrent.futures
import csv
import hashlib
import json
import multiprocessing
import os
import posixpath
import struct

from absl import logging
import tensorflow as tf

from tlframe import fileio
from tlframe import imageformat
from tlframe.errors import UserError
from tlframe.progress import Progress

SPLITS = ("train", "validation", "test")
LABELS_FILENAME = "labels.txt"
MANIFEST_FILENAME = "manifest.json"
MANIFEST_VERSION = 1
# Per-shard sidecars that make a killed run resumable; kept so a rerun of a
# finished conversion is a quick no-op.
PROGRESS_DIRNAME = ".make_tfrecords"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
DEFAULT_MAX_PIXELS = 100_000_000  # ~10000x10000: above any camera photo, far below a bomb
DEFAULT_SHARD_SIZE = 1000
# Re-encoded JPEGs (CMYK, --max_side): high enough that the loss is invisible.
_JPEG_QUALITY = 95
# Work handed to worker processes: enough in flight to keep them busy, little
# enough that memory stays bounded (images per task x tasks x workers).
_IMAGES_PER_TASK = 16
_TASKS_IN_FLIGHT_PER_WORKER = 3
_FILELIST_HEADER_NAMES = ("path", "filename", "file", "filepath", "image", "image_path")


# ---------------------------------------------------------------------------
# Reading a records directory (used by the pipeline's callers and training).


def split_file_pattern(records_dir, split):
  """The glob matching one split's shards, e.g. `<dir>/train-*-of-*.tfrecord`."""
  _check_split(split)
  return _join(records_dir, f"{split}-*-of-*.tfrecord")


def shard_filename(split, index, num_shards):
  return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def read_label_lines(path):
  """Non-empty stripped lines of a text file: a labels file's class names in order."""
  try:
    with tf.io.gfile.GFile(path, "r") as f:
      labels = [line.strip() for line in f.read().splitlines()]
  except tf.errors.NotFoundError:
    raise UserError(f"{path}: no such labels file") from None
  return [label for label in labels if label]


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
  """`directory`/labels.txt: the class names in label-index order, one per line (atomic)."""
  fileio.atomic_write_text(_join(directory, LABELS_FILENAME), "".join(f"{l}\n" for l in labels))


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


def _walk_files(root):
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
      unreadable.append((directory, f"unreadable directory: {_error_text(e)}"))
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
    raise UserError(f"--image_dir {image_dir}: no such directory")
  files, unwalked = _walk_files(image_dir)
  sources, ignored = [], []
  skipped = [{"path": _relative_key(image_dir, directory), "reason": reason}
             for directory, reason in unwalked]
  for path in files:
    key = _relative_key(image_dir, path)
    name = posixpath.basename(key)
    if name.startswith(".") or not _has_image_extension(name):
      ignored.append({"path": key, "reason": "not an image file name (extension or hidden file)"})
    elif "/" not in key:
      skipped.append({"path": key, "reason": "not inside a class sub-folder"})
    else:
      sources.append(Source(path, key, key.split("/", 1)[0], None))
  return sources, skipped, ignored


def _folder_of(path):
  """The folder a list file's relative paths resolve against."""
  return posixpath.dirname(path) if _is_remote(path) else os.path.dirname(os.path.abspath(path))


def read_filelist(path, flag, need_labels=True):
  """[(resolved path, label or None)] from a CSV or TSV of `path[,label]`; optional header.

  Blank lines and lines starting with '#' are skipped; a first line whose first
  field is a column name such as `path` or `filename` is a header.
  """
  try:
    with tf.io.gfile.GFile(path, "r") as f:
      lines = [(number, line) for number, line in enumerate(f.read().splitlines(), 1)
               if line.strip() and not line.startswith("#")]
  except tf.errors.NotFoundError:
    raise UserError(f"--{flag} {path}: no such file") from None
  delimiter = "\t" if lines and "\t" in lines[0][1] else ","
  base_dir = _folder_of(path)
  entries = []
  for number, line in lines:
    row = [field.strip() for field in next(csv.reader([line], delimiter=delimiter))]
    if number == lines[0][0] and row[0].lower() in _FILELIST_HEADER_NAMES:
      continue
    if len(row) > 2 or not row[0] or (need_labels and (len(row) < 2 or not row[1])):
      expected = "path,label" if need_labels else "path or path,label"
      raise UserError(f"--{flag} {path}: line {number} {line.strip()!r} is not {expected}")
    entries.append((_resolve(base_dir, row[0]), row[1] if len(row) == 2 and row[1] else None))
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


class BadImage(Exception):
  """This file is skipped; the message is the manifest's reason."""


def _sniff(data):
  """(format, width, height, note) from the header alone, before any pixel is decoded.

  note is 'cmyk' or '16bit' when the image must be re-encoded for other readers.
  """
  if not data:
    raise BadImage("empty file")
  if data[:3] == b"\xff\xd8\xff":
    try:
      height, width, channels = tf.io.extract_jpeg_shape(data).numpy().tolist()
    except tf.errors.InvalidArgumentError:
      raise BadImage("corrupt or truncated JPEG header") from None
    return "jpeg", width, height, "cmyk" if channels == 4 else None
  if data[:8] == b"\x89PNG\r\n\x1a\n":
    if len(data) < 26 or data[12:16] != b"IHDR":
      raise BadImage("truncated PNG header")
    width, height, bit_depth = struct.unpack(">IIB", data[16:25])
    return "png", width, height, "16bit" if bit_depth == 16 else None
  if data[:6] in (b"GIF87a", b"GIF89a"):
    if len(data) < 10:
      raise BadImage("truncated GIF header")
    width, height = struct.unpack("<HH", data[6:10])
    return "gif", width, height, None
  if data[:2] == b"BM":
    if len(data) < 26:
      raise BadImage("truncated BMP header")
    if struct.unpack("<I", data[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER
      width, height = struct.unpack("<hh", data[18:22])
    else:
      width, height = struct.unpack("<ii", data[18:26])
    return "bmp", abs(width), abs(height), None
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return ("webp",) + _webp_size(data) + (None,)
  raise BadImage("not an image (unrecognized file format)")


def _webp_size(data):
  chunk = data[12:16]
  try:
    if chunk == b"VP8 ":
      width, height = struct.unpack("<HH", data[26:30])
      return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
      bits = struct.unpack("<I", data[21:25])[0]
      return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
      return (int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1)
  except struct.error:
    pass
  raise BadImage("truncated or unknown WebP header")


def _error_text(error):
  message = getattr(error, "message", None) or str(error)
  return message.split("}}")[-1].strip().splitlines()[0] if message else type(error).__name__


def convert_image(path, max_pixels, max_side):
  """Reads, checks and encodes one file. Returns a dict; `encoded` is None when skipped."""
  result = {"sha256": None, "encoded": None, "reason": None}
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      data = f.read()
  except (tf.errors.OpError, OSError) as e:
    result["reason"] = f"unreadable: {_error_text(e)}"
    return result
  result["sha256"] = hashlib.sha256(data).hexdigest()
  try:
    source_format, width, height, note = _sniff(data)
    if width * height > max_pixels:
      raise BadImage(f"{width}x{height} = {width * height} pixels is over --max_pixels "
                     f"{max_pixels} (decompression bomb?)")
    if width == 0 or height == 0:
      raise BadImage(f"{width}x{height}: empty image")
    try:
      image = imageformat.decode_image(data)
    except tf.errors.OpError as e:
      raise BadImage(f"does not decode: {_error_text(e)}") from None
  except BadImage as e:
    result["reason"] = str(e)
    return result
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


def _init_worker(threads):
  # The cores are shared out among the workers instead of oversubscribed.
  tf.config.threading.set_intra_op_parallelism_threads(threads)
  tf.config.threading.set_inter_op_parallelism_threads(1)


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
  if num_workers <= 1:
    for path in paths:
      yield convert_image(path, max_pixels, max_side)
    return
  threads_per_worker = max(1, (os.cpu_count() or 1) // num_workers)
  # spawn, not fork: forking a process that already runs TensorFlow's threads can deadlock.
  with concurrent.futures.ProcessPoolExecutor(
      num_workers, mp_context=multiprocessing.get_context("spawn"),
      initializer=_init_worker, initargs=(threads_per_worker,)) as executor:
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
      plan = json.dumps([name, labels, options, [(s.path, s.key, s.label) for s in chunk]])
      shards.append(Shard(split, name, chunk, hashlib.sha256(plan.encode("utf-8")).hexdigest()))
  return shards


def _file_sha256(path):
  digest = hashlib.sha256()
  with tf.io.gfile.GFile(path, "rb") as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def _sidecar_path(output_dir, shard_name):
  return _join(_join(output_dir, PROGRESS_DIRNAME), shard_name + ".json")


def _finished_shard(output_dir, shard):
  """The sidecar of a shard a previous run completed with this same plan, else None."""
  shard_path = _join(output_dir, shard.name)
  sidecar_path = _sidecar_path(output_dir, shard.name)
  if not (tf.io.gfile.exists(shard_path) and tf.io.gfile.exists(sidecar_path)):
    return None
  try:
    sidecar = fileio.read_json(sidecar_path)
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None
  if sidecar.get("fingerprint") != shard.fingerprint or sidecar.get("sha256") != _file_sha256(
      shard_path):
    return None
  return sidecar


def _write_shard(output_dir, shard, results, label_index, progress):
  """Writes one shard from its sources' results: temp file, sidecar, then rename."""
  shard_path = _join(output_dir, shard.name)
  temp_path = fileio.temp_path_for(shard_path)
  files, skipped = [], []
  with tf.io.TFRecordWriter(temp_path) as writer:
    for source in shard.sources:
      result = next(results)
      progress.update(1)
      if result["encoded"] is None:
        logging.warning("Skipping %s: %s", source.path, result["reason"])
        skipped.append({"path": source.key, "reason": result["reason"], "sha256": result["sha256"]})
        continue
      example = imageformat.make_example(result["encoded"], result["format"],
                                         label_index[source.label], source.label, source.key,
                                         result["height"], result["width"])
      writer.write(example.SerializeToString(deterministic=True))
      files.append({"path": source.key, "label": source.label, "sha256": result["sha256"],
                    "reencoded": result["reencoded"]})
  sidecar = {"fingerprint": shard.fingerprint, "split": shard.split, "records": len(files),
             "sha256": _file_sha256(temp_path), "files": files, "skipped": skipped}
  fileio.atomic_write_json(_sidecar_path(output_dir, shard.name), sidecar)
  tf.io.gfile.rename(temp_path, shard_path, overwrite=True)
  return sidecar


def _remove_stale_outputs(output_dir, shards):
  """Makes `output_dir` hold only what this conversion plans, before it writes anything.

  The old manifest and labels go first, so that a run killed from here on
  leaves no manifest describing shards that are not there. Then temp files of
  killed runs, and shards (with their sidecars) this conversion does not write.
  """
  for name in (MANIFEST_FILENAME, LABELS_FILENAME):
    if tf.io.gfile.exists(_join(output_dir, name)):
      tf.io.gfile.remove(_join(output_dir, name))
  planned = {shard.name for shard in shards}
  progress_dir = _join(output_dir, PROGRESS_DIRNAME)
  for split in SPLITS:
    for path in tf.io.gfile.glob(split_file_pattern(output_dir, split)):
      if posixpath.basename(path) not in planned:
        logging.info("Removing %s: not part of this conversion", path)
        tf.io.gfile.remove(path)
    for path in tf.io.gfile.glob(_join(progress_dir, f"{split}-*.json")):
      if posixpath.basename(path)[:-len(".json")] not in planned:
        tf.io.gfile.remove(path)
    for path in (tf.io.gfile.glob(_join(output_dir, f".{split}-*.tmp-*"))
                 + tf.io.gfile.glob(_join(progress_dir, f".{split}-*.tmp-*"))):
      tf.io.gfile.remove(path)


# ---------------------------------------------------------------------------
# The conversion.


def _collect_sources(image_dir, filelist, split_filelists):
  if bool(image_dir) == bool(filelist):
    raise UserError("give exactly one of --image_dir or --filelist")
  if image_dir:
    # Absolute, so that paths in the split lists (resolved against their own folder) match.
    root = image_dir if _is_remote(image_dir) else os.path.abspath(image_dir)
    sources, skipped, ignored = list_image_dir(root)
  else:
    (sources, root), skipped, ignored = _sources_from_filelist(filelist), [], []
  duplicates = [path for path, n in collections.Counter(s.path for s in sources).items() if n > 1]
  if duplicates:
    raise UserError(f"--filelist {filelist}: {duplicates[0]} is listed more than once")
  sources = _apply_split_lists(sources, root, split_filelists, skipped)
  return sources, skipped, ignored


def _choose_labels(sources, labels, skipped):
  present = sorted({source.label for source in sources})
  if labels:
    if len(set(labels)) != len(labels):
      raise UserError(f"--labels has a duplicate class name: {labels}")
    unknown = [s for s in sources if s.label not in set(labels)]
    for source in unknown:
      skipped.append({"path": source.key, "reason": f"class {source.label!r} is not in --labels"})
    sources = [s for s in sources if s.label in set(labels)]
    for label in labels:
      if label not in present:
        logging.warning("Class %r from --labels has no images", label)
  else:
    labels = present
  with_images = {source.label for source in sources}
  if len(with_images) < 2:
    names = ", ".join(sorted(with_images)) or "none"
    raise UserError(f"found {len(with_images)} class(es) with images ({names}); need at least 2: "
                    "one sub-folder (or list label) per class")
  return sources, list(labels)


def convert(output_dir, *, image_dir=None, filelist=None, validation_filelist=None,
            test_filelist=None, labels=None, validation_percentage=10.0, test_percentage=10.0,
            shard_size=DEFAULT_SHARD_SIZE, max_side=None, max_pixels=DEFAULT_MAX_PIXELS,
            num_workers=1):
  """Converts images to sharded TFRecords in `output_dir`; returns the manifest (also written).

  Exactly one of `image_dir` (one sub-folder per class) or `filelist` (CSV/TSV
  `path,label`). `validation_filelist` / `test_filelist` fix those splits
  explicitly and replace their percentage; everything else is split by a hash
  of its relative path. `labels` fixes the class order (else sorted names).
  `max_side` downscales larger images; `max_pixels` rejects bigger headers
  before decoding. `num_workers` never changes the output.
  """
  split_filelists = {split: path for split, path in
                     (("validation", validation_filelist), ("test", test_filelist)) if path}
  for split in split_filelists:
    logging.info("The %s split comes from --%s_filelist; --%s_percentage is not used",
                 split, split, split)
  validation_percentage = 0.0 if validation_filelist else validation_percentage
  test_percentage = 0.0 if test_filelist else test_percentage
  if not (0 <= validation_percentage and 0 <= test_percentage and
          validation_percentage + test_percentage <= 100):
    raise UserError("--validation_percentage and --test_percentage must be >= 0 and sum to "
                    f"at most 100 (got {validation_percentage} and {test_percentage})")
  if shard_size < 1 or num_workers < 1 or max_pixels < 1 or (max_side is not None and max_side < 1):
    raise UserError("--shard_size, --num_workers, --max_pixels and --max_side must be positive")

  sources, skipped, ignored = _collect_sources(image_dir, filelist, split_filelists)
  sources, labels = _choose_labels(sources, labels, skipped)
  sources_by_split = {split: [] for split in SPLITS}
  for source in sorted(sources, key=lambda s: s.key):
    split = source.split or stable_split(source.key, validation_percentage, test_percentage)
    sources_by_split[split].append(source)

  options = {"image_dir": image_dir, "filelist": filelist,
             "validation_filelist": validation_filelist, "test_filelist": test_filelist,
             "labels": labels, "validation_percentage": validation_percentage,
             "test_percentage": test_percentage, "shard_size": shard_size,
             "max_side": max_side, "max_pixels": max_pixels}
  # Decoding options only: the sources and labels are in the fingerprint already.
  shards = _plan_shards(sources_by_split, labels, {"max_side": max_side, "max_pixels": max_pixels},
                        shard_size)

  tf.io.gfile.makedirs(_join(output_dir, PROGRESS_DIRNAME))
  _remove_stale_outputs(output_dir, shards)
  sidecars, todo = {}, []
  for shard in shards:
    sidecar = _finished_shard(output_dir, shard)
    if sidecar is None:
      todo.append(shard)
    else:
      sidecars[shard.name] = sidecar
  if sidecars:
    logging.info("Resuming: %d of %d shards are already complete", len(sidecars), len(shards))
  progress = Progress(sum(len(shard.sources) for shard in todo), what="files")
  label_index = {label: i for i, label in enumerate(labels)}
  results = _ordered_results((s.path for shard in todo for s in shard.sources), num_workers,
                             max_pixels, max_side)
  for shard in todo:
    sidecars[shard.name] = _write_shard(output_dir, shard, results, label_index, progress)

  manifest = _manifest(options, labels, shards, sidecars, skipped, ignored)
  write_labels(output_dir, labels)
  manifest_path = _join(output_dir, MANIFEST_FILENAME)
  fileio.atomic_write_json(manifest_path, manifest)
  if not manifest["num_examples"]:
    first = manifest["skipped"][0]
    raise UserError(f"no usable images: all {len(sources)} files were skipped (e.g. "
                    f"{first['path']}: {first['reason']}); every reason is in {manifest_path}")
  return manifest


def _manifest(options, labels, shards, sidecars, skipped, ignored):
  splits = {split: {"examples": 0, "shards": [], "per_class": {label: 0 for label in labels}}
            for split in SPLITS}
  files = []
  skipped = list(skipped)
  for shard in shards:
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
      "options": options,
      "labels": labels,
      "num_examples": sum(split["examples"] for split in splits.values()),
      "splits": splits,
      "skipped": skipped,
      "ignored": ignored,
      "files": files,
  }


def summary_lines(manifest, output_dir, max_skipped_lines=20):
  """What a user wants to see after a conversion: counts, skipped files, where things are."""
  splits = manifest["splits"]
  counts = ", ".join(f"{split} {splits[split]['examples']}" for split in SPLITS)
  num_shards = sum(len(splits[split]["shards"]) for split in SPLITS)
  lines = [f"Wrote {manifest['num_examples']} examples ({counts}) of "
           f"{len(manifest['labels'])} classes in {num_shards} shards to {output_dir}"]
  skipped = manifest["skipped"]
  if skipped:
    lines.append(f"Skipped {len(skipped)} files:")
    lines.extend(f"  {entry['path']}: {entry['reason']}" for entry in skipped[:max_skipped_lines])
    if len(skipped) > max_skipped_lines:
      lines.append(f"  ... and {len(skipped) - max_skipped_lines} more")
  if manifest["ignored"]:
    lines.append(f"Ignored {len(manifest['ignored'])} files that are not named like images")
  lines.append(f"Labels: {_join(output_dir, LABELS_FILENAME)}")
  lines.append(f"Manifest: {_join(output_dir, MANIFEST_FILENAME)}")
  return lines
