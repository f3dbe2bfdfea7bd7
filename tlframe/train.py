"""Training the linear head on frozen features: `train(TrainOptions)` is bin/train.

Two modes, both in-graph (the epochs and steps are tf.while_loops inside one
tf.function; Python only runs between checkpoints):
- cached features (default): one backbone pass over the train and validation
  records, kept in memory and in model_dir/features/ (so a rerun with other
  head settings skips the backbone), then many epochs of minibatches of those
  features;
- augmented (`augment=True`): each step reads records with random crops and
  flips, runs the frozen backbone and the head.

Every run goes through a tf.distribute strategy (the default one, mirrored or
multi-worker); batches come from `distribute_datasets_from_function` and the
per-replica losses are scaled by the global batch size, so all strategies take
the same steps. Epoch e's order of examples is a stateless shuffle of
(seed, e): a run resumed from the checkpoint after epoch e sees the same
batches as an uninterrupted one.

`tune_l2` does k-fold cross-validation over an l2 grid on the cached features:
all (l2, fold) pairs train together as one stacked head (head.LinearHead's
model axis), so the whole grid costs about one training run.
"""

import dataclasses
import json
import os
import time

import numpy as np
import tensorflow as tf
from absl import logging

from tlframe import backbone as backbone_lib
from tlframe import features as features_lib
from tlframe import fileio
from tlframe import head as head_lib
from tlframe import pipeline
from tlframe import records
from tlframe import summaries
from tlframe.errors import UserError

STRATEGIES = ("default", "mirrored", "multi_worker")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("cosine", "constant")
CLASS_WEIGHTS = ("none", "balanced")
METRICS_FILENAME = "metrics.json"
CHECKPOINT_DIRNAME = "checkpoints"
RUN_OPTIONS_FILENAME = "run_options.json"
# Defaults chosen with bench/bench_train.py on oxford_flowers12 (docs/training.md).
DEFAULT_L2_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
# On cached features a step is a matmul, so big batches (the whole set when it
# has up to 1024 images) are fastest; through the backbone, memory bounds it.
FEATURES_BATCH_SIZE = 1024
AUGMENTED_BATCH_SIZE = 64


@dataclasses.dataclass
class TrainOptions:
  """Everything bin/train's flags set; see configs/template.cfg for each one's meaning.

  The head defaults (softmax, l2=1e-3, standardized features, Adam at 0.003
  with cosine decay, 100 epochs, batch 1024) were chosen by measurement on
  oxford_flowers12 with bench/bench_train.py: see docs/training.md.
  """
  records_dir: str
  model_dir: str
  backbone: str = backbone_lib.DEFAULT_HANDLE
  features: str = "feature_vector"
  input_size: int = None
  precision: str = "float32"
  resize_mode: str = "center_crop"
  loss: str = "softmax"
  l2: float = 1e-3
  label_smoothing: float = 0.0
  class_weight: str = "none"
  feature_normalization: str = "standardize"
  optimizer: str = "adam"
  learning_rate: float = 0.003
  momentum: float = 0.9
  lr_schedule: str = "cosine"
  warmup_epochs: float = 0.0
  epochs: int = 100
  batch_size: int = None   # None: FEATURES_BATCH_SIZE, or AUGMENTED_BATCH_SIZE with augment
  patience: int = 0
  augment: bool = False
  tune_l2: bool = False
  l2_grid: tuple = DEFAULT_L2_GRID
  cv_folds: int = 5
  strategy: str = "default"
  seed: int = 0
  checkpoint_every_epochs: int = 25
  extract_batch_size: int = 32
  log_every_steps: int = 10
  num_thumbnails_per_class: int = 16


# ---------------------------------------------------------------------------
# Checks and small pieces.


