"""The in-graph head trainer: batches, optimizer, class weights and HeadTrainer.

Three kinds of batches feed it:
- cached features (default): minibatches of the features of one backbone
  pass, kept in memory;
- streamed features (`streamed_feature_batches`): the same, read part by part
  from the feature cache by tf.data, for sets larger than memory;
- augmented images (`augment`): records with random crops and flips, run
  through the frozen backbone at every step.

Epochs and steps are tf.while_loops inside one tf.function; Python only runs
between checkpoints. Batches come from `distribute_datasets_from_function` and
the per-replica losses are scaled by the global batch size, so all strategies
take the same steps. Epoch e's order of examples is a stateless shuffle of
(seed, e): a run resumed from the checkpoint after epoch e sees the same
batches as an uninterrupted one.
"""

import numpy as np
import tensorflow as tf

from tlframe.train import feature_cache
from tlframe.train import head as head_lib
from tlframe.train import fit_loop
from tlframe.train import optimizers
from tlframe import options as options_lib
from tlframe import pipeline
from tlframe.train import summaries
from tlframe.errors import UserError


def class_weights(labels, num_classes, mode):
  """[num_classes] weights: ones, or N / (num_classes * count) for 'balanced'."""
  if mode == "none":
    return np.ones([num_classes], np.float32)
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
  return weights.astype(np.float32)


def effective_batch_size(options, num_examples, num_replicas):
  """The global batch: --batch_size (or the mode's default), at most the number of
  examples, a multiple of the replica count."""
  batch_size = options.batch_size or (options_lib.AUGMENTED_BATCH_SIZE if options.augment
                                      else options_lib.FEATURES_BATCH_SIZE)
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
      return tf.data.Dataset.from_tensor_slices(batches).repeat(
          epochs - first_epoch).with_options(pipeline.static_options())

    def epoch_order(epoch):
      order = tf.random.experimental.stateless_shuffle(
          tf.range(num_examples), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
      order = tf.reshape(order[:steps * global_batch_size], [steps, pipelines, per_pipeline])
      return tf.reshape(order[:, context.input_pipeline_id], [-1])

    dataset = tf.data.Dataset.range(first_epoch, epochs).map(epoch_order).unbatch()
    dataset = dataset.batch(per_replica, drop_remainder=True)
    dataset = dataset.map(lambda i: (tf.gather(features, i), tf.gather(labels, i),
                                     tf.gather(weights, i)))
    return dataset.with_options(pipeline.static_options()).prefetch(tf.data.AUTOTUNE)

  return strategy.distribute_datasets_from_function(dataset_fn)


# Cache parts read at once while streaming: their rows are mixed before the shuffle buffer.
_STREAM_CYCLE = 4


def streamed_feature_batches(strategy, stream, weights_by_class, global_batch_size, seed,
                             first_epoch, epochs, shuffle_buffer_size):
  """Distributed (features, labels, weights [b, 1]) batches from the cache parts of `stream`.

  The features are not normalized: the trainer does it in the step
  (HeadTrainer(normalize_inputs=True)). Epoch e reads the parts (originals,
  then mirrors, of each) in a stateless shuffle of (seed, e), `_STREAM_CYCLE`
  at a time, through a shuffle buffer of `shuffle_buffer_size` rows seeded by
  (seed, e), cut into global batches (the remainder dropped): a resumed run
  sees the same batches. As in `feature_batches`, each input pipeline takes its
  slice of every global batch; when one batch holds every example, the steps
  are the in-memory path's (a gradient summed over all of them).
  """
  paths = tf.constant(stream.paths)
  num_parts = len(stream.paths)
  weights_by_class = tf.constant(weights_by_class)

  def read_rows(path):
    part = feature_cache.read_part(path.decode("utf-8"))
    if part is None:
      raise ValueError(f"the feature cache part {path.decode('utf-8')} became unreadable during "
                       "training: rerun, which recomputes it")
    if stream.flip:
      return (np.concatenate([part["features"], part["flipped_features"]]),
              np.concatenate([part["labels"], part["labels"]]).astype(np.int32))
    return part["features"], part["labels"].astype(np.int32)

  def part_rows(path):
    features, labels = tf.numpy_function(read_rows, [path], (tf.float32, tf.int32))
    return tf.data.Dataset.from_tensor_slices((tf.ensure_shape(features, [None, stream.dim]),
                                               tf.ensure_shape(labels, [None])))

  def epoch_batches(epoch):
    epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])
    order = tf.random.experimental.stateless_shuffle(tf.range(num_parts), seed=epoch_seed)
    rows = tf.data.Dataset.from_tensor_slices(tf.gather(paths, order)).interleave(
        part_rows, cycle_length=min(num_parts, _STREAM_CYCLE))
    rows = rows.shuffle(shuffle_buffer_size, seed=seed * 1000003 + epoch)
    return rows.batch(global_batch_size, drop_remainder=True)

  def dataset_fn(context):
    per_pipeline = global_batch_size // context.num_input_pipelines
    per_replica = context.get_per_replica_batch_size(global_batch_size)
    start = context.input_pipeline_id * per_pipeline
    dataset = tf.data.Dataset.range(first_epoch, epochs).flat_map(epoch_batches)
    dataset = dataset.map(lambda features, labels: (features[start:start + per_pipeline],
                                                     labels[start:start + per_pipeline]))
    dataset = dataset.unbatch().batch(per_replica, drop_remainder=True)
    dataset = dataset.map(lambda features, labels: (
        features, labels, tf.gather(weights_by_class, labels)[:, None]))
    return dataset.with_options(pipeline.static_options()).prefetch(tf.data.AUTOTUNE)

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


