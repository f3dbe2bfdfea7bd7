#!/usr/bin/env python3
"""Benchmark of make_tfrecords on Apache Beam: files/s of the DirectRunner vs the local converter.

Runs bin/make_tfrecords on the same input with the local converter (1 and 2
worker processes) and with `--runner=DirectRunner` (2 worker processes,
multi_processing mode), and prints one table: files, wall time of the whole
program (start-up included: TensorFlow in every process, Beam's workers) and
files/s end to end, on the data set and on a larger symlinked copy of it, where
the start-up counts less. It checks that every run wrote the same shards.

The DirectRunner is Beam's local runner, for trying a pipeline before
Dataflow, Flink or Spark: this measures its overhead on one machine, not a
cluster's speed.

Data: `--data_dir` (or $TLFRAME_DATA_DIR, else ../shared/data beside the
checkout) holding oxford_flowers12; generated photos when it is absent.

  .venv/bin/python bench/bench_convert.py
"""

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import bench_common  # pylint: disable=g-import-not-at-top,wrong-import-position
from tlframe import records  # pylint: disable=g-import-not-at-top,wrong-import-position
from tlframe import samples  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", samples.benchmark_data_dir(),
                    "Folder holding oxford_flowers12/; generated photos are used when absent.")
flags.DEFINE_integer("scale_up", 4, "The larger input uses this many copies of the data.")

MAKE_TFRECORDS = REPO_ROOT / "bin" / "make_tfrecords"
CONVERTERS = (
    ("local", 1, ("--num_workers=1",)),
    ("local", 2, ("--num_workers=2",)),
    ("Beam DirectRunner, multi_processing", 2,
     ("--runner=DirectRunner", "--", "--direct_num_workers=2",
      "--direct_running_mode=multi_processing")),
)


def convert(image_dir, output_dir, converter_flags):
  """(files, wall seconds) of one bin/make_tfrecords run."""
  command = [sys.executable, str(MAKE_TFRECORDS), f"--image_dir={image_dir}",
             f"--output_dir={output_dir}", *converter_flags]
  start = time.monotonic()
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  wall = time.monotonic() - start
  if result.returncode:
    raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
  manifest = records.read_manifest(str(output_dir))
  return len(manifest["files"]) + len(manifest["skipped"]), wall


def shards_digest(output_dir):
  digest = hashlib.sha256()
  for path in sorted(pathlib.Path(output_dir).glob("*.tfrecord")):
    digest.update(path.name.encode() + path.read_bytes())
  return digest.hexdigest()


def main(argv):
  del argv  # unused
  work_dir = pathlib.Path(tempfile.mkdtemp(prefix="bench_convert_"))
  try:
    image_dir, description = bench_common.image_dir_for_bench(FLAGS.data_dir, work_dir)
    big_dir = bench_common.scaled_copy(image_dir, FLAGS.scale_up, work_dir)
    print(f"CPU: {bench_common.cpu_model()}; load average {os.getloadavg()[0]:.1f} at start")
    print(f"Data: {description}\n")
    print("| input | converter | worker processes | files | wall s | files/s | x local, 1 worker |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, source in (("data set", image_dir), (f"data set x{FLAGS.scale_up}", big_dir)):
      baseline, digests = None, set()
      for converter, workers, converter_flags in CONVERTERS:
        output_dir = work_dir / f"records_{len(os.listdir(work_dir))}"
        files, wall = convert(source, output_dir, converter_flags)
        rate = files / wall
        baseline = baseline or rate
        digests.add(shards_digest(output_dir))
        print(f"| {name} | {converter} | {workers} | {files} | {wall:.1f} | {rate:.0f} | "
              f"{rate / baseline:.2f}x |")
      if len(digests) != 1:
        raise RuntimeError(f"{name}: the converters wrote different shards")
    print("\nEvery converter wrote byte-identical shards on each input.")
  finally:
    shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