def check_options(options):
  """Raises UserError for any bad flag or combination, before anything runs."""
  def bad(message):
    raise UserError(message)

  if not options.records_dir:
    bad("--records_dir is required: the folder bin/make_tfrecords wrote")
  if not tf.io.gfile.isdir(options.records_dir):
    bad(f"--records_dir={options.records_dir} does not exist: run bin/make_tfrecords first")
  if not options.model_dir:
    bad("--model_dir is required: where checkpoints, logs and metrics go")
  for name, allowed in (("loss", head_lib.LOSSES),
                        ("feature_normalization", head_lib.FEATURE_NORMALIZATIONS),
                        ("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES),
                        ("class_weight", CLASS_WEIGHTS), ("strategy", STRATEGIES),
                        ("features", backbone_lib.FEATURES),
                        ("precision", backbone_lib.PRECISIONS),
                        ("resize_mode", pipeline.RESIZE_MODES)):
    if getattr(options, name) not in allowed:
      bad(f"--{name}={getattr(options, name)} is unknown: use one of {', '.join(allowed)}")
  for name in ("epochs", "learning_rate", "checkpoint_every_epochs", "extract_batch_size",
               "log_every_steps"):
    if not getattr(options, name) > 0:
      bad(f"--{name}={getattr(options, name)} must be positive")
  if options.batch_size is not None and options.batch_size < 1:
    bad(f"--batch_size={options.batch_size} must be positive")
  if options.l2 < 0 or any(l2 < 0 for l2 in options.l2_grid):
    bad("--l2 and --l2_grid must be >= 0")
  if not 0 <= options.label_smoothing < 1:
    bad(f"--label_smoothing={options.label_smoothing} must be in [0, 1)")
  if options.label_smoothing and options.loss != "softmax":
    bad("--label_smoothing applies to --loss=softmax only: drop it or use --loss=softmax")
  if options.patience < 0 or options.warmup_epochs < 0:
    bad("--patience and --warmup_epochs must be >= 0")
  if options.warmup_epochs >= options.epochs:
    bad(f"--warmup_epochs={options.warmup_epochs} must be less than --epochs={options.epochs}")
  if options.tune_l2 and options.augment:
    bad("--tune_l2 works on cached features and cannot be combined with --augment: "
        "tune without --augment, then train with --augment --l2=<the best value>")
  if options.tune_l2 and (options.cv_folds < 2 or not options.l2_grid):
    bad("--tune_l2 needs --cv_folds >= 2 and a non-empty --l2_grid")
  if options.strategy == "multi_worker" and not os.environ.get("TF_CONFIG"):
    bad("--strategy=multi_worker needs the TF_CONFIG environment variable (cluster and task); "
        "see docs/training.md, or use --strategy=default|mirrored")


def make_strategy(name):
  """The tf.distribute strategy for --strategy (see docs/training.md)."""
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    # All GPUs; without GPUs, all logical CPUs (one unless configured otherwise).
    devices = ([d.name for d in tf.config.list_logical_devices("GPU")] or
               [d.name for d in tf.config.list_logical_devices("CPU")])
    return tf.distribute.MirroredStrategy(devices)
  if name == "multi_worker":
    try:
      json.loads(os.environ["TF_CONFIG"])
    except ValueError as e:
      raise UserError(f"TF_CONFIG is not valid JSON ({e}): fix the environment variable") from None
    return tf.distribute.MultiWorkerMirroredStrategy()
  raise UserError(f"--strategy={name} is unknown: use one of {', '.join(STRATEGIES)}")


def is_chief(strategy):
  """Whether this process writes model_dir (always, except non-chief multi-workers)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  return task_type == "chief" or (task_type == "worker" and task_id == 0 and
                                  "chief" not in resolver.cluster_spec().as_dict())


def write_dir(model_dir, strategy):
  """model_dir for the chief; a per-worker temp dir for the others' collective saves."""
  if is_chief(strategy):
    return model_dir
  resolver = strategy.cluster_resolver
  return os.path.join(model_dir, f".worker-{resolver.task_type}-{resolver.task_id}")


def class_weights(labels, num_classes, mode):
  """[num_classes] weights: ones, or N / (num_classes * count) for 'balanced'."""
  if mode == "none":
    return np.ones([num_classes], np.float32)
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
  return weights.astype(np.float32)


def make_optimizer(options, steps_per_epoch):
  """A Keras optimizer with the --lr_schedule over all steps of the run."""
  import keras  # pylint: disable=g-import-not-at-top
  total_steps = options.epochs * steps_per_epoch
  warmup_steps = int(round(options.warmup_epochs * steps_per_epoch))
  if options.lr_schedule == "cosine":
    learning_rate = keras.optimizers.schedules.CosineDecay(
        0.0 if warmup_steps else options.learning_rate,
        decay_steps=max(1, total_steps - warmup_steps),
        warmup_target=options.learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps)
  else:
    learning_rate = options.learning_rate
  if options.optimizer == "adam":
    return keras.optimizers.Adam(learning_rate)
  return keras.optimizers.SGD(learning_rate, momentum=options.momentum)


def effective_batch_size(options, num_examples, num_replicas):
  """The global batch: --batch_size (or the mode's default), at most the number of
  examples, a multiple of the replica count."""
  batch_size = options.batch_size or (AUGMENTED_BATCH_SIZE if options.augment else
                                      FEATURES_BATCH_SIZE)
  size = min(batch_size, num_examples)
  size -= size % num_replicas
  if size < 1:
    raise UserError(f"{num_examples} training examples cannot fill one batch on "
                    f"{num_replicas} replicas: add images or use fewer replicas")
  return size


# ---------------------------------------------------------------------------
# Input: batches of cached features or of augmented images, per replica.


def feature_batches(strategy, features, labels, example_weights, global_batch_size,
                    seed, first_epoch, epochs):
  """Distributed (features, labels, weights [b, models]) batches for epochs [first, epochs).

  Each epoch is a stateless shuffle of (seed, epoch) cut into global batches
  (the remainder is dropped); each input pipeline takes its slice of every
  global batch, so the replicas together see exactly the global batch. When
  one global batch holds every example, epochs are not shuffled (see below).
  """
  num_examples = len(labels)
  steps = num_examples // global_batch_size
  features = tf.constant(features)
  labels = tf.constant(labels)
  weights = tf.constant(np.ascontiguousarray(example_weights.T))

  def dataset_fn(context):
    pipelines = context.num_input_pipelines
    per_pipeline = global_batch_size // pipelines
    per_replica = context.get_per_replica_batch_size(global_batch_size)
    if global_batch_size == num_examples:
      # Every epoch is one step over all the examples, whose gradient is a sum
      # over all of them: the order cannot matter. This pipeline's per-replica
      # batches are gathered once and repeated (~40% faster than reshuffling
      # and gathering every epoch; the default batch covers sets of <= 1024).
      rows = tf.reshape(tf.range(num_examples),
                        [pipelines, -1, per_replica])[context.input_pipeline_id]
      batches = tuple(tf.gather(t, rows) for t in (features, labels, weights))
      return tf.data.Dataset.from_tensor_slices(batches).repeat(epochs - first_epoch)

    def epoch_order(epoch):
      order = tf.random.experimental.stateless_shuffle(
          tf.range(num_examples), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
      order = tf.reshape(order[:steps * global_batch_size], [steps, pipelines, per_pipeline])
      return tf.reshape(order[:, context.input_pipeline_id], [-1])

    dataset = tf.data.Dataset.range(first_epoch, epochs).map(epoch_order).unbatch()
    dataset = dataset.batch(per_replica, drop_remainder=True)
    dataset = dataset.map(lambda i: (tf.gather(features, i), tf.gather(labels, i),
                                     tf.gather(weights, i)))
    return dataset.prefetch(tf.data.AUTOTUNE)

  return strategy.distribute_datasets_from_function(dataset_fn)


def augmented_batches(strategy, file_pattern, global_batch_size, weights_by_class, *,
                      image_size, resize_mode, seed):
  """Distributed (images, labels, weights [b, 1]) batches of randomly augmented records."""
  weights_by_class = tf.constant(weights_by_class)

  def dataset_fn(context):
    dataset = pipeline.make_dataset(
        file_pattern, context.get_per_replica_batch_size(global_batch_size),
        image_size=image_size, resize_mode=resize_mode, augment=True, shuffle=True,
        repeat=True, seed=seed, drop_remainder=True, input_context=context)
    return dataset.map(
        lambda images, labels: (images, labels, tf.gather(weights_by_class, labels)[:, None]))

  return strategy.distribute_datasets_from_function(dataset_fn)


# ---------------------------------------------------------------------------
# The in-graph trainer.


class HeadTrainer:
  """Trains a (stacked) LinearHead in-graph; holds everything a checkpoint needs.

  normalization: the head's (shift, scale) constants (head.normalization_constants).
  Training works on normalized features: cached features are normalized once
  (`normalize`) instead of at every step.
  backbone: images -> features inside the step (augmented mode), or None when
  the batches hold normalized features.
  validation: (features, labels) evaluated in-graph after every epoch (for
  early stopping and the validation curves), or None.
  """

  def __init__(self, strategy, options, *, num_features, num_classes, steps_per_epoch,
               global_batch_size, normalization, l2_values=None, model_fractions=None,
               backbone=None, validation=None, writers=None):
    self.strategy = strategy
    self.options = options
    self.steps_per_epoch = steps_per_epoch
    self.global_batch_size = global_batch_size
    l2_values = np.asarray([options.l2] if l2_values is None else l2_values, np.float32)
    self.num_models = len(l2_values)
    self._l2 = tf.constant(l2_values)
    # Each model's loss is a mean over the examples it trains on (a fraction of
    # each batch under cross-validation), so l2 means the same for every model.
    fractions = np.ones([self.num_models]) if model_fractions is None else model_fractions
    self._batch_share = tf.constant(global_batch_size * np.asarray(fractions, np.float32))
    self._backbone = backbone
    self._writers = writers
    with strategy.scope():
      self.head = head_lib.LinearHead(num_features, num_classes, num_models=self.num_models,
                                      feature_normalization=options.feature_normalization)
      self.optimizer = make_optimizer(options, steps_per_epoch)
      self.optimizer.build(self.head.trainable_weights)
      self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
      self.stopped = tf.Variable(False, trainable=False, name="stopped")
      self.best_val_loss = tf.Variable(np.inf, dtype=tf.float32, trainable=False)
      self.best_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
      self.bad_epochs = tf.Variable(0, dtype=tf.int64, trainable=False)
      self.best_kernel = tf.Variable(self.head.kernel, trainable=False)
      self.best_bias = tf.Variable(self.head.bias, trainable=False)
    self.head.set_normalization(*normalization)
    self._validation = None
    if validation is not None:
      self._validation = (tf.constant(self.normalize(validation[0])), tf.constant(validation[1]))
    self.checkpoint = tf.train.Checkpoint(
        head=self.head, optimizer=self.optimizer, epoch=self.epoch, stopped=self.stopped,
        best_val_loss=self.best_val_loss, best_epoch=self.best_epoch,
        bad_epochs=self.bad_epochs, best_kernel=self.best_kernel, best_bias=self.best_bias)
    self.run_epochs = tf.function(self._epochs_loop, autograph=False)

  # -- one step on one replica ---------------------------------------------

  def _train_step(self, inputs, labels, weights):
    features = inputs if self._backbone is None else self.head.normalize(self._backbone(inputs))
    with tf.GradientTape() as tape:
      scores = self.head.linear(features)                              # [M, b, C]
      losses = head_lib.per_example_loss(self.options.loss, scores, labels,
                                         self.options.label_smoothing)  # [M, b]
      weighted = losses * tf.transpose(weights)
      data_loss = tf.reduce_sum(weighted, axis=1) / self._batch_share
      regularization = self._l2 * self.head.l2_penalty()
      num_replicas = tf.cast(tf.distribute.get_replica_context().num_replicas_in_sync,
                             tf.float32)
      # Models are independent, so one summed objective trains each on its own.
      objective = tf.reduce_sum(data_loss + regularization / num_replicas)
    gradients = tape.gradient(objective, self.head.trainable_weights)
    self.optimizer.apply_gradients(zip(gradients, self.head.trainable_weights))
    correct = tf.cast(tf.equal(tf.argmax(scores, axis=-1, output_type=tf.int32), labels),
                      tf.float32)
    return data_loss, tf.reduce_sum(correct, axis=1)

  # -- the in-graph loop -----------------------------------------------------

  def _epochs_loop(self, iterator, num_epochs):
    """`num_epochs` epochs of steps from `iterator` as tf.while_loops (`run_epochs`).

    Written with explicit control flow, traced without autograph: tracing is
    most of a short run's head-training time.
    """
    strategy = self.strategy
    global_batch = float(self.global_batch_size)
    sum_op = tf.distribute.ReduceOp.SUM

    def step(loss_sum, correct_sum):
      per_replica = strategy.run(self._train_step, args=next(iterator))
      step_loss = strategy.reduce(sum_op, per_replica[0], axis=None)
      step_correct = strategy.reduce(sum_op, per_replica[1], axis=None)
      if self._writers is not None:
        self._write_step(step_loss[0], step_correct[0] / global_batch)
      return loss_sum + step_loss, correct_sum + step_correct

    def epoch(epochs_run):
      zeros = tf.zeros([self.num_models])
      loss_sum, correct_sum = tf.while_loop(lambda *_: True, step, (zeros, zeros),
                                            maximum_iterations=self.steps_per_epoch)
      self.epoch.assign_add(1)
      if self._writers is not None:
        self._write_epoch(loss_sum[0] / self.steps_per_epoch,
                          correct_sum[0] / (self.steps_per_epoch * global_batch))
      if self._validation is not None:
        self._validate_and_track_best()
      return epochs_run + 1

    def more(epochs_run):
      return tf.logical_and(epochs_run < num_epochs, tf.logical_not(self.stopped))

    tf.while_loop(more, epoch, [tf.constant(0, tf.int64)])

  def _learning_rate(self):
    return tf.convert_to_tensor(self.optimizer.learning_rate)

  def _write_step(self, loss, accuracy):
    step = self.optimizer.iterations

    def write():
      with self._writers.train.as_default(step=step):
        summaries.scalar("step/loss", loss)
        summaries.scalar("step/accuracy", accuracy)
        summaries.scalar("step/learning_rate", self._learning_rate())
        return summaries.scalar("step/weight_norm", self.head.weight_norm())

    tf.cond(step % self.options.log_every_steps == 0, write, lambda: tf.constant(False))

  def _write_epoch(self, loss, accuracy):
    with self._writers.train.as_default(step=self.epoch):
      summaries.scalar("epoch/loss", loss)
      summaries.scalar("epoch/accuracy", accuracy)
      summaries.scalar("epoch/learning_rate", self._learning_rate())
      summaries.scalar("epoch/weight_norm", self.head.weight_norm())

  def normalize(self, features):
    """The head's normalization of numpy features, as numpy."""
    return self.head.normalize(tf.constant(features)).numpy()

  def evaluate(self, features, labels, *, normalized=False):
    """(mean loss, accuracy, scores [M, N, C]) of every model; unweighted, no l2."""
    scores = self.head.linear(features) if normalized else self.head.scores(features)
    losses = head_lib.per_example_loss(self.options.loss, scores, labels,
                                       self.options.label_smoothing)
    correct = tf.equal(tf.argmax(scores, axis=-1, output_type=tf.int32), labels)
    return (tf.reduce_mean(losses, axis=-1),
            tf.reduce_mean(tf.cast(correct, tf.float32), axis=-1), scores)

  def _validate_and_track_best(self):
    features, labels = self._validation
    loss, accuracy, _ = self.evaluate(features, labels, normalized=True)
    loss, accuracy = loss[0], accuracy[0]
    if self._writers is not None:
      with self._writers.validation.as_default(step=self.epoch):
        summaries.scalar("epoch/loss", loss)
        summaries.scalar("epoch/accuracy", accuracy)

    def improved():
      self.best_val_loss.assign(loss)
      self.best_epoch.assign(self.epoch)
      self.best_kernel.assign(self.head.kernel)
      self.best_bias.assign(self.head.bias)
      return self.bad_epochs.assign(0)

    def not_improved():
      bad_epochs = self.bad_epochs.assign_add(1)
      if self.options.patience:
        self.stopped.assign(bad_epochs >= self.options.patience)
      return bad_epochs

    tf.cond(loss < self.best_val_loss, improved, not_improved)

  # -- Python between checkpoints -----------------------------------------

  def fit(self, make_iterator, *, resume_from=None, manager=None, on_checkpoint=None):
    """Runs the remaining epochs; `make_iterator(first_epoch)` gives the batches.

    resume_from: a checkpoint path to restore first. With a CheckpointManager,
    saves every `checkpoint_every_epochs`. Returns the number of epochs run now.
    """
    if resume_from:
      self.checkpoint.restore(resume_from).assert_existing_objects_matched()
      logging.info("Resumed from %s at epoch %d", resume_from, self.epochs_done)
    first_epoch = self.epochs_done
    epochs = self.options.epochs
    chunk = self.options.checkpoint_every_epochs if manager is not None else epochs
    iterator = None
    while self.epochs_done < epochs and not self.stopped.numpy():
      if iterator is None:
        iterator = iter(make_iterator(first_epoch))
      self.run_epochs(iterator, tf.constant(min(chunk, epochs - self.epochs_done), tf.int64))
      if manager is not None:
        manager.save(checkpoint_number=self.epochs_done)
      if on_checkpoint is not None:
        on_checkpoint(self.epochs_done)
    if self._writers is not None:
      self._writers.flush()
    return self.epochs_done - first_epoch

  @property
  def epochs_done(self):
    return int(self.epoch.numpy())

  def use_best_weights(self):
    """With early stopping, keep the weights of the best validation loss."""
    if self._validation is not None and self.options.patience and self.best_epoch.numpy() > 0:
      self.head.kernel.assign(self.best_kernel)
      self.head.bias.assign(self.best_bias)


# ---------------------------------------------------------------------------
# Cross-validation of l2.


def stratified_folds(labels, num_folds, seed):
  """Fold index of each example: classes shuffled within and dealt round-robin in turn.

  Dealing continues from one class to the next, so folds differ in size by at
  most one and each class is spread as evenly as its count allows.
  """
  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(np.flatnonzero(labels == label))
                          for label in np.unique(labels)])
  folds = np.zeros(len(labels), np.int64)
  folds[order] = np.arange(len(order)) % num_folds
  return folds


