"""Batch prediction over image files: the library behind bin/predict (and bin/evaluate --image_dir).

Files are named by a folder (searched recursively for image file names), a
glob pattern, a list file (one path per line, or `path,label` CSV/TSV lines,
relative to the list's folder), or a single image file. tf.data reads, decodes
and resizes them in parallel, in the export's own way (`imageformat.decode_image`,
`pipeline.preprocess` in the model's resize mode), while the previous batch runs
through the export's `predict_images` signature.

A file that cannot be read or decoded (empty, truncated, not an image) does
not stop the run: it gets a row with its error, and the rest go on.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from tlframe.util import fileio
from tlframe import imageformat
from tlframe import pipeline
from tlframe import records
from tlframe.errors import UserError
from tlframe.util.progress import Progress

_LIST_EXTENSIONS = (".txt", ".csv", ".tsv", ".lst")
_GLOB_CHARACTERS = "*?["


@dataclasses.dataclass
class Row:
  """One file's result: `error` is None for a classified image, else why it was not."""
  path: str
  label: str = None
  probability: float = None
  top_k: list = None           # [(label, probability)], most probable first
  probabilities: np.ndarray = None
  error: str = None


def list_images(spec, line_numbers=None):
  """The image files `spec` names (DIR | GLOB | LIST file | one image), in a stable order.

  When `spec` is read as a list file, a dict `line_numbers` gets each path's line.
  Messages cite the argument `spec` (bin/predict's --images).
  """
  fileio.check_filesystem(spec, "spec")
  if tf.io.gfile.isdir(spec):
    files, _ = records.walk_files(spec)
    paths = [path for path in files if path.lower().endswith(records.IMAGE_EXTENSIONS)
             and not os.path.basename(path).startswith(".")]
    what = f"the folder holds no image files ({', '.join(records.IMAGE_EXTENSIONS)})"
  elif any(character in spec for character in _GLOB_CHARACTERS):
    paths = sorted(tf.io.gfile.glob(spec))
    what = "no files match it"
  elif spec.lower().endswith(_LIST_EXTENSIONS) and tf.io.gfile.exists(spec):
    paths = [path for path, _ in records.read_filelist(spec, "spec", need_labels=False,
                                                       line_numbers=line_numbers)]
    what = "the list names no files"
  elif tf.io.gfile.exists(spec):
    paths = [spec]
    what = None
  else:
    raise UserError(f"spec={spec}: no such file or folder; give a folder, a glob pattern "
                    "(quoted), a list file (.txt/.csv) or an image", arguments=["spec"])
  if not paths:
    raise UserError(f"spec={spec}: {what}", arguments=["spec"])
  return paths


def _load(path, image_size, resize_mode, max_pixels):
  """(image [S, S, 3] float32, ok): a file that does not read, pass the header check
  (`imageformat.check_header`: no bomb is decoded) or decode gives ok=False."""
  return pipeline.try_map(
      path, lambda p: pipeline.preprocess(
          imageformat.decode_within(tf.io.read_file(p), max_pixels), image_size, resize_mode),
      tf.zeros([image_size, image_size, 3]))


def image_batches(paths, batch_size, image_size, resize_mode,
                  max_pixels=imageformat.DEFAULT_MAX_PIXELS):
  """A dataset of (images [B, S, S, 3] float32, ok [B] bool) in the order of `paths`."""
  if batch_size < 1:
    raise UserError(f"batch_size={batch_size} must be positive", arguments=["batch_size"])
  if max_pixels < 1:
    raise UserError(f"max_pixels={max_pixels} must be positive", arguments=["max_pixels"])
  dataset = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))
  dataset = dataset.interleave(lambda path: _load(path, image_size, resize_mode, max_pixels),
                               cycle_length=tf.data.AUTOTUNE,
                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def explain_failure(path, max_pixels=imageformat.DEFAULT_MAX_PIXELS):
  """Why `path` did not load, in a few words (read again: only for the files that failed)."""
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      data = f.read()
  except (tf.errors.OpError, OSError) as e:
    return f"unreadable: {imageformat.op_error_text(e)}"
  try:
    imageformat.decode_checked(data, max_pixels, "--max_pixels")
  except imageformat.ImageError as e:
    return str(e)
  return "does not decode"


def predict_files(classifier, paths, *, batch_size=32, top_k=3, log_progress=True,
                  max_pixels=imageformat.DEFAULT_MAX_PIXELS):
  """Yields a Row per path, in order, classifying with a loaded `Classifier`.

  A file whose header declares more than `max_pixels` pixels gets an error row
  without a pixel decoded (a decompression bomb).
  """
  progress = Progress(len(paths), what="images") if log_progress else None
  batches = image_batches(paths, batch_size, classifier.image_size,
                          classifier.info["resize_mode"], max_pixels)
  position = 0
  label_names = classifier.label_names
  for images, ok in batches:
    ok = ok.numpy()
    batch_paths = paths[position:position + len(ok)]
    position += len(ok)
    probabilities = None
    if ok.any():
      # Failed files hold placeholders: classify only the loaded ones.
      probabilities = classifier.classify_images(tf.boolean_mask(images, ok))["probabilities"]
    row_of_loaded = np.cumsum(ok) - 1
    for i, path in enumerate(batch_paths):
      if not ok[i]:
        yield Row(path=path, error=explain_failure(path, max_pixels))
        continue
      row = probabilities[row_of_loaded[i]]
      order = np.argsort(-row, kind="stable")[:top_k]
      yield Row(path=path, label=label_names[order[0]], probability=float(row[order[0]]),
                top_k=[(label_names[c], float(row[c])) for c in order], probabilities=row)
    if progress:
      progress.update(len(ok))
