"""Fixtures (no tests) shared by the export, predict and evaluate tests: one trained model.

Import the fixture into a test module (`from production_fixtures import trained_model`).
A fixture imported into several modules is a separate fixture in each, so the
model itself is kept here: it is trained and exported once per test run.
"""

import dataclasses
import os

import pytest

from tlframe.backbone import loading as backbone_lib
from tlframe import export
from tlframe import records
from tlframe import samples
from tlframe import train

CLASSES = ("astronaut", "chelsea", "coffee", "rocket")
_TRAINED = []  # the one TrainedModel of this test run


@dataclasses.dataclass
class TrainedModel:
  records_dir: str
  model_dir: str
  export_dir: str
  metrics: dict
  photos: dict          # the full photos by class name: uint8 [H, W, 3]


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, skimage_photos, builtin_backbone_dirs):
  """The built-in MobileNetV2 and a hinge head on crops of 4 real photos, exported.

  Records: 12 crops per class, 160 px, split by hash into train / validation / test.
  """
  if not _TRAINED:
    _TRAINED.append(_train(tmp_path_factory, skimage_photos))
  return _TRAINED[0]


def _train(tmp_path_factory, skimage_photos):
  tmp = tmp_path_factory.mktemp("production")
  photos = {name: skimage_photos[name] for name in CLASSES}
  image_dir = os.path.join(tmp, "images")
  samples.write_photo_crops(image_dir, photos, per_class=12, size=160)
  records_dir = os.path.join(tmp, "records")
  records.convert(records_dir, image_dir=image_dir, validation_percentage=30,
                  test_percentage=25)
  model_dir = os.path.join(tmp, "model")
  metrics = train.train(train.TrainOptions(records_dir=records_dir, model_dir=model_dir,
                                           backbone=backbone_lib.DEFAULT_HANDLE, loss="hinge"))
  # bin/train exports at its end; export explicitly where the run did not.
  export_dir = metrics.get("export_dir") or export.export_model(model_dir)
  return TrainedModel(records_dir, model_dir, export_dir, metrics, photos)
