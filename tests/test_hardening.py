"""Hardening (issue 21): no command deletes what it did not write, the lock follows no link,
every decode checks the header first, and the inputs spreadsheets and odd names make.

Each test runs the real programs where the case is about them (make_tfrecords, train,
export, predict as subprocesses); the checks that fire before TensorFlow loads are timed
by nothing but their own speed.
"""

import io
import json
import os
import pathlib
import subprocess
import sys
import time

from PIL import Image
import pytest

from tlframe.util import locking
from tlframe.predict import prediction
from tlframe import records
from tlframe.predict.classifier import Classifier
from tlframe.errors import UserError
from production_fixtures import trained_model  # pylint: disable=unused-import  (a fixture)
# Real photos (4 per class of cat, cup, rocket) and the helpers of issue 10's tests.
from test_reliability_records import (  # pylint: disable=unused-import  (photos: a fixture)
    error_lines, jpeg, photos, tree_bytes, write_tree)

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_program(name, *args):
  return subprocess.run([sys.executable, str(REPO_ROOT / "bin" / name), *map(str, args)],
                        capture_output=True, text=True, timeout=300)


# Points 6 and 11: bin/train refuses before TensorFlow loads, writing nothing.


# "../..": <model_dir>/data/records. <model_dir>/records itself is bin/train --image_dir's own
# records folder, which training never writes or removes (tests/test_small_data.py).
@pytest.mark.parametrize("model_dir", [".", "model", "../.."], ids=["same", "inside", "containing"])
def test_train_refuses_a_model_dir_overlapping_the_records_even_with_overwrite(tmp_path, model_dir):
  records_dir = tmp_path / "data" / "records"
  write_tree(records_dir, {"labels.txt": b"cat\ncup\n", "manifest.json": b"{}",
                           "train-00000-of-00001.tfrecord": b"records"})
  before = tree_bytes(tmp_path)
  result = run_program("train", f"--records_dir={records_dir}",
                       f"--model_dir={os.path.normpath(records_dir / model_dir)}", "--overwrite")
  assert result.returncode == 2, result.stderr[-2000:]
  [line] = error_lines(result.stderr)
  assert "--records_dir" in line and "outside the records" in line, line
  assert "Traceback" not in result.stderr
  assert tree_bytes(tmp_path) == before  # labels.txt (and all else) untouched, nothing new


def test_train_refuses_a_model_dir_that_links_into_the_records(tmp_path):
  records_dir = tmp_path / "records"
  records_dir.mkdir()
  (tmp_path / "link").symlink_to(records_dir)
  result = run_program("train", f"--records_dir={records_dir}",
                       f"--model_dir={tmp_path / 'link' / 'model'}")
  assert result.returncode == 2 and "is inside --records_dir" in result.stderr, result.stderr


@pytest.mark.parametrize("seed", ["-1", str(2**31)])
def test_a_seed_out_of_range_is_one_line_before_tensorflow(tmp_path, seed):
  result = run_program("train", f"--records_dir={tmp_path / 'records'}",
                       f"--model_dir={tmp_path / 'model'}", f"--seed={seed}")
  assert result.returncode == 2
  assert error_lines(result.stderr) == [f"error: --seed={seed} must be in [0, 2147483647]"]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "model").exists()  # no run_options.json


# Point 10: the header check before every decode.


@pytest.fixture(scope="module")
def big_and_small(trained_model, tmp_path_factory):
  """A real photo of 512x512 (262144 pixels) and one of 100x100, in one folder."""
  folder = tmp_path_factory.mktemp("header_check")
  photo = trained_model.photos["astronaut"]
  (folder / "big.png").write_bytes(png(photo[:512, :512]))
  (folder / "small.jpg").write_bytes(jpeg(photo[::5, ::5][:100, :100]))
  return folder


def png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, "PNG")
  return buffer.getvalue()


def test_predict_gives_an_image_over_max_pixels_an_error_row_without_decoding(
    trained_model, big_and_small, tmp_path):
  """big.png decodes fine: only a header check, made before decoding, can refuse it."""
  output = tmp_path / "rows.jsonl"
  result = run_program("predict", f"--model={trained_model.export_dir}",
                       f"--images={big_and_small}", f"--output={output}", "--max_pixels=100000")
  assert result.returncode == 0, result.stderr[-2000:]
  rows = {os.path.basename(row["path"]): row for row in map(json.loads, open(output))}
  assert rows["big.png"]["label"] is None
  assert rows["big.png"]["error"] == ("512x512 = 262144 pixels is over --max_pixels 100000 "
                                      "(a decompression bomb?)")
  assert rows["small.jpg"]["error"] is None and rows["small.jpg"]["label"]


@pytest.fixture(scope="module")
def classifier(trained_model):
  return Classifier.load(trained_model.export_dir)


