"""Image bytes that lie (issue 10): EXIF orientation, headers claiming more than the file holds,
decompression bombs at classify. Real photos, real JPEG bytes, the real decoder."""

import io
import pathlib
import struct
import subprocess
import sys

import numpy as np
from PIL import Image
from PIL import ImageOps
import pytest
import tensorflow as tf

from tlframe import imageformat
from tlframe.backbone import imagenet
from tlframe import pipeline
from tlframe import records
from tlframe.errors import UserError

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def jpeg_with_orientation(photo, orientation, **save_args):
  """`photo` as JPEG with EXIF orientation (Pillow writes a JFIF APP0, then a big-endian APP1)."""
  exif = Image.Exif()
  exif[0x0112] = orientation
  exif[0x010F] = "tlframe test camera"  # Make: the orientation is not the only tag
  buffer = io.BytesIO()
  Image.fromarray(photo).save(buffer, "JPEG", exif=exif, quality=90, **save_args)
  return buffer.getvalue()


def little_endian_exif_jpeg(data, orientation):
  """`data` (a JPEG without EXIF) with a little-endian ("II") APP1 Exif right after SOI."""
  entries = [(0x010F, 2, 4, b"cam\0"), (0x0112, 3, 1, struct.pack("<HH", orientation, 0))]
  ifd = struct.pack("<H", len(entries)) + b"".join(
      struct.pack("<HHI", tag, kind, count) + value for tag, kind, count, value in entries)
  tiff = b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)
  payload = b"Exif\0\0" + tiff
  return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def upright_by_pil(upright_pixels, orientation):
  """What PIL's exif_transpose makes of pixels stored with `orientation`."""
  image = Image.fromarray(upright_pixels)
  image.getexif()[0x0112] = orientation
  return np.asarray(ImageOps.exif_transpose(image))


@pytest.fixture(scope="module")
def cat():
  from tlframe import samples
  return samples.load_sample_photos(("chelsea",))["chelsea"]  # 300x451


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_image_turns_every_exif_orientation_upright(cat, orientation):
  data = jpeg_with_orientation(cat, orientation)
  ours = imageformat.decode_image(data).numpy()
  # The same compressed pixels, stored upright: PIL's transform of them is the reference.
  stored = imageformat.decode_image(jpeg_with_orientation(cat, 1)).numpy()
  np.testing.assert_array_equal(ours, upright_by_pil(stored, orientation))
  # And PIL's own decoder and exif_transpose agree up to the two libjpeg builds' rounding.
  pil = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
  assert ours.shape == pil.shape == ((300, 451, 3) if orientation < 5 else (451, 300, 3))
  assert np.abs(ours.astype(int) - pil).mean() < 2
  assert int(imageformat.exif_orientation(data)) == orientation


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_little_endian_exif_is_read_too(cat, orientation):
  plain = io.BytesIO()
  Image.fromarray(cat).save(plain, "JPEG", quality=90)
  data = little_endian_exif_jpeg(plain.getvalue(), orientation)
  assert int(imageformat.exif_orientation(data)) == orientation
  np.testing.assert_array_equal(imageformat.decode_image(data).numpy(),
                                upright_by_pil(imageformat.decode_image(plain.getvalue()).numpy(),
                                               orientation))


def test_no_or_bad_exif_means_upright(cat):
  plain = io.BytesIO()
  Image.fromarray(cat).save(plain, "JPEG", quality=90)
  plain = plain.getvalue()
  png = io.BytesIO()
  Image.fromarray(cat).save(png, "PNG")
  broken = bytearray(little_endian_exif_jpeg(plain, 6))
  broken[10:14] = b"XX*\0"  # no byte order
  for data in (plain, png.getvalue(), jpeg_with_orientation(cat, 9), bytes(broken),
               little_endian_exif_jpeg(plain, 6)[:30]):
    assert int(imageformat.exif_orientation(data)) == 1


