"""make_tfrecords under hostile conditions (issue 10): two runs on one folder, damaged shards,
classes without a readable image, names labels.txt must carry, full and read-only disks,
killed parents, and files that must not be hashed."""

import hashlib
import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from tlframe.util import locking
from tlframe import pipeline
from tlframe import records
from tlframe.errors import UserError

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
MAKE_TFRECORDS = REPO_ROOT / "bin" / "make_tfrecords"


def jpeg(array, quality=90):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, "JPEG", quality=quality)
  return buffer.getvalue()


def make_tfrecords(*args, **popen_args):
  command = [sys.executable, str(MAKE_TFRECORDS), *map(str, args)]
  if popen_args:
    return subprocess.Popen(command, **popen_args)
  return subprocess.run(command, capture_output=True, text=True, timeout=300)


def error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith("error: ")]


def tree_bytes(directory):
  return {str(path.relative_to(directory)): path.read_bytes()
          for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def photos(skimage_photos):
  """Real photos scaled to 64-96 rows: 4 per class, 3 classes, as JPEG bytes by relative path."""
  files = {}
  for label, name in (("cat", "chelsea"), ("cup", "coffee"), ("rocket", "rocket")):
    for i in range(4):
      image = Image.fromarray(skimage_photos[name][i * 7:])
      height = 64 + 8 * i
      image = image.resize((round(image.width * height / image.height), height))
      files[f"{label}/{name}_{i}.jpg"] = jpeg(np.asarray(image))
  return files


def write_tree(root, files):
  for name, data in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)
  return root


def blocked_opening_fifo(pid):
  """True while the process waits in open() of a FIFO for a writer (Linux: its wchan)."""
  try:
    return pathlib.Path(f"/proc/{pid}/wchan").read_text() == "wait_for_partner"
  except OSError:
    return False


def release_fifo(fifo):
  """Lets a process blocked opening `fifo` go on: it reads an empty file (skipped)."""
  os.close(os.open(fifo, os.O_WRONLY))


# Case 1: two runs on one output dir.


def test_second_make_tfrecords_on_one_output_dir_refuses(photos, tmp_path):
  """The first run holds the lock while it blocks reading a FIFO among its inputs."""
  image_dir = write_tree(tmp_path / "in", photos)
  fifo = image_dir / "cat" / "0_slow.jpg"
  os.mkfifo(fifo)
  lock_file = tmp_path / "out" / locking.LOCK_FILENAME
  first = make_tfrecords("--image_dir", image_dir, "--output_dir", tmp_path / "out",
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 180
    while f'"pid": {first.pid},' not in (lock_file.read_text() if lock_file.exists() else ""):
      assert first.poll() is None and time.monotonic() < deadline, first.communicate()
      time.sleep(0.02)
    second = make_tfrecords("--image_dir", image_dir, "--output_dir", tmp_path / "out")
    assert first.poll() is None  # blocked on the FIFO: the refusal came while it held the lock
    release_fifo(fifo)
    stdout, stderr = first.communicate(timeout=120)
  finally:
    if first.poll() is None:
      first.kill()
      first.wait()
  assert second.returncode == 2, second.stderr
  assert "Traceback" not in second.stderr
  [line] = error_lines(second.stderr)
  assert line.startswith(f"error: {tmp_path / 'out'} is in use by make_tfrecords "
                         f"(PID {first.pid} on {socket.gethostname()}, since ")
  assert first.returncode == 0, stderr
  assert records.read_manifest(str(tmp_path / "out"))["num_examples"] == 12
  assert not (tmp_path / "out" / locking.LOCK_FILENAME).exists()  # released on exit


def test_lock_is_released_on_exceptions_and_by_the_death_of_its_holder(tmp_path):
  with pytest.raises(RuntimeError):
    with locking.DirectoryLock(str(tmp_path), what="test"):
      with pytest.raises(UserError, match=rf"in use by test \(PID {os.getpid()} on "):
        locking.DirectoryLock(str(tmp_path), what="second").acquire()
      raise RuntimeError("boom")
  with locking.DirectoryLock(str(tmp_path), what="test"):
    pass
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from tlframe.util import locking; "
       f"locking.DirectoryLock({str(tmp_path)!r}, what='holder').acquire(); "
       "print('locked', flush=True); time.sleep(600)"],
      stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
  try:
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(UserError, match=rf"in use by holder \(PID {holder.pid} on "):
      locking.DirectoryLock(str(tmp_path), what="test").acquire()
  finally:
    holder.kill()
    holder.wait()
  assert (tmp_path / locking.LOCK_FILENAME).exists()  # stale file of the dead holder ...
  with locking.DirectoryLock(str(tmp_path), what="test"):  # ... is no lock
    assert json.loads((tmp_path / locking.LOCK_FILENAME).read_text())["pid"] == os.getpid()


