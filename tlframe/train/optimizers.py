"""The trainers' optimizers: Adam or SGD with momentum, on a constant or cosine learning rate.

`make_optimizer(options, steps_per_epoch)` gives the one for --optimizer,
--learning_rate, --momentum, --lr_schedule and --warmup_epochs over the run's
steps. The update rules, defaults and schedule are Keras 3's (`keras.optimizers.Adam`,
`SGD`, `schedules.CosineDecay` with warmup, decoupled `weight_decay`), and so is
the handling of tf.distribute: each step's gradients are summed over the replicas,
then every copy of a variable takes the same update. tests/test_optimizers.py
checks the numbers against Keras' own.

Why not Keras' own: importing Keras costs about a second of every run's start
(`import tensorflow`: 3.3 s with it, 2.3 s without; tlframe/util/lazy_keras.py),
more than the head's whole training on a few photos, and tlframe uses nothing
else of it.
"""

import math

import tensorflow as tf

# Keras' defaults.
ADAM_BETA_1 = 0.9
ADAM_BETA_2 = 0.999
ADAM_EPSILON = 1e-7


class CosineDecay:
  """The learning rate at a step: linear warmup from 0 over `warmup_steps`, then a cosine
  from `learning_rate` to 0 over `decay_steps` (constant after them)."""

  def __init__(self, learning_rate, decay_steps, warmup_steps=0):
    self.learning_rate = learning_rate
    self.decay_steps = decay_steps
    self.warmup_steps = warmup_steps

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    warmup = self.learning_rate * step / max(self.warmup_steps, 1)
    decayed_fraction = tf.minimum(step - self.warmup_steps, self.decay_steps) / self.decay_steps
    decayed = self.learning_rate * 0.5 * (1.0 + tf.cos(math.pi * decayed_fraction))
    return tf.where(step < self.warmup_steps, warmup, decayed)


class Optimizer(tf.Module):
  """Adam (`momentum` unused) or SGD with `momentum`, for the variables given to `build`.

  learning_rate: a float, or a function of the step (`CosineDecay`).
  weight_decay: decoupled, as Keras' (each step first takes learning rate x
  weight_decay of every variable off it); None: none.
  Create it, and `build` it, inside the strategy's scope; `apply_gradients` in
  a replica context (`strategy.run`) or outside any strategy.
  """

  def __init__(self, kind, learning_rate, *, momentum=0.0, weight_decay=None, name=None):
    super().__init__(name=name)
    if kind not in ("adam", "sgd"):
      raise ValueError(f"optimizer {kind!r} is not adam or sgd")
    self.kind = kind
    self._learning_rate = learning_rate
    self.momentum = momentum
    self.weight_decay = weight_decay
    # Updated once per step, the same on every replica: the first's value stands.
    self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations",
                                  aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    self.slots = []   # per variable built: [m, v] (adam), [momentum] (sgd), or []

  @property
  def learning_rate(self):
    """This step's learning rate (a float32 tensor)."""
    if callable(self._learning_rate):
      return self._learning_rate(self.iterations)
    return tf.constant(self._learning_rate, tf.float32)

  def build(self, variables):
    """Creates the slots of `variables`, each beside its variable; returns self."""
    strategy = tf.distribute.get_strategy()
    count = {"adam": 2, "sgd": 1 if self.momentum else 0}[self.kind]
    for variable in variables:
      with strategy.extended.colocate_vars_with(variable):
        self.slots.append([tf.Variable(tf.zeros(variable.shape, variable.dtype), trainable=False)
                           for _ in range(count)])
    return self

  def apply_gradients(self, grads_and_vars):
    """One step: the gradients (summed over replicas) update the variables, which are
    those given to `build`, in the same order."""
    gradients, variables = zip(*grads_and_vars)
    if len(variables) != len(self.slots):
      raise ValueError(f"{len(variables)} variables to update, {len(self.slots)} built")
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
      gradients = context.all_reduce(tf.distribute.ReduceOp.SUM, list(gradients))
    tf.__internal__.distribute.interim.maybe_merge_call(
        self._update, tf.distribute.get_strategy(), gradients, variables)

  def _update(self, strategy, gradients, variables):
    learning_rate = self.learning_rate
    step = tf.cast(self.iterations + 1, tf.float32)
    for gradient, variable, slots in zip(gradients, variables, self.slots):
      strategy.extended.update(variable, self._update_one, args=(gradient, learning_rate, step,
                                                                 *slots), group=False)
    strategy.extended.update(self.iterations, lambda iterations: iterations.assign_add(1),
                             group=False)

  def _update_one(self, variable, gradient, learning_rate, step, *slots):
    learning_rate = tf.cast(learning_rate, variable.dtype)
    if self.weight_decay:
      variable.assign_sub(variable * self.weight_decay * learning_rate)
    if self.kind == "adam":
      m, v = slots
      alpha = (learning_rate * tf.sqrt(1.0 - tf.pow(ADAM_BETA_2, step))
               / (1.0 - tf.pow(ADAM_BETA_1, step)))
      m.assign_add((gradient - m) * (1.0 - ADAM_BETA_1))
      v.assign_add((tf.square(gradient) - v) * (1.0 - ADAM_BETA_2))
      variable.assign_sub(m * alpha / (tf.sqrt(v) + ADAM_EPSILON))
    elif slots:
      velocity, = slots
      velocity.assign(velocity * self.momentum - gradient * learning_rate)
      variable.assign_add(velocity)
    else:
      variable.assign_sub(gradient * learning_rate)


def make_optimizer(options, steps_per_epoch, *, weight_decay=None):
  """The Optimizer of --optimizer with the --lr_schedule over all steps of the run."""
  total_steps = options.epochs * steps_per_epoch
  warmup_steps = int(round(options.warmup_epochs * steps_per_epoch))
  learning_rate = options.learning_rate
  if options.lr_schedule == "cosine":
    learning_rate = CosineDecay(options.learning_rate, decay_steps=max(1, total_steps - warmup_steps),
                                warmup_steps=warmup_steps)
  return Optimizer(options.optimizer, learning_rate, momentum=options.momentum,
                   weight_decay=weight_decay)