def test_the_python_api_and_predict_files_check_the_header_first(classifier, big_and_small):
  big, small = str(big_and_small / "big.png"), str(big_and_small / "small.jpg")
  with pytest.raises(UserError, match=r"big.png: 512x512 = 262144 pixels is over max_pixels "
                                      r"100000 \(a decompression bomb\?\)"):
    classifier.predict([small, big], max_pixels=100_000)
  with pytest.raises(UserError, match=r"^image 1: 512x512"):
    classifier.predict([small, (big_and_small / "big.png").read_bytes()], max_pixels=100_000)
  assert len(classifier.predict([small, big])) == 2  # the default limit lets a photo through
  rows = list(prediction.predict_files(classifier, [big, small], log_progress=False,
                                       max_pixels=100_000))
  assert "over --max_pixels 100000" in rows[0].error and rows[0].label is None
  assert rows[1].error is None


def test_predict_image_dir_skips_an_image_over_max_pixels(classifier, big_and_small, tmp_path):
  """What bin/evaluate --image_dir runs: the big photo is skipped, with the reason."""
  from tlframe.predict import evaluation  # pylint: disable=import-outside-toplevel
  image_dir = tmp_path / "held_out"
  (image_dir / "astronaut").mkdir(parents=True)
  for name in ("big.png", "small.jpg"):
    (image_dir / "astronaut" / name).write_bytes((big_and_small / name).read_bytes())
  _, labels, filenames, skipped = evaluation.predict_image_dir(classifier, str(image_dir),
                                                               max_pixels=100_000)
  assert [os.path.basename(name) for name in filenames] == ["small.jpg"] and len(labels) == 1
  assert [(os.path.basename(entry["path"]), "over --max_pixels 100000" in entry["reason"])
          for entry in skipped] == [("big.png", True)]


# Points 12 and 13: list files as spreadsheets save them; names with U+2028.


def test_a_spreadsheet_csv_with_bom_header_and_crlf_reads_cleanly(tmp_path, photos):
  write_tree(tmp_path, photos)
  lines = ["Path,Label"] + [f"{name},{name.split('/')[0]}" for name in sorted(photos)]
  (tmp_path / "list.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8-sig"))
  entries = records.read_filelist(str(tmp_path / "list.csv"), "filelist")
  assert entries == [(str(tmp_path / name), name.split("/")[0]) for name in sorted(photos)]


def test_listed_paths_end_at_newline_only(tmp_path, photos):
  name = "cat/a\u2028b\u0085c.jpg"
  write_tree(tmp_path, {name: photos["cat/chelsea_0.jpg"]})
  (tmp_path / "list.txt").write_text(f"{name},cat\n", encoding="utf-8")
  assert records.read_filelist(str(tmp_path / "list.txt"), "filelist") == [
      (str(tmp_path / name), "cat")]
  (tmp_path / "bad.txt").write_bytes(b"cat/\xff.jpg,cat\n")
  with pytest.raises(UserError, match=r"bad.txt: not UTF-8 text \(byte 4\); save it as UTF-8"):
    records.read_filelist(str(tmp_path / "bad.txt"), "filelist")


# Point 5: make_tfrecords removes only what a conversion wrote.


def test_make_tfrecords_refuses_a_folder_of_the_users_files_unless_overwrite(tmp_path, photos):
  image_dir = write_tree(tmp_path / "in", photos)
  output_dir = write_tree(tmp_path / "out", {
      "labels.txt": b"my own labels\n", "manifest.json": b'{"mine": 1}',
      "train-00000-of-00003.tfrecord": b"my own file", "notes.txt": b"keep me"})
  before = tree_bytes(output_dir)
  result = run_program("make_tfrecords", f"--image_dir={image_dir}", f"--output_dir={output_dir}")
  assert result.returncode == 2
  assert error_lines(result.stderr) == [
      f"error: --output_dir={output_dir} is not empty and holds no make_tfrecords output "
      "(labels.txt, manifest.json, notes.txt, train-00000-of-00003.tfrecord): give a new or "
      "empty folder, or pass --overwrite to convert into it (replaces labels.txt, manifest.json, "
      "train-00000-of-00003.tfrecord)"]
  assert tree_bytes(output_dir) == before

  records.convert(str(output_dir), image_dir=str(image_dir), overwrite=True)
  assert (output_dir / "notes.txt").read_bytes() == b"keep me"
  assert not (output_dir / "train-00000-of-00003.tfrecord").exists()
  assert records.read_labels(str(output_dir)) == ["cat", "cup", "rocket"]


