"""The export's format: what an export dir holds and how readers find one.

`export_model` (tlframe.export.exporter) writes it; `Classifier`, bin/predict,
evaluation and the server read it through these names alone, so that reading a
model loads no trainer. The layout, signatures and JSON are fixed in
docs/production.md.
"""

import os

import tensorflow as tf

from tlframe.errors import UserError
from tlframe.train import layout as model_dir_layout
from tlframe.util import fileio

EXPORT_INFO_FILENAME = "tlframe_export.json"
# Written last into a version dir: its presence means the export is complete.
SAVED_MODEL_FILENAME = "saved_model.pb"
FORMAT_VERSION = 1
MAX_TOP_K = 5
TFLITE_DIRNAME = "tflite"
TFLITE_FILENAME = "model.tflite"
SERVING_DEFAULT = "serving_default"
SERVING_KEYED = "serving_keyed"
PREDICT_IMAGES = "predict_images"
OUTPUTS = {
    "classes": "int64 [B]: index of the top class",
    "labels": "string [B]: name of the top class",
    "probabilities": "float32 [B, C]: softmax(scores / temperature)",
    "scores": "float32 [B, C]: the head's raw scores (SVM margins for hinge losses)",
    "top_k_labels": "string [B, k]: the k most probable classes",
    "top_k_probabilities": "float32 [B, k]: their probabilities",
}
SIGNATURES = {
    SERVING_DEFAULT: {"inputs": {"image_bytes": "string [B]: encoded JPEG, PNG, GIF, BMP or "
                                                "WebP images"}},
    SERVING_KEYED: {"inputs": {"image_bytes": "string [B]: encoded images",
                               "key": "string [B]: passed through to the output `key`"}},
    PREDICT_IMAGES: {"inputs": {"images": "float32 [B, H, W, 3] in [0, 1], any H and W "
                                          "(resized inside as in training)"}},
}


def resolve_export_dir(path):
  """The export for a path a user gives: an export dir, a versions dir, or a model dir.

  `path` itself when it holds saved_model.pb; else the highest numbered
  `path/<N>/` (TF Serving's model base path) or `path/export/<N>/` (a model dir).
  """
  fileio.check_filesystem(path)
  if tf.io.gfile.exists(os.path.join(path, SAVED_MODEL_FILENAME)):
    return path
  for base in (path, os.path.join(path, model_dir_layout.EXPORT_DIRNAME)):
    latest = latest_version(base)
    if latest:
      return latest
  raise UserError(f"{path}: no saved_model.pb there nor in {path}/<N>/ or "
                  f"{path}/{model_dir_layout.EXPORT_DIRNAME}/<N>/; "
                  "give an export dir, or export the model dir first "
                  f"(bin/export --model_dir={path})")


def latest_version(export_base):
  """The highest numbered complete version dir under `export_base`, or None.

  Complete: it holds saved_model.pb, which an export on an object store moves
  in last (`fileio.publish_directory`).
  """
  for version in sorted(versions(export_base), reverse=True):
    path = os.path.join(export_base, str(version))
    if tf.io.gfile.exists(os.path.join(path, SAVED_MODEL_FILENAME)):
      return path
  return None


def versions(export_base):
  """The version numbers of the dirs under `export_base` (complete or not)."""
  if not tf.io.gfile.isdir(export_base):
    return []
  return [int(name.rstrip("/")) for name in tf.io.gfile.listdir(export_base)
          if name.rstrip("/").isdigit()]


