"""The export stage: a trained model dir -> a SavedModel that classifies raw image bytes.

`export_model(model_dir)` writes `<model_dir>/export/<N>/` (TF Serving's
versioned layout, N = 1, 2, ...): the frozen backbone and the head in one
SavedModel that loads with `import tensorflow` alone (no tlframe, no
tensorflow_hub), `assets/labels.txt`, and `tlframe_export.json` describing it.
The layout, signatures and JSON are fixed in docs/production.md:

- `serving_default`: `image_bytes` string [B] (JPEG, PNG, GIF, BMP, WebP) ->
  outputs; `serving_keyed`: the same plus a `key` [B] passed through;
- `predict_images`: `images` float32 [B, H, W, 3] in [0, 1] of any size ->
  outputs;
- outputs: `classes` int64 [B], `labels` string [B], `probabilities` float32
  [B, C] (softmax of scores / T), `scores` [B, C] (the head's raw scores or SVM
  margins), `top_k_labels` [B, k], `top_k_probabilities` [B, k], k = min(5, C).

Every image goes through the training pipeline's own pieces,
`imageformat.decode_image` and `pipeline.preprocess` in the model's resize
mode, so the export sees the pixels training saw. T is the temperature in
`<model_dir>/calibration.json` (tlframe.train.calibration), 1 without it. A head
trained with flipped features (head_config.json's `flip_features`) scores each
image as the mean of its scores and its left-right mirror's, as evaluation
did (`features.average_flip_scores`); `average_flips` in the JSON says so.

With `tflite=True` the version dir also holds `tflite/model.tflite` (float32
input [1, S, S, 3] in [0, 1], already resized; outputs `classes`,
`probabilities`, `scores`) and `tflite/labels.txt`, checked against the
SavedModel before the export is published.

A version is written into a hidden temporary directory and renamed into place
when complete, so TF Serving and readers never see a half export.
"""

import os
import sys
import tempfile
import uuid
import warnings

import numpy as np
import tensorflow as tf
from absl import logging

import tlframe
from tlframe.backbone import loading as backbone_lib
from tlframe.train import calibration as calibration_lib
from tlframe.util import fileio
from tlframe.train import tuned_blocks
from tlframe.train import head as head_lib
from tlframe import imageformat
from tlframe.train import layout as model_dir_layout
from tlframe import pipeline
from tlframe import records
from tlframe.errors import UserError
from tlframe.export import layout as export_layout
from tlframe.export import templates
from tlframe.export.layout import (EXPORT_INFO_FILENAME, FORMAT_VERSION, MAX_TOP_K,
                                   OUTPUTS, PREDICT_IMAGES, SAVED_MODEL_FILENAME, SERVING_DEFAULT,
                                   SERVING_KEYED, SIGNATURES, TFLITE_DIRNAME, TFLITE_FILENAME,
                                   versions)

# The modules whose code an export traces: a change to any makes new export templates.
_TRACED_MODULES = (sys.modules[__name__], backbone_lib, head_lib, imageformat, pipeline,
                   export_layout)
# An export serves inference: the gradient functions of its ops are not traced into it
# (0.05-0.09 s of the pair's ~1.7 s save, all of it in Python).
_SAVE_OPTIONS = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
# How far the TFLite model may be from the SavedModel (float kernels differ).
TFLITE_PROBABILITY_TOLERANCE = 1e-3


