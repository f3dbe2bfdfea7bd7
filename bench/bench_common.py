"""Helpers (no benchmark) shared by the bench scripts: the CPU's name, a demo model, input folders."""

import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

import numpy as np

from tlframe import export
from tlframe.train import layout as model_dir_layout
from tlframe import options
from tlframe import records
from tlframe import samples
from tlframe import train


def cpu_model():
  """e.g. "AMD EPYC, 2 cores": what every bench prints with its table."""
  try:
    with open("/proc/cpuinfo") as f:
      names = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.M)
  except OSError:
    names = []
  return f"{names[0] if names else 'unknown CPU'}, {os.cpu_count()} cores"


def import_seconds():
  """T0: the median wall time of three `python -c "import tensorflow"`, the floor of any
  run in a fresh process."""
  times = []
  for _ in range(3):
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import tensorflow"], check=True,
                   capture_output=True)
    times.append(time.monotonic() - start)
  return statistics.median(times)


def conversion_seconds(train_stdout):
  """The seconds bin/train's "conversion: S s" line reports; 0 when it converted nothing."""
  lines = [line for line in train_stdout.splitlines() if line.startswith("conversion:")]
  return float(lines[0].split()[1]) if lines else 0.0


def build_model(work_dir):
  """A model dir with an export: the default head on MobileNetV2 on crops of 4 sample photos."""
  image_dir = os.path.join(work_dir, "train_images")
  samples.write_photo_crops(image_dir, samples.load_sample_photos(samples.SAMPLE_PHOTOS[:4]), 12)
  records_dir = os.path.join(work_dir, "records")
  records.convert(records_dir, image_dir=image_dir, validation_percentage=25, test_percentage=0)
  model_dir = os.path.join(work_dir, "model")
  # MobileNetV2, not bin/train's auto: the benches' numbers stay comparable across machines.
  train.train(train.TrainOptions(records_dir=records_dir, model_dir=model_dir,
                                 backbone=options.DEFAULT_BACKBONE))
  if not export.latest_version(os.path.join(model_dir, model_dir_layout.EXPORT_DIRNAME)):
    export.export_model(model_dir)
  return model_dir


def image_dir_for_bench(data_dir, work_dir):
  """(folder, description): oxford_flowers12 in `data_dir` if there, else 600 generated crops."""
  flowers = pathlib.Path(data_dir) / "oxford_flowers12"
  if flowers.is_dir():
    return flowers, "oxford_flowers12 (real photos, 224x224 JPEG)"
  root = pathlib.Path(work_dir) / "generated"
  photos = samples.load_sample_photos(("chelsea", "coffee", "rocket", "astronaut"))
  samples.write_photo_crops(str(root), photos, per_class=150)
  return root, "generated crops of scikit-image photos (JPEG, 150-576 px)"


def scaled_copy(image_dir, copies, work_dir):
  """`copies` symlinked copies of every image, under new names (so new split keys)."""
  root = pathlib.Path(work_dir) / f"x{copies}"
  for path in sorted(image_dir.rglob("*")):
    if path.is_file() and path.suffix.lower() in records.IMAGE_EXTENSIONS:
      folder = root / path.relative_to(image_dir).parent
      folder.mkdir(parents=True, exist_ok=True)
      for copy in range(copies):
        (folder / f"c{copy}_{path.name}").symlink_to(path)
  return root


def k_shot_rows(labels, k, seed=0):
  """Sorted rows of k random examples per class (all rows when k is None)."""
  if k is None:
    return np.arange(len(labels))
  rng = np.random.default_rng(seed)
  return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == label))[:k]
                                 for label in np.unique(labels)]))


def add_data_dir_argument(parser):
  """--data_dir, the folder holding the benchmark data sets (argparse)."""
  parser.add_argument("--data_dir", default=samples.benchmark_data_dir(),
                      help="Folder holding oxford_flowers12 (default $TLFRAME_DATA_DIR or "
                           "../shared/data).")


def flowers12_dir(data_dir):
  """data_dir/oxford_flowers12, or exits with where to get it."""
  flowers_dir = pathlib.Path(data_dir) / "oxford_flowers12"
  if not flowers_dir.is_dir():
    sys.exit(f"oxford_flowers12 not found under {data_dir}: run bench/get_data, or give "
             "--data_dir (or set TLFRAME_DATA_DIR)")
  return flowers_dir
