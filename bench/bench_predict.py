#!/usr/bin/env python3
"""bin/predict's speed from JPEG files against the backbone alone, in one run.

Trains and exports a classifier on the built-in MobileNetV2 (scikit-image's
photos, a minute) unless --model names one, writes --num_images JPEG crops at
their own sizes (300-640 px photos), and measures:

- batch 32: images/s of tlframe.predict.prediction.predict_files (what bin/predict runs:
  tf.data reads, decodes and resizes in parallel while the export classifies)
  against the backbone alone on ready 224x224 batches;
- batch 1: seconds per image of the same path against the backbone's
  single-image latency;
- bin/predict as a whole program (start-up and model load included).

Targets (issue 9): at batch 32, end to end >= 0.8x the backbone-only rate
(decoding overlaps the backbone); at batch 1, within 1.3x of the backbone's
single-image latency.

  python bench/bench_predict.py [--model=MODEL_OR_EXPORT_DIR] [--num_images=256]
"""

import os
import re
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

import tlframe  # noqa: F401  (before TensorFlow: oneDNN on)
from tlframe.backbone import loading as backbone_lib
from tlframe.predict import prediction
from tlframe import samples
from tlframe.predict.classifier import Classifier
from bench_common import build_model  # pylint: disable=g-bad-import-order
from bench_common import cpu_model  # pylint: disable=g-bad-import-order

import tensorflow as tf  # pylint: disable=g-import-not-at-top,g-bad-import-order

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A model or export dir; default: train one on "
                    "scikit-image's photos with the built-in MobileNetV2.")
flags.DEFINE_integer("num_images", 256, "JPEG files to classify at batch 32.")
flags.DEFINE_integer("single_images", 48, "Files classified one by one at batch 1.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 32


def backbone_rates(handle, image_size):
  """(images/s at batch 32, seconds per image at batch 1) of the backbone on ready batches."""
  backbone = backbone_lib.load_backbone(handle, input_size=image_size)
  run = tf.function(backbone.__call__)
  rng = np.random.default_rng(0)
  batch = tf.constant(rng.uniform(size=[BATCH, image_size, image_size, 3]).astype(np.float32))
  single = batch[:1]
  run(batch).numpy(), run(single).numpy()  # trace both shapes
  start, rounds = time.perf_counter(), 8
  for _ in range(rounds):
    run(batch).numpy()
  batch_rate = rounds * BATCH / (time.perf_counter() - start)
  latencies = []
  for _ in range(FLAGS.single_images):
    start = time.perf_counter()
    run(single).numpy()
    latencies.append(time.perf_counter() - start)
  return batch_rate, float(np.median(latencies))


def end_to_end_seconds(classifier, paths, batch_size):
  """Seconds to classify `paths` through predict_files (after one warm-up batch)."""
  for _ in prediction.predict_files(classifier, paths[:batch_size], batch_size=batch_size,
                                    log_progress=False):
    pass
  start = time.perf_counter()
  rows = list(prediction.predict_files(classifier, paths, batch_size=batch_size,
                                       log_progress=False))
  seconds = time.perf_counter() - start
  assert not any(row.error for row in rows)
  return seconds


def main(argv):
  del argv
  work_dir = tempfile.mkdtemp(prefix="bench_predict_")
  model = FLAGS.model or build_model(work_dir)
  image_dir = os.path.join(work_dir, "images")
  photos = samples.load_sample_photos(samples.SAMPLE_PHOTOS)
  samples.write_photo_crops(image_dir, photos, -(-FLAGS.num_images // len(photos)), seed=1)
  paths = prediction.list_images(image_dir)[:FLAGS.num_images]
  classifier = Classifier.load(model)
  backbone_batch_rate, backbone_latency = backbone_rates(classifier.info["backbone"],
                                                         classifier.image_size)
  batch_rate = len(paths) / end_to_end_seconds(classifier, paths, BATCH)
  single_paths = paths[:FLAGS.single_images]
  single_latency = end_to_end_seconds(classifier, single_paths, 1) / len(single_paths)
  start = time.perf_counter()
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "bin", "predict"), f"--model={model}",
       f"--images={image_dir}", f"--batch_size={BATCH}",
       f"--output={os.path.join(work_dir, 'predictions.csv')}"],
      capture_output=True, text=True, check=True)
  program_seconds = time.perf_counter() - start
  printed_rate = float(re.search(r"([\d.]+) images/s", result.stdout).group(1))

  print(f"\nbin/predict on {cpu_model()}; TensorFlow {tf.__version__}; "
        f"{classifier.export_dir}; {len(paths)} JPEGs of 300-640 px")
  print("| batch | backbone only | end to end (JPEG files) | ratio | target |")
  print("| --- | --- | --- | --- | --- |")
  print(f"| {BATCH} | {backbone_batch_rate:.1f} images/s | {batch_rate:.1f} images/s | "
        f"{batch_rate / backbone_batch_rate:.2f}x the rate | >= 0.8x |")
  print(f"| 1 | {backbone_latency * 1e3:.1f} ms/image | {single_latency * 1e3:.1f} ms/image | "
        f"{single_latency / backbone_latency:.2f}x the latency | <= 1.3x |")
  print(f"\nbin/predict as a program (start-up, model load, {len(paths)} images): "
        f"{program_seconds:.1f} s; it printed {printed_rate:.1f} images/s (from its first "
        f"batch, graph warm-up included)")


if __name__ == "__main__":
  app.run(main)