class ClassifierModule(tf.Module):
  """The backbone and the head behind the export's signatures."""

  def __init__(self, backbone, head, labels, temperature, resize_mode, labels_file, *,
               average_flips=False):
    super().__init__(name="tlframe_classifier")
    pipeline.check_resize_mode(resize_mode)
    self.image_size = backbone.input_size
    self.resize_mode = resize_mode
    self.top_k = min(MAX_TOP_K, len(labels))
    # The backbone's variables and the head are tracked, so their variables are saved. Not
    # the backbone's module: saving it would save every function it has (its bfloat16 entry
    # too), where the signatures reach the one they call; that cost seconds per export.
    self.backbone_variables = [trackable for trackable in
                               tf.train.TrackableView(backbone.module).descendants()
                               if isinstance(trackable, tf.Variable)]
    self.head = head
    self.labels_file = tf.saved_model.Asset(labels_file)
    self._backbone = backbone
    # Variables, not constants: the graph is then the same for every model of its
    # shape, and an export template's (templates) holds any model's values.
    self.label_names = tf.Variable(np.asarray(labels, dtype=object), dtype=tf.string,
                                   trainable=False, name="label_names")
    self.temperature = tf.Variable(float(temperature), trainable=False, name="temperature")
    self.average_flips = bool(average_flips)
    self._image_spec = tf.TensorSpec([self.image_size, self.image_size, 3], tf.float32)
    # Every signature classifies through this one function: the backbone's graph is
    # traced, and saved, once (each signature tracing it anew cost seconds per export).
    self._classify = tf.function(self.outputs, autograph=False, input_signature=[
        tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.float32)])

  def model_variables(self):
    """{object path: variable} of the variables that are not the backbone's (the head's,
    the labels, the temperature): what makes one model's export differ from another's."""
    head = {f"head/{name}": value for name, value in vars(self.head).items()
            if isinstance(value, tf.Variable)}
    return dict(head, label_names=self.label_names, temperature=self.temperature)

  @property
  def backbone_function(self):
    """The backbone's module as loaded: its float32 entry point whatever the precision."""
    return self._backbone.module

  def outputs(self, images, backbone=None):
    """float32 [B, S, S, 3] in [0, 1] -> the signatures' output dict."""
    scores = self.scores(images, backbone or self._backbone)
    probabilities = tf.nn.softmax(scores / self.temperature, axis=-1)
    # top_k orders ties like argmax does (lower index first), so classes = top 1.
    top = tf.math.top_k(scores, k=self.top_k)
    label_names = self.label_names.read_value()
    classes = tf.cast(top.indices[:, 0], tf.int64)
    return {
        "classes": classes,
        "labels": tf.gather(label_names, classes),
        "probabilities": probabilities,
        "scores": scores,
        "top_k_labels": tf.gather(label_names, top.indices),
        "top_k_probabilities": tf.gather(probabilities, top.indices, batch_dims=1),
    }

  def scores(self, images, backbone):
    """[B, C] head scores; with average_flips, the mean over each image and its mirror."""
    if not self.average_flips:
      return self.head(backbone(images))
    both = self.head(backbone(tf.concat([images, tf.image.flip_left_right(images)], axis=0)))
    original, mirrored = tf.split(both, 2, axis=0)
    return (original + mirrored) / 2

  def _decode_and_resize(self, image_bytes):
    return pipeline.preprocess(imageformat.decode_image(image_bytes), self.image_size,
                               self.resize_mode)

  def _resize(self, images):
    size = self.image_size

    def each_image():
      return tf.map_fn(lambda image: pipeline.preprocess(image, size, self.resize_mode),
                       images, fn_output_signature=self._image_spec)

    if self.resize_mode == "imagenet_crop":
      return tf.ensure_shape(each_image(), [None, size, size, 3])  # it crops S x S images too
    # The other modes leave an S x S image as it is (resizing to the same size is
    # exact), so a batch already at size skips the per-image loop.
    shape = tf.shape(images)
    resized = tf.cond(tf.logical_and(shape[1] == size, shape[2] == size),
                      lambda: tf.clip_by_value(images, 0.0, 1.0), each_image)
    return tf.ensure_shape(resized, [None, size, size, 3])

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
               autograph=False)
  def serve_bytes(self, image_bytes):
    images = tf.map_fn(self._decode_and_resize, image_bytes, fn_output_signature=self._image_spec)
    return self._classify(images)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes"),
                                tf.TensorSpec([None], tf.string, name="key")],
               autograph=False)
  def serve_keyed(self, image_bytes, key):
    outputs = self.serve_bytes(image_bytes)
    outputs["key"] = tf.identity(key)
    return outputs

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")],
               autograph=False)
  def predict_images(self, images):
    return self._classify(self._resize(images))

  def signatures(self):
    # The functions, not their concrete functions: tf.saved_model.save traces them in its
    # own context anyway, so tracing them here first would trace the backbone twice.
    return {SERVING_DEFAULT: self.serve_bytes, SERVING_KEYED: self.serve_keyed,
            PREDICT_IMAGES: self.predict_images}