# Case 3: a damaged shard.


def record_offsets(data):
  """Byte offsets of the records of TFRecord bytes, read from the framing (not by TensorFlow)."""
  offsets, offset = [], 0
  while offset < len(data):
    offsets.append(offset)
    offset += 16 + int.from_bytes(data[offset:offset + 8], "little")
  return offsets


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_damaged_shard_is_named_with_its_offset_and_a_rerun_rewrites_it(photos, tmp_path, damage):
  image_dir = write_tree(tmp_path / "in", photos)
  out = tmp_path / "out"
  convert_args = dict(image_dir=str(image_dir), validation_percentage=0, test_percentage=0,
                      shard_size=4)
  records.convert(str(out), **convert_args)
  assert len(records.check_shards(str(out), "train")) == 3
  before = tree_bytes(out)
  shard = out / "train-00001-of-00003.tfrecord"
  data = shard.read_bytes()
  offsets = record_offsets(data)
  if damage == "flipped":  # a byte in the third record's image data
    damaged = bytearray(data)
    damaged[offsets[2] + 200] ^= 0xFF
    expected = f"corrupt record at byte offset {offsets[2]} (record 3 of 4)"
  else:  # cut in the middle of the last record
    damaged = data[:offsets[3] + 100]
    expected = f"truncated record at byte offset {offsets[3]} (record 4 of 4)"
  shard.write_bytes(bytes(damaged))
  with pytest.raises(UserError) as error:
    records.check_shards(str(out), "train")
  assert str(error.value) == (
      f"{shard}: {expected}; rerun make_tfrecords with the same flags to rewrite it "
      "(only damaged shards are rewritten)")
  # The pipeline does not skip a damaged shard: training would stop in the middle.
  with pytest.raises(tf.errors.DataLossError):
    for _ in pipeline.make_dataset(records.split_file_pattern(str(out), "train"), 4):
      pass
  others = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tfrecord") if p != shard}
  records.convert(str(out), **convert_args)
  assert tree_bytes(out) == before
  assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tfrecord") if p != shard} == others
  assert len(records.check_shards(str(out), "train")) == 3


def test_check_shards_names_missing_and_unlisted_shards(photos, tmp_path):
  image_dir = write_tree(tmp_path / "in", photos)
  out = tmp_path / "out"
  records.convert(str(out), image_dir=str(image_dir), validation_percentage=0,
                  test_percentage=0, shard_size=6)
  (out / "train-00000-of-00001.tfrecord").write_bytes(b"")  # another conversion's leftover
  with pytest.raises(UserError, match=r"train-00000-of-00001.tfrecord: a train shard that "
                                      r"manifest.json does not list; remove it"):
    records.check_shards(str(out), "train")
  (out / "train-00000-of-00001.tfrecord").unlink()
  (out / "train-00001-of-00002.tfrecord").unlink()
  with pytest.raises(UserError, match=r"train-00001-of-00002.tfrecord: missing; rerun "):
    records.check_shards(str(out), "train")


# Case 5: classes counted after decoding.


