"""The tf.distribute strategy of a run, and which process writes the model dir.

Every run goes through a strategy: the default one, mirrored (all GPUs, else
all logical CPUs) or multi-worker (from TF_CONFIG). Under multi-worker only the
chief writes the model dir; the others save their collective checkpoints into
temporary folders of their own.
"""

import json
import os

import tensorflow as tf

from tlframe.errors import UserError


def make_strategy(name):
  """The tf.distribute strategy for --strategy (see docs/training.md)."""
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    # All GPUs; without GPUs, all logical CPUs (one unless configured otherwise).
    devices = ([d.name for d in tf.config.list_logical_devices("GPU")] or
               [d.name for d in tf.config.list_logical_devices("CPU")])
    return tf.distribute.MirroredStrategy(devices)
  # multi_worker (options.check allows no other name).
  try:
    json.loads(os.environ["TF_CONFIG"])
  except ValueError as e:
    raise UserError(f"TF_CONFIG is not valid JSON ({e}): fix the environment variable") from None
  return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy):
  """Whether this process writes model_dir (always, except non-chief multi-workers)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  return task_type == "chief" or (task_type == "worker" and task_id == 0 and
                                  "chief" not in resolver.cluster_spec().as_dict())


def output_dir(model_dir, strategy):
  """model_dir for the chief; a per-worker temp dir for the others' collective saves."""
  if is_chief(strategy):
    return model_dir
  resolver = strategy.cluster_resolver
  return os.path.join(model_dir, f".worker-{resolver.task_type}-{resolver.task_id}")