def tune_l2(strategy, options, train_x, train_y, num_classes, *, shift, scale):
  """k-fold CV over options.l2_grid on cached features; returns (best l2, table rows).

  Each row: dict(l2, accuracy and loss over all held-out predictions,
  accuracy_std across folds).
  The best has the highest held-out accuracy; ties go to the lower held-out loss,
  then to the larger l2.
  """
  num_folds = options.cv_folds
  if len(train_y) < num_folds:
    raise UserError(f"--cv_folds={num_folds} but only {len(train_y)} training examples: "
                    "lower --cv_folds or drop --tune_l2")
  folds = stratified_folds(train_y, num_folds, options.seed)
  grid = list(options.l2_grid)
  # Model g * num_folds + k: l2 = grid[g], trained without fold k.
  l2_values = np.repeat(np.asarray(grid, np.float32), num_folds)
  held_out = np.tile(np.arange(num_folds), len(grid))
  train_masks = (folds[None, :] != held_out[:, None]).astype(np.float32)   # [M, N]
  weights = train_masks * class_weights(train_y, num_classes, options.class_weight)[train_y]
  global_batch = effective_batch_size(options, len(train_y),
                                      strategy.num_replicas_in_sync)
  trainer = HeadTrainer(strategy, options, num_features=train_x.shape[1],
                        num_classes=num_classes,
                        steps_per_epoch=len(train_y) // global_batch,
                        global_batch_size=global_batch, l2_values=l2_values,
                        normalization=(shift, scale), model_fractions=train_masks.mean(axis=1))
  normalized = trainer.normalize(train_x)
  trainer.fit(lambda first: feature_batches(strategy, normalized, train_y, weights,
                                            global_batch, options.seed, first, options.epochs))
  _, _, scores = trainer.evaluate(tf.constant(train_x), tf.constant(train_y))
  losses = head_lib.per_example_loss(options.loss, scores, train_y,
                                     options.label_smoothing).numpy()
  correct = np.argmax(scores.numpy(), axis=-1) == train_y[None, :]
  # Each example is scored by the model that did not train on it.
  held_out_model = np.arange(len(grid))[:, None] * num_folds + folds[None, :]   # [G, N]
  examples = np.arange(len(train_y))
  rows = []
  for g, l2 in enumerate(grid):
    held_correct = correct[held_out_model[g], examples]
    fold_accuracies = [held_correct[folds == k].mean() for k in range(num_folds)]
    rows.append(dict(l2=float(l2), accuracy=float(held_correct.mean()),
                     accuracy_std=float(np.std(fold_accuracies)),
                     loss=float(losses[held_out_model[g], examples].mean())))
  best = max(rows, key=lambda row: (row["accuracy"], -row["loss"], row["l2"]))
  return best["l2"], rows