def test_training_and_prediction_see_the_same_upright_pixels(cat, skimage_photos, tmp_path):
  """make_tfrecords + the pipeline (train time) == decode_image on the file (predict time)."""
  image_dir = tmp_path / "in"
  for label, photo in (("cat", cat), ("cup", skimage_photos["coffee"][::2, ::2])):
    (image_dir / label).mkdir(parents=True)
    for orientation in range(1, 9):
      (image_dir / label / f"o{orientation}.jpg").write_bytes(
          jpeg_with_orientation(photo, orientation))
  out = tmp_path / "out"
  records.convert(str(out), image_dir=str(image_dir), validation_percentage=0, test_percentage=0)
  for serialized in tf.data.TFRecordDataset(
      tf.io.gfile.glob(records.split_file_pattern(str(out), "train"))):
    feature = tf.train.Example.FromString(serialized.numpy()).features.feature
    stored_as = imageformat.decode_image(feature["image/encoded"].bytes_list.value[0]).shape
    assert (feature["image/height"].int64_list.value[0],
            feature["image/width"].int64_list.value[0]) == tuple(stored_as[:2])
  for resize_mode in ("letterbox", "crop_or_pad"):
    images, _, filenames = [np.concatenate(part) for part in zip(*[
        [t.numpy() for t in batch] for batch in pipeline.make_dataset(
            records.split_file_pattern(str(out), "train"), 8, resize_mode=resize_mode,
            with_filenames=True)])]
    assert len(filenames) == 16
    for image, filename in zip(images, filenames):
      raw = (image_dir / filename.decode()).read_bytes()
      predicted = pipeline.preprocess(imageformat.decode_image(raw), 224, resize_mode).numpy()
      np.testing.assert_array_equal(image, predicted)
      np.testing.assert_array_equal(imagenet.read_image(str(image_dir / filename.decode())),
                                    imageformat.decode_image(raw))
  # Re-encoded images (--max_side) are stored upright, without EXIF.
  records.convert(str(tmp_path / "small"), image_dir=str(image_dir), validation_percentage=0,
                  test_percentage=0, max_side=200)
  for serialized in tf.data.TFRecordDataset(
      tf.io.gfile.glob(records.split_file_pattern(str(tmp_path / "small"), "train"))):
    feature = tf.train.Example.FromString(serialized.numpy()).features.feature
    name = feature["image/filename"].bytes_list.value[0].decode()
    encoded = feature["image/encoded"].bytes_list.value[0]
    assert int(imageformat.exif_orientation(encoded)) == 1
    height, width = imageformat.decode_image(encoded).shape[:2]
    assert (height > width) == (int(name[-5]) >= 5), name  # both photos are landscape


def with_frame_size(data, height, width):
  """JPEG bytes whose frame header claims height x width (the pixels are not changed)."""
  data = bytearray(data)
  pos = 2
  while data[pos + 1] not in (0xC0, 0xC1, 0xC2):
    pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
  data[pos + 5:pos + 9] = struct.pack(">HH", height, width)
  return bytes(data)


def test_lying_and_partial_jpegs_are_skipped_as_such_without_libjpeg_noise(cat, skimage_photos,
                                                                           tmp_path):
  tiny = io.BytesIO()
  Image.fromarray(cat).resize((16, 16)).save(tiny, "JPEG")
  whole = io.BytesIO()
  Image.fromarray(skimage_photos["coffee"]).save(whole, "JPEG", quality=90)
  whole = whole.getvalue()
  files = {
      "cat/lying_header.jpg": with_frame_size(tiny.getvalue(), 9000, 9000),
      "cat/cut_then_closed.jpg": whole[:len(whole) // 2] + b"\xff\xd9",
      "cat/cut_header.jpg": whole[:100],
      "cat/cut_scan.jpg": whole[:400],
      "cat/good.jpg": jpeg_with_orientation(cat, 1),
      "cup/good.jpg": whole,
  }
  for name, data in files.items():
    (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "in" / name).write_bytes(data)
  result = subprocess.run(
      [sys.executable, str(REPO_ROOT / "bin" / "make_tfrecords"), f"--image_dir={tmp_path / 'in'}",
       f"--output_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  reasons = {entry["path"]: entry["reason"]
             for entry in records.read_manifest(str(tmp_path / "out"))["skipped"]}
  partial = ("decodes only partially (Corrupt JPEG data: premature end of data segment): a "
             "truncated file, or a header claiming more than its")
  assert reasons["cat/lying_header.jpg"].startswith(partial)
  assert reasons["cat/cut_then_closed.jpg"].startswith(partial)
  assert reasons["cat/cut_header.jpg"] == "corrupt or truncated JPEG header"
  assert reasons["cat/cut_scan.jpg"] == ("does not decode: jpeg::Uncompress failed. Invalid JPEG "
                                         "data or crop window.")
  assert len(reasons) == 4
  assert "Improper call to JPEG library" not in result.stderr
  assert "Corrupt JPEG data" not in result.stderr.replace(partial, "")  # only in our own lines


def test_classify_calls_a_jpeg_bomb_what_it_is(cat, tmp_path):
  small = io.BytesIO()
  Image.fromarray(cat).save(small, "JPEG")
  bomb = tmp_path / "bomb.jpg"
  bomb.write_bytes(with_frame_size(small.getvalue(), 65000, 65000))
  message = ("65000x65000 = 4225000000 pixels is over the limit of 100000000 (a decompression "
             "bomb?)")
  with pytest.raises(UserError) as error:
    imagenet.read_image(str(bomb))
  assert str(error.value) == f"path={bomb}: {message}"
  result = subprocess.run([sys.executable, str(REPO_ROOT / "bin" / "classify"), f"--image={bomb}"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == [
      f"error: --image={bomb}: {message}"]
  assert "Traceback" not in result.stderr
