#!/usr/bin/env python3
"""Why the same cross-validation takes 0.35 s in one run and 1 s in another: the shared cache.

  .venv/bin/python bench/bench_cache_contention.py [--seconds 90]

For --seconds, over and over in one process, times:
- cv: the cross-validation's loop of 5 classes x 10 photos (tuning.out_of_fold_scores
  on random features: 65 stacked models, 50 x 2560 features, 100 steps), as
  bin/train runs it for each candidate normalization;
- llc: 100 Adam-like elementwise steps on [65, 2560, 5] float32 tensors (3.3 MB
  each, the cross-validation's kernel and slots: ~15 MB, sized for a last-level cache);
- l2: the same work on [65, 256, 5] tensors (0.33 MB each, sized for one core's L2
  cache), 10 times as many steps;
- matmul: 100 float32 512 x 512 matmuls (compute-bound);
- dram: a 100 MB numpy copy, one thread (memory-bandwidth-bound).
Prints the samples, then each probe's median over the samples where `llc` ran
at its usual speed and where it ran over twice as slow. On a VM whose cores'
caches are shared with other tenants (the L3, or a hyperthread sibling's L1
and L2), what runs from the caches slows down while they use them; what
streams from memory does not, and compute hardly (docs/training.md).
"""

import argparse
import pathlib
import statistics
import sys
import time

import numpy as np
import tensorflow as tf

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_common import cpu_model  # pylint: disable=wrong-import-position
from tlframe import options as options_lib  # pylint: disable=wrong-import-position
from tlframe.train import tuning  # pylint: disable=wrong-import-position

_SLOW_FACTOR = 2.0


def _elementwise_steps(shape, steps):
  """A traced loop of `steps` Adam-like updates of [shape] variables (a dozen elementwise
  ops over them each)."""
  gradient = tf.random.stateless_normal(shape, seed=[0, 1])
  weights, first, second = (tf.Variable(tf.zeros(shape)) for _ in range(3))

  @tf.function(autograph=False)
  def run():
    def step(i):
      first.assign_add((gradient - first) * 0.1)
      second.assign_add((tf.square(gradient) - second) * 0.001)
      weights.assign_sub(first * 0.001 / (tf.sqrt(second) + 1e-7))
      return i + 1
    tf.while_loop(lambda i: i < steps, step, [tf.constant(0)])

  return run


def _matmuls():
  a = tf.random.stateless_normal([512, 512], seed=[0, 2])

  @tf.function(autograph=False)
  def run():
    return tf.while_loop(lambda i, x: i < 100, lambda i, x: (i + 1, tf.matmul(x, a) * 0.01),
                         [tf.constant(0), a])[1]

  return run


def _cross_validation():
  rng = np.random.default_rng(0)
  features = rng.normal(size=[50, 2560]).astype(np.float32)
  labels = np.repeat(np.arange(5), 10).astype(np.int32)
  run_options = options_lib.TrainOptions(records_dir="unused", model_dir="unused")
  strategy = tf.distribute.get_strategy()
  trainers = {}
  shift, scale = np.zeros(2560, np.float32), np.ones(2560, np.float32)

  def run():
    tuning.out_of_fold_scores(strategy, run_options, features, labels, 5, shift=shift,
                              scale=scale, l2_values=options_lib.DEFAULT_L2_GRID,
                              trainers=trainers)

  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seconds", type=float, default=90.0,
                      help="how long to sample (the slow windows last seconds to minutes)")
  args = parser.parse_args()
  source = np.ones(25_000_000, np.float32)
  target = np.empty_like(source)
  probes = {
      "cv": _cross_validation(),
      "llc": _elementwise_steps([65, 2560, 5], 100),
      "l2": _elementwise_steps([65, 256, 5], 1000),
      "matmul": _matmuls(),
      "dram": lambda: np.copyto(target, source),
  }
  for probe in probes.values():   # traced and warmed up
    probe()
  print(f"CPU: {cpu_model()}; TensorFlow {tf.__version__}")
  print("| time | " + " | ".join(f"{name} s" for name in probes) + " |")
  print("| --- " * (len(probes) + 1) + "|")
  samples = []
  end = time.monotonic() + args.seconds
  while time.monotonic() < end:
    sample = {}
    for name, probe in probes.items():
      start = time.perf_counter()
      probe()
      sample[name] = time.perf_counter() - start
    samples.append(sample)
    print(f"| {time.strftime('%H:%M:%S')} | "
          + " | ".join(f"{sample[name]:.3f}" for name in probes) + " |", flush=True)

  fastest = min(sample["llc"] for sample in samples)
  slow = [sample for sample in samples if sample["llc"] > _SLOW_FACTOR * fastest]
  fast = [sample for sample in samples if sample["llc"] <= _SLOW_FACTOR * fastest]
  print(f"\n{len(slow)} of {len(samples)} samples with `llc` over {_SLOW_FACTOR:g}x its "
        f"fastest ({fastest:.3f} s). Medians:\n")
  print("| probe | llc fast: s | llc slow: s | slow / fast |")
  print("| --- | --- | --- | --- |")
  for name in probes:
    fast_median = statistics.median(s[name] for s in fast)   # holds the fastest sample
    if not slow:
      print(f"| {name} | {fast_median:.3f} | - | - |")
      continue
    slow_median = statistics.median(s[name] for s in slow)
    print(f"| {name} | {fast_median:.3f} | {slow_median:.3f} | "
          f"{slow_median / fast_median:.2f}x |")


if __name__ == "__main__":
  main()
