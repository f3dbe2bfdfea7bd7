"""The backbone pass on real photos: every row the backbone's features of its image, in order,
with the last batch padded and one trace; thumbnails only of the images shown; flipped
features, their cache entry, and the export's flip-averaged scores."""

import numpy as np
import pytest
import tensorflow as tf

from tlframe.backbone import loading as backbone_lib
from tlframe import export
from tlframe.train import extraction
from tlframe.train import feature_cache
from tlframe.train import features
from tlframe.train import head as head_lib
from tlframe import pipeline
from tlframe import records
from tlframe.records import example_format
from tlframe import samples

CLASSES = ("astronaut", "chelsea", "coffee")
BATCH = 4


@pytest.fixture(scope="module")
def photo_records(tmp_path_factory, skimage_photos):
  """7 crops per class of 3 real photos (21 images: the last batch of 4 is short)."""
  root = tmp_path_factory.mktemp("features")
  samples.write_photo_crops(str(root / "images"), {name: skimage_photos[name] for name in CLASSES},
                            per_class=7, size=120)
  records.convert(str(root / "records"), image_dir=str(root / "images"),
                  validation_percentage=0, test_percentage=0)
  return str(root / "records")


@pytest.fixture(scope="module")
def backbone(builtin_backbone_dirs):
  del builtin_backbone_dirs  # built; load_backbone finds it in the cache
  return backbone_lib.load_backbone(backbone_lib.DEFAULT_HANDLE)


def pipeline_images(records_dir):
  """(images [N, S, S, 3], labels, filenames) the pipeline gives, in record order."""
  parts = list(zip(*[[t.numpy() for t in batch] for batch in pipeline.make_dataset(
      records.split_file_pattern(records_dir, "train"), 64, with_filenames=True)]))
  return [np.concatenate(part) for part in parts]


def extract(backbone, records_dir, **kwargs):
  """The FeatureSet of the training split's one record file."""
  kwargs = dict(dict(batch_size=BATCH, num_thumbnails_per_class=2), **kwargs)
  feature_set, = extraction.extract_features(
      backbone, records.split_file_pattern(records_dir, "train"), image_size=224,
      resize_mode="center_crop", num_classes=len(CLASSES), **kwargs)
  return feature_set


def test_features_are_the_backbones_of_each_image_in_order(backbone, photo_records):
  images, labels, filenames = pipeline_images(photo_records)
  assert len(labels) == 21 and len(labels) % BATCH  # a padded last batch
  feature_set = extract(backbone, photo_records)
  np.testing.assert_array_equal(feature_set.labels, labels)
  assert list(feature_set.filenames) == [name.decode() for name in filenames]
  expected = backbone(tf.constant(images)).numpy()
  assert feature_set.features.shape == expected.shape == (21, backbone.output_dim)
  np.testing.assert_allclose(feature_set.features, expected, atol=1e-4)
  assert feature_set.flipped_features is None
  features_only, labels_only = feature_set.training_examples()
  assert features_only is feature_set.features and labels_only is feature_set.labels
  # A second split through the same backbone and batch size reuses the one trace.
  extract(backbone, photo_records)
  traced = extraction._featurizer(backbone, BATCH, 224, False)  # pylint: disable=protected-access
  assert traced.experimental_get_tracing_count() == 1


def test_thumbnails_are_the_first_images_of_each_class(backbone, photo_records):
  images, labels, _ = pipeline_images(photo_records)
  feature_set = extract(backbone, photo_records, num_thumbnails_per_class=2)
  expected_rows = np.concatenate([np.flatnonzero(labels == label)[:2]
                                  for label in range(len(CLASSES))])
  np.testing.assert_array_equal(np.sort(feature_set.thumbnail_rows), np.sort(expected_rows))
  np.testing.assert_array_equal(feature_set.thumbnail_labels, labels[feature_set.thumbnail_rows])
  assert feature_set.thumbnails.shape == (6, features.THUMBNAIL_SIZE, features.THUMBNAIL_SIZE, 3)
  assert feature_set.thumbnails.dtype == np.uint8
  small = tf.image.resize(images[feature_set.thumbnail_rows], [features.THUMBNAIL_SIZE] * 2,
                          antialias=True).numpy() * 255
  assert np.abs(feature_set.thumbnails - small).max() <= 1
  assert len(extract(backbone, photo_records, num_thumbnails_per_class=0).thumbnails) == 0


