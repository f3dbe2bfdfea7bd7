"""The linear head on frozen features, its losses and its saved form.

The head is `scores = normalize(features) @ kernel + bias`. It can hold several
independent heads stacked on a leading "model" axis, so that k-fold
cross-validation over an l2 grid (tuning.tune_l2) trains every (l2, fold) pair
in the same in-graph loop, one batched matmul per step, instead of one loop per
pair. A normal run has one model.

Losses (per example, before class weights and l2):
  hinge          multiclass SVM of Crammer and Singer:
                 max(0, 1 + max_{j != y} s_j - s_y)
  squared_hinge  one-vs-rest squared hinge: sum_j max(0, 1 - t_j s_j)^2 with
                 t_j = +1 for the true class and -1 for the others
  softmax        cross-entropy of softmax(s), with optional label smoothing

The objective is mean(weighted loss) + l2 / 2 * ||kernel||^2; for the hinge loss
that is the SVM objective 1/2 ||w||^2 + C * sum(loss) divided by C * N, so
l2 = 1 / (C * N) for N training examples (see docs/training.md).
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from tlframe.util import fileio
from tlframe.train import layout as model_dir_layout
from tlframe.errors import UserError

_EPSILON = 1e-12


def hinge_loss(scores, labels):
  """Crammer-Singer multiclass hinge: [..., B, C] scores, [B] labels -> [..., B]."""
  num_classes = tf.shape(scores)[-1]
  true_mask = tf.one_hot(labels, num_classes, dtype=scores.dtype)
  true_score = tf.reduce_sum(scores * true_mask, axis=-1)
  # The largest wrong-class score: push the true class to -inf before the max.
  other_max = tf.reduce_max(scores - true_mask * 1e30, axis=-1)
  return tf.nn.relu(1.0 + other_max - true_score)


def squared_hinge_loss(scores, labels):
  """One-vs-rest squared hinge summed over classes: [..., B, C], [B] -> [..., B]."""
  num_classes = tf.shape(scores)[-1]
  targets = 2.0 * tf.one_hot(labels, num_classes, dtype=scores.dtype) - 1.0
  return tf.reduce_sum(tf.square(tf.nn.relu(1.0 - targets * scores)), axis=-1)


def softmax_loss(scores, labels, label_smoothing=0.0):
  """Softmax cross-entropy with label smoothing: [..., B, C], [B] -> [..., B]."""
  num_classes = tf.shape(scores)[-1]
  targets = tf.one_hot(labels, num_classes, dtype=scores.dtype)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / tf.cast(
        num_classes, scores.dtype)
  targets = tf.broadcast_to(targets, tf.shape(scores))
  return tf.nn.softmax_cross_entropy_with_logits(targets, scores)


def per_example_loss(loss, scores, labels, label_smoothing=0.0):
  """The named loss (one of options.LOSSES) for each example, before weights: [..., B, C] -> [..., B]."""
  if loss == "hinge":
    return hinge_loss(scores, labels)
  if loss == "squared_hinge":
    return squared_hinge_loss(scores, labels)
  return softmax_loss(scores, labels, label_smoothing)


def normalization_constants(train_features, feature_normalization):
  """(shift, scale) [D] applied as (x - shift) * scale after optional l2 norm.

  `standardize` uses the training features' per-dimension mean and 1/std;
  the constants become part of the head so the exported model applies them.
  """
  dim = train_features.shape[-1]
  if feature_normalization == "standardize":
    return standardization_constants(train_features.mean(axis=0), train_features.std(axis=0))
  return np.zeros([dim], np.float32), np.ones([dim], np.float32)


def standardization_constants(mean, std):
  """(shift, scale) [D] of `standardize` from the training features' mean and std."""
  return mean.astype(np.float32), (1.0 / np.maximum(std, 1e-6)).astype(np.float32)


def normalizes_to_unit_length(feature_normalization):
  """Whether the normalization divides each feature vector by its l2 norm (before the
  shift and scale every normalization applies)."""
  return feature_normalization == "l2"


