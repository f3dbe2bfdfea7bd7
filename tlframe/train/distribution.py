"""The tf.distribute strategy of a run, and which process writes the model dir.

Every run goes through a strategy: the default one, mirrored (all GPUs, else
all logical CPUs) or multi-worker (from TF_CONFIG). Under multi-worker only the
chief writes the model dir; the others save their collective checkpoints into
temporary folders of their own. The backbone pass shares its work out by
worker (`worker_index_and_count`) and runs on this worker's replicas
(`extraction_strategy`).
"""

import json
import os
import socket

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


def worker_index_and_count(strategy):
  """(this worker's index, number of workers): the chief first, then the workers; (0, 1) alone."""
  resolver = getattr(strategy, "cluster_resolver", None)
  spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
  tasks = [(job, index) for job in ("chief", "worker") for index in range(len(spec.get(job, ())))]
  if not tasks:
    return 0, 1
  return tasks.index((resolver.task_type, resolver.task_id)), len(tasks)


# Multi-worker runs' local MirroredStrategy of the backbone pass, by strategy.
_local_strategies = {}


def extraction_strategy(strategy):
  """The strategy whose replicas split each batch of this process's backbone pass, or None.

  Mirrored: the run's own. Multi-worker: a MirroredStrategy over this worker's
  devices when it has several (each worker extracts its own shards, without
  collectives). None (the default device) when there is one replica.
  """
  if isinstance(strategy, tf.distribute.MirroredStrategy):
    return strategy if strategy.num_replicas_in_sync > 1 else None
  if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    devices = strategy.extended.worker_devices
    if len(devices) > 1:
      if strategy not in _local_strategies:
        _local_strategies[strategy] = tf.distribute.MirroredStrategy(devices)
      return _local_strategies[strategy]
  return None


def local_tf_configs(num_workers):
  """TF_CONFIG values (JSON) of `num_workers` workers on 127.0.0.1, one per process to start.

  For trying --strategy=multi_worker on one machine (tests, bench/bench_scale.py);
  the ports are free when chosen.
  """
  sockets = [socket.socket() for _ in range(num_workers)]
  for s in sockets:
    s.bind(("127.0.0.1", 0))
  workers = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
  for s in sockets:
    s.close()
  return [json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
          for index in range(num_workers)]
