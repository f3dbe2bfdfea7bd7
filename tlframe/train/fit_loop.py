"""The loop both trainers share: epochs, resuming, divergence, early stopping, the best weights.

HeadTrainer (tlframe.train.trainer) runs its epochs in-graph, a chunk between two
checkpoints at a time; FineTuner (tlframe.train.finetune) one epoch at a time from
Python. Both follow one rule, implemented here once (`FitLoop`):
- `fit` resumes from a checkpoint (the loop's state is in it), runs chunks of
  epochs until the last epoch or an early stop, and after each chunk checks
  that the weights are finite numbers (a diverged run stops with a UserError
  before a checkpoint could save them), then saves a checkpoint;
- `track_best`, after an epoch's validation loss (in-graph or eagerly): the
  lowest loss yet copies the weights aside, any other counts an epoch without
  improvement, and `patience` of those in a row stop the run (0: never);
- `use_best_weights` puts the copied weights back.
"""

import numpy as np
import tensorflow as tf
from absl import logging

from tlframe.errors import UserError


class FitLoop:
  """Base of the trainers. A subclass, inside its strategy's scope and after
  creating its weights, calls `_init_loop(epochs=, patience=)`, and implements:

  _weights(): the variables that train (checked finite, kept at their best);
  _run_epochs(make_batches, first_epoch, count): `count` more epochs;
  _epochs_per_chunk(checkpointing): epochs run between two checks and checkpoints;
  _divergence_fix(): what to change when the weights stopped being finite, and the
    arguments it cites (errors.UserError).
  Class attributes: _WHAT ("training"), _WEIGHTS_WHAT ("the head's weights"),
  _RESUMED (the log line's start).
  """

  _WHAT = "training"
  _WEIGHTS_WHAT = "the weights"
  _RESUMED = "Resumed"
  _writers = None

  def _init_loop(self, *, epochs, patience):
    self._epochs = epochs
    self._patience = patience
    self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    self.stopped = tf.Variable(False, trainable=False, name="stopped")
    self.best_val_loss = tf.Variable(np.inf, dtype=tf.float32, trainable=False)
    self.best_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
    self.bad_epochs = tf.Variable(0, dtype=tf.int64, trainable=False)
    self.best_weights = [tf.Variable(weight, trainable=False) for weight in self._weights()]

  def _loop_state(self):
    """The loop's variables by their checkpoint names (best_weights apart: subclasses name them)."""
    return dict(epoch=self.epoch, stopped=self.stopped, best_val_loss=self.best_val_loss,
                best_epoch=self.best_epoch, bad_epochs=self.bad_epochs)

  @property
  def epochs_done(self):
    return int(self.epoch.numpy())

  def fit(self, make_batches, *, resume_from=None, manager=None, on_checkpoint=None):
    """Runs the remaining epochs; returns the number of epochs run now.

    make_batches: the subclass's source of batches (see `_run_epochs`).
    resume_from: a checkpoint path to restore first. With a CheckpointManager,
    saves after every chunk of epochs; on_checkpoint(epochs_done) after each.
    """
    if resume_from:
      try:
        self.checkpoint.restore(resume_from).assert_existing_objects_matched()
      except AssertionError:
        # E.g. one written by a tlframe whose optimizer was Keras': other variables.
        raise UserError(f"cannot resume from {resume_from}: it does not hold this trainer's "
                        "state (written by another version of tlframe?); pass "
                        "overwrite=True to start the model again", arguments=["overwrite"]) from None
      logging.info("%s from %s at epoch %d", self._RESUMED, resume_from, self.epochs_done)
    first_epoch = self.epochs_done
    chunk = self._epochs_per_chunk(checkpointing=manager is not None)
    while self.epochs_done < self._epochs and not self.stopped.numpy():
      self._run_epochs(make_batches, first_epoch, min(chunk, self._epochs - self.epochs_done))
      self._check_finite()
      if manager is not None:
        manager.save(checkpoint_number=self.epochs_done)
      if on_checkpoint is not None:
        on_checkpoint(self.epochs_done)
    if self._writers is not None:
      self._writers.flush()
    return self.epochs_done - first_epoch

  def _check_finite(self):
    """Stops the run when it diverged: weights that are not finite numbers never get saved."""
    if not all(np.all(np.isfinite(weight.numpy())) for weight in self._weights()):
      fix, arguments = self._divergence_fix()
      raise UserError(f"{self._WHAT} diverged by epoch {self.epochs_done}: "
                      f"{self._WEIGHTS_WHAT} are no longer finite numbers; {fix}",
                      arguments=arguments)

  def track_best(self, loss):
    """After an epoch's validation `loss`: keeps the weights when it is the lowest yet,
    else counts an epoch without improvement; returns whether it improved (a bool tensor).

    Runs in-graph (HeadTrainer's epochs) or eagerly (FineTuner's).
    """
    def improved():
      self.best_val_loss.assign(loss)
      self.best_epoch.assign(self.epoch)
      self.bad_epochs.assign(0)
      for best, weight in zip(self.best_weights, self._weights()):
        best.assign(weight)
      return tf.constant(True)

    def not_improved():
      bad_epochs = self.bad_epochs.assign_add(1)
      if self._patience:
        self.stopped.assign(bad_epochs >= self._patience)
      return tf.constant(False)

    return tf.cond(loss < self.best_val_loss, improved, not_improved)

  def _keeps_best(self):
    """Whether `use_best_weights` puts the best weights back (a subclass may say when not)."""
    return True

  def use_best_weights(self):
    """The weights of the lowest validation loss, where `_keeps_best`."""
    if self._keeps_best():
      for weight, best in zip(self._weights(), self.best_weights):
        weight.assign(best)
