"""The Python API to a trained classifier: `tlframe.Classifier.load(path).predict(images)`.

    import tlframe
    classifier = tlframe.Classifier.load("runs/demo/model")   # or an export dir
    result = classifier.predict(["cat.jpg", open("cup.png", "rb").read(), pixels])
    result.labels            # ['chelsea', 'coffee', ...]
    result.probabilities     # [N, C] float32, columns in classifier.labels order

It runs the export (tlframe.export) the way TF Serving would: file contents
and bytes through the `serving_default` signature (decoded and resized inside),
pixel arrays through `predict_images`.
"""

import dataclasses
import json
import os

import numpy as np
import tensorflow as tf

from tlframe import export
from tlframe import imageformat
from tlframe.errors import UserError

DEFAULT_BATCH_SIZE = 32


@dataclasses.dataclass
class Predictions:
  """Results for N images, in input order; columns of [N, C] arrays follow `label_names`."""
  labels: list                 # N class names: the most probable class of each image
  classes: np.ndarray          # [N] int64: its index in label_names
  probabilities: np.ndarray    # [N, C] float32: calibrated probabilities
  scores: np.ndarray           # [N, C] float32: the head's raw scores (SVM margins for hinge)
  label_names: list            # the C class names

  def __len__(self):
    return len(self.labels)

  @property
  def confidences(self):
    """[N] the probability of each image's predicted class."""
    return self.probabilities[np.arange(len(self.classes)), self.classes]

  def top_k(self, k=3):
    """[[(label, probability), ...] k best per image, most probable first]."""
    order = np.argsort(-self.probabilities, axis=1, kind="stable")[:, :k]
    return [[(self.label_names[c], float(row[c])) for c in top]
            for row, top in zip(self.probabilities, order)]


class Classifier:
  """An export loaded for prediction. Use `Classifier.load(path)`."""

  def __init__(self, export_dir, model, info):
    self.export_dir = export_dir
    self.info = info
    self.label_names = list(info["labels"])
    self.image_size = info["image_size"]
    self._serve_bytes = model.signatures[export.SERVING_DEFAULT]
    self._predict_images = model.signatures[export.PREDICT_IMAGES]
    self._model = model  # keeps the signatures' variables alive

  @classmethod
  def load(cls, path):
    """Loads an export dir, or the latest export of a model dir (`<path>/export/<N>`)."""
    export_dir = export.resolve_export_dir(path)
    info_path = os.path.join(export_dir, export.EXPORT_INFO_FILENAME)
    if not tf.io.gfile.exists(info_path):
      raise UserError(f"{export_dir} has no {export.EXPORT_INFO_FILENAME}: not a tlframe export; "
                      "export the model dir with bin/export")
    with tf.io.gfile.GFile(info_path, "r") as f:
      info = json.load(f)
    try:
      model = tf.saved_model.load(export_dir)
    except (OSError, ValueError, tf.errors.OpError) as e:
      raise UserError(f"{export_dir} does not load as a SavedModel ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200]}); export the model again") from None
    return cls(export_dir, model, info)

  def __repr__(self):
    return f"Classifier({self.export_dir!r}, labels={self.label_names})"

  def classify_bytes(self, encoded):
    """Encoded images [B] (bytes) -> the export's outputs as numpy; InvalidArgumentError if
    any does not decode."""
    outputs = self._serve_bytes(image_bytes=tf.constant(list(encoded), tf.string))
    return {name: value.numpy() for name, value in outputs.items()}

  def classify_images(self, images):
    """float32 [B, H, W, 3] in [0, 1] (one size per batch) -> the export's outputs as numpy."""
    outputs = self._predict_images(images=tf.convert_to_tensor(images, tf.float32))
    return {name: value.numpy() for name, value in outputs.items()}

  def predict(self, images, *, batch_size=DEFAULT_BATCH_SIZE,
              max_pixels=imageformat.DEFAULT_MAX_PIXELS):
    """Classifies images given as file paths, encoded bytes, or pixel arrays; -> Predictions.

    A path or bytes must be a JPEG, PNG, GIF, BMP or WebP; an array is [H, W, 3],
    uint8 (0-255) or float in [0, 1]. One image may be given alone. Raises
    UserError naming the first input that cannot be read or decoded; every
    header is checked before any image is decoded, so a file declaring more
    than `max_pixels` pixels (a decompression bomb) costs nothing.
    """
    if isinstance(images, (str, bytes, os.PathLike, np.ndarray, tf.Tensor)) and not (
        isinstance(images, (np.ndarray, tf.Tensor)) and len(np.shape(images)) == 4):
      images = [images]
    images = list(images)
    encoded, arrays = {}, {}
    for index, image in enumerate(images):
      if isinstance(image, (str, os.PathLike)):
        encoded[index] = _read_file(os.fspath(image))
      elif isinstance(image, (bytes, bytearray)):
        encoded[index] = bytes(image)
      else:
        arrays[index] = _to_float_image(image, index)
    for index, data in encoded.items():
      _check_header(images[index], index, data, max_pixels)
    outputs = [None] * len(images)
    positions = sorted(encoded)
    for start in range(0, len(positions), batch_size):
      batch = positions[start:start + batch_size]
      data = [encoded[i] for i in batch]
      try:
        result = self.classify_bytes(data)
      except tf.errors.InvalidArgumentError:
        _raise_for_undecodable(images, batch, data)
        raise
      for row, index in enumerate(batch):
        outputs[index] = (result["scores"][row], result["probabilities"][row])
    for index, array in arrays.items():
      result = self.classify_images(array[None])
      outputs[index] = (result["scores"][0], result["probabilities"][0])
    num_classes = len(self.label_names)
    scores = np.array([o[0] for o in outputs], np.float32).reshape([-1, num_classes])
    probabilities = np.array([o[1] for o in outputs], np.float32).reshape([-1, num_classes])
    classes = np.argmax(scores, axis=1).astype(np.int64)
    return Predictions(labels=[self.label_names[c] for c in classes], classes=classes,
                       probabilities=probabilities, scores=scores,
                       label_names=list(self.label_names))


def _read_file(path):
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  except (tf.errors.OpError, OSError) as e:
    raise UserError(f"{path}: cannot read ({imageformat.op_error_text(e)})") from None


def _to_float_image(image, index):
  array = np.asarray(image)
  if array.ndim != 3 or array.shape[-1] != 3:
    raise UserError(f"image {index}: an array must be [height, width, 3], not {array.shape}")
  if array.dtype == np.uint8:
    return array.astype(np.float32) / 255.0
  if not np.issubdtype(array.dtype, np.floating):
    raise UserError(f"image {index}: arrays must be uint8 (0-255) or float in [0, 1], not "
                    f"{array.dtype}")
  return array.astype(np.float32)


def _name(image, index):
  """How a message names an input: its path, else its position."""
  return os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"image {index}"


def _check_header(image, index, data, max_pixels):
  try:
    imageformat.check_header(data, max_pixels, "max_pixels")
  except imageformat.ImageError as e:
    raise UserError(f"{_name(image, index)}: {e}") from None


def _raise_for_undecodable(images, batch, data):
  """Raises UserError naming the first of `batch` whose bytes do not decode, if any."""
  for index, encoded in zip(batch, data):
    try:
      imageformat.decode_checked(encoded)
    except imageformat.ImageError as e:
      raise UserError(f"{_name(images[index], index)}: {e}") from None