def test_class_whose_files_all_fail_to_decode_is_named_and_a_fixed_rerun_converts(photos,
                                                                                 tmp_path):
  files = {name: data for name, data in photos.items() if not name.startswith("rocket/")}
  files["dog/a.jpg"] = b"not a picture at all\n"
  files["dog/b.jpg"] = photos["cup/coffee_0.jpg"][:300]
  image_dir = write_tree(tmp_path / "in", files)
  out = tmp_path / "out"
  result = make_tfrecords("--image_dir", image_dir, "--output_dir", out)
  assert result.returncode == 2
  [line] = error_lines(result.stderr)
  assert line == ("error: class 'dog' has no readable image: its 2 files were all skipped "
                  "(e.g. dog/a.jpg: not an image (unrecognized file format)); fix or remove "
                  "them, or leave the class out with --labels, then rerun")
  assert not (out / records.MANIFEST_FILENAME).exists()
  assert not (out / records.LABELS_FILENAME).exists()
  # The files are fixed in place: the rerun must decode them again, not reuse its shards.
  (image_dir / "dog" / "a.jpg").write_bytes(photos["rocket/rocket_0.jpg"])
  (image_dir / "dog" / "b.jpg").write_bytes(photos["rocket/rocket_1.jpg"])
  result = make_tfrecords("--image_dir", image_dir, "--output_dir", out)
  assert result.returncode == 0, result.stderr
  manifest = records.read_manifest(str(out))
  assert manifest["num_examples"] == 10 and not manifest["skipped"]
  assert records.read_labels(str(out)) == ["cat", "cup", "dog"]


def test_only_one_class_readable_is_an_error_after_decoding(photos, tmp_path):
  files = {name: data for name, data in photos.items() if name.startswith("cat/")}
  files["dog/a.jpg"] = b""
  with pytest.raises(UserError, match=r"^found 1 class\(es\) with readable images \(cat\); need "
                                      r"at least 2. No readable image in: dog; "):
    records.convert(str(tmp_path / "out"), image_dir=str(write_tree(tmp_path / "in", files)))


def test_a_label_only_missing_files_use_is_no_class(photos, tmp_path):
  image_dir = write_tree(tmp_path / "in", photos)
  filelist = tmp_path / "list.csv"
  filelist.write_text("".join(f"{image_dir / name},{name.split('/')[0]}\n" for name in photos)
                      + "gone/1.jpg,ghost\ngone/2.jpg,ghost\n")
  manifest = records.convert(str(tmp_path / "out"), filelist=str(filelist))
  assert records.read_labels(str(tmp_path / "out")) == ["cat", "cup", "rocket"]
  assert manifest["labels"] == ["cat", "cup", "rocket"]
  assert [(e["path"], e["reason"]) for e in manifest["skipped"]] == [
      ("gone/1.jpg", "unreadable: no such file"), ("gone/2.jpg", "unreadable: no such file")]


def test_class_from_labels_without_images_is_reported(photos, tmp_path):
  image_dir = write_tree(tmp_path / "in", photos)
  manifest = records.convert(str(tmp_path / "out"), image_dir=str(image_dir),
                             labels=["cat", "cup", "rocket", "zebra"])
  assert records.read_labels(str(tmp_path / "out"))[-1] == "zebra"
  assert "Classes from --labels with no images: zebra" in records.summary_lines(
      manifest, str(tmp_path / "out"))


# Case 6: class names and labels.txt.


def test_labels_txt_round_trips_every_name_a_folder_can_have(photos, tmp_path):
  names = ["be\u2028ta", " spaced ", "caf\u00e9", "#hash", "tab\u00a0nbsp"]
  files = {f"{label}/{i}.jpg": photos[f"cat/chelsea_{i}.jpg"]
           for label in names for i in range(2)}
  out = tmp_path / "out"
  records.convert(str(out), image_dir=str(write_tree(tmp_path / "in", files)),
                  validation_percentage=0, test_percentage=0)
  assert records.read_labels(str(out)) == sorted(names)
  examples = [tf.train.Example.FromString(r.numpy()).features.feature
              for r in tf.data.TFRecordDataset(str(out / "train-00000-of-00001.tfrecord"))]
  for feature in examples:
    label = feature["image/class/label"].int64_list.value[0]
    assert sorted(names)[label] == feature["image/class/text"].bytes_list.value[0].decode()
    assert feature["image/filename"].bytes_list.value[0].decode().startswith(sorted(names)[label])
  records.write_labels(str(tmp_path), names)
  assert records.read_labels(str(tmp_path)) == names
  # A labels file written on Windows (BOM, CRLF) reads the same.
  (tmp_path / "windows.txt").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(names).encode() + b"\r\n")
  assert records.labels_from_spec(str(tmp_path / "windows.txt")) == names


