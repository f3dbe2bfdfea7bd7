"""ImageNet classification with a backbone's classification module: bin/classify.

Not part of training: this is how a user checks that a backbone (built-in or
from TF-Hub) sees what it should, with the preprocessing the ImageNet models
were evaluated with (`pipeline.imagenet_eval_crop`), which differs from the training
pipeline's square `center_crop` resize mode.
"""

import os

import tensorflow as tf

from tlframe.backbone import loading as backbone_lib
from tlframe import imageformat
from tlframe.pipeline import imagenet_eval_crop
from tlframe.errors import UserError


def read_image(path):
  """Upright uint8 [H, W, 3] from an image file on any TF filesystem (`imageformat.decode_checked`)."""
  try:
    data = tf.io.gfile.GFile(path, "rb").read()
  except tf.errors.OpError as e:
    raise UserError(f"path={path}: cannot read it ({e.message})", arguments=["path"]) from None
  try:
    return imageformat.decode_checked(data)[0]
  except imageformat.ImageError as e:
    raise UserError(f"path={path}: {e}", arguments=["path"]) from None


def class_names_for(backbone, labels_file=None):
  """Names for a classification module's outputs.

  `labels_file` (one name per line) if given; else the module's own
  `assets/*.txt` with one line per output; else the 1000 ImageNet names,
  preceded by "background" for 1001-output modules.
  """
  if labels_file:
    if not tf.io.gfile.exists(labels_file):
      raise UserError(f"labels_file={labels_file}: no such file", arguments=["labels_file"])
    with tf.io.gfile.GFile(labels_file) as f:
      names = f.read().splitlines()
    if len(names) != backbone.output_dim:
      raise UserError(f"labels_file={labels_file} has {len(names)} lines but {backbone.handle} "
                      f"has {backbone.output_dim} outputs: give one name per output",
                      arguments=["labels_file"])
    return names
  assets = os.path.join(backbone.path, "assets")
  if tf.io.gfile.isdir(assets):
    for name in sorted(tf.io.gfile.listdir(assets)):
      if name.endswith(".txt"):
        with tf.io.gfile.GFile(os.path.join(assets, name)) as f:
          names = f.read().splitlines()
        if len(names) == backbone.output_dim:
          return names
  with open(backbone_lib.CLASS_NAMES_FILE) as f:
    names = f.read().splitlines()
  if backbone.output_dim == len(names) + 1:
    names = ["background"] + names
  if len(names) != backbone.output_dim:
    raise UserError(f"{backbone.handle} has {backbone.output_dim} outputs and no class names "
                    "file: pass labels_file with one name per line", arguments=["labels_file"])
  return names


def top_k(backbone, image, k=5):
  """[(class index, probability)] for the top `k` classes of one uint8 image."""
  logits = backbone(imagenet_eval_crop(image, backbone.input_size)[tf.newaxis])[0]
  probabilities = tf.nn.softmax(logits)
  values, indices = tf.math.top_k(probabilities, k=min(k, backbone.output_dim))
  return [(int(i), float(p)) for i, p in zip(indices.numpy(), values.numpy())]
