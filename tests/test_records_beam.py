"""make_tfrecords on Apache Beam: the DirectRunner (2 processes) writes what the local one does."""

import os
import shutil
import subprocess
import sys

import pytest

from test_records import MAKE_TFRECORDS, read_examples, run_make_tfrecords
from test_records import photo_tree, zoo  # pylint: disable=unused-import  (fixtures)
from tlframe import records
from tlframe.errors import UserError

pytest.importorskip("apache_beam", reason="the beam extra: pip install 'tlframe[beam]'")
from tlframe.records import beam as records_beam  # pylint: disable=wrong-import-position

BEAM_ARGS = ("--", "--direct_num_workers=2", "--direct_running_mode=multi_processing")
CONVERSION = {"validation_percentage": 25, "test_percentage": 25, "shard_size": 3}


@pytest.fixture(scope="module")
def zoo_and_photos(zoo, photo_tree, tmp_path_factory):
  """One class-per-folder tree: the bad-file zoo's files and the real photos, by symlink.

  Links keep every odd file what it is (an unreadable file stays unreadable, a
  symlink loop stays a loop); plus a directory loop and a stray text file.
  """
  root = tmp_path_factory.mktemp("zoo_and_photos")
  for name, source_root in (("zoo", zoo[0]), ("photos", photo_tree)):
    for directory, _, files in os.walk(source_root):
      relative = os.path.relpath(directory, source_root)
      if relative == ".":
        continue
      label, _, rest = relative.partition(os.sep)
      target = root / label / name / rest
      target.mkdir(parents=True, exist_ok=True)
      for file in files:
        os.symlink(os.path.join(directory, file), target / file)
  os.symlink("..", root / "cup" / "up")
  (root / "cup" / "notes.txt").write_text("not an image\n")
  return root


def shard_bytes(output_dir):
  return {path.name: path.read_bytes() for path in sorted(output_dir.glob("*.tfrecord"))}


@pytest.mark.slow  # three processes start TensorFlow and Beam: ~30 s of CPU
def test_beam_direct_runner_writes_what_the_local_converter_writes(zoo_and_photos, zoo, tmp_path):
  local, beam = tmp_path / "local", tmp_path / "beam"
  records.convert(str(local), image_dir=str(zoo_and_photos), **CONVERSION)
  flags = [f"--{name}={value}" for name, value in CONVERSION.items()]
  result = run_make_tfrecords("--image_dir", zoo_and_photos, "--output_dir", beam,
                              "--runner=DirectRunner", *flags, *BEAM_ARGS)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Wrote " in result.stdout and "Skipped " in result.stdout

  manifest = records.read_manifest(str(beam))
  assert manifest == records.read_manifest(str(local))
  skipped = {entry["path"] for entry in manifest["skipped"]}
  bad_files = [name.split("/", 1) for name in zoo[2] if name != "cup/up"]  # a folder: not linked
  assert {f"{label}/zoo/{name}" for label, name in bad_files} <= skipped
  assert "cup/up" in skipped
  assert all(manifest["splits"][split]["examples"] >= 2 for split in records.SPLITS)
  for split in records.SPLITS:
    pattern = records.split_file_pattern
    assert read_examples(pattern(str(beam), split)) == read_examples(pattern(str(local), split))
  assert shard_bytes(beam) == shard_bytes(local) and len(shard_bytes(beam)) > 3
  assert (beam / "labels.txt").read_bytes() == (local / "labels.txt").read_bytes()
  for split in records.SPLITS:
    records.check_shards(str(beam), split)

  # The sidecars the pipeline left make the local converter's rerun a no-op.
  records.convert(str(beam), image_dir=str(zoo_and_photos), **CONVERSION)
  assert shard_bytes(beam) == shard_bytes(local)


def test_a_failed_pipeline_is_one_user_error_and_the_rerun_completes(photo_tree, tmp_path):
  conversion = {"image_dir": str(photo_tree), "validation_percentage": 0, "test_percentage": 0}
  output_dir = tmp_path / "beam"
  in_the_way = output_dir / "train-00000-of-00001.tfrecord"  # the shard's name, as a folder
  (in_the_way / "file").mkdir(parents=True)
  # In an earlier conversion's folder: a folder of other files would be refused before.
  (output_dir / records.PROGRESS_DIRNAME).mkdir()
  # One process (Beam's default): the failure, not the workers, is what this tests.
  with pytest.raises(UserError, match=r"^the DirectRunner pipeline failed: .*Is a directory.* "
                     r"rerun the same command \(the finished shards are kept\)$") as error:
    records_beam.convert(str(output_dir), "DirectRunner", **conversion)
  assert "\n" not in str(error.value)
  assert not (output_dir / "manifest.json").exists()
  assert not (output_dir / records.PROGRESS_DIRNAME / "beam_plan.jsonl").exists()

  shutil.rmtree(in_the_way)
  manifest = records_beam.convert(str(output_dir), "DirectRunner", **conversion)
  assert manifest == records.convert(str(tmp_path / "local"), **conversion)
  assert shard_bytes(output_dir) == shard_bytes(tmp_path / "local")
  assert not list(output_dir.glob(".*.tmp-*"))  # the failed run's temp files are gone


def test_runner_flag_errors_are_one_line_and_exit_2(tmp_path):
  common = [str(MAKE_TFRECORDS), "--image_dir", str(tmp_path), "--output_dir", str(tmp_path / "o")]
  # Beam missing: the import fails as it does where the extra is not installed.
  without_beam = ("import runpy, sys; sys.modules['apache_beam'] = None; "
                  f"sys.argv = {common + ['--runner=DirectRunner']!r}; "
                  f"runpy.run_path({str(MAKE_TFRECORDS)!r}, run_name='__main__')")
  cases = {  # run at once: each spends most of its time importing TensorFlow
      "--runner=NoSuchRunner": common + ["--runner=NoSuchRunner"],
      "--direct_num_workers=2: arguments after `--` are Beam pipeline options; give --runner":
          common + ["--", "--direct_num_workers=2"],
      "--runner=DirectRunner needs Apache Beam, which is not installed: "
      "pip install 'tlframe[beam]'": ["-c", without_beam],
  }
  processes = {message: subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
               for message, args in cases.items()}
  for message, process in processes.items():
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr
    assert "Traceback" not in stderr
    error_lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and message in error_lines[0], stderr
    if "NoSuchRunner" in message:
      assert "DirectRunner" in error_lines[0]  # the error names the choices
  assert not (tmp_path / "o").exists()
