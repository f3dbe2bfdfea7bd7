"""Helpers (no benchmark) shared by the bench scripts: the CPU's name and a demo model."""

import os
import re

from tlframe import export
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


def build_model(work_dir):
  """A model dir with an export: the default head on crops of 4 sample photos (a minute)."""
  image_dir = os.path.join(work_dir, "train_images")
  samples.write_photo_crops(image_dir, samples.load_sample_photos(samples.SAMPLE_PHOTOS[:4]), 12)
  records_dir = os.path.join(work_dir, "records")
  records.convert(records_dir, image_dir=image_dir, validation_percentage=25, test_percentage=0)
  model_dir = os.path.join(work_dir, "model")
  train.train(train.TrainOptions(records_dir=records_dir, model_dir=model_dir))
  if not export.latest_version(os.path.join(model_dir, export.EXPORT_DIRNAME)):
    export.export_model(model_dir)
  return model_dir