@pytest.mark.parametrize("name, message", [
    (" ", r"class name ' ' is blank"),
    ("a\nb", r"class name 'a\\nb' contains a control character \(U\+000A\)"),
    ("a\tb", r"class name 'a\\tb' contains a control character \(U\+0009\)"),
    ("a\rb", r"class name 'a\\rb' contains a control character \(U\+000D\)"),
])
def test_names_labels_txt_cannot_carry_are_refused(photos, tmp_path, name, message):
  files = {f"{label}/0.jpg": photos["cat/chelsea_0.jpg"] for label in ("ok", name)}
  with pytest.raises(UserError, match="^image_dir: " + message):
    records.convert(str(tmp_path / "out"), image_dir=str(write_tree(tmp_path / "in", files)))
  assert not (tmp_path / "out").exists()
  with pytest.raises(UserError, match=message):
    records.write_labels(str(tmp_path), ["ok", name])


# Case 8: full and read-only disks.


def mount(*args):
  result = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
  if result.returncode:
    pytest.skip(f"cannot mount here ({result.stderr.strip() or result.returncode}): "
                "this needs root in a system that allows mounts")


@pytest.fixture
def small_tmpfs(tmp_path):
  if os.geteuid() != 0:
    pytest.skip("mounting a small tmpfs needs root")
  mount_point = tmp_path / "disk"
  mount_point.mkdir()
  mount("-t", "tmpfs", "-o", "size=256k", "tmpfs", mount_point)
  yield mount_point
  subprocess.run(["umount", str(mount_point)], check=True)


def test_full_disk_is_one_line_leaves_no_temp_and_the_rerun_completes(photos, tmp_path,
                                                                      small_tmpfs, skimage_photos):
  files = dict(photos)
  for i in range(6):  # ~50 KB each: the 256 KiB disk fills in the middle
    files[f"rocket/big_{i}.jpg"] = jpeg(skimage_photos["rocket"][i * 5:], quality=95)
  image_dir = write_tree(tmp_path / "in", files)
  args = ["--image_dir", image_dir, "--shard_size", 3, "--validation_percentage", 0,
          "--test_percentage", 0]
  out = small_tmpfs / "records"
  result = make_tfrecords(*args, "--output_dir", out)
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  [line] = error_lines(result.stderr)
  assert line.startswith(f"error: --output_dir={out}: cannot write (")
  assert "No space left on device" in line and line.endswith(" finished shards are kept")
  assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
  finished = sorted(out.glob("*.tfrecord"))
  assert finished  # some shards were done before the disk filled
  for shard in finished:
    sidecar = json.loads((out / records.PROGRESS_DIRNAME / f"{shard.name}.json").read_text())
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == sidecar["sha256"]
  subprocess.run(["mount", "-o", "remount,size=8m", str(small_tmpfs)], check=True)
  rerun = make_tfrecords(*args, "--output_dir", out)
  assert rerun.returncode == 0, rerun.stderr
  assert "Resuming:" in rerun.stderr
  reference = make_tfrecords(*args, "--output_dir", tmp_path / "reference")
  assert reference.returncode == 0
  assert tree_bytes(out) == tree_bytes(tmp_path / "reference")


def test_read_only_output_dir_is_one_line_and_changes_nothing(photos, tmp_path):
  image_dir = write_tree(tmp_path / "in", photos)
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  records.convert(str(read_only / "done"), image_dir=str(image_dir))
  before = tree_bytes(read_only)
  if os.geteuid() == 0:  # root writes through permissions: a read-only bind mount it is
    mount("--bind", read_only, read_only)
    mount("-o", "remount,bind,ro", read_only)
    cause = "Read-only file system"
  else:
    read_only.chmod(0o555)
    (read_only / "done").chmod(0o555)
    cause = "Permission denied"
  try:
    for out in (read_only / "new", read_only / "done"):
      result = make_tfrecords("--image_dir", image_dir, "--output_dir", out)
      assert result.returncode == 2, result.stderr
      assert "Traceback" not in result.stderr
      [line] = error_lines(result.stderr)
      assert line.startswith(f"error: {out}: cannot create the lock file ")
      assert cause in line
  finally:
    if os.geteuid() == 0:
      subprocess.run(["umount", str(read_only)], check=True)
    else:
      read_only.chmod(0o755)
      (read_only / "done").chmod(0o755)
  assert tree_bytes(read_only) == before


# Case 9: workers die with their parent.


