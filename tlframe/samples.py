"""Sample data for the demo, the tests and the benchmarks.

scikit-image ships a few real photographs (a cat, a coffee cup, a rocket, an
astronaut, and brick, grass and gravel textures). Random crops of each, half of
them mirrored, make a small class-per-folder image set that needs no network:
`bin/make_sample_images` writes it for the README's demo.

Larger real data sets for benchmarks (oxford_flowers12) live in
`benchmark_data_dir()` (tlframe.benchmark_data, which fetches them: bench/get_data);
tests that need them skip where it is missing.
"""

import os

import numpy as np
import tensorflow as tf

from tlframe.util import fileio
from tlframe import records
from tlframe.benchmark_data import DATA_DIR_ENV, TEST_SPLIT_FILENAME, benchmark_data_dir  # noqa: F401  # pylint: disable=unused-import
from tlframe.errors import UserError

SAMPLE_PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "brick", "grass", "gravel")
_JPEG_QUALITY = 90


def make_flowers12_records(flowers_dir, records_dir):
  """oxford_flowers12 as records: its TEST_SPLIT.txt (240) is the validation split, the rest train.

  So bin/train's validation accuracy on these records is the data set's test accuracy.
  """
  return records.convert(str(records_dir), image_dir=str(flowers_dir),
                         validation_filelist=os.path.join(flowers_dir, TEST_SPLIT_FILENAME),
                         test_percentage=0)


def load_sample_photos(names=SAMPLE_PHOTOS):
  """{name: uint8 [H, W, 3]} of scikit-image's sample photos (grayscale ones replicated)."""
  try:
    from skimage import data  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError("the sample photos come from scikit-image: pip install 'tlframe[demo]' "
                    "(or pip install scikit-image)") from None
  photos = {}
  for name in names:
    if not hasattr(data, name):
      raise UserError(f"{name!r} is not a scikit-image sample photo; use some of "
                      f"{', '.join(SAMPLE_PHOTOS)}")
    photo = getattr(data, name)()
    photos[name] = np.repeat(photo[..., None], 3, axis=-1) if photo.ndim == 2 else photo[..., :3]
  return photos


def write_photo_crops(image_dir, photos, per_class, size=None, seed=0):
  """Writes `per_class` random crops of each photo as JPEGs into `image_dir/<name>/`.

  Each crop covers 50-90% of the photo's height and width; odd-numbered crops
  are mirrored; `size` resizes them to size x size (else they keep their own
  size). The same seed writes the same files. Returns the number written.
  """
  rng = np.random.default_rng(seed)
  written = 0
  for name, photo in photos.items():
    class_dir = os.path.join(image_dir, name)
    tf.io.gfile.makedirs(class_dir)
    height, width, _ = photo.shape
    for i in range(per_class):
      scale = rng.uniform(0.5, 0.9)
      crop_h, crop_w = int(height * scale), int(width * scale)
      top = rng.integers(0, height - crop_h + 1)
      left = rng.integers(0, width - crop_w + 1)
      crop = photo[top:top + crop_h, left:left + crop_w]
      if i % 2:
        crop = crop[:, ::-1]
      crop = tf.constant(np.ascontiguousarray(crop))
      if size:
        crop = tf.cast(tf.round(tf.clip_by_value(
            tf.image.resize(crop, [size, size], antialias=True), 0, 255)), tf.uint8)
      encoded = tf.io.encode_jpeg(crop, quality=_JPEG_QUALITY).numpy()
      fileio.atomic_write_bytes(os.path.join(class_dir, f"{i:03d}.jpg"), encoded)
      written += 1
  return written