def test_one_pass_over_two_splits_gives_each_file_its_own_pass(backbone, skimage_photos,
                                                               tmp_path):
  """bin/train's pass over a few photos in two splits: the files share the batches (one
  padded last batch, not one per file), and each file's rows, thumbnails and skipped
  count are those of a pass over it alone."""
  samples.write_photo_crops(str(tmp_path / "images"),
                            {name: skimage_photos[name] for name in CLASSES}, per_class=5,
                            size=120)
  records_dir = tmp_path / "records"
  records.convert(str(records_dir), image_dir=str(tmp_path / "images"),
                  validation_percentage=40, test_percentage=0)
  train_file, = tf.io.gfile.glob(records.split_file_pattern(str(records_dir), "train"))
  validation_file, = tf.io.gfile.glob(records.split_file_pattern(str(records_dir), "validation"))
  kwargs = dict(batch_size=BATCH, image_size=224, resize_mode="center_crop",
                num_classes=len(CLASSES), num_thumbnails_per_class=1)

  def passes():
    """(the two files' sets of one pass, each file's set of its own pass)."""
    return (extraction.extract_features(backbone, [train_file, validation_file], **kwargs),
            [extraction.extract_features(backbone, [path], **kwargs)[0]
             for path in (train_file, validation_file)])

  # The cache's split sets, filled by one pass, equal each split's own.
  cache = tmp_path / "cache"
  sets = feature_cache.cached_feature_sets(backbone, str(records_dir), ["train", "validation"],
                                           feature_cache_dir=str(cache), **kwargs)
  _, alone = passes()
  for split, own in zip(("train", "validation"), alone):
    assert not sets[split].from_cache
    np.testing.assert_allclose(sets[split].features, own.features, atol=1e-4)
    again = feature_cache.cached_features(backbone, str(records_dir), split,
                                          feature_cache_dir=str(cache), **kwargs)
    assert again.from_cache
    np.testing.assert_array_equal(again.features, sets[split].features)

  # One undecodable record among the validation file's good ones.
  good = [bytes(r) for r in tf.data.TFRecordDataset(validation_file).as_numpy_iterator()]
  bad = example_format.make_example(b"\xff\xd8\xff\xe0 not really a jpeg", "jpeg", 0,
                                    CLASSES[0], "broken.jpg", 80, 80).SerializeToString()
  with tf.io.TFRecordWriter(validation_file) as writer:
    for record in good[:2] + [bad] + good[2:]:
      writer.write(record)
  together, alone = passes()
  assert len(together[0].labels) + len(together[1].labels) == 15
  for shared, own in zip(together, alone):
    np.testing.assert_allclose(shared.features, own.features, atol=1e-4)
    np.testing.assert_array_equal(shared.labels, own.labels)
    np.testing.assert_array_equal(shared.filenames, own.filenames)
    np.testing.assert_array_equal(shared.thumbnail_rows, own.thumbnail_rows)
    np.testing.assert_array_equal(shared.thumbnails, own.thumbnails)
    assert sorted(set(shared.labels[shared.thumbnail_rows])) == sorted(set(shared.labels))
  assert [s.skipped for s in together] == [s.skipped for s in alone] == [0, 1]