def test_a_rerun_removes_only_the_shards_a_conversion_wrote(tmp_path, photos):
  image_dir = write_tree(tmp_path / "in", photos)
  output_dir = tmp_path / "out"
  first = records.convert(str(output_dir), image_dir=str(image_dir), shard_size=1,
                          validation_percentage=0, test_percentage=0)
  ours = [shard["name"] for shard in first["splits"]["train"]["shards"]]
  user_files = {"train-00007-of-00009.tfrecord": b"named like a shard", "notes.txt": b"mine"}
  write_tree(output_dir, user_files)
  # As a run killed after removing the manifest and the sidecars of shards to rewrite
  # leaves it: only the list of shards written says which are the conversion's.
  (output_dir / records.MANIFEST_FILENAME).unlink()
  for sidecar in (output_dir / records.PROGRESS_DIRNAME).glob("*.tfrecord.json"):
    sidecar.unlink()
  records.convert(str(output_dir), image_dir=str(image_dir), validation_percentage=0,
                  test_percentage=0)  # one shard now: the twelve of the first run go
  left = set(os.listdir(output_dir))
  assert not left & set(ours)
  assert {name: (output_dir / name).read_bytes() for name in user_files} == user_files
  with pytest.raises(UserError, match="train-00007-of-00009.tfrecord: a train shard that "
                                      "manifest.json does not list"):
    records.check_shards(str(output_dir), "train")


# Points 7 and 8: bin/export takes the lock; the lock follows no link.


def test_export_refuses_a_model_dir_in_use_by_train(tmp_path):
  model_dir = tmp_path / "model"
  with locking.DirectoryLock(str(model_dir), what="bin/train"):  # what bin/train holds
    result = run_program("export", f"--model_dir={model_dir}")
  assert result.returncode == 2
  [line] = error_lines(result.stderr)
  assert line.startswith(f"error: {model_dir} is in use by bin/train (PID {os.getpid()} on "), line
  assert sorted(os.listdir(model_dir)) == []  # no export/ started


def test_train_refuses_a_model_dir_in_use_by_export(tmp_path):
  """A real bin/export holds the lock while it blocks reading a FIFO planted as its head."""
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  fifo = model_dir / "head_config.json"
  os.mkfifo(fifo)
  export = subprocess.Popen([sys.executable, str(REPO_ROOT / "bin" / "export"),
                             f"--model_dir={model_dir}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
  try:
    lock = model_dir / locking.LOCK_FILENAME
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text()):
      assert export.poll() is None, export.stderr.read()
      assert time.monotonic() < deadline, "bin/export took no lock on the model dir"
      time.sleep(0.05)
    (tmp_path / "records").mkdir()
    result = run_program("train", f"--records_dir={tmp_path / 'records'}",
                         f"--model_dir={model_dir}")
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert f"is in use by bin/export (PID {export.pid} on " in line, line
  finally:
    with open(fifo, "w"):  # lets the export go on: it reads an empty head config and fails
      pass
    export.wait(timeout=120)
  assert not lock.exists()


@pytest.mark.parametrize("planted", ["symlink", "fifo", "directory", "hardlink"])
def test_the_lock_never_writes_through_a_planted_file(tmp_path, planted):
  victim = tmp_path / "victim.txt"
  victim.write_text("the victim's file\n")
  directory = tmp_path / "shared"
  directory.mkdir()
  lock_path = directory / locking.LOCK_FILENAME
  {"symlink": lambda: lock_path.symlink_to(victim), "fifo": lambda: os.mkfifo(lock_path),
   "directory": lock_path.mkdir, "hardlink": lambda: os.link(victim, lock_path)}[planted]()
  with pytest.raises(UserError, match=r"the lock file .* is (a symbolic link|not a regular file|"
                                      r"a file with other hard links), which tlframe never "
                                      r"writes through; remove it"):
    locking.DirectoryLock(str(directory), what="test").acquire()
  assert victim.read_text() == "the victim's file\n"


def test_make_tfrecords_and_train_refuse_a_lock_symlink(tmp_path, photos):
  image_dir = write_tree(tmp_path / "in", photos)
  victim = tmp_path / "victim.txt"
  victim.write_text("the victim's file\n")
  for name in ("records", "model"):
    (tmp_path / name).mkdir()
    (tmp_path / name / locking.LOCK_FILENAME).symlink_to(victim)
  converted = run_program("make_tfrecords", f"--image_dir={image_dir}",
                          f"--output_dir={tmp_path / 'records'}")
  trained = run_program("train", f"--records_dir={tmp_path / 'records'}",
                        f"--model_dir={tmp_path / 'model'}")
  for result, name in ((converted, "records"), (trained, "model")):
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        f"error: {tmp_path / name}: the lock file {tmp_path / name / locking.LOCK_FILENAME} is "
        "a symbolic link, which tlframe never writes through; remove it (and see who put it "
        "there), then rerun"]
  assert victim.read_text() == "the victim's file\n"
  assert sorted(os.listdir(tmp_path / "records")) == [locking.LOCK_FILENAME]
