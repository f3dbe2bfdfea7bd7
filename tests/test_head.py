"""Losses against numpy references; the head's normalization, saved form, and stacked training."""

import numpy as np
import pytest
import tensorflow as tf

from tlframe.train import head as head_lib
from tlframe.errors import UserError


def _numpy_crammer_singer(scores, labels):
  out = np.zeros(scores.shape[:-1])
  for index in np.ndindex(*scores.shape[:-1]):
    s, y = scores[index], labels[index[-1]]
    others = np.delete(s, y)
    out[index] = max(0.0, 1.0 + others.max() - s[y])
  return out


def _numpy_squared_hinge(scores, labels):
  out = np.zeros(scores.shape[:-1])
  for index in np.ndindex(*scores.shape[:-1]):
    s, y = scores[index], labels[index[-1]]
    t = -np.ones_like(s)
    t[y] = 1.0
    out[index] = np.sum(np.maximum(0.0, 1.0 - t * s) ** 2)
  return out


def _numpy_softmax_xent(scores, labels, smoothing):
  num_classes = scores.shape[-1]
  targets = np.eye(num_classes)[labels] * (1 - smoothing) + smoothing / num_classes
  shifted = scores - scores.max(-1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return -(targets * log_p).sum(-1)


@pytest.mark.parametrize("shape", [(16, 5), (3, 16, 7), (4, 2)])
def test_hinge_losses_match_numpy(shape):
  rng = np.random.default_rng(sum(shape))
  # Scores around the margin so every branch of max(0, .) is exercised.
  scores = rng.normal(scale=1.5, size=shape).astype(np.float32)
  labels = rng.integers(0, shape[-1], size=shape[-2]).astype(np.int32)
  got = head_lib.hinge_loss(tf.constant(scores), tf.constant(labels)).numpy()
  want = _numpy_crammer_singer(scores, labels)
  assert (want == 0).any() and (want > 0).any()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  got = head_lib.squared_hinge_loss(tf.constant(scores), tf.constant(labels)).numpy()
  np.testing.assert_allclose(got, _numpy_squared_hinge(scores, labels), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_loss_matches_numpy(smoothing):
  rng = np.random.default_rng(3)
  scores = rng.normal(scale=3.0, size=(2, 10, 6)).astype(np.float32)
  labels = rng.integers(0, 6, size=10).astype(np.int32)
  got = head_lib.per_example_loss("softmax", tf.constant(scores), tf.constant(labels),
                                  smoothing).numpy()
  np.testing.assert_allclose(got, _numpy_softmax_xent(scores, labels, smoothing), rtol=1e-5)


def test_hinge_is_zero_only_beyond_the_margin():
  scores = tf.constant([[2.0, 0.9, 1.0], [2.0, 1.0, 0.5]])
  labels = tf.constant([0, 0])
  np.testing.assert_allclose(head_lib.hinge_loss(scores, labels).numpy(), [0.0, 0.0])
  np.testing.assert_allclose(
      head_lib.hinge_loss(scores, tf.constant([1, 2])).numpy(), [2.1, 2.5], rtol=1e-6)


def test_normalization_and_stacked_models():
  rng = np.random.default_rng(0)
  features = rng.uniform(0, 5, size=(50, 8)).astype(np.float32)
  shift, scale = head_lib.normalization_constants(features, "standardize")
  head = head_lib.LinearHead(8, 3, num_models=2, feature_normalization="standardize")
  head.set_normalization(shift, scale)
  normalized = head.normalize(tf.constant(features)).numpy()
  np.testing.assert_allclose(normalized.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(normalized.std(0), 1, atol=1e-4)
  kernel = rng.normal(size=(2, 8, 3)).astype(np.float32)
  head.kernel.assign(kernel)
  scores = head.scores(tf.constant(features)).numpy()
  assert scores.shape == (2, 50, 3)
  np.testing.assert_allclose(scores[1], normalized @ kernel[1], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(head.l2_penalty().numpy(), 0.5 * (kernel ** 2).sum((1, 2)),
                             rtol=1e-5)
  l2_head = head_lib.LinearHead(8, 3, feature_normalization="l2")
  np.testing.assert_allclose(
      np.linalg.norm(l2_head.normalize(tf.constant(features)).numpy(), axis=1), 1, rtol=1e-5)


def test_saved_head_round_trips(tmp_path):
  head = head_lib.LinearHead(4, 3, feature_normalization="l2")
  head.kernel.assign(np.arange(12, dtype=np.float32).reshape(1, 4, 3))
  head.bias.assign([[1.0, 2.0, 3.0]])
  config = head_lib.HeadConfig(loss="hinge", feature_normalization="l2", num_features=4,
                               num_classes=3, labels=["a", "b", "c"], backbone="x",
                               features="feature_vector", image_size=224,
                               resize_mode="center_crop")
  config.write(str(tmp_path))
  head_lib.save_head(head, str(tmp_path))
  loaded, loaded_config = head_lib.load_head(str(tmp_path))
  assert loaded_config == config
  x = tf.constant([[1.0, 0.0, 2.0, 1.0]])
  np.testing.assert_allclose(loaded(x).numpy(), head(x).numpy())
  with pytest.raises(UserError, match="bin/train"):
    head_lib.load_head(str(tmp_path / "missing"))


@pytest.mark.parametrize("loss", ["hinge", "softmax"])
def test_stacked_models_take_the_steps_of_their_own_objective(loss):
  """Each model of a stacked HeadTrainer takes Adam's steps on its own mean loss + l2 / 2
  ||kernel||^2 (the l2 term's gradient is added to the tape's by hand), as one head trained
  alone by the tape on that whole objective does."""
  from tlframe import options as options_lib  # pylint: disable=g-import-not-at-top
  from tlframe.train import optimizers  # pylint: disable=g-import-not-at-top
  from tlframe.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  num_examples, dim, num_classes, epochs = 24, 16, 3, 8
  features = rng.normal(size=(num_examples, dim)).astype(np.float32)
  labels = np.arange(num_examples, dtype=np.int32) % num_classes
  l2_values = np.asarray([0.0, 0.1, 3.0], np.float32)
  options = options_lib.TrainOptions(records_dir="unused", model_dir="unused", loss=loss,
                                     epochs=epochs, learning_rate=0.05)
  strategy = tf.distribute.get_strategy()
  trainer = trainer_lib.HeadTrainer(
      strategy, options, num_features=dim, num_classes=num_classes, steps_per_epoch=1,
      global_batch_size=num_examples, l2_values=l2_values,
      normalization=(np.zeros(dim, np.float32), np.ones(dim, np.float32)))
  weights = np.ones((len(l2_values), num_examples), np.float32)
  trainer.fit(lambda first: trainer_lib.feature_batches(
      strategy, features, labels, weights, num_examples, 0, first, epochs))

  kernels = []
  for l2 in l2_values:
    kernel, bias = tf.Variable(tf.zeros((dim, num_classes))), tf.Variable(tf.zeros(num_classes))
    optimizer = optimizers.make_optimizer(options, 1).build([kernel, bias])
    for _ in range(epochs):
      with tf.GradientTape() as tape:
        scores = features @ kernel + bias
        objective = (tf.reduce_mean(head_lib.per_example_loss(loss, scores, labels)) +
                     l2 * 0.5 * tf.reduce_sum(tf.square(kernel)))
      optimizer.apply_gradients(zip(tape.gradient(objective, [kernel, bias]), [kernel, bias]))
    kernels.append(kernel.numpy())
  np.testing.assert_allclose(trainer.head.kernel.numpy(), np.stack(kernels), atol=1e-6)
  # The l2 term did something to compare: the models differ by it.
  assert np.abs(kernels[0] - kernels[2]).max() > 0.01
