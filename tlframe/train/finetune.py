"""Fine-tuning: the top blocks of the backbone train with the linear head, after it (--fine_tune).

Linear probing, then fine-tuning: bin/train first trains the head on cached
features as always; `fine_tune` then continues from that trained head (so the
backbone's features are not wrecked by a random head's gradients) with the top
K blocks of a second copy of the backbone trainable, on randomly cropped and
flipped images from the records (`pipeline.augment_image`, through
`trainer.augmented_batches`).

Which variables train (the top K blocks) and how their trained values are
kept in the model dir for the export: tlframe.train.tuned_blocks.

The step: softmax/hinge loss of the head (the head's --l2 on its kernel) on
the augmented batch, one optimizer for the backbone's variables at
--fine_tune_learning_rate with decoupled --fine_tune_weight_decay, one for the
head at its --learning_rate, both --optimizer with --lr_schedule over the
fine-tuning steps. The backbone copy is loaded inside `strategy.scope()`, so
its variables are mirrored like the head's; it runs at the run's --precision
(bfloat16 compute with float32 variables where chosen; the modules have no
float16 entry point).

After each epoch the validation images go through the fine-tuned backbone in
evaluation mode (`eval_features`); the weights of the lowest validation loss
are kept, counting the linear-probed start as epoch 0, so fine-tuning never
leaves a model worse on validation loss than the head alone; after
--fine_tune_patience epochs without improvement the run stops. A checkpoint
(model_dir/checkpoints/fine_tune) is saved after every epoch and a rerun of
the same command resumes from it. TensorBoard: logs/fine_tune/{train,validation}
(loss, accuracy, both learning rates, the train - validation gaps).
"""

import dataclasses
import os
import time

import numpy as np
import tensorflow as tf
from absl import logging

from tlframe.backbone import loading as backbone_lib
from tlframe.train import head as head_lib
from tlframe.train import layout as model_dir_layout
from tlframe.train import optimizers
from tlframe.train import fit_loop
from tlframe import options as options_lib
from tlframe import pipeline
from tlframe import records
from tlframe.train import summaries
from tlframe.train import trainer as trainer_lib
from tlframe.train import tuned_blocks
from tlframe.util.progress import Progress


# ---------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class FineTuneResult:
  """What the run (train.run) needs after fine-tuning."""
  head: head_lib.LinearHead           # the fine-tuned head (mirrored under the strategy)
  variables: list                      # the fine-tuned backbone variables
  features: dict                       # {split: [N, D] features through the fine-tuned backbone}
  metrics: dict                        # metrics.json's "fine_tune"


