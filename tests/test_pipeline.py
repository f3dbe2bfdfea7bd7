"""The input pipeline on real records: shapes, where each resize mode puts content, augmentation,
determinism, undecodable records, and sharding for tf.distribute."""

import io
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from tlframe.records import example_format
from tlframe import pipeline
from tlframe import records
from tlframe.errors import UserError

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, "PNG")
  return buffer.getvalue()


def thirds(height, width):
  """Red | green | blue vertical thirds: where each resize mode puts content is easy to see."""
  image = np.zeros((height, width, 3), np.uint8)
  for channel in range(3):
    image[:, channel * width // 3:(channel + 1) * width // 3, channel] = 255
  return image


def batches_to_arrays(dataset):
  """All batches of a dataset, concatenated per component into numpy arrays."""
  parts = list(zip(*[[t.numpy() for t in batch] for batch in dataset]))
  return [np.concatenate(part) for part in parts]


@pytest.fixture(scope="module")
def varied_records(tmp_path_factory, skimage_photos, skimage_textures):
  """Records of real photos and generated images of many sizes, aspect ratios and modes."""
  root = tmp_path_factory.mktemp("varied")
  images = {f"photos/{name}.jpg": photo for name, photo in skimage_photos.items()}
  images.update({f"textures/{name}.png": texture[:200, :300]
                 for name, texture in skimage_textures.items()})
  rng = np.random.default_rng(0)
  for height, width in ((1, 1), (3, 500), (500, 3), (224, 224), (223, 225), (900, 40), (17, 31)):
    images[f"generated/noise_{height}x{width}.png"] = rng.integers(
        0, 256, (height, width, 3), dtype=np.uint8)
  gray = skimage_photos["coffee"][::4, ::4, 1]
  for name, array in (("gray", gray), ("rgba", np.dstack([gray, gray, gray, gray])),
                      ("sixteen_bit", gray.astype(np.uint16) * 257)):
    images[f"generated/{name}.png"] = array
  for name, array in images.items():
    path = root / name
    path.parent.mkdir(exist_ok=True)
    if name.endswith(".jpg"):
      Image.fromarray(array).save(path, "JPEG", quality=92)
    else:
      path.write_bytes(png(array))
  output_dir = tmp_path_factory.mktemp("varied_records")
  records.convert(str(output_dir), image_dir=str(root), validation_percentage=0,
                  test_percentage=0, shard_size=5)
  return records.split_file_pattern(str(output_dir), "train"), len(images)


@pytest.mark.parametrize("resize_mode", pipeline.RESIZE_MODES)
def test_every_image_becomes_224_float_in_unit_range(varied_records, resize_mode):
  pattern, count = varied_records
  dataset = pipeline.make_dataset(pattern, 8, resize_mode=resize_mode)
  sizes = []
  for images, labels in dataset:
    assert images.dtype == tf.float32 and labels.dtype == tf.int32
    assert images.shape[1:] == (224, 224, 3)
    assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0
    sizes.append(images.shape[0])
  assert sum(sizes) == count and max(sizes) == 8


@pytest.fixture(scope="module")
def layout_records(tmp_path_factory):
  """Synthetic layouts, one record each, labelled by index."""
  layouts = {"wide": thirds(90, 270), "tall": np.transpose(thirds(90, 270), (1, 0, 2)),
             "small": np.random.default_rng(1).integers(0, 256, (60, 40, 3), dtype=np.uint8)}
  path = tmp_path_factory.mktemp("layouts") / "layouts.tfrecord"
  with tf.io.TFRecordWriter(str(path)) as writer:
    for index, (name, array) in enumerate(layouts.items()):
      writer.write(example_format.make_example(png(array), "png", index, name, name, *array.shape[:2])
                   .SerializeToString(deterministic=True))
  return str(path), layouts


def layout_outputs(layout_records, resize_mode):
  pattern, layouts = layout_records
  images, _, filenames = batches_to_arrays(
      pipeline.make_dataset(pattern, 8, resize_mode=resize_mode, with_filenames=True))
  return {name.decode(): image for name, image in zip(filenames, images)}, layouts


def test_center_crop_keeps_the_middle(layout_records):
  out, _ = layout_outputs(layout_records, "center_crop")
  green = np.array([0.0, 1.0, 0.0])
  # The shorter side is scaled to 224, so the centre square is exactly the middle third.
  assert np.abs(out["wide"][:, 8:-8] - green).max() < 0.02
  assert np.abs(out["tall"][8:-8, :] - green).max() < 0.02


def test_center_crop_matches_an_independent_resize(skimage_photos, tmp_path):
  photo = skimage_photos["chelsea"]  # 300x451
  ours = pipeline.preprocess(tf.constant(photo), 224, "center_crop").numpy()
  width = round(451 * 224 / 300)
  resized = np.asarray(Image.fromarray(photo).resize((width, 224), Image.BILINEAR)) / 255.0
  left = (width - 224) // 2
  assert np.abs(ours - resized[:, left:left + 224]).mean() < 0.01


def test_imagenet_crop_is_the_central_224_of_the_256_resize(skimage_photos):
  photo = skimage_photos["chelsea"]  # 300x451 -> 256x384, then the central 224x224
  ours = pipeline.preprocess(tf.constant(photo), 224, "imagenet_crop").numpy()
  assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
  resized = np.asarray(Image.fromarray(photo).resize((384, 256), Image.BILINEAR)) / 255.0
  assert np.abs(ours - resized[16:240, 80:304]).mean() < 0.01
  # Tighter than center_crop: the same middle, magnified 256/224.
  center = pipeline.preprocess(tf.constant(photo), 224, "center_crop").numpy()
  assert np.abs(ours - center).mean() > 0.02


def test_letterbox_keeps_everything_and_pads_black(layout_records):
  out, _ = layout_outputs(layout_records, "letterbox")
  wide = out["wide"]
  # 90x270 scales to 75x224: about 74 black rows above and below.
  assert wide[:70].max() == 0 and wide[-70:].max() == 0
  middle = wide[112]
  assert np.abs(middle[10:64] - [1, 0, 0]).max() < 0.02    # red third
  assert np.abs(middle[85:139] - [0, 1, 0]).max() < 0.02   # green third
  assert np.abs(middle[160:214] - [0, 0, 1]).max() < 0.02  # blue third
  assert out["tall"][:, :70].max() == 0 and out["tall"][:, -70:].max() == 0


def test_crop_or_pad_moves_pixels_without_resampling(layout_records):
  out, layouts = layout_outputs(layout_records, "crop_or_pad")
  small = out["small"]  # 60x40 in the centre, black around
  np.testing.assert_array_equal(np.round(small[82:142, 92:132] * 255), layouts["small"])
  assert small[:82].max() == 0 and small[:, :92].max() == 0
  wide = out["wide"]    # 90x270: rows padded by 67, columns cropped by 23
  np.testing.assert_array_equal(np.round(wide[67:157] * 255), layouts["wide"][:, 23:247])
  assert wide[:67].max() == 0 and wide[157:].max() == 0


def test_labels_and_filenames_come_with_their_images(tmp_path, skimage_photos):
  for label in ("cat", "rocket"):
    (tmp_path / "in" / label).mkdir(parents=True)
  for i in range(6):
    label, name = ("cat", "chelsea") if i % 2 else ("rocket", "rocket")
    Image.fromarray(skimage_photos[name][i * 10:]).save(tmp_path / "in" / label / f"{i}.png")
  records.convert(str(tmp_path / "out"), image_dir=str(tmp_path / "in"),
                  validation_percentage=0, test_percentage=0)
  images, labels, filenames = batches_to_arrays(pipeline.make_dataset(
      records.split_file_pattern(str(tmp_path / "out"), "train"), 4, with_filenames=True))
  label_names = records.read_labels(str(tmp_path / "out"))
  assert sorted(f.decode() for f in filenames) == sorted(
      str(p.relative_to(tmp_path / "in")) for p in (tmp_path / "in").glob("*/*.png"))
  for image, label, filename in zip(images, labels, filenames):
    assert label_names[label] == filename.decode().split("/")[0]
    source = np.asarray(Image.open(tmp_path / "in" / filename.decode()))
    expected = pipeline.preprocess(tf.constant(source)).numpy()
    np.testing.assert_allclose(image, expected, atol=1e-6)


def test_seeded_shuffle_and_augmentation_repeat_exactly(varied_records):
  pattern, count = varied_records

  def run(seed):
    return batches_to_arrays(pipeline.make_dataset(
        pattern, 4, augment=True, shuffle=True, seed=seed, with_filenames=True))

  first, again, other = run(7), run(7), run(8)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert list(first[2]) != list(other[2])  # another seed, another order
  assert len(first[2]) == count
  plain = dict(zip(*batches_to_arrays(pipeline.make_dataset(
      pattern, 4, with_filenames=True))[2::-2]))
  augmented = dict(zip(first[2], first[0]))
  assert all(augmented[name].shape == (224, 224, 3) for name in augmented)
  assert all(0.0 <= augmented[name].min() and augmented[name].max() <= 1.0 for name in augmented)
  changed = [not np.allclose(augmented[name], plain[name], atol=0.02) for name in plain]
  assert sum(changed) > 0.8 * len(changed)


def test_shuffle_with_repeat_reshuffles_each_epoch(varied_records):
  pattern, count = varied_records
  dataset = pipeline.make_dataset(pattern, count, shuffle=True, repeat=True, seed=1,
                                  with_filenames=True)
  epochs = [batch[2].numpy().tolist() for batch in dataset.take(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]


def test_undecodable_records_are_skipped_and_counted(tmp_path, skimage_photos):
  """Records from another tool: good JPEGs between a truncated one and text."""
  jpeg = io.BytesIO()
  Image.fromarray(skimage_photos["coffee"]).save(jpeg, "JPEG")
  jpeg = jpeg.getvalue()
  contents = [("good_0.jpg", jpeg), ("truncated.jpg", jpeg[:len(jpeg) // 3]), ("good_1.jpg", jpeg),
              ("text.jpg", b"hello"), ("good_2.jpg", jpeg)]
  path = tmp_path / "foreign.tfrecord"
  with tf.io.TFRecordWriter(str(path)) as writer:
    for index, (name, data) in enumerate(contents):
      writer.write(example_format.make_example(data, "jpeg", index, name, name, 400, 600)
                   .SerializeToString(deterministic=True))
  counter = pipeline.SkipCounter()
  _, labels, filenames = batches_to_arrays(
      pipeline.make_dataset(str(path), 2, with_filenames=True, skip_counter=counter))
  assert [f.decode() for f in filenames] == ["good_0.jpg", "good_1.jpg", "good_2.jpg"]
  assert labels.tolist() == [0, 2, 4]
  assert counter.count == 2
  assert sorted(counter.filenames) == ["text.jpg", "truncated.jpg"]
  # Without a counter the bad records are still skipped.
  assert len(batches_to_arrays(pipeline.make_dataset(str(path), 2))[1]) == 3


def test_input_context_gives_each_pipeline_a_disjoint_share(varied_records, layout_records):
  for pattern, in ((varied_records[0],), (layout_records[0],)):  # many files; one file
    shares = []
    for pipeline_id in range(2):
      context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id,
                                           num_replicas_in_sync=2)
      # Shuffled, unseeded, nondeterministic: the shares must not overlap all the same.
      shares.append(batches_to_arrays(pipeline.make_dataset(
          pattern, 3, with_filenames=True, input_context=context, shuffle=True,
          deterministic=False))[2].tolist())
    everything = batches_to_arrays(pipeline.make_dataset(pattern, 3, with_filenames=True))[2]
    assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(everything.tolist())


def test_augmented_batches_give_per_replica_batches(varied_records):
  """MirroredStrategy over 2 logical CPUs (a fresh process: devices are fixed at TF start)."""
  script = textwrap.dedent(f"""
      import numpy as np
      import tensorflow as tf
      from tlframe.train import trainer
      cpu = tf.config.list_physical_devices("CPU")[0]
      tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
      strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
      dataset = trainer.augmented_batches(strategy, {varied_records[0]!r}, 8, np.ones([3], np.float32),
                                          image_size=224, resize_mode="center_crop", seed=1)
      images, labels, weights = next(iter(dataset))
      print([tuple(t.shape) for t in strategy.experimental_local_results(images)])
      print([tuple(t.shape) for t in strategy.experimental_local_results(weights)])
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == "[(4, 224, 224, 3), (4, 224, 224, 3)]"
  assert lines[1] == "[(4, 1), (4, 1)]"

def test_user_errors(tmp_path):
  with pytest.raises(UserError, match="no record files match"):
    pipeline.make_dataset(str(tmp_path / "train-*-of-*.tfrecord"), 8)
  with pytest.raises(UserError, match="resize mode 'stretch' is not one of"):
    pipeline.preprocess(tf.zeros([4, 4, 3], tf.uint8), 224, "stretch")
  with pytest.raises(UserError, match="split 'dev' is not one of"):
    records.split_file_pattern(str(tmp_path), "dev")
  with pytest.raises(UserError, match="labels.txt: not found"):
    records.read_labels(str(tmp_path))
  (tmp_path / records.MANIFEST_FILENAME).write_text("{not json")
  with pytest.raises(UserError, match="corrupt manifest"):
    records.count_examples(str(tmp_path), "train")
