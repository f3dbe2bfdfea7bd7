"""TensorBoard output of a training run: model_dir/logs/{train,validation}.

Scalars by step and epoch are written in-graph by trainer.HeadTrainer; this
module writes what is made between checkpoints or once per run:
- input grids: per class, thumbnails of images after crop/pad (what the
  backbone saw);
- at each evaluation: the confusion matrix as an image (rows = true class,
  columns = predicted, shade = fraction of the row), per-class precision and
  recall, and a histogram of the scores;
- the hparams plugin: the run's flags and final metrics;
- the embedding projector: validation features with label/filename metadata and
  a sprite of thumbnails.
"""

import os

import numpy as np
import tensorflow as tf
from tensorboard.plugins import projector
# summary_v2 is what hparams' `api` re-exports, without the Keras callback beside it
# (`api` imports Keras: a second of every run's start).
from tensorboard.plugins.hparams import summary_v2 as hparams_api
from tensorboard.plugins.histogram import summary_v2 as histogram_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata

from tlframe.util import fileio

_CELL_PIXELS = 12
_GRID_COLUMNS = 8


class Writers:
  """The train and validation summary writers under `log_dir`."""

  def __init__(self, log_dir):
    self.train = tf.summary.create_file_writer(os.path.join(log_dir, "train"))
    self.validation = tf.summary.create_file_writer(os.path.join(log_dir, "validation"))

  def flush(self):
    self.train.flush()
    self.validation.flush()

  def close(self):
    self.train.close()
    self.validation.close()


def scalar(tag, value):
  """tf.summary.scalar with `tag` exactly: inside tf.function loops, the scalar op
  would prefix autograph's name scopes (while/cond_1/...) to the tag."""
  metadata = scalar_metadata.create_summary_metadata(display_name=tag, description="")
  return tf.summary.write(tag, tf.cast(value, tf.float32),
                          metadata=metadata.SerializeToString())


def image(tag, picture, description):
  """tf.summary.image of one uint8 [H, W, 3] `picture`, encoded eagerly. The same record:
  TensorBoard's own traces a function at its first call (0.04 s of a short run)."""
  height, width = picture.shape[:2]
  metadata = image_metadata.create_summary_metadata(display_name=None, description=description)
  return tf.summary.write(tag, tf.stack([tf.as_string(width), tf.as_string(height),
                                         tf.io.encode_png(picture)]),
                          metadata=metadata.SerializeToString())


def histogram(tag, values):
  """tf.summary.histogram of `values` (30 buckets), bucketed by numpy. The same record:
  TensorBoard's own traces a function at its first call (0.06 s of a short run)."""
  summary = histogram_summary.histogram_pb(tag, np.asarray(values, np.float64))
  return tf.summary.experimental.write_raw_pb(summary.SerializeToString())


def tile(images, columns):
  """uint8 [K, H, W, 3] -> one [rows*H, columns*W, 3] grid (unused cells black)."""
  count, height, width, _ = images.shape
  rows = -(-count // columns)
  grid = np.zeros([rows * height, columns * width, 3], np.uint8)
  for i, thumbnail in enumerate(images):
    r, c = divmod(i, columns)
    grid[r * height:(r + 1) * height, c * width:(c + 1) * width] = thumbnail
  return grid


def write_input_grids(writer, thumbnails, thumbnail_labels, label_names, step=0):
  """One image per class, `inputs/<label>`: a grid of its sample thumbnails."""
  with writer.as_default(step=step):
    for index, name in enumerate(label_names):
      images = thumbnails[thumbnail_labels == index]
      if len(images):
        grid = tile(images, min(_GRID_COLUMNS, len(images)))
        image(f"inputs/{name}", grid, description=(
            f"Training images of class {name!r} after crop/pad, as the backbone saw them."))


def confusion_image(confusion):
  """[C, C] counts -> uint8 RGB image: white (0) to dark blue (whole row), grid lines."""
  confusion = np.asarray(confusion, np.float64)
  fractions = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  white, blue = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
  cells = white + fractions[..., None] * (blue - white)
  image = np.repeat(np.repeat(cells, _CELL_PIXELS, axis=0), _CELL_PIXELS, axis=1)
  image[::_CELL_PIXELS, :] = 160
  image[:, ::_CELL_PIXELS] = 160
  return image.astype(np.uint8)


def write_evaluation(writer, scores, labels, metrics, step):
  """Confusion-matrix image, per-class precision/recall and score histograms.

  metrics: metrics.classification_metrics of the same scores and labels.
  """
  label_names = list(metrics["per_class"])
  with writer.as_default(step=step):
    image("evaluation/confusion_matrix", confusion_image(metrics["confusion_matrix"]),
          description=("Rows: true class, columns: predicted, in label order: " +
                       ", ".join(label_names)))
    for name, per_class in metrics["per_class"].items():
      tf.summary.scalar(f"precision/{name}", per_class["precision"])
      tf.summary.scalar(f"recall/{name}", per_class["recall"])
    histogram("evaluation/scores", scores)
    histogram("evaluation/true_class_scores", scores[np.arange(len(labels)), labels])
  writer.flush()


def write_hparams(writer, hparams, final_metrics):
  """The hparams plugin's config, this run's values and the final metrics as scalars."""
  with writer.as_default(step=0):
    hparams_api.hparams_config(
        hparams=[hparams_api.HParam(name) for name in hparams],
        metrics=[hparams_api.Metric(tag) for tag in final_metrics])
    hparams_api.hparams(hparams)
    for tag, value in final_metrics.items():
      tf.summary.scalar(tag, value)
  writer.flush()


def write_projector(log_dir, feature_set, label_names):
  """Embedding projector files for the features that have thumbnails (a sprite each)."""
  rows = feature_set.thumbnail_rows
  if not len(rows):
    return
  tf.io.gfile.makedirs(log_dir)
  vectors = feature_set.features[rows]
  fileio.atomic_write_text(
      os.path.join(log_dir, "projector_features.tsv"),
      "\n".join("\t".join(f"{v:.6g}" for v in vector) for vector in vectors) + "\n")
  metadata = ["label\tfilename"] + [
      f"{label_names[feature_set.labels[row]]}\t{_tsv_safe(feature_set.filenames[row])}"
      for row in rows]
  fileio.atomic_write_text(os.path.join(log_dir, "projector_metadata.tsv"),
                           "\n".join(metadata) + "\n")
  thumbnails = feature_set.thumbnails
  columns = int(np.ceil(np.sqrt(len(thumbnails))))
  sprite = tile(thumbnails, columns)
  fileio.atomic_write_bytes(os.path.join(log_dir, "projector_sprite.png"),
                            tf.io.encode_png(sprite).numpy())
  config = projector.ProjectorConfig()
  embedding = config.embeddings.add()
  embedding.tensor_name = "validation_features"
  embedding.tensor_path = "projector_features.tsv"
  embedding.metadata_path = "projector_metadata.tsv"
  embedding.sprite.image_path = "projector_sprite.png"
  embedding.sprite.single_image_dim.extend(list(thumbnails.shape[1:3]))
  fileio.atomic_write_text(os.path.join(log_dir, "projector_config.pbtxt"), str(config))


def _tsv_safe(text):
  return str(text).replace("\t", " ").replace("\n", " ")