def fine_tune(options, strategy, trained_head, feature_sets, out_dir):
  """Fine-tunes from `trained_head`; returns a FineTuneResult (see the module doc).

  feature_sets: the run's {split: FeatureSet or None} (of the frozen
  backbone), for the labels and the number of training images; the features
  of every split are recomputed through the fine-tuned backbone.
  """
  start = time.monotonic()
  # A copy of its own, inside the scope: its variables are mirrored (and the
  # frozen copy used for the cached features stays as it is).
  with strategy.scope():
    backbone = backbone_lib.load_backbone(options.backbone, features=options.features,
                                          input_size=options.input_size,
                                          precision=options.precision)
  num_train = len(feature_sets["train"].labels)
  global_batch = trainer_lib.effective_batch_size(
      dataclasses.replace(options, batch_size=options.fine_tune_batch_size), num_train,
      strategy.num_replicas_in_sync)
  writers = summaries.Writers(os.path.join(out_dir, model_dir_layout.LOGS_DIRNAME,
                                           model_dir_layout.FINE_TUNE_SUBDIRNAME))
  tuner = FineTuner(strategy, options, backbone, trained_head,
                    steps_per_epoch=num_train // global_batch, global_batch_size=global_batch,
                    writers=writers)
  label_names = records.read_labels(options.records_dir)
  weights_by_class = trainer_lib.class_weights(feature_sets["train"].labels, len(label_names),
                                               options.class_weight)
  records.check_shards(options.records_dir, "train")

  def epoch_batches(epoch):
    # Seeded by the epoch: a run resumed after epoch e sees the batches an
    # uninterrupted one would.
    return iter(trainer_lib.augmented_batches(
        strategy, records.split_file_pattern(options.records_dir, "train"), global_batch,
        weights_by_class, image_size=backbone.input_size, resize_mode=options.resize_mode,
        seed=options.seed * 100003 + epoch))

  checkpoints = os.path.join(model_dir_layout.CHECKPOINT_DIRNAME, model_dir_layout.FINE_TUNE_SUBDIRNAME)
  manager = tf.train.CheckpointManager(tuner.checkpoint, os.path.join(out_dir, checkpoints),
                                       max_to_keep=2)
  # Every worker resumes from the chief's checkpoints (the others' are temporary).
  resume_from = tf.train.latest_checkpoint(os.path.join(options.model_dir, checkpoints))
  validation = feature_sets["validation"]
  epochs_run = tuner.fit(epoch_batches, validation.labels, manager=manager,
                         resume_from=resume_from)
  tuner.use_best_weights()
  writers.close()
  train_seconds = time.monotonic() - start

  features = {split: (tuner.eval_features(split, len(feature_set.labels))
                      if feature_set is not None else None)
              for split, feature_set in feature_sets.items() if split != "validation"}
  features["validation"] = tuner.best_validation_features
  if features["validation"] is None:  # resumed after the best epoch
    features["validation"] = tuner.eval_features("validation", len(validation.labels))
  for split, feature_set in feature_sets.items():
    if feature_set is not None and len(features[split]) != len(feature_set.labels):
      raise RuntimeError(f"the {split} records gave {len(features[split])} images through the "
                         f"fine-tuned backbone, {len(feature_set.labels)} in the backbone pass")
  metrics = dict(
      blocks=options_lib.fine_tune_blocks(options.fine_tune_blocks),
      num_variables=len(tuner.variables),
      num_parameters=int(sum(np.prod(v.shape) for v in tuner.variables)),
      epochs_completed=tuner.epochs_done, epochs_run_now=epochs_run,
      best_epoch=int(tuner.best_epoch.numpy()), stopped_early=bool(tuner.stopped.numpy()),
      best_validation_loss=float(tuner.best_val_loss.numpy()),
      linear_probe_validation_loss=float(tuner.initial_val_loss.numpy()),
      global_batch_size=global_batch, precision=backbone.precision,
      train_images_per_s=tuner.train_rate(), eval_images_per_s=tuner.eval_rate(),
      training_s=train_seconds, total_s=time.monotonic() - start)
  return FineTuneResult(tuner.head, tuner.variables, features, metrics)


