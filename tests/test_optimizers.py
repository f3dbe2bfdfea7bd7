"""tlframe's optimizers take Keras' steps: Adam and SGD with momentum, the cosine schedule
with warmup, decoupled weight decay; the same under a MirroredStrategy of 2 logical CPUs."""

import json
import subprocess
import sys

from test_train_helpers import subprocess_env

# A fresh process: logical devices must be set before TF initializes; Keras is
# imported here only to compare with.
_SCRIPT = r"""
import json, types
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from tlframe.train import optimizers

STEPS_PER_EPOCH, EPOCHS, LEARNING_RATE, MOMENTUM = 10, 3, 0.01, 0.9
# Gradients past the schedule's end too (its last steps have a learning rate of 0).
gradients = np.random.default_rng(0).normal(size=(35, 4, 3)).astype(np.float32)
start = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(4, 3)

def run_tlframe(kind, schedule, weight_decay, strategy):
  options = types.SimpleNamespace(optimizer=kind, learning_rate=LEARNING_RATE, momentum=MOMENTUM,
                                  lr_schedule=schedule, warmup_epochs=1.0, epochs=EPOCHS)
  with strategy.scope():
    variable = tf.Variable(start)
    optimizer = optimizers.make_optimizer(options, STEPS_PER_EPOCH, weight_decay=weight_decay)
    optimizer.build([variable])

  @tf.function
  def step(gradient):
    def on_replica():
      # Each replica's share: summed over the replicas, the whole gradient.
      share = gradient / tf.distribute.get_replica_context().num_replicas_in_sync
      optimizer.apply_gradients([(share, variable)])
    strategy.run(on_replica)

  rates = []
  for gradient in gradients:
    rates.append(float(optimizer.learning_rate))
    step(tf.constant(gradient))
  replicas = [value.numpy() for value in strategy.experimental_local_results(variable)]
  return replicas, rates, int(optimizer.iterations.numpy())

def run_keras(kind, schedule, weight_decay):
  rate = LEARNING_RATE
  if schedule == "cosine":
    rate = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=(EPOCHS - 1) * STEPS_PER_EPOCH, warmup_target=LEARNING_RATE,
        warmup_steps=STEPS_PER_EPOCH)
  if kind == "adam":
    optimizer = keras.optimizers.Adam(rate, weight_decay=weight_decay)
  else:
    optimizer = keras.optimizers.SGD(rate, momentum=MOMENTUM, weight_decay=weight_decay)
  variable = tf.Variable(start)
  optimizer.build([variable])
  rates = []
  for gradient in gradients:
    rates.append(float(optimizer.learning_rate))
    optimizer.apply_gradients([(tf.constant(gradient), variable)])
  return variable.numpy(), rates

mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
results = []
for kind in ("adam", "sgd"):
  for schedule in ("cosine", "constant"):
    for weight_decay in (None, 0.05):
      expected, expected_rates = run_keras(kind, schedule, weight_decay)
      for name, strategy in (("default", tf.distribute.get_strategy()), ("mirrored", mirrored)):
        replicas, rates, iterations = run_tlframe(kind, schedule, weight_decay, strategy)
        results.append(dict(
            case=f"{kind} {schedule} weight_decay={weight_decay} {name}",
            replicas=len(replicas), iterations=iterations,
            moved=float(np.abs(expected - start).max()),
            weights=max(float(np.abs(value - expected).max()) for value in replicas),
            rates=float(np.abs(np.array(rates) - np.array(expected_rates)).max()),
            last_rate=rates[-1]))
print("RESULT " + json.dumps(results))
"""


def test_steps_match_keras_by_default_and_mirrored():
  run = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                       env=subprocess_env(), timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  results = json.loads(next(line for line in run.stdout.splitlines()
                            if line.startswith("RESULT "))[7:])
  assert len(results) == 16
  for result in results:
    assert result["replicas"] == (2 if result["case"].endswith("mirrored") else 1), result
    assert result["iterations"] == 35, result
    assert result["moved"] > 0.01, result   # the steps did something to compare
    assert result["weights"] < 1e-5, result
    assert result["rates"] < 1e-7, result
    if "cosine" in result["case"]:
      assert result["last_rate"] == 0.0, result   # the schedule ended
