"""make_tfrecords --test_dir: a folder of test photos (class sub-folders) is the test split."""

import os
import subprocess
import sys

import pytest

from tlframe import records
from tlframe import samples
from tlframe.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def photos(skimage_photos):
  return {name: skimage_photos[name] for name in ("chelsea", "coffee", "rocket")}


def _by_split(manifest):
  by_split = {}
  for entry in manifest["files"]:
    by_split.setdefault(entry["split"], []).append(entry["path"])
  return by_split


def test_a_test_folder_beside_the_training_folder_is_the_test_split(photos, tmp_path):
  samples.write_photo_crops(str(tmp_path / "train"), photos, per_class=4, size=48)
  samples.write_photo_crops(str(tmp_path / "test"), photos, per_class=2, size=48, seed=1)
  result = subprocess.run([sys.executable, os.path.join(REPO, "bin", "make_tfrecords"),
                           f"--image_dir={tmp_path}/train", f"--test_dir={tmp_path}/test",
                           f"--output_dir={tmp_path}/records", "--validation_percentage=25"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "test 6)" in result.stdout, result.stdout
  manifest = records.read_manifest(str(tmp_path / "records"))
  by_split = _by_split(manifest)
  assert sorted(by_split["test"]) == sorted(f"test/{name}/{i:03d}.jpg" for name in photos
                                            for i in range(2))
  assert len(by_split["train"]) + len(by_split["validation"]) == 12
  assert manifest["options"]["test_percentage"] == 0
  assert manifest["options"]["test_dir"] == f"{tmp_path}/test"
  assert records.count_examples(str(tmp_path / "records"), "test") == 6


def test_a_test_folder_inside_the_image_dir_is_not_a_class(photos, tmp_path):
  root = tmp_path / "photos"
  samples.write_photo_crops(str(root), photos, per_class=3, size=48)
  samples.write_photo_crops(str(root / "held_out"), photos, per_class=2, size=48, seed=1)
  manifest = records.convert(str(tmp_path / "records"), image_dir=str(root),
                             test_dir=str(root / "held_out"), validation_percentage=0)
  assert manifest["labels"] == sorted(photos)
  by_split = _by_split(manifest)
  assert sorted(by_split["test"]) == sorted(f"held_out/{name}/{i:03d}.jpg" for name in photos
                                            for i in range(2))
  assert len(by_split["train"]) == 9


def test_test_dir_and_test_filelist_are_one_or_the_other(photos, tmp_path):
  samples.write_photo_crops(str(tmp_path / "train"), photos, per_class=2, size=32)
  with pytest.raises(UserError, match="one of test_dir or test_filelist"):
    records.convert(str(tmp_path / "records"), image_dir=str(tmp_path / "train"),
                    test_dir=str(tmp_path / "train"), test_filelist="list.txt")