def format_cv_table(rows, best_l2, num_folds):
  lines = [f"{num_folds}-fold cross-validation of --l2:",
           f"  {'l2':>9}  {'accuracy':>8}  {'+-':>6}  {'loss':>7}"]
  for row in rows:
    mark = "  <- best" if row["l2"] == best_l2 else ""
    lines.append(f"  {row['l2']:9.2g}  {row['accuracy']:8.4f}  {row['accuracy_std']:6.4f}  "
                 f"{row['loss']:7.4f}{mark}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Metrics.


def classification_metrics(scores, labels, label_names):
  """Accuracy, confusion matrix and per-class precision/recall of [N, C] scores."""
  num_classes = len(label_names)
  predictions = np.argmax(scores, axis=-1)
  confusion = np.zeros([num_classes, num_classes], np.int64)
  np.add.at(confusion, (labels, predictions), 1)
  true_counts = confusion.sum(axis=1)
  predicted_counts = confusion.sum(axis=0)
  diagonal = np.diag(confusion)
  recall = np.where(true_counts > 0, diagonal / np.maximum(true_counts, 1), 0.0)
  precision = np.where(predicted_counts > 0, diagonal / np.maximum(predicted_counts, 1), 0.0)
  return dict(
      accuracy=float(diagonal.sum() / max(1, len(labels))),
      num_examples=int(len(labels)),
      confusion_matrix=confusion.tolist(),
      per_class={name: dict(precision=float(precision[i]), recall=float(recall[i]),
                            count=int(true_counts[i]))
                 for i, name in enumerate(label_names)})


# ---------------------------------------------------------------------------
# The whole run.


def train(options):
  """Trains a head as `options` say; writes model_dir; returns the metrics dict."""
  check_options(options)
  start = time.monotonic()
  strategy = make_strategy(options.strategy)
  label_names = records.read_labels(options.records_dir)
  num_classes = len(label_names)
  num_train = records.count_examples(options.records_dir, "train")
  num_val = records.count_examples(options.records_dir, "validation")
  if num_train == 0:
    raise UserError(f"{options.records_dir} has no training examples: rebuild the records with "
                    "a smaller --validation_percentage/--test_percentage")
  if options.patience and not num_val:
    raise UserError("--patience needs validation records: rebuild the records with "
                    "--validation_percentage > 0, or set --patience=0")
  out_dir = write_dir(options.model_dir, strategy)
  tf.io.gfile.makedirs(out_dir)
  _start_or_resume(out_dir, options)

  # Loaded outside strategy.scope(): the frozen backbone has no state to mirror,
  # and a module restored in a MirroredStrategy scope cannot run in the
  # cross-replica context of the feature pass.
  load_start = time.monotonic()
  backbone = backbone_lib.load_backbone(options.backbone, features=options.features,
                                        input_size=options.input_size,
                                        precision=options.precision)
  backbone_load_seconds = time.monotonic() - load_start
  image_size = backbone.input_size
  extract = dict(backbone=backbone, records_dir=options.records_dir,
                 cache_dir=os.path.join(out_dir, features_lib.CACHE_DIRNAME),
                 batch_size=options.extract_batch_size, image_size=image_size,
                 resize_mode=options.resize_mode, num_classes=num_classes,
                 num_thumbnails_per_class=options.num_thumbnails_per_class)
  # The train features give the normalization constants, the sample grid and
  # the final train accuracy also in augmented mode.
  train_set = features_lib.cached_features(split="train", **extract)
  val_set = features_lib.cached_features(split="validation", **extract) if num_val else None
  backbone_seconds = train_set.extract_seconds + (val_set.extract_seconds if val_set else 0.0)
  shift, scale = head_lib.normalization_constants(train_set.features,
                                                  options.feature_normalization)

  cv = None
  l2 = options.l2
  if options.tune_l2:
    cv_start = time.monotonic()
    l2, rows = tune_l2(strategy, options, train_set.features, train_set.labels, num_classes,
                       shift=shift, scale=scale)
    print(format_cv_table(rows, l2, options.cv_folds))
    print(f"best --l2={l2:g}")
    cv = dict(folds=options.cv_folds, rows=rows, best_l2=l2,
              seconds=time.monotonic() - cv_start)
  options = dataclasses.replace(options, l2=l2)

  writers = summaries.Writers(os.path.join(out_dir, "logs"))
  summaries.write_input_grids(writers.train, train_set.thumbnails, train_set.thumbnail_labels,
                              label_names)
  weights_by_class = class_weights(train_set.labels, num_classes, options.class_weight)
  global_batch = effective_batch_size(options, num_train,
                                      strategy.num_replicas_in_sync)
  steps_per_epoch = num_train // global_batch
  trainer = HeadTrainer(
      strategy, options, num_features=backbone.output_dim, num_classes=num_classes,
      steps_per_epoch=steps_per_epoch, global_batch_size=global_batch,
      normalization=(shift, scale), backbone=backbone if options.augment else None,
      validation=(val_set.features, val_set.labels) if val_set is not None else None,
      writers=writers)

  if options.augment:
    def make_iterator(first_epoch):
      return augmented_batches(strategy, records.split_file_pattern(options.records_dir, "train"),
                               global_batch, weights_by_class, image_size=image_size,
                               resize_mode=options.resize_mode,
                               seed=options.seed * 100003 + first_epoch)
  else:
    example_weights = weights_by_class[train_set.labels][None, :]
    normalized = trainer.normalize(train_set.features)

    def make_iterator(first_epoch):
      return feature_batches(strategy, normalized, train_set.labels, example_weights,
                             global_batch, options.seed, first_epoch, options.epochs)

  def on_checkpoint(epoch):
    if val_set is not None:
      _, _, scores = trainer.evaluate(val_set.features, val_set.labels)
      scores = scores[0].numpy()
      summaries.write_evaluation(
          writers.validation, scores, val_set.labels,
          classification_metrics(scores, val_set.labels, label_names), epoch)

  manager = tf.train.CheckpointManager(trainer.checkpoint,
                                       os.path.join(out_dir, CHECKPOINT_DIRNAME), max_to_keep=3)
  head_start = time.monotonic()
  # Every worker resumes from the chief's checkpoints (the others' are temporary).
  resume_from = tf.train.latest_checkpoint(os.path.join(options.model_dir, CHECKPOINT_DIRNAME))
  epochs_run = trainer.fit(make_iterator, resume_from=resume_from, manager=manager,
                           on_checkpoint=on_checkpoint)
  head_seconds = time.monotonic() - head_start
  trainer.use_best_weights()

  metrics = _final_metrics(trainer, train_set, val_set, label_names)
  metrics.update(
      epochs_completed=trainer.epochs_done, epochs_run_now=epochs_run,
      stopped_early=bool(trainer.stopped.numpy()),
      best_epoch=int(trainer.best_epoch.numpy()) if val_set is not None else None,
      l2=l2, cross_validation=cv, num_replicas=strategy.num_replicas_in_sync,
      global_batch_size=global_batch,
      timings=dict(backbone_load_s=backbone_load_seconds, backbone_pass_s=backbone_seconds,
                   backbone_pass_cached=train_set.from_cache and (
                       val_set is None or val_set.from_cache),
                   head_training_s=head_seconds, total_s=time.monotonic() - start),
      options=dataclasses.asdict(options))

  if val_set is not None:
    summaries.write_projector(os.path.join(out_dir, "logs", "validation"), val_set, label_names)
  summaries.write_hparams(writers.train, _hparams(options, global_batch), {
      "final/train_accuracy": metrics["train"]["accuracy"],
      "final/validation_accuracy": (metrics["validation"] or {}).get("accuracy", float("nan"))})
  writers.close()

  _write_model(out_dir, trainer.head, options, backbone, label_names)
  fileio.atomic_write_json(os.path.join(out_dir, METRICS_FILENAME), metrics)
  if out_dir != options.model_dir:
    tf.io.gfile.rmtree(out_dir)
  return metrics


def _write_model(out_dir, trained_head, options, backbone, label_names):
  """head_config.json, head/ (a one-model LinearHead checkpoint) and labels.txt."""
  head_lib.HeadConfig(
      loss=options.loss, feature_normalization=options.feature_normalization,
      num_features=backbone.output_dim, num_classes=len(label_names), labels=label_names,
      backbone=options.backbone, features=options.features, image_size=backbone.input_size,
      resize_mode=options.resize_mode, label_smoothing=options.label_smoothing,
  ).write(out_dir)
  # A plain (unmirrored) copy, so the export loads it without a strategy.
  final_head = head_lib.LinearHead(backbone.output_dim, len(label_names),
                                   feature_normalization=options.feature_normalization)
  for target, source in ((final_head.kernel, trained_head.kernel),
                         (final_head.bias, trained_head.bias),
                         (final_head.feature_shift, trained_head.feature_shift),
                         (final_head.feature_scale, trained_head.feature_scale)):
    target.assign(source.numpy())
  head_lib.save_head(final_head, out_dir)
  records.write_labels(out_dir, label_names)


# Flags that change how a run is carried out, not its result: a rerun with other
# values still resumes. Any other change starts the head from scratch.
_NOT_IN_RUN_IDENTITY = ("strategy", "checkpoint_every_epochs", "extract_batch_size",
                        "log_every_steps", "num_thumbnails_per_class")


def _start_or_resume(out_dir, options):
  """Keeps checkpoints and logs of the same settings; clears them when settings changed."""
  identity = json.loads(json.dumps(
      {name: value for name, value in dataclasses.asdict(options).items()
       if name not in _NOT_IN_RUN_IDENTITY}))
  path = os.path.join(out_dir, RUN_OPTIONS_FILENAME)
  if tf.io.gfile.exists(path) and fileio.read_json(path) != identity:
    previous = fileio.read_json(path)
    changed = sorted(name for name in identity if previous.get(name) != identity[name])
    logging.warning("Settings changed since the last run in %s (%s): training the head from "
                    "scratch; the cached features are kept", out_dir, ", ".join(changed))
    for name in (CHECKPOINT_DIRNAME, "logs"):
      if tf.io.gfile.exists(os.path.join(out_dir, name)):
        tf.io.gfile.rmtree(os.path.join(out_dir, name))
  fileio.atomic_write_json(path, identity)


def _final_metrics(trainer, train_set, val_set, label_names):
  metrics = {}
  for name, feature_set in (("train", train_set), ("validation", val_set)):
    if feature_set is None:
      metrics[name] = None
      continue
    _, _, scores = trainer.evaluate(tf.constant(feature_set.features),
                                    tf.constant(feature_set.labels))
    metrics[name] = classification_metrics(scores[0].numpy(), feature_set.labels, label_names)
  return metrics


def _hparams(options, global_batch_size):
  """The flags that shape the model, as hparams plugin values (str, float, int, bool)."""
  names = ("backbone", "features", "loss", "l2", "label_smoothing", "class_weight",
           "feature_normalization", "optimizer", "learning_rate", "lr_schedule",
           "warmup_epochs", "epochs", "patience", "augment", "tune_l2", "strategy", "seed",
           "resize_mode", "precision")
  return dict({name: getattr(options, name) for name in names}, batch_size=global_batch_size)