class LinearHead(tf.Module):
  """`num_models` independent linear heads over the same normalized features."""

  def __init__(self, num_features, num_classes, *, num_models=1,
               feature_normalization="none", name="linear_head"):
    super().__init__(name=name)
    self.num_features = num_features
    self.num_classes = num_classes
    self.num_models = num_models
    self.feature_normalization = feature_normalization
    # Zero init: the losses are convex in (kernel, bias), so any start works and
    # zeros make runs reproducible without an initializer seed.
    self.kernel = tf.Variable(tf.zeros([num_models, num_features, num_classes]),
                              name="kernel")
    self.bias = tf.Variable(tf.zeros([num_models, num_classes]), name="bias")
    self.feature_shift = tf.Variable(tf.zeros([num_features]), trainable=False,
                                     name="feature_shift")
    self.feature_scale = tf.Variable(tf.ones([num_features]), trainable=False,
                                     name="feature_scale")

  @property
  def trainable_weights(self):
    return [self.kernel, self.bias]

  def assign(self, other):
    """Takes the weights and normalization of `other`, a head of the same shape."""
    for target, source in ((self.kernel, other.kernel), (self.bias, other.bias),
                           (self.feature_shift, other.feature_shift),
                           (self.feature_scale, other.feature_scale)):
      target.assign(source.numpy())

  def set_normalization(self, shift, scale):
    self.feature_shift.assign(shift)
    self.feature_scale.assign(scale)

  def normalize(self, features):
    if normalizes_to_unit_length(self.feature_normalization):
      features = tf.math.l2_normalize(features, axis=-1, epsilon=_EPSILON)
    return (features - self.feature_shift) * self.feature_scale

  def linear(self, normalized):
    """[B, D] normalized features -> [num_models, B, C] class scores."""
    return tf.einsum("bd,mdc->mbc", normalized, self.kernel) + self.bias[:, None, :]

  def scores(self, features):
    """[B, D] features -> [num_models, B, C] class scores."""
    return self.linear(self.normalize(features))

  def __call__(self, features):
    """[B, D] -> [B, C] scores of the first (for a trained head, the only) model."""
    return self.scores(features)[0]

  def l2_penalty(self):
    """[num_models] 1/2 ||kernel||^2 of each model (the bias is not regularized)."""
    return 0.5 * tf.reduce_sum(tf.square(self.kernel), axis=[1, 2])

  def weight_norm(self):
    return tf.norm(self.kernel[0])


@dataclasses.dataclass
class HeadConfig:
  """What the export stage needs besides the head's checkpoint."""
  loss: str
  feature_normalization: str
  num_features: int
  num_classes: int
  labels: list
  backbone: str
  features: str
  image_size: int
  resize_mode: str
  label_smoothing: float = 0.0
  flip_features: bool = False   # scores are averaged over each image and its mirror
  # After --fine_tune: {"blocks": K or "all", "directory": the fine-tuned variables' folder}.
  fine_tune: dict = None
  # With --backbone=auto: backbone_choice.Choice as a dict (the choice and its reason).
  backbone_choice: dict = None

  def write(self, model_dir):
    fileio.atomic_write_json(os.path.join(model_dir, model_dir_layout.HEAD_CONFIG_FILENAME),
                             dataclasses.asdict(self))

  @classmethod
  def read(cls, model_dir):
    path = os.path.join(model_dir, model_dir_layout.HEAD_CONFIG_FILENAME)
    if not tf.io.gfile.exists(path):
      raise UserError(f"{path} not found: train a model into {model_dir} with bin/train first")
    return cls(**fileio.read_json(path))


def save_head(head, model_dir):
  """Writes the head's variables (kernel, bias, normalization) to model_dir/head/."""
  checkpoint = tf.train.Checkpoint(head=head)
  prefix = os.path.join(model_dir, model_dir_layout.HEAD_CHECKPOINT)
  return checkpoint.write(prefix)


def load_head(model_dir):
  """(LinearHead, HeadConfig) of a model trained by bin/train into `model_dir`."""
  config = HeadConfig.read(model_dir)
  head = LinearHead(config.num_features, config.num_classes,
                    feature_normalization=config.feature_normalization)
  prefix = os.path.join(model_dir, model_dir_layout.HEAD_CHECKPOINT)
  tf.train.Checkpoint(head=head).read(prefix).assert_consumed()
  return head, config
