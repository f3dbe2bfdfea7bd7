"""The loop HeadTrainer and FineTuner share (tlframe.train.fit_loop): one early-stopping rule, one
divergence check, the best weights put back, checkpoints holding the loop's state."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from tlframe import backbone as backbone_lib
from tlframe.train import finetune
from tlframe.train import head as head_lib
from tlframe.train import trainer as trainer_lib
from tlframe import train
from tlframe.errors import UserError
from test_finetune import TinyBatchNormBackbone

NUM_FEATURES = 16   # TinyBatchNormBackbone's
NUM_CLASSES = 3


@pytest.fixture(scope="module")
def tiny_module(tmp_path_factory):
  module_dir = str(tmp_path_factory.mktemp("fit_loop") / "tiny_bn_backbone")
  tf.saved_model.save(TinyBatchNormBackbone(), module_dir)
  return module_dir


def _options(module_dir, **overrides):
  values = dict(records_dir="unused", model_dir="unused", backbone=module_dir, l2=1e-3,
                learning_rate=0.01, epochs=10, patience=2, fine_tune=True, fine_tune_epochs=10,
                fine_tune_patience=2, fine_tune_learning_rate=0.01, precision="float32")
  values.update(overrides)
  return train.TrainOptions(**values)


def _head_trainer(options):
  rng = np.random.default_rng(0)
  validation = (rng.normal(size=[6, NUM_FEATURES]).astype(np.float32),
                np.arange(6, dtype=np.int32) % NUM_CLASSES)
  return trainer_lib.HeadTrainer(
      tf.distribute.get_strategy(), options, num_features=NUM_FEATURES, num_classes=NUM_CLASSES,
      steps_per_epoch=1, global_batch_size=6,
      normalization=(np.zeros(NUM_FEATURES, np.float32), np.ones(NUM_FEATURES, np.float32)),
      validation=validation)


def _fine_tuner(options):
  strategy = tf.distribute.get_strategy()
  with strategy.scope():
    backbone = backbone_lib.load_backbone(options.backbone, precision="float32")
  return finetune.FineTuner(strategy, options, backbone,
                            head_lib.LinearHead(NUM_FEATURES, NUM_CLASSES),
                            steps_per_epoch=1, global_batch_size=6)


@pytest.fixture(params=["head", "fine_tune"])
def make_trainer(request, tiny_module):
  """(make(**option overrides) -> a trainer, its divergence message) for both trainers."""
  if request.param == "head":
    return (lambda **o: _head_trainer(_options(tiny_module, **o)),
            r"^training diverged by epoch 3: the head's weights are no longer finite numbers; "
            r"lower learning_rate \(now 0.01\) or raise l2 \(now 0.001\)$")
  return (lambda **o: _fine_tuner(_options(tiny_module, **o)),
          r"^fine-tuning diverged by epoch 3: the weights are no longer finite numbers; lower "
          r"fine_tune_learning_rate \(now 0.01\) or fine_tune_head_learning_rate$")


def _epoch(trainer, loss, value):
  """One epoch that leaves every weight at `value` and has validation loss `loss`."""
  for weight in trainer._weights():  # pylint: disable=protected-access
    weight.assign(tf.fill(weight.shape, value))
  trainer.epoch.assign_add(1)
  return bool(trainer.track_best(tf.constant(loss, tf.float32)))


def test_patience_stops_and_the_best_epochs_weights_come_back(make_trainer):
  make, _ = make_trainer
  trainer = make()
  assert [_epoch(trainer, loss, value) for loss, value in
          ((0.9, 1.0), (0.5, 2.0), (0.7, 3.0))] == [True, True, False]
  assert not trainer.stopped.numpy()           # one epoch without improvement of 2
  assert not _epoch(trainer, 0.5, 4.0)         # equal is no improvement
  assert trainer.stopped.numpy() and trainer.epochs_done == 4
  assert int(trainer.best_epoch.numpy()) == 2 and trainer.best_val_loss.numpy() == 0.5
  trainer.use_best_weights()
  for weight in trainer._weights():  # pylint: disable=protected-access
    np.testing.assert_array_equal(weight.numpy(), np.full(weight.shape, 2.0))


def test_patience_zero_never_stops(make_trainer):
  make, _ = make_trainer
  trainer = make(patience=0, fine_tune_patience=0)
  for epoch in range(6):
    _epoch(trainer, 0.1 * epoch + 1.0, float(epoch))
  assert not trainer.stopped.numpy() and int(trainer.bad_epochs.numpy()) == 5


def test_non_finite_weights_stop_the_run_with_the_same_error(make_trainer):
  make, message = make_trainer
  trainer = make()
  for loss in (0.9, 0.8, 0.7):
    _epoch(trainer, loss, 1.0)
  trainer._check_finite()  # pylint: disable=protected-access
  weight = trainer._weights()[-1]  # pylint: disable=protected-access
  weight.assign(tf.fill(weight.shape, np.nan))
  with pytest.raises(UserError, match=message):
    trainer._check_finite()  # pylint: disable=protected-access


def test_the_loop_state_is_in_the_checkpoint(make_trainer, tmp_path):
  """A resumed run continues from the epoch, the best loss and the best weights it saved."""
  make, _ = make_trainer
  trainer = make()
  for loss, value in ((0.9, 1.0), (0.5, 2.0), (0.7, 3.0)):
    _epoch(trainer, loss, value)
  path = trainer.checkpoint.write(str(tmp_path / "ckpt"))
  resumed = make()
  resumed.checkpoint.read(path).assert_existing_objects_matched()
  assert resumed.epochs_done == 3 and int(resumed.bad_epochs.numpy()) == 1
  assert resumed.best_val_loss.numpy() == 0.5 and int(resumed.best_epoch.numpy()) == 2
  resumed.use_best_weights()
  weights = resumed._weights()  # pylint: disable=protected-access
  assert all(np.all(weight.numpy() == 2.0) for weight in weights)


def test_fit_resumes_where_the_checkpoint_left_and_runs_nothing_past_the_end(tiny_module,
                                                                             tmp_path):
  """HeadTrainer.fit through the base: chunks, checkpoints, the epochs done."""
  options = _options(tiny_module, epochs=6, patience=0, checkpoint_every_epochs=4)
  rng = np.random.default_rng(1)
  features = rng.normal(size=[6, NUM_FEATURES]).astype(np.float32)
  labels = np.arange(6, dtype=np.int32) % NUM_CLASSES
  weights = np.ones([1, 6], np.float32)   # [models, N]

  def batches(trainer):
    return lambda first: trainer_lib.feature_batches(
        trainer.strategy, trainer.normalize(features), labels, weights, 6, 0, first, 6)

  trainer = _head_trainer(options)
  manager = tf.train.CheckpointManager(trainer.checkpoint, str(tmp_path), max_to_keep=3)
  seen = []
  assert trainer.fit(batches(trainer), manager=manager, on_checkpoint=seen.append) == 6
  assert seen == [4, 6] and trainer.epochs_done == 6
  resumed = _head_trainer(dataclasses.replace(options))
  assert resumed.fit(batches(resumed), resume_from=str(tmp_path / "ckpt-4")) == 2
  np.testing.assert_allclose(resumed.head.kernel.numpy(), trainer.head.kernel.numpy(),
                             rtol=1e-6)
  assert resumed.fit(batches(resumed)) == 0


def test_a_checkpoint_of_other_state_stops_the_resume_with_a_user_error(tiny_module, tmp_path):
  # As one written by an earlier tlframe, whose Keras optimizer had other variables.
  trainer = _head_trainer(_options(tiny_module))
  path = tf.train.Checkpoint(head=trainer.head, epoch=trainer.epoch).write(str(tmp_path / "old"))
  with pytest.raises(UserError, match=r"^cannot resume from .*old: it does not hold this "
                     r"trainer's state .*pass overwrite=True"):
    trainer.fit(lambda first: None, resume_from=path)