class FineTuner(fit_loop.FitLoop):
  """The top blocks of `backbone` and a copy of `trained_head`, trained together.

  backbone: a Backbone loaded inside `strategy.scope()`. Holds everything a
  checkpoint needs (`checkpoint`). One epoch per chunk of tlframe.train.fit_loop,
  each validated from Python.
  """

  _WHAT = "fine-tuning"
  _RESUMED = "Fine-tuning resumed"

  def __init__(self, strategy, options, backbone, trained_head, *, steps_per_epoch,
               global_batch_size, writers=None):
    self.strategy = strategy
    self.options = options
    self.backbone = backbone
    self.steps_per_epoch = steps_per_epoch
    self.global_batch_size = global_batch_size
    self._writers = writers
    self.variables = tuned_blocks.trainable_variables(backbone, options.fine_tune_blocks)
    schedule = dataclasses.replace(options, epochs=options.fine_tune_epochs, warmup_epochs=0.0)
    with strategy.scope():
      self.head = head_lib.LinearHead(trained_head.num_features, trained_head.num_classes,
                                      feature_normalization=options.feature_normalization)
      self.head.assign(trained_head)
      # Decoupled weight decay on the backbone's weights.
      self.backbone_optimizer = optimizers.make_optimizer(
          dataclasses.replace(schedule, learning_rate=options.fine_tune_learning_rate),
          steps_per_epoch, weight_decay=options.fine_tune_weight_decay)
      # The head starts trained: at its own --learning_rate it would leave its
      # optimum faster than the backbone improves (measured: docs/training.md).
      self.head_optimizer = optimizers.make_optimizer(
          dataclasses.replace(schedule, learning_rate=options.fine_tune_head_learning_rate or
                              options.fine_tune_learning_rate), steps_per_epoch)
      self.backbone_optimizer.build(self.variables)
      self.head_optimizer.build(self.head.trainable_weights)
      self.initial_val_loss = tf.Variable(np.nan, dtype=tf.float32, trainable=False)
      self._init_loop(epochs=options.fine_tune_epochs, patience=options.fine_tune_patience)
    self.checkpoint = tf.train.Checkpoint(
        backbone_variables=self.variables, head=self.head,
        backbone_optimizer=self.backbone_optimizer, head_optimizer=self.head_optimizer,
        initial_val_loss=self.initial_val_loss, best_weights=self.best_weights,
        **self._loop_state())
    # No autograph: the steps have no Python control flow, and tracing is faster.
    self._train_step_fn = tf.function(self._distributed_step, autograph=False)
    size = backbone.input_size
    self._eval_fn = tf.function(self._distributed_features, autograph=False, input_signature=[
        tf.TensorSpec([None, size, size, 3], tf.float32)])
    self._step_seconds, self._eval_seconds = [], []
    # The kept weights' validation features, when this process computed them.
    self.best_validation_features = None
    self._validation_labels = None   # fit's

  def _weights(self):
    return self.variables + self.head.trainable_weights

  # -- one training step on one replica --------------------------------------

  def _train_step(self, images, labels, weights):
    options = self.options
    num_replicas = tf.cast(tf.distribute.get_replica_context().num_replicas_in_sync, tf.float32)
    with tf.GradientTape() as tape:
      scores = self.head(self.backbone(images))                          # [b, C]
      losses = head_lib.per_example_loss(options.loss, scores, labels,
                                         options.label_smoothing) * weights[:, 0]
      data_loss = tf.reduce_sum(losses) / self.global_batch_size
      objective = data_loss + options.l2 * self.head.l2_penalty()[0] / num_replicas
    gradients = tape.gradient(objective, self._weights())
    count = len(self.variables)
    self.backbone_optimizer.apply_gradients(zip(gradients[:count], self.variables))
    self.head_optimizer.apply_gradients(zip(gradients[count:], self.head.trainable_weights))
    correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(scores, axis=-1, output_type=tf.int32),
                                             labels), tf.float32))
    return data_loss, correct

  def _distributed_step(self, iterator):
    per_replica = self.strategy.run(self._train_step, args=next(iterator))
    return tuple(self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                 for value in per_replica)

  # -- evaluation mode ---------------------------------------------------------

  def _distributed_features(self, images):
    """[B, S, S, 3] -> [B, D] through the fine-tuned backbone, the batch split over replicas.

    Every replica gets the whole batch, runs its contiguous share and all-gathers,
    which keeps the rows in order under every strategy.
    """
    replicas = self.strategy.num_replicas_in_sync
    count = tf.shape(images)[0]
    share = (count + replicas - 1) // replicas
    padded = tf.pad(images, [[0, share * replicas - count], [0, 0], [0, 0], [0, 0]])

    def replica_features(padded):
      context = tf.distribute.get_replica_context()
      first = tf.cast(context.replica_id_in_sync_group, tf.int32) * share
      return context.all_gather(self.backbone(padded[first:first + share]), axis=0)

    gathered = self.strategy.run(replica_features, args=(padded,))
    return self.strategy.experimental_local_results(gathered)[0][:count]

  def eval_features(self, split, total=None):
    """[N, D] features of the split's records (no augmentation), in record order."""
    options = self.options
    dataset = pipeline.make_dataset(
        records.split_file_pattern(options.records_dir, split), options.extract_batch_size,
        image_size=self.backbone.input_size, resize_mode=options.resize_mode)
    progress = Progress(total, what=f"{split} images")
    batches = []
    for images, _ in dataset:
      batch_start = time.monotonic()
      batches.append(self._eval_fn(images).numpy())
      self._eval_seconds.append((time.monotonic() - batch_start, len(batches[-1])))
      progress.update(len(batches[-1]))
    return (np.concatenate(batches) if batches else
            np.zeros([0, self.head.num_features], np.float32))

  def _validate(self, labels):
    """(loss, accuracy, features) of the validation split in evaluation mode (unweighted, no l2)."""
    features = self.eval_features("validation", len(labels))
    scores = self.head(tf.constant(features))
    losses = head_lib.per_example_loss(self.options.loss, scores, tf.constant(labels),
                                       self.options.label_smoothing)
    accuracy = np.mean(np.argmax(scores.numpy(), axis=-1) == labels)
    return float(tf.reduce_mean(losses).numpy()), float(accuracy), features

  # -- epochs (fit_loop.FitLoop.fit) -------------------------------------------

  def fit(self, epoch_batches, validation_labels, *, manager=None, resume_from=None):
    """Runs the remaining epochs, a checkpoint after each; returns the number run now.

    epoch_batches(epoch): an iterator over at least an epoch of distributed batches.
    """
    self._validation_labels = validation_labels
    if not resume_from:
      # Epoch 0 is the linear-probed start: the weights to beat.
      loss, accuracy, features = self._validate(validation_labels)
      self.initial_val_loss.assign(loss)
      if self.track_best(loss):
        self.best_validation_features = features
      self._write_epoch(self._writers.validation if self._writers else None, loss, accuracy)
    return super().fit(epoch_batches, manager=manager, resume_from=resume_from)

  def _epochs_per_chunk(self, checkpointing):
    del checkpointing  # every epoch is validated, checked and saved
    return 1

  def _run_epochs(self, epoch_batches, first_epoch, count):
    del first_epoch, count  # one epoch, its batches seeded by the epoch
    train_loss, train_accuracy = self._train_epoch(epoch_batches(self.epochs_done))
    self.epoch.assign_add(1)
    loss, accuracy, features = self._validate(self._validation_labels)
    improved = bool(self.track_best(loss))
    if improved:
      self.best_validation_features = features
    logging.info("Fine-tuning epoch %d: train loss %.4f accuracy %.4f, validation loss %.4f "
                 "accuracy %.4f%s", self.epochs_done, train_loss, train_accuracy, loss,
                 accuracy, " (best)" if improved else "")
    if self._writers is not None:
      self._write_epoch(self._writers.train, train_loss, train_accuracy)
      self._write_epoch(self._writers.validation, loss, accuracy)
      with self._writers.train.as_default(step=self.epochs_done):
        summaries.scalar("epoch/learning_rate_backbone",
                         self.backbone_optimizer.learning_rate)
        summaries.scalar("epoch/learning_rate_head", self.head_optimizer.learning_rate)
        summaries.scalar("epoch/accuracy_gap_train_minus_validation",
                         train_accuracy - accuracy)
        summaries.scalar("epoch/loss_gap_validation_minus_train", loss - train_loss)
      self._writers.flush()

  def _divergence_fix(self):
    return (f"lower fine_tune_learning_rate (now {self.options.fine_tune_learning_rate:g}) "
            "or fine_tune_head_learning_rate",
            ["fine_tune_learning_rate", "fine_tune_head_learning_rate"])

  def _train_epoch(self, iterator):
    """One epoch of steps; returns the mean (loss, accuracy) of its augmented batches."""
    loss_sum = correct_sum = 0.0
    progress = Progress(self.steps_per_epoch * self.global_batch_size,
                        what="fine-tuning images")
    for _ in range(self.steps_per_epoch):
      step_start = time.monotonic()
      loss, correct = (float(value) for value in self._train_step_fn(iterator))
      self._step_seconds.append(time.monotonic() - step_start)
      loss_sum += loss
      correct_sum += correct
      step = int(self.backbone_optimizer.iterations.numpy())
      if self._writers is not None and step % self.options.log_every_steps == 0:
        with self._writers.train.as_default(step=step):
          summaries.scalar("step/loss", loss)
          summaries.scalar("step/accuracy", correct / self.global_batch_size)
          summaries.scalar("step/learning_rate_backbone", self.backbone_optimizer.learning_rate)
          summaries.scalar("step/learning_rate_head", self.head_optimizer.learning_rate)
      progress.update(self.global_batch_size)
    return (loss_sum / self.steps_per_epoch,
            correct_sum / (self.steps_per_epoch * self.global_batch_size))

  def _write_epoch(self, writer, loss, accuracy):
    if writer is None:
      return
    with writer.as_default(step=self.epochs_done):
      summaries.scalar("epoch/loss", loss)
      summaries.scalar("epoch/accuracy", accuracy)

  def train_rate(self):
    """Training images/s through the backbone (forward + backward), the first step
    (traced) aside."""
    seconds = sum(self._step_seconds[1:])
    return (len(self._step_seconds) - 1) * self.global_batch_size / seconds if seconds else None

  def eval_rate(self):
    """Evaluation images/s through the backbone (forward only), the first (traced) batch aside."""
    seconds = sum(s for s, _ in self._eval_seconds[1:])
    return sum(n for _, n in self._eval_seconds[1:]) / seconds if seconds else None