def export_model(model_dir, *, export_base=None, precision="float32", tflite=False,
                 backbone=None):
  """Exports the model trained into `model_dir` as the next version; returns its directory.

  export_base: where the versions go, default `<model_dir>/export`. precision:
  the backbone's compute precision in the export ("float32", "bfloat16" or
  "auto" for bfloat16 where this machine has it). tflite: also write and check
  a TFLite model. backbone: the model's backbone as the caller (bin/train)
  already loaded it, to skip loading it again when it computes in the
  export's precision (in float32 any loaded module does: a bfloat16 pass's
  module too) and no fine-tuning changed it.
  """
  head, config = head_lib.load_head(model_dir)
  calibration = calibration_lib.read_calibration(model_dir)
  precision = backbone_lib.resolve_precision(precision)
  backbone = None if backbone is None or config.fine_tune else _at_precision(backbone, precision)
  if backbone is None:
    backbone = backbone_lib.load_backbone(config.backbone, features=config.features,
                                          input_size=config.image_size, precision=precision)
  if backbone.output_dim != config.num_features:
    raise UserError(f"{config.backbone} gives {backbone.output_dim} features but the head in "
                    f"{model_dir} takes {config.num_features}: the backbone changed since "
                    "training; retrain")
  if config.fine_tune:
    # Into this loaded copy only: the module's own files stay as they are.
    tuned_blocks.restore_backbone_variables(backbone, model_dir, config.fine_tune["blocks"])
  export_base = export_base or os.path.join(model_dir, model_dir_layout.EXPORT_DIRNAME)
  tf.io.gfile.makedirs(export_base)
  tmp = os.path.join(export_base, f".tmp-{uuid.uuid4().hex[:12]}")
  try:
    tf.io.gfile.makedirs(tmp)
    records.write_labels(tmp, config.labels)
    module = ClassifierModule(backbone, head, config.labels, calibration["temperature"],
                              config.resize_mode, os.path.join(tmp, records.LABELS_FILENAME),
                              average_flips=config.flip_features)
    # A fine-tuned backbone's weights are not a template's; a TFLite model needs the traces.
    template_key = None if (config.fine_tune or tflite) else _template_key(
        backbone, num_classes=config.num_classes,
        feature_normalization=config.feature_normalization, resize_mode=config.resize_mode,
        flip_features=config.flip_features)
    labels_path = os.path.join(tmp, records.LABELS_FILENAME)
    from_template = template_key is not None and templates.export_from_template(
        template_key, module.model_variables(), tmp, labels_path)
    if not from_template:
      tf.saved_model.save(module, tmp, signatures=module.signatures(), options=_SAVE_OPTIONS)
    tf.io.gfile.remove(labels_path)  # the export's copy is assets/labels.txt
    if template_key is not None and not from_template:
      templates.keep(template_key, tmp)
    tflite_path = None
    if tflite:
      tflite_path = os.path.join(TFLITE_DIRNAME, TFLITE_FILENAME)
      _write_tflite(module, os.path.join(tmp, TFLITE_DIRNAME), config.labels)
    info = dict(
        format_version=FORMAT_VERSION, tlframe_version=tlframe.__version__,
        backbone=config.backbone, backbone_choice=config.backbone_choice,
        features=config.features, image_size=config.image_size,
        resize_mode=config.resize_mode, average_flips=module.average_flips,
        fine_tuned_blocks=config.fine_tune["blocks"] if config.fine_tune else None,
        precision=backbone.precision, loss=config.loss,
        labels=list(config.labels), num_classes=len(config.labels), top_k=module.top_k,
        calibration=dict(method=calibration["method"],
                         temperature=float(calibration["temperature"]),
                         fitted_on=calibration.get("fitted_on")),
        signatures={name: dict(spec, outputs=OUTPUTS) for name, spec in SIGNATURES.items()},
        tflite=tflite_path)
    info["signatures"][SERVING_KEYED]["outputs"] = dict(
        OUTPUTS, key="string [B]: the input `key`")
    fileio.atomic_write_json(os.path.join(tmp, EXPORT_INFO_FILENAME), info)
    return _publish(tmp, export_base)
  finally:
    if tf.io.gfile.exists(tmp):
      tf.io.gfile.rmtree(tmp)


def _at_precision(backbone, precision):
  """The loaded `backbone` computing at `precision` (resolved): itself, or its float32 entry
  point (every module has one); None when it cannot (a float32 load, bfloat16 asked for)."""
  if precision == "float32":
    backbone = backbone.in_float32()
  return backbone if backbone.precision == precision else None


def _template_key(backbone, **head_shape):
  return templates.graph_key(backbone, traced_modules=_TRACED_MODULES, **head_shape)


