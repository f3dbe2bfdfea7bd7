"""make_tfrecords on real bytes: round trip, labels, file lists, stable splits, the bad-file zoo."""

import hashlib
import io
import os
import pathlib
import struct
import subprocess
import sys
import zlib

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from tlframe import imageformat
from tlframe import records
from tlframe.errors import UserError

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
MAKE_TFRECORDS = REPO_ROOT / "bin" / "make_tfrecords"


def encode(array, image_format, **save_args):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, image_format, **save_args)
  return buffer.getvalue()


def small(photo, height):
  """A photo scaled to `height` rows: keeps tests fast, keeps real content."""
  image = Image.fromarray(photo)
  width = max(1, round(image.width * height / image.height))
  return np.asarray(image.resize((width, height), Image.BILINEAR))


def read_examples(pattern):
  """Every record of the shards matching `pattern`, parsed into plain Python values."""
  examples = []
  for path in sorted(tf.io.gfile.glob(pattern)):
    for serialized in tf.data.TFRecordDataset(path):
      features = tf.train.Example.FromString(serialized.numpy()).features.feature
      examples.append({
          key: (feature.bytes_list.value[0] if feature.HasField("bytes_list")
                else feature.int64_list.value[0])
          for key, feature in features.items()})
  return examples


def run_make_tfrecords(*args):
  return subprocess.run([sys.executable, str(MAKE_TFRECORDS), *map(str, args)],
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory, skimage_photos):
  """3 classes of real photos, JPEG and PNG, varied sizes, some nested one level deeper."""
  root = tmp_path_factory.mktemp("photos")
  for label, name in (("cat", "chelsea"), ("cup", "coffee"), ("rocket", "rocket")):
    for i, height in enumerate((40, 56, 72, 88, 104, 120)):
      image = small(skimage_photos[name], height)
      folder = root / label / ("more" if i % 3 == 2 else "")
      folder.mkdir(parents=True, exist_ok=True)
      if i % 2:
        (folder / f"{name}_{i}.png").write_bytes(encode(image, "PNG"))
      else:
        (folder / f"{name}_{i}.jpg").write_bytes(encode(image, "JPEG", quality=90))
  (root / "README.txt").write_text("not an image\n")
  return root


@pytest.fixture(scope="module")
def converted(photo_tree, tmp_path_factory):
  output_dir = tmp_path_factory.mktemp("records")
  manifest = records.convert(str(output_dir), image_dir=str(photo_tree),
                             validation_percentage=20, test_percentage=20, shard_size=4)
  return output_dir, manifest


def test_round_trip_keeps_bytes_labels_and_sizes(photo_tree, converted):
  output_dir, manifest = converted
  labels = records.read_labels(str(output_dir))
  assert labels == ["cat", "cup", "rocket"]
  seen = []
  for split in records.SPLITS:
    examples = read_examples(records.split_file_pattern(str(output_dir), split))
    assert len(examples) == records.count_examples(str(output_dir), split)
    for example in examples:
      filename = example["image/filename"].decode()
      source = (photo_tree / filename).read_bytes()
      assert example["image/encoded"] == source  # JPEG and PNG are kept bit for bit
      label = filename.split("/")[0]
      assert example["image/class/text"].decode() == label
      assert example["image/class/label"] == labels.index(label)
      expected_format = "png" if filename.endswith(".png") else "jpeg"
      assert example["image/format"].decode() == expected_format
      height, width = np.asarray(Image.open(io.BytesIO(source))).shape[:2]
      assert (example["image/height"], example["image/width"]) == (height, width)
      seen.append(filename)
  assert sorted(seen) == sorted(str(p.relative_to(photo_tree)) for p in photo_tree.rglob("*.*")
                                if p.suffix in (".jpg", ".png"))
  # The manifest accounts for every file, with the source's sha256.
  assert manifest["num_examples"] == 18 and not manifest["skipped"]
  assert [entry["path"] for entry in manifest["ignored"]] == ["README.txt"]
  for entry in manifest["files"]:
    assert entry["sha256"] == hashlib.sha256((photo_tree / entry["path"]).read_bytes()).hexdigest()
  for split in records.SPLITS:
    per_class = manifest["splits"][split]["per_class"]
    assert sum(per_class.values()) == manifest["splits"][split]["examples"]
  assert records.read_manifest(str(output_dir)) == manifest


