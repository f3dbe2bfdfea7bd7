"""The servable: one export directory loaded once, with its signatures and metadata.

Also the image checks a request's bytes pass before the model sees them
(`check_image_headers`: no decompression bomb reaches a decoder).
"""

import json
import os

from google.protobuf import json_format
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from tlframe import export
from tlframe import imageformat
from tlframe.errors import UserError
from tlframe.serve.rest import DEFAULT_SIGNATURE, IMAGE_BYTES_INPUT, RequestError

def _version_of(export_dir):
  name = os.path.basename(os.path.normpath(export_dir))
  return int(name) if name.isdigit() else 1


class Servable:
  """One loaded export: its signatures, metadata and version."""

  def __init__(self, export_dir):
    self.export_dir = export_dir
    self.version = _version_of(export_dir)
    try:
      self._model = tf.saved_model.load(export_dir)
    except (OSError, ValueError, tf.errors.OpError) as e:
      raise UserError(f"{export_dir} does not load as a SavedModel ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0][:200]}); export the model again") from None
    self.signatures = dict(self._model.signatures)
    if DEFAULT_SIGNATURE not in self.signatures:
      raise UserError(f"{export_dir} has no {DEFAULT_SIGNATURE!r} signature "
                      f"(it has {', '.join(sorted(self.signatures)) or 'none'}); "
                      "serve an export written by bin/export")
    # {signature: {input name: TensorSpec}}
    self.input_specs = {name: fn.structured_input_signature[1]
                        for name, fn in self.signatures.items()}
    self.signature_defs = _signature_defs(export_dir)
    info_path = os.path.join(export_dir, export.EXPORT_INFO_FILENAME)
    self.export_info = None
    if tf.io.gfile.exists(info_path):
      with tf.io.gfile.GFile(info_path) as f:
        self.export_info = json.load(f)

  def run(self, signature, inputs):
    """{input: array [B, ...]} -> {output: array [B, ...]} through one signature."""
    outputs = self.signatures[signature](**{name: tf.constant(value)
                                            for name, value in inputs.items()})
    return {name: value.numpy() for name, value in outputs.items()}

  def warm_up(self):
    """One call on a real PNG, so that the first request does not pay for graph set-up."""
    png = tf.io.encode_png(tf.zeros([8, 8, 3], tf.uint8)).numpy()
    self.run(DEFAULT_SIGNATURE, {IMAGE_BYTES_INPUT: np.array([png], dtype=object)})


def _signature_defs(export_dir):
  """The SignatureDefs as TF Serving's metadata JSON writes them (proto field names)."""
  saved_model = saved_model_pb2.SavedModel()
  with tf.io.gfile.GFile(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
    saved_model.ParseFromString(f.read())
  return {name: json_format.MessageToDict(signature_def,
                                          always_print_fields_with_no_presence=True,
                                          preserving_proto_field_name=True)
          for name, signature_def in saved_model.meta_graphs[0].signature_def.items()}


def check_image_headers(images, max_pixels):
  """Refuses (400) image bytes whose header is no image or declares over `max_pixels` pixels.

  Reads headers only, before any pixel is decoded: a decompression bomb costs nothing.
  """
  for index, data in enumerate(images):
    try:
      imageformat.check_header(data, max_pixels, limit_name="--max_pixels")
    except imageformat.ImageError as e:
      raise RequestError(400, f"instance {index}: {e}") from None


def first_undecodable(images):
  """(index, message) of the first image bytes the export's decoder rejects, else None."""
  for index, data in enumerate(images):
    try:
      imageformat.decode_image(data)
    except tf.errors.InvalidArgumentError as e:
      return index, imageformat.op_error_text(e)
  return None


