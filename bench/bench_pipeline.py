#!/usr/bin/env python3
"""Benchmark of the data path: make_tfrecords files/s and peak memory, pipeline images/s.

Prints two tables:
1. bin/make_tfrecords with 1 and 2 workers, on the dataset and on a 4x larger
   copy of it (symlinks): files/s, wall time and peak resident memory of the
   whole process tree (PSS; flat memory = the same peak at 1x and 4x).
2. Records -> 224x224 float32 batches of 64: images/s without and with
   augmentation, the built-in backbone's images/s on ready batches, and the
   backbone fed by the pipeline. The target is pipeline >= 4x backbone, so
   input never limits training.

Data: `--data_dir` (or $TLFRAME_DATA_DIR, else ../shared/data beside the
checkout) holding oxford_flowers12; generated photos when it is absent.

  .venv/bin/python bench/bench_pipeline.py
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
import psutil

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# tlframe before tensorflow: importing it sets TensorFlow's oneDNN default (tlframe/__init__.py).
import bench_common  # pylint: disable=g-import-not-at-top
from tlframe import pipeline  # pylint: disable=g-import-not-at-top
from tlframe import samples  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", samples.benchmark_data_dir(),
                    "Folder holding oxford_flowers12/; generated photos are used when absent.")
flags.DEFINE_float("seconds", 5.0, "How long each throughput measurement runs.")
flags.DEFINE_integer("batch_size", 64, "Batch size for the pipeline and the backbone.")
flags.DEFINE_integer("scale_up", 4, "The larger conversion uses this many copies of the data.")
flags.DEFINE_string("backbone", "mobilenet_v2_100_224", "Backbone to compare against.")

MAKE_TFRECORDS = REPO_ROOT / "bin" / "make_tfrecords"
_RATE_LINE = re.compile(r"files: (\d+)/\d+ \(100%\), ([\d.]+) files/s")


def large_photos(work_dir, count=64):
  """`count` 2048x1536 JPEGs (upscaled, noisy scikit-image photos): camera-sized decodes."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from skimage import data  # pylint: disable=g-import-not-at-top
  root = work_dir / "large"
  rng = np.random.default_rng(1)
  for i, name in enumerate(("chelsea", "coffee", "rocket", "astronaut") * (count // 4)):
    base = np.asarray(Image.fromarray(getattr(data, name)()).resize((2048, 1536)), np.int16)
    noisy = np.clip(base + rng.integers(-8, 9, base.shape), 0, 255).astype(np.uint8)
    (root / name).mkdir(parents=True, exist_ok=True)
    Image.fromarray(noisy).save(root / name / f"{i:04d}.jpg", quality=90)
  return root


def run_make_tfrecords(image_dir, output_dir, num_workers, *extra_flags):
  """(files, files/s, wall s, peak PSS MiB of the process tree) of one CLI run.

  PSS (proportional set size) splits shared pages among the processes sharing
  them, so summing it over the tree does not count TensorFlow's libraries twice.
  """
  command = [sys.executable, str(MAKE_TFRECORDS), f"--image_dir={image_dir}",
             f"--output_dir={output_dir}", f"--num_workers={num_workers}", *extra_flags]
  start = time.monotonic()
  process = psutil.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  peak = 0
  while process.poll() is None:
    try:
      tree = [process] + process.children(recursive=True)
      peak = max(peak, sum(p.memory_full_info().pss for p in tree))
    except psutil.Error:
      pass
    time.sleep(0.05)
  wall = time.monotonic() - start
  _, stderr = process.communicate()
  if process.returncode:
    raise RuntimeError(f"{' '.join(command)} failed:\n{stderr.decode()[-2000:]}")
  files, rate = _RATE_LINE.findall(stderr.decode())[-1]
  return int(files), float(rate), wall, peak / 2**20


def images_per_second(batches, seconds, consume=lambda batch: batch):
  """Images/s over `seconds` after a short warm-up, from an iterator of (images, ...)."""
  iterator = iter(batches)
  for _ in range(3):
    consume(next(iterator))
  images, start = 0, time.monotonic()
  while time.monotonic() - start < seconds:
    result = consume(next(iterator))
    images += int(result[0].shape[0]) if isinstance(result, tuple) else int(result.shape[0])
  return images / (time.monotonic() - start)


def backbone_rates(pattern):
  """(backbone alone, backbone fed by the pipeline) images/s, or None if it is not available."""
  try:
    from tlframe.backbone import load_backbone  # pylint: disable=g-import-not-at-top
    backbone = load_backbone(FLAGS.backbone)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Backbone %s not available (%s: %s); its rate is pending",
                    FLAGS.backbone, type(e).__name__, e)
    return None
  featurize = tf.function(backbone)
  ready = tf.random.uniform([FLAGS.batch_size, 224, 224, 3])

  def alone():
    return images_per_second(iter(lambda: ready, None), FLAGS.seconds,
                             lambda images: featurize(images).numpy())

  dataset = pipeline.make_dataset(pattern, FLAGS.batch_size, shuffle=True, repeat=True,
                                  deterministic=False)
  before = alone()
  fed = images_per_second(dataset, FLAGS.seconds, lambda batch: featurize(batch[0]).numpy())
  # Measured before and after: on a shared machine the load can change in between.
  return (before + alone()) / 2, fed


def main(argv):
  del argv  # unused
  logging.set_verbosity(logging.WARNING)
  work_dir = pathlib.Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
  try:
    image_dir, description = bench_common.image_dir_for_bench(FLAGS.data_dir, work_dir)
    big_dir = bench_common.scaled_copy(image_dir, FLAGS.scale_up, work_dir)
    large_dir = large_photos(work_dir)
    print(f"Data: {description}; {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f} at start\n")

    print("| make_tfrecords input | files | workers | files/s | wall s | "
          "peak memory MiB (PSS, all processes) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, source, extra_flags in (
        ("dataset", image_dir, ()),
        (f"dataset x{FLAGS.scale_up}", big_dir, ()),
        ("2048x1536 JPEGs, --max_side=512", large_dir, ("--max_side=512",))):
      for workers in (1, 2):
        output_dir = work_dir / f"records_{len(os.listdir(work_dir))}"
        files, rate, wall, peak = run_make_tfrecords(source, output_dir, workers, *extra_flags)
        print(f"| {name} | {files} | {workers} | {rate:.0f} | {wall:.1f} | {peak:.0f} |")
        if source is image_dir and workers == 1:
          records_dir = output_dir

    pattern = str(records_dir / "*-of-*.tfrecord")  # every split: more distinct images
    rows = []
    for label, kwargs in (("pipeline, center_crop", {}),
                          ("pipeline, letterbox", {"resize_mode": "letterbox"}),
                          ("pipeline, center_crop + augmentation", {"augment": True})):
      dataset = pipeline.make_dataset(pattern, FLAGS.batch_size, shuffle=True, repeat=True,
                                      deterministic=False, **kwargs)
      rows.append((label, images_per_second(dataset, FLAGS.seconds)))
    backbone = backbone_rates(pattern)

    print(f"\n| records -> 224x224 batches of {FLAGS.batch_size} | images/s | x backbone |")
    print("| --- | ---: | ---: |")
    for label, rate in rows:
      ratio = f"{rate / backbone[0]:.1f}x" if backbone else "pending"
      print(f"| {label} | {rate:.0f} | {ratio} |")
    if backbone:
      print(f"| backbone {FLAGS.backbone} alone (ready batches) | {backbone[0]:.0f} | 1.0x |")
      print(f"| backbone fed by the pipeline | {backbone[1]:.0f} | "
            f"{backbone[1] / backbone[0]:.2f}x |")
      worst = min(rate for _, rate in rows) / backbone[0]
      print(f"\nTarget pipeline >= 4x backbone: {'met' if worst >= 4 else 'NOT met'} "
            f"(slowest pipeline row {worst:.1f}x)")
    else:
      print(f"\nBackbone {FLAGS.backbone}: not available here; the ratio is pending")
  finally:
    shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