def test_a_pass_takes_equally_full_batches():
  """The fewest batches of at most the batch size, equally full: the padding of the last
  one is less than one image per batch."""
  for num_images in (1, 8, 28, 32, 33, 70, 720, 961):
    for replicas in (1, 2):
      batch = feature_cache.balanced_batch_size(num_images, 32, replicas)
      per_replica = -(-num_images // replicas)
      num_batches = -(-per_replica // batch)
      assert batch <= 32 and num_batches == -(-per_replica // 32)
      assert num_batches * batch - per_replica < num_batches
  assert feature_cache.balanced_batch_size(70, 32) == 24   # 72 images, not 96
  assert feature_cache.balanced_batch_size(28, 32) == 28   # one batch, unpadded


def test_flipped_features_are_the_mirrors_features(backbone, photo_records):
  images, labels, _ = pipeline_images(photo_records)
  feature_set = extract(backbone, photo_records, flip=True)
  mirrored = backbone(tf.image.flip_left_right(tf.constant(images))).numpy()
  np.testing.assert_allclose(feature_set.flipped_features, mirrored, atol=1e-4)
  np.testing.assert_allclose(feature_set.features, backbone(tf.constant(images)).numpy(),
                             atol=1e-4)
  # Real photos are not symmetric: the mirror is another view, not the same features.
  assert np.abs(feature_set.flipped_features - feature_set.features).max() > 0.1
  train_x, train_y = feature_set.training_examples()
  np.testing.assert_array_equal(train_x, np.concatenate([feature_set.features, mirrored]))
  np.testing.assert_array_equal(train_y, np.concatenate([labels, labels]))


def test_flip_averaged_scores_are_the_mean_of_the_two_views(backbone, photo_records):
  feature_set = extract(backbone, photo_records, flip=True)
  weights = np.random.default_rng(0).normal(size=[backbone.output_dim, len(CLASSES)])

  def scores_of(x):
    return x @ weights

  averaged = features.average_flip_scores(scores_of, feature_set)
  np.testing.assert_allclose(
      averaged, (scores_of(feature_set.features) + scores_of(feature_set.flipped_features)) / 2)
  plain = features.FeatureSet(feature_set.features, feature_set.labels, feature_set.filenames,
                              feature_set.thumbnails, feature_set.thumbnail_rows)
  np.testing.assert_array_equal(features.average_flip_scores(scores_of, plain),
                                scores_of(feature_set.features))


def test_flip_features_have_their_own_cache_entry(backbone, photo_records):
  kwargs = dict(batch_size=BATCH, image_size=224, resize_mode="center_crop",
                num_classes=len(CLASSES), num_thumbnails_per_class=2)
  plain = feature_cache.cached_features(backbone, photo_records, "train", **kwargs)
  flipped = feature_cache.cached_features(backbone, photo_records, "train", flip=True, **kwargs)
  assert plain.flipped_features is None and flipped.flipped_features is not None
  again = feature_cache.cached_features(backbone, photo_records, "train", flip=True, **kwargs)
  assert again.from_cache
  np.testing.assert_array_equal(again.flipped_features, flipped.flipped_features)
  np.testing.assert_array_equal(again.features, plain.features)
  assert feature_cache.cached_features(backbone, photo_records, "train",
                                       **kwargs).flipped_features is None


def test_exported_flip_averaged_scores_are_the_mean_of_the_two_passes(backbone, skimage_photos,
                                                                       tmp_path):
  """A saved ClassifierModule with average_flips: its scores on raw pixels == the mean of the
  head's scores on the image and on its mirror, each through the training pipeline."""
  head = head_lib.LinearHead(backbone.output_dim, len(CLASSES))
  head.kernel.assign(np.random.default_rng(1).normal(
      size=[1, backbone.output_dim, len(CLASSES)]).astype(np.float32) * 0.01)
  labels_file = tmp_path / "labels.txt"
  labels_file.write_text("\n".join(CLASSES) + "\n")
  module = export.ClassifierModule(backbone, head, CLASSES, 1.0, "center_crop", str(labels_file),
                                   average_flips=True)
  tf.saved_model.save(module, str(tmp_path / "export"), signatures=module.signatures())
  loaded = tf.saved_model.load(str(tmp_path / "export"))
  photos = [skimage_photos[name] for name in ("chelsea", "coffee")]
  images = tf.stack([pipeline.preprocess(tf.constant(photo)) for photo in photos])
  scores = np.concatenate([loaded.signatures["predict_images"](
      images=tf.constant(photo[None] / 255, tf.float32))["scores"].numpy() for photo in photos])
  original = head(backbone(images)).numpy()
  mirrored = head(backbone(tf.image.flip_left_right(images))).numpy()
  np.testing.assert_allclose(scores, (original + mirrored) / 2, atol=1e-4)
  assert np.abs(original - mirrored).max() > 1e-3  # the average is not the plain score
