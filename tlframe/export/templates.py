"""Export templates: an earlier export's graph, reused by the next export that has the same one.

An export's graph (saved_model.pb: decoding, resizing, the backbone, the head,
the signatures) depends on the backbone, the image size and resize mode, flip
averaging, the head's shape and normalization, and the code of tlframe and
TensorFlow that traced it; not on the head's weights, the labels or the
temperature, which it holds as variables. Tracing and serializing that graph
is most of an export: 1.5 s of 1.7 s for the MobileNetV2 + EfficientNet-Lite0
pair on a 2-core CPU, every time, for a graph that differs from the last one
only in those variables' values.

So the first export of a graph is also kept, whole, in the cache
(`$TLFRAME_CACHE_DIR/export_templates/<key>/`: 9 MB for MobileNetV2, 23 MB for
the pair, the backbone's weights most of it), and a later export whose
`graph_key` matches copies its saved_model.pb and writes the variables anew:
the template's backbone weights (the key covers the backbone module's
fingerprint, which covers its weights) with this model's head, labels and
temperature, under the template's own checkpoint keys, so TF Serving's restore
op and `tf.saved_model.load` read them as they read a traced export's. An
export from a fine-tuned backbone, or with a TFLite model, is always traced. A
template that cannot be read, or whose variables are not the ones this module
has, is dropped (logged) and the export traced, which keeps a new one. Delete
the folder to drop the templates.
"""

import hashlib
import json
import os

import tensorflow as tf
from absl import logging
# The function tf.saved_model.save writes fingerprint.pb with (no public equivalent).
from tensorflow.python.saved_model import fingerprinting_utils  # pylint: disable=g-direct-tensorflow-import

import tlframe
from tlframe.backbone import loading as backbone_lib
from tlframe.export import layout
from tlframe.train import head as head_lib
from tlframe.util import fileio

TEMPLATES_DIRNAME = "export_templates"
# Bump when what a template holds changes.
_FORMAT_VERSION = 1
_VARIABLES_PREFIX = os.path.join("variables", "variables")
_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_FINGERPRINT_FILENAME = "fingerprint.pb"
# The module's variables that come from the backbone, as the template holds them.
_BACKBONE_PREFIX = "backbone_variables/"


def templates_dir():
  """`$TLFRAME_CACHE_DIR/export_templates`."""
  return os.path.join(backbone_lib.cache_root(), TEMPLATES_DIRNAME)


def graph_key(backbone, *, num_classes, feature_normalization, resize_mode, flip_features,
              traced_modules):
  """A digest of what an export's graph depends on.

  backbone: the export's Backbone (its cache_key names the module, its
  weights, size and precision; its input size and feature count are the
  graph's). The head's: its class count, and whether its normalization has an
  l2 norm (head.LinearHead: "none" and "standardize" are the same graph, a
  shift and scale held as variables). traced_modules: the Python modules whose
  code the export traces (their source is digested, so a changed tlframe never
  reuses an old graph).
  """
  sources = hashlib.sha256()
  for module in traced_modules:
    with open(module.__file__, "rb") as f:
      sources.update(f.read())
  identity = dict(format=_FORMAT_VERSION, tlframe=tlframe.__version__,
                  tensorflow=tf.__version__, sources=sources.hexdigest(),
                  backbone=backbone.cache_key, image_size=backbone.input_size,
                  resize_mode=resize_mode, flip_features=bool(flip_features),
                  l2_norm=head_lib.normalizes_to_unit_length(feature_normalization),
                  num_features=backbone.output_dim, num_classes=num_classes)
  return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def exists(key):
  """Whether the template `key` is kept."""
  return tf.io.gfile.exists(os.path.join(template_path(key), layout.SAVED_MODEL_FILENAME))


def template_path(key):
  return os.path.join(templates_dir(), key)