@pytest.mark.slow
@pytest.mark.parametrize("parent_signal", [signal.SIGKILL, signal.SIGTERM])
def test_workers_die_with_their_parent(photos, tmp_path, parent_signal):
  psutil = pytest.importorskip("psutil")
  image_dir = write_tree(tmp_path / "in", photos)
  fifo = image_dir / "cat" / "0_slow.jpg"  # a worker blocks reading it: work is in flight
  os.mkfifo(fifo)
  parent = make_tfrecords("--image_dir", image_dir, "--output_dir", tmp_path / "out",
                          "--num_workers", 2, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 180
    children = []
    while not any(blocked_opening_fifo(child.pid) for child in children):
      assert parent.poll() is None and time.monotonic() < deadline
      time.sleep(0.1)
      children = psutil.Process(parent.pid).children(recursive=True)
    assert len(children) >= 2  # the two workers (and multiprocessing's resource tracker)
    parent.send_signal(parent_signal)
    parent.wait(timeout=30)
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [(p.pid, p.cmdline()[-3:]) for p in alive]
  finally:
    if any(blocked_opening_fifo(child.pid) for child in children if child.is_running()):
      release_fifo(fifo)
    if parent.poll() is None:
      parent.kill()
      parent.wait()


# Case 12: nothing hashed that is not converted.


def test_skipped_files_are_not_hashed(photos, tmp_path):
  secret = tmp_path / "elsewhere" / "shadow"
  secret.parent.mkdir()
  secret.write_text("root:$6$secret-hash:19000:0:99999:7:::\n")
  image_dir = write_tree(tmp_path / "in", photos)
  filelist = tmp_path / "list.csv"
  filelist.write_text("".join(f"{image_dir / name},{name.split('/')[0]}\n" for name in photos)
                      + f"{secret},cat\n")
  out = tmp_path / "out"
  manifest = records.convert(str(out), filelist=str(filelist))
  [entry] = manifest["skipped"]
  assert entry == {"path": "elsewhere/shadow", "label": "cat", "split": entry["split"],
                   "reason": "not an image (unrecognized file format)"}
  digest = hashlib.sha256(secret.read_bytes()).hexdigest()
  assert all(digest.encode() not in data for data in tree_bytes(out).values())
  assert len(manifest["files"]) == len(photos)
  assert all(e["sha256"] == hashlib.sha256(photos[e["path"].removeprefix("in/")]).hexdigest()
             for e in manifest["files"])


# Issue 8: a folder without class sub-folders; files not named like images.


def test_loose_images_get_a_message_that_says_how_to_lay_them_out(photos, tmp_path):
  image_dir = tmp_path / "in"
  image_dir.mkdir()
  for i, data in enumerate(list(photos.values())[:7]):
    (image_dir / f"IMG_{i:04d}.jpg").write_bytes(data)
  result = make_tfrecords("--image_dir", image_dir, "--output_dir", tmp_path / "out")
  assert result.returncode == 2
  [line] = error_lines(result.stderr)
  assert line == (
      f"error: found 0 class(es) with images (none); need at least 2: one sub-folder (or list "
      f"label) per class; the 7 images directly in {image_dir} (IMG_0000.jpg, IMG_0001.jpg, "
      "IMG_0002.jpg, IMG_0003.jpg, IMG_0004.jpg and 2 more) were ignored: put each class's images "
      f"in a sub-folder named for the class, e.g. {image_dir}/cat/IMG_0000.jpg")


def test_ignored_files_are_named_in_the_log_and_summary_and_all_in_the_manifest(photos,
                                                                                tmp_path):
  image_dir = write_tree(tmp_path / "in", photos)
  names = [f"cat/notes_{i}.txt" for i in range(7)]
  for name in names:
    (image_dir / name).write_text("not an image\n")
  result = make_tfrecords("--image_dir", image_dir, "--output_dir", tmp_path / "out")
  assert result.returncode == 0, result.stderr
  shown = "cat/notes_0.txt, cat/notes_1.txt, cat/notes_2.txt, cat/notes_3.txt, cat/notes_4.txt"
  assert f"Ignored 7 files that are not named like images: {shown} and 2 more\n" in result.stdout
  assert f"Ignored 7 files that are not named like images: {shown} and 2 more (all" in (
      result.stderr)
  manifest = records.read_manifest(str(tmp_path / "out"))
  assert [entry["path"] for entry in manifest["ignored"]] == names