def test_shards_are_named_and_sized(converted):
  output_dir, manifest = converted
  train = manifest["splits"]["train"]
  num_shards = len(train["shards"])
  assert num_shards == -(-train["examples"] // 4)
  names = sorted(os.path.basename(p) for p in
                 tf.io.gfile.glob(records.split_file_pattern(str(output_dir), "train")))
  assert names == [f"train-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]


def test_every_record_decodes_with_the_pipeline_decoder(converted):
  output_dir, _ = converted
  for example in read_examples(records.split_file_pattern(str(output_dir), "train")):
    image = imageformat.decode_image(example["image/encoded"])
    assert image.shape == (example["image/height"], example["image/width"], 3)


def test_labels_fix_the_class_order_and_drop_other_classes(photo_tree, tmp_path):
  labels_file = tmp_path / "labels_in.txt"
  labels_file.write_text("rocket\ncat\n")
  manifest = records.convert(str(tmp_path / "out"), image_dir=str(photo_tree),
                             labels=records.labels_from_spec(str(labels_file)))
  assert records.read_labels(str(tmp_path / "out")) == ["rocket", "cat"]
  assert manifest["num_examples"] == 12
  dropped = [e for e in manifest["skipped"] if "not in --labels" in e["reason"]]
  assert len(dropped) == 6 and all(e["path"].startswith("cup/") for e in dropped)
  examples = read_examples(records.split_file_pattern(str(tmp_path / "out"), "train"))
  assert {(e["image/class/text"], e["image/class/label"]) for e in examples} <= {
      (b"rocket", 0), (b"cat", 1)}
  assert records.labels_from_spec("b, a") == ["b", "a"]


def test_filelist_csv_and_tsv_with_header_and_relative_paths(photo_tree, tmp_path):
  rows = [(str(p.relative_to(photo_tree)), p.relative_to(photo_tree).parts[0])
          for p in sorted(photo_tree.rglob("*.jpg"))]
  (photo_tree / "list.csv").write_text(
      "path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
  tsv = tmp_path / "list.tsv"  # in another folder: absolute paths
  tsv.write_text("".join(f"{photo_tree / p}\t{label}\n" for p, label in rows))
  try:
    from_csv = records.convert(str(tmp_path / "csv"), filelist=str(photo_tree / "list.csv"),
                               validation_percentage=0, test_percentage=0)
  finally:
    (photo_tree / "list.csv").unlink()
  from_tsv = records.convert(str(tmp_path / "tsv"), filelist=str(tsv),
                             validation_percentage=0, test_percentage=0)
  assert from_csv["num_examples"] == from_tsv["num_examples"] == len(rows)
  csv_examples = read_examples(records.split_file_pattern(str(tmp_path / "csv"), "train"))
  assert sorted(e["image/filename"].decode() for e in csv_examples) == sorted(p for p, _ in rows)
  for example in csv_examples:
    source = photo_tree / example["image/filename"].decode()
    assert example["image/encoded"] == source.read_bytes()


def test_a_split_list_none_of_whose_files_converts_is_a_user_error(photo_tree, tmp_path):
  # Paths relative to the photo folder, but the list lives elsewhere: none of them exists.
  rows = [str(p.relative_to(photo_tree)) for p in sorted(photo_tree.rglob("cat/*.jpg"))]
  filelist = tmp_path / "validation.csv"
  filelist.write_text("".join(f"{path},cat\n" for path in rows))
  with pytest.raises(UserError, match=rf"validation_filelist={filelist}: none of its files became "
                     rf"a record \(e.g. .*No such file.*\); a relative path in a list is read "
                     rf"from the list's own folder \({tmp_path}\)"):
    records.convert(str(tmp_path / "out"), image_dir=str(photo_tree),
                    validation_filelist=str(filelist), test_percentage=0)
  # Written from the photo folder's point of view, the same list converts.
  filelist.write_text("".join(f"{photo_tree / path},cat\n" for path in rows))
  manifest = records.convert(str(tmp_path / "out"), image_dir=str(photo_tree),
                             validation_filelist=str(filelist), test_percentage=0)
  assert manifest["splits"]["validation"]["examples"] == len(rows)


def test_filelist_line_without_label_is_a_user_error(tmp_path):
  filelist = tmp_path / "list.csv"
  filelist.write_text("a.jpg,cat\nb.jpg\n")
  with pytest.raises(UserError, match=r"list.csv: line 2 'b.jpg' is not path,label"):
    records.convert(str(tmp_path / "out"), filelist=str(filelist))


def test_split_is_stable_when_files_are_added(photo_tree, tmp_path, skimage_photos):
  before = records.convert(str(tmp_path / "before"), image_dir=str(photo_tree),
                           validation_percentage=30, test_percentage=30)
  grown = tmp_path / "grown"
  subprocess.run(["cp", "-r", str(photo_tree), str(grown)], check=True)
  for i in range(20):
    image = small(skimage_photos["astronaut"], 32 + i)
    (grown / ("cat" if i % 2 else "cup") / f"new_{i}.jpg").write_bytes(encode(image, "JPEG"))
  after = records.convert(str(tmp_path / "after"), image_dir=str(grown),
                          validation_percentage=30, test_percentage=30)
  split_before = {e["path"]: e["split"] for e in before["files"]}
  split_after = {e["path"]: e["split"] for e in after["files"]}
  assert len(split_after) == len(split_before) + 20
  assert {path: split_after[path] for path in split_before} == split_before
  assert {"train", "validation", "test"} <= set(split_after.values())


def test_stable_split_follows_the_percentages():
  keys = [f"class_{i % 7}/image_{i:05d}.jpg" for i in range(5000)]
  splits = [records.stable_split(key, 10, 20) for key in keys]
  assert abs(splits.count("validation") / 5000 - 0.10) < 0.02
  assert abs(splits.count("test") / 5000 - 0.20) < 0.02
  assert all(records.stable_split(key, 0, 0) == "train" for key in keys[:100])


def test_explicit_test_list_replaces_the_test_percentage(photo_tree, tmp_path):
  test_files = ["cat/chelsea_0.jpg", "cup/more/coffee_2.jpg", "rocket/rocket_1.png"]
  test_list = photo_tree / "TEST_SPLIT.txt"
  test_list.write_text("".join(f"{p}\n" for p in test_files) + "rocket/missing.jpg\n")
  try:
    manifest = records.convert(str(tmp_path / "out"), image_dir=str(photo_tree),
                               test_filelist=str(test_list), validation_percentage=25)
  finally:
    test_list.unlink()
  by_split = {}
  for entry in manifest["files"]:
    by_split.setdefault(entry["split"], []).append(entry["path"])
  assert sorted(by_split["test"]) == sorted(test_files)
  assert by_split["validation"] and by_split["train"]
  assert manifest["options"]["test_percentage"] == 0
  assert [e["reason"] for e in manifest["skipped"]] == [
      "listed in --test_filelist but not among the inputs and no label given"]


def test_max_side_downscales_and_reencodes(photo_tree, tmp_path):
  records.convert(str(tmp_path / "out"), image_dir=str(photo_tree), max_side=50,
                  validation_percentage=0, test_percentage=0)
  for example in read_examples(records.split_file_pattern(str(tmp_path / "out"), "train")):
    source = np.asarray(Image.open(photo_tree / example["image/filename"].decode()))
    height, width = example["image/height"], example["image/width"]
    assert max(height, width) == min(50, max(source.shape[:2]))
    assert abs(height / width - source.shape[0] / source.shape[1]) < 0.05
    assert imageformat.decode_image(example["image/encoded"]).shape == (height, width, 3)


def png_bomb(width, height):
  """A real PNG of width x height 1-bit pixels: ~50 KB on disk, 400 M pixels decoded."""

  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  compressor = zlib.compressobj(9)
  row = b"\x00" * (1 + (width + 7) // 8)
  pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
  header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
          + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, skimage_photos):
  """One of each kind of good-but-odd and bad file, with what each should become."""
  root = tmp_path_factory.mktemp("zoo")
  cat, cup = small(skimage_photos["chelsea"], 60), small(skimage_photos["coffee"], 60)
  good, bad = {}, {}

  def add(name, data, expected=None, reason=None):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if reason:
      bad[name] = reason
    else:
      good[name] = expected

  add("cat/plain.jpg", encode(cat, "JPEG", quality=95), expected=("jpeg", cat, 8))
  add("cat/png_named.jpg", encode(cat, "PNG"), expected=("png", cat, 0))
  cmyk = io.BytesIO()
  Image.fromarray(cat).convert("CMYK").save(cmyk, "JPEG", quality=95)
  add("cat/cmyk.jpg", cmyk.getvalue(), expected=("jpeg", cat, 12))
  gray = cat.mean(axis=2).astype(np.uint8)
  add("cat/gray.jpg", encode(gray, "JPEG", quality=95),
      expected=("jpeg", np.repeat(gray[..., None], 3, axis=2), 8))
  add("cup/sixteen_bit.png", encode(cup[..., 0].astype(np.uint16) * 257, "PNG"),
      expected=("png", np.repeat(cup[..., :1], 3, axis=2), 0))
  frames = [Image.fromarray(cup).convert("P", palette=Image.ADAPTIVE),
            Image.fromarray(cat[:, :cup.shape[1]]).convert("P", palette=Image.ADAPTIVE)]
  gif = io.BytesIO()
  frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100)
  add("cup/animated.gif", gif.getvalue(), expected=("png", np.asarray(frames[0].convert("RGB")), 0))
  add("cup/plain.bmp", encode(cup, "BMP"), expected=("png", cup, 0))
  add("cup/lossless.webp", encode(cup, "WEBP", lossless=True), expected=("png", cup, 0))

  jpeg = encode(cup, "JPEG")
  add("cup/truncated.jpg", jpeg[:len(jpeg) // 2], reason="does not decode")
  add("cup/zero.jpg", b"", reason="empty file")
  add("cup/text.jpg", b"this is a text file, not a JPEG\n", reason="not an image")
  add("cat/bomb.png", png_bomb(20000, 20000), reason="400000000 pixels is over --max_pixels")
  unreadable = root / "cat" / "unreadable.jpg"
  if os.geteuid() == 0:  # root reads through chmod 000: a dangling link is what it cannot read
    os.symlink(root / "nowhere.jpg", unreadable)
    bad["cat/unreadable.jpg"] = "unreadable"
  else:
    add("cat/unreadable.jpg", encode(cat, "JPEG"), reason="unreadable")
    unreadable.chmod(0)
  os.symlink("loop.jpg", root / "cat" / "loop.jpg")
  bad["cat/loop.jpg"] = "unreadable"
  os.symlink("..", root / "cup" / "up")  # a directory loop: must not be walked forever
  bad["cup/up"] = "directory symlink loop"
  return root, good, bad


def test_bad_file_zoo_converts_the_good_and_reports_each_bad(zoo, tmp_path):
  root, good, bad = zoo
  result = run_make_tfrecords("--image_dir", root, "--output_dir", tmp_path / "out",
                              "--validation_percentage", 0, "--test_percentage", 0,
                              "--num_workers", 1)
  assert result.returncode == 0, result.stderr
  manifest = records.read_manifest(str(tmp_path / "out"))
  reasons = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
  assert set(reasons) == set(bad)
  for name, expected_reason in bad.items():
    assert expected_reason in reasons[name], (name, reasons[name])
    assert f"{name}: {reasons[name]}" in result.stdout  # the end-of-run summary
  examples = {e["image/filename"].decode(): e
              for e in read_examples(records.split_file_pattern(str(tmp_path / "out"), "train"))}
  assert set(examples) == set(good)
  for name, (stored_format, expected_pixels, tolerance) in good.items():
    example = examples[name]
    assert example["image/format"].decode() == stored_format, name
    if name.endswith((".jpg", ".png")) and "cmyk" not in name and "sixteen" not in name:
      assert example["image/encoded"] == (root / name).read_bytes(), name
    image = imageformat.decode_image(example["image/encoded"]).numpy()
    assert image.shape == expected_pixels.shape, name
    error = np.abs(image.astype(int) - expected_pixels.astype(int)).mean()
    assert error <= tolerance, (name, error)


def test_fewer_than_two_classes_is_a_user_error(tmp_path, photo_tree):
  (tmp_path / "cat").mkdir()
  for name in ("a.jpg", "b.jpg"):
    (tmp_path / "cat" / name).write_bytes((photo_tree / "cat" / "chelsea_0.jpg").read_bytes())
  with pytest.raises(UserError, match=r"found 1 class\(es\) with images \(cat\); need at least 2"):
    records.convert(str(tmp_path / "out"), image_dir=str(tmp_path))


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
  missing = run_make_tfrecords("--image_dir", tmp_path / "nope", "--output_dir", tmp_path / "o")
  broken = tmp_path / "broken"
  for label in ("a", "b"):
    (broken / label).mkdir(parents=True)
    (broken / label / "x.jpg").write_bytes(b"")
  nothing = run_make_tfrecords("--image_dir", broken, "--output_dir", tmp_path / "o2")
  for result, message in ((missing, "nope does not exist: give the folder or list of your photos"),
                          (nothing, "no usable images: all 2 files were skipped (e.g. ")):
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr
  assert "/x.jpg: empty file); each file and why is logged above" in nothing.stderr


def test_reconverting_with_other_flags_replaces_the_old_output(photo_tree, tmp_path):
  output_dir = tmp_path / "out"
  records.convert(str(output_dir), image_dir=str(photo_tree), shard_size=2,
                  validation_percentage=0, test_percentage=0)
  assert len(list(output_dir.glob("train-*.tfrecord"))) == 9
  manifest = records.convert(str(output_dir), image_dir=str(photo_tree), shard_size=100,
                             validation_percentage=0, test_percentage=0)
  assert sorted(p.name for p in output_dir.glob("*.tfrecord")) == ["train-00000-of-00001.tfrecord"]
  assert sorted(p.name for p in (output_dir / records.PROGRESS_DIRNAME).iterdir()) == [
      records.SHARDS_WRITTEN_FILENAME, "train-00000-of-00001.tfrecord.json"]
  assert len(read_examples(str(output_dir / "*.tfrecord"))) == manifest["num_examples"] == 18


def test_exact_duplicates_within_and_across_classes_and_splits_are_listed(photo_tree, tmp_path):
  tree = tmp_path / "photos"
  copies = {  # file in the new tree: file of photo_tree whose bytes it holds
      "cat/chelsea_0.jpg": "cat/chelsea_0.jpg", "cat/chelsea_1.png": "cat/chelsea_1.png",
      "cat/chelsea_copy.jpg": "cat/chelsea_0.jpg",
      "cup/coffee_0.jpg": "cup/coffee_0.jpg", "cup/coffee_1.png": "cup/coffee_1.png",
      "cup/cat_by_mistake.png": "cat/chelsea_1.png",
      "rocket/rocket_0.jpg": "rocket/rocket_0.jpg", "rocket/rocket_1.png": "rocket/rocket_1.png",
      "rocket/rocket_held_out.jpg": "rocket/rocket_0.jpg"}
  for path, source in copies.items():
    (tree / path).parent.mkdir(parents=True, exist_ok=True)
    (tree / path).write_bytes((photo_tree / source).read_bytes())
  # The same pixels in other bytes are no exact duplicate (near-duplicates are bin/train's).
  pixels = imageformat.decode_image((photo_tree / "rocket/rocket_0.jpg").read_bytes()).numpy()
  (tree / "rocket/rocket_0_as_png.png").write_bytes(encode(pixels, "PNG"))
  test_list = tmp_path / "test.txt"
  test_list.write_text(f"{tree / 'rocket/rocket_held_out.jpg'}\n")
  output_dir = tmp_path / "out"
  manifest = records.convert(str(output_dir), image_dir=str(tree), test_filelist=str(test_list),
                             validation_percentage=0)
  assert manifest["num_examples"] == 10 and not manifest["skipped"]  # reported, none removed

  def group(problems, *paths):
    return {"sha256": hashlib.sha256((tree / paths[0]).read_bytes()).hexdigest(),
            "problems": problems,
            "files": [{"path": path, "label": path.split("/")[0],
                       "split": "test" if path == "rocket/rocket_held_out.jpg" else "train"}
                      for path in paths]}

  assert manifest["exact_duplicates"] == [
      group(["within_class"], "cat/chelsea_0.jpg", "cat/chelsea_copy.jpg"),
      group(["across_classes"], "cat/chelsea_1.png", "cup/cat_by_mistake.png"),
      group(["across_splits", "within_class"], "rocket/rocket_0.jpg",
            "rocket/rocket_held_out.jpg")]
  assert records.read_manifest(str(output_dir))["exact_duplicates"] == manifest[
      "exact_duplicates"]
  lines = records.summary_lines(manifest, str(output_dir))
  assert ("Exact duplicates (identical bytes): 3 groups of 6 files, kept as they are: "
          "1 across classes (one photo, two labels), 1 across splits (held-out accuracy "
          "inflated), 2 within a class (weighs double)") in lines
  assert ("  across classes: cat/chelsea_1.png (train) = cup/cat_by_mistake.png (train)"
          in lines)
  assert ("  across splits, within class: rocket/rocket_0.jpg (train) = "
          "rocket/rocket_held_out.jpg (test)") in lines