def export_from_template(key, model_variables, export_dir, labels_file):
  """Writes the export of the template `key` into `export_dir`, if there is a usable one.

  model_variables: {object path, e.g. "head/kernel": tf.Variable} of every
  variable of the module that is not the backbone's. labels_file: this model's
  labels, copied as the export's labels asset. Returns whether it
  wrote the export (False: no template, or one that does not fit; the caller
  traces the export).
  """
  template = template_path(key)
  if not exists(key):
    return False
  try:
    reader = tf.train.load_checkpoint(os.path.join(template, _VARIABLES_PREFIX))
    dtypes = reader.get_variable_to_dtype_map()
    shapes = reader.get_variable_to_shape_map()
    ours = {path + _VALUE_SUFFIX: variable for path, variable in model_variables.items()}
    theirs = {name for name in dtypes
              if name != _OBJECT_GRAPH_KEY and not name.startswith(_BACKBONE_PREFIX)}
    if theirs != set(ours) or any(
        dtypes[name] != variable.dtype or shapes[name] != variable.shape.as_list()
        for name, variable in ours.items()):
      logging.warning("Export template %s holds other variables than this model's: dropping "
                      "it, tracing the export", template)
      _drop(template)
      return False
    names = sorted(dtypes)
    tensors = [ours[name].read_value() if name in ours else reader.get_tensor(name)
               for name in names]
    tf.io.gfile.makedirs(os.path.join(export_dir, "variables"))
    tf.raw_ops.SaveV2(prefix=os.path.join(export_dir, _VARIABLES_PREFIX), tensor_names=names,
                      shape_and_slices=[""] * len(names), tensors=tensors)
    tf.io.gfile.makedirs(os.path.join(export_dir, "assets"))
    tf.io.gfile.copy(labels_file, os.path.join(export_dir, "assets", _labels_asset(template)),
                     overwrite=True)
    tf.io.gfile.copy(os.path.join(template, layout.SAVED_MODEL_FILENAME),
                     os.path.join(export_dir, layout.SAVED_MODEL_FILENAME), overwrite=True)
    fingerprinting_utils.write_fingerprint(export_dir)
  # What a damaged template raises: a short read is an IndexError in TF's reader.
  except (OSError, ValueError, IndexError, tf.errors.OpError) as e:
    logging.warning("Could not use the export template %s (%s: %s): dropping it, tracing the "
                    "export", template, type(e).__name__, e)
    _drop(template)
    for name in ("variables", "assets", layout.SAVED_MODEL_FILENAME, _FINGERPRINT_FILENAME):
      path = os.path.join(export_dir, name)
      if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
      elif tf.io.gfile.exists(path):
        tf.io.gfile.remove(path)
    return False
  logging.info("Export written from the template %s (its graph, this model's variables)",
               template)
  return True


def _drop(template):
  """Removes a template that cannot serve, so that the traced export replaces it."""
  try:
    tf.io.gfile.rmtree(template)
  except tf.errors.OpError as e:
    logging.warning("Could not remove %s (%s)", template, e)


def _labels_asset(template):
  """The file name of the template's one asset (the labels)."""
  names = tf.io.gfile.listdir(os.path.join(template, "assets"))
  if len(names) != 1:
    raise ValueError(f"{len(names)} assets, not the one labels file")
  return names[0]


def keep(key, export_dir):
  """Keeps the traced export in `export_dir` as the template `key` (a no-op if there is one)."""
  target = template_path(key)
  if exists(key):
    return
  tmp = fileio.temp_path_for(target)
  try:
    for directory, _, names in tf.io.gfile.walk(export_dir):
      relative = os.path.relpath(directory, export_dir)
      tf.io.gfile.makedirs(os.path.join(tmp, relative))
      for name in names:
        tf.io.gfile.copy(os.path.join(directory, name), os.path.join(tmp, relative, name))
    fileio.publish_directory(tmp, target, last_name=layout.SAVED_MODEL_FILENAME)
    logging.info("Kept the export's graph as the template %s", target)
  except tf.errors.AlreadyExistsError:
    pass   # another process kept the same graph meanwhile
  except (OSError, tf.errors.OpError) as e:
    logging.warning("Could not keep the export template %s (%s): the next export is traced "
                    "again", target, e)
  finally:
    if tf.io.gfile.exists(tmp):
      tf.io.gfile.rmtree(tmp)