def keep_template(backbone, *, precision, num_classes, feature_normalization, resize_mode,
                  flip_features):
  """Keeps the export template of a model of this shape (templates), unless one is kept.

  The graph is traced from a head of zeros and placeholder labels: a model's
  own values replace them when its export is written from the template.
  bin/train runs this in a thread while it trains, so that even the first
  model of a graph is exported from its template. backbone: as loaded for
  training; the export runs it at `precision` (export_model's). Returns the
  template's key; None where that export would load the backbone anew (it
  computes in another precision than the one given).
  """
  backbone = _at_precision(backbone, backbone_lib.resolve_precision(precision))
  if backbone is None:
    return None
  key = _template_key(backbone, num_classes=num_classes,
                      feature_normalization=feature_normalization, resize_mode=resize_mode,
                      flip_features=flip_features)
  if templates.exists(key):
    return key
  labels = [f"class_{index}" for index in range(num_classes)]
  # "auto" (the CV's choice to come) is none or standardize: the one graph without an l2 norm.
  head = head_lib.LinearHead(backbone.output_dim, num_classes,
                             feature_normalization=feature_normalization)
  with tempfile.TemporaryDirectory(prefix="tlframe-template-") as tmp:
    records.write_labels(tmp, labels)
    export_dir = os.path.join(tmp, "export")
    module = ClassifierModule(backbone, head, labels, 1.0, resize_mode,
                              os.path.join(tmp, records.LABELS_FILENAME),
                              average_flips=flip_features)
    tf.saved_model.save(module, export_dir, signatures=module.signatures(),
                        options=_SAVE_OPTIONS)
    templates.keep(key, export_dir)
  return key


def _publish(tmp, export_base):
  """Renames the finished `tmp` to the next free version number; returns that directory."""
  while True:
    version = max(versions(export_base), default=0) + 1
    target = os.path.join(export_base, str(version))
    try:
      fileio.publish_directory(tmp, target, last_name=SAVED_MODEL_FILENAME)
      return target
    except tf.errors.AlreadyExistsError:
      pass  # another export took this number meanwhile: take the next one


# ---------------------------------------------------------------------------
# TFLite.


def _write_tflite(module, directory, labels):
  """`directory`/model.tflite and labels.txt, after checking the model against `module`."""
  size = module.image_size

  # TFLite runs the backbone's float32 entry point whatever the export's precision.
  @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.float32, name="images")])
  def classify(images):
    outputs = module.outputs(images, backbone=module.backbone_function)
    return {name: outputs[name] for name in ("classes", "probabilities", "scores")}

  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [classify.get_concrete_function()], module)
  model = converter.convert()
  _check_tflite(model, module, size)
  tf.io.gfile.makedirs(directory)
  fileio.atomic_write_bytes(os.path.join(directory, TFLITE_FILENAME), model)
  records.write_labels(directory, labels)


def tflite_classify(model, images):
  """Runs TFLite export bytes on float32 [N, S, S, 3] images one by one -> probabilities [N, C]."""
  with warnings.catch_warnings():
    # TF 2.21 points to the ai_edge_litert package; tf.lite's interpreter still works.
    warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
    interpreter = tf.lite.Interpreter(model_content=model)
  classify = interpreter.get_signature_runner()
  return np.concatenate([classify(images=np.asarray(image, np.float32)[None])["probabilities"]
                         for image in images])


def _check_tflite(model, module, size):
  """Raises if the TFLite model disagrees with the SavedModel's graph on test images."""
  # Smooth colour gradients with texture: deterministic, image-like inputs.
  rng = np.random.default_rng(0)
  ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
  images = []
  for _ in range(4):
    weights = rng.uniform(-1.0, 1.0, size=[3, 3]).astype(np.float32)
    base = ramp[:, None, None] * weights[0] + ramp[None, :, None] * weights[1] + weights[2]
    noise = rng.uniform(-0.1, 0.1, size=[size, size, 3]).astype(np.float32)
    images.append(np.clip(base * 0.5 + 0.5 + noise, 0.0, 1.0))
  images = np.stack(images)
  expected = module.outputs(tf.constant(images),
                            backbone=module.backbone_function)["probabilities"].numpy()
  actual = tflite_classify(model, images)
  difference = float(np.max(np.abs(actual - expected)))
  if difference > TFLITE_PROBABILITY_TOLERANCE:
    raise RuntimeError(f"the TFLite model's probabilities differ from the SavedModel's by "
                       f"{difference:.2g} (> {TFLITE_PROBABILITY_TOLERANCE}): the conversion "
                       "changed the model; export without --tflite")
  logging.info("TFLite model checked: probabilities within %.2g of the SavedModel", difference)