class HeadTrainer(fit_loop.FitLoop):
  """Trains a (stacked) LinearHead in-graph; holds everything a checkpoint needs.

  normalization: the head's (shift, scale) constants (head.normalization_constants).
  Training works on normalized features: cached features are normalized once
  (`normalize`) instead of at every step, unless `normalize_inputs` (streamed
  features) or a backbone.
  backbone: images -> features inside the step (augmented mode), or None when
  the batches hold features.
  validation: (features, labels) evaluated in-graph after every epoch (for
  early stopping and the validation curves), or None.
  `fit(make_iterator)`: make_iterator(first_epoch) gives the batches of all
  the remaining epochs, drawn chunk by chunk (tlframe.train.fit_loop).
  """

  _WEIGHTS_WHAT = "the head's weights"

  def __init__(self, strategy, options, *, num_features, num_classes, steps_per_epoch,
               global_batch_size, normalization, l2_values=None, model_fractions=None,
               backbone=None, normalize_inputs=False, validation=None, writers=None):
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
    self._normalize_inputs = normalize_inputs or backbone is not None
    self._writers = writers
    with strategy.scope():
      self.head = head_lib.LinearHead(num_features, num_classes, num_models=self.num_models,
                                      feature_normalization=options.feature_normalization)
      self.optimizer = optimizers.make_optimizer(options, steps_per_epoch)
      self.optimizer.build(self.head.trainable_weights)
      self._init_loop(epochs=options.epochs, patience=options.patience)
    self.head.set_normalization(*normalization)
    self._validation = None
    if validation is not None:
      self._validation = (tf.constant(self.normalize(validation[0])), tf.constant(validation[1]))
    best_kernel, best_bias = self.best_weights
    self.checkpoint = tf.train.Checkpoint(
        head=self.head, optimizer=self.optimizer, best_kernel=best_kernel, best_bias=best_bias,
        **self._loop_state())
    self.run_epochs = tf.function(self._epochs_loop, autograph=False)
    self._iterator = None   # one over all the epochs `fit` runs, drawn chunk by chunk
    # Every variable's starting value (None: zeros, most of them), for `restart`.
    variables = [trackable for trackable in tf.train.TrackableView(self.checkpoint).descendants()
                 if isinstance(trackable, tf.Variable)]
    self._initial_values = []
    for variable in variables:
      value = np.asarray(variable.numpy())
      self._initial_values.append((variable, value if np.any(value) else None))

  def restart(self, options, normalization):
    """Back to a new trainer's state, for `options` that differ from this trainer's at most
    in feature_normalization: the traced epochs loop is kept (a new trainer traces its own,
    most of a small cross-validation's time). Cached features only (the loop's graph does
    not normalize them)."""
    for variable, value in self._initial_values:
      variable.assign(tf.zeros(variable.shape, variable.dtype) if value is None else value)
    self.options = options
    self.head.feature_normalization = options.feature_normalization
    self.head.set_normalization(*normalization)
    self._iterator = None

  def _weights(self):
    return self.head.trainable_weights

  # -- one step on one replica ---------------------------------------------

  def _train_step(self, inputs, labels, weights):
    features = inputs if self._backbone is None else self._backbone(inputs)
    if self._normalize_inputs:
      features = self.head.normalize(features)
    with tf.GradientTape() as tape:
      scores = self.head.linear(features)                              # [M, b, C]
      losses = head_lib.per_example_loss(self.options.loss, scores, labels,
                                         self.options.label_smoothing)  # [M, b]
      weighted = losses * tf.transpose(weights)
      data_loss = tf.reduce_sum(weighted, axis=1) / self._batch_share
      # Models are independent, so one summed objective trains each on its own.
      objective = tf.reduce_sum(data_loss)
    kernel_gradient, bias_gradient = tape.gradient(objective, self.head.trainable_weights)
    num_replicas = tf.cast(tf.distribute.get_replica_context().num_replicas_in_sync, tf.float32)
    # The gradient of l2 / 2 ||kernel||^2 per model, l2 x kernel, spelled out: the tape took
    # it through square and sum, ~5 passes over the [M, D, C] kernel per step (11-14% of a
    # few photos' cross-validation). Its rounding is the tape's: scaling by 2 and 1/2 is exact.
    coefficient = (1.0 / num_replicas) * self._l2
    kernel_gradient += coefficient[:, None, None] * self.head.kernel
    self.optimizer.apply_gradients(zip((kernel_gradient, bias_gradient),
                                       self.head.trainable_weights))
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
    self.track_best(loss)

  # -- Python between checkpoints (fit_loop.FitLoop.fit) ----------------------

  def _epochs_per_chunk(self, checkpointing):
    return self.options.checkpoint_every_epochs if checkpointing else self.options.epochs

  def _run_epochs(self, make_iterator, first_epoch, count):
    if self._iterator is None:
      self._iterator = iter(make_iterator(first_epoch))
    self.run_epochs(self._iterator, tf.constant(count, tf.int64))

  def _divergence_fix(self):
    return (f"lower learning_rate (now {self.options.learning_rate:g}) or raise l2 "
            f"(now {self.options.l2:g})", ["learning_rate", "l2"])

  def _keeps_best(self):
    """Only with early stopping, and once an epoch improved: before, the copies hold the
    initial (zero) weights."""
    return bool(self._validation is not None and self.options.patience and
                self.best_epoch.numpy() > 0)
