"""bin/predict and tlframe.Classifier on real photos, with broken files among them."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tlframe
from tlframe.predict import prediction
from tlframe import samples
from tlframe.errors import UserError
from production_fixtures import trained_model  # pylint: disable=unused-import  (a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREDICT = os.path.join(REPO, "bin", "predict")
BAD_FILES = ("truncated.jpg", "empty.jpg", "text.jpg")


@pytest.fixture(scope="module")
def photo_folder(trained_model, tmp_path_factory):
  """New crops (another seed) of each class's photo in nested folders, plus three bad files."""
  folder = tmp_path_factory.mktemp("to_classify")
  samples.write_photo_crops(str(folder), trained_model.photos, per_class=2, size=200, seed=7)
  good = {os.path.join(folder, name, file): name for name in trained_model.photos
          for file in sorted(os.listdir(folder / name))}
  jpeg = tf.io.encode_jpeg(trained_model.photos["rocket"]).numpy()
  (folder / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 3])
  (folder / "empty.jpg").write_bytes(b"")
  (folder / "text.jpg").write_text("not a picture, just text named .jpg\n")
  return folder, good


def _predict(*args):
  return subprocess.run([sys.executable, PREDICT, *args], capture_output=True, text=True,
                        timeout=300)


def test_predict_reports_bad_files_and_classifies_the_rest(trained_model, photo_folder,
                                                           tmp_path):
  folder, good = photo_folder
  output = tmp_path / "predictions.csv"
  result = _predict(f"--model={trained_model.model_dir}", f"--images={folder}",
                    f"--output={output}", "--top_k=2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"classified {len(good)} of {len(good) + 3} images (3 errors)" in result.stdout
  rows = {row["path"]: row for row in csv.DictReader(open(output))}
  assert len(rows) == len(good) + 3
  for path, label in good.items():
    row = rows[path]
    assert row["label"] == label and not row["error"], row
    assert 0 < float(row["probability"]) <= 1 and row["top_k"].startswith(f"{label}=")
    assert len(row["top_k"].split(";")) == 2
  errors = {name: rows[str(folder / name)]["error"] for name in BAD_FILES}
  assert "empty" in errors["empty.jpg"]
  assert "not an image" in errors["text.jpg"]
  assert errors["truncated.jpg"]
  for name in BAD_FILES:
    assert not rows[str(folder / name)]["label"]
  # An existing output is not overwritten unless asked.
  again = _predict(f"--model={trained_model.model_dir}", f"--images={folder}",
                   f"--output={output}")
  assert again.returncode == 2 and "--overwrite" in again.stderr


def test_predict_writes_jsonl_for_a_list_file(trained_model, photo_folder, tmp_path):
  folder, good = photo_folder
  listed = sorted(good)[:3]
  list_file = tmp_path / "images.txt"
  list_file.write_text("".join(f"{path}\n" for path in listed) + f"{folder}/empty.jpg\n")
  output = tmp_path / "predictions.jsonl"
  result = _predict(f"--model={trained_model.export_dir}", f"--images={list_file}",
                    f"--output={output}")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(line) for line in open(output)]
  assert [line["path"] for line in lines] == listed + [f"{folder}/empty.jpg"]
  assert [line["label"] for line in lines[:3]] == [good[path] for path in listed]
  assert lines[3]["label"] is None and "empty" in lines[3]["error"]


@pytest.mark.slow
def test_predict_prints_a_table_or_exits_2_with_one_line(trained_model, photo_folder, tmp_path):
  folder, _ = photo_folder
  table = _predict(f"--model={trained_model.export_dir}", f"--images={folder}/chelsea/*.jpg")
  assert table.returncode == 0, table.stderr[-3000:]
  printed = [line for line in table.stdout.splitlines() if line.startswith(str(folder))]
  assert len(printed) == 2 and all("  chelsea " in line for line in printed)
  for args, message in (
      ([f"--model={trained_model.model_dir}", f"--images={folder}/*d.jpg"],
       "none of the 1 images could be read and decoded"),
      ([f"--model={tmp_path}", f"--images={folder}"], "no saved_model.pb"),
      ([f"--model={trained_model.model_dir}", f"--images={tmp_path}/missing"],
       "no such file or folder")):
    result = _predict(*args)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_classifier_api_takes_paths_bytes_and_arrays(trained_model, photo_folder):
  folder, good = photo_folder
  classifier = tlframe.Classifier.load(trained_model.model_dir)
  assert classifier.export_dir == trained_model.export_dir or os.path.dirname(
      classifier.export_dir) == os.path.dirname(trained_model.export_dir)
  paths = sorted(good)
  photo = trained_model.photos["coffee"]
  result = classifier.predict(paths + [open(paths[0], "rb").read(), photo,
                                       photo.astype(np.float32) / 255.0])
  assert result.labels == [good[p] for p in paths] + [good[paths[0]], "coffee", "coffee"]
  assert result.probabilities.shape == (len(paths) + 3, 4)
  np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(result.probabilities[-1], result.probabilities[-2], atol=1e-5)
  top = result.top_k(2)
  assert top[0][0][0] == result.labels[0] and len(top[0]) == 2
  single = classifier.predict(paths[0])
  assert single.labels == [good[paths[0]]]
  with pytest.raises(UserError, match="text.jpg: not an image"):
    classifier.predict([paths[0], str(folder / "text.jpg")])


def test_list_images_takes_a_folder_a_glob_and_a_single_file(photo_folder):
  folder, good = photo_folder
  found = prediction.list_images(str(folder))
  assert sorted(found) == sorted(list(good) + [str(folder / name) for name in BAD_FILES])
  assert prediction.list_images(f"{folder}/*/*.jpg") == sorted(good)
  one = sorted(good)[0]
  assert prediction.list_images(one) == [one]


def test_programs_run_from_any_folder_after_install(tmp_path):
  script = os.path.join(os.path.dirname(sys.executable), "tlframe-predict")
  if not os.path.exists(script):
    pytest.skip("tlframe is not pip-installed into this interpreter's environment")
  result = subprocess.run([script, "--help"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "--images" in result.stdout and "--top_k" in result.stdout
