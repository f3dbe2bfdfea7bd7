"""Sharded TFRecords -> fixed-size float32 image batches, as a tf.data.Dataset.

Reads the records `tlframe.records` writes (TF-Slim's keys, `records.example_format`),
decodes each image with `imageformat.decode_image` (the one decoder the
converter and the export use too), and brings it to `image_size` x `image_size` float32 in [0, 1] (the
TF-Hub image convention) by one of four resize modes:

- "center_crop": resize the shorter side to `image_size` keeping the aspect
  ratio, then crop the centre square. The evaluation default: what ImageNet
  backbones were trained to see.
- "imagenet_crop": resize the shorter side to image_size * 256/224, then crop
  the centre image_size square (`imagenet_eval_crop`): the crop the
  ImageNet backbones were evaluated with, trimming 1/8 of the square's edges.
- "letterbox": resize the longer side to `image_size` keeping the aspect ratio
  and pad the rest with black. Keeps all content; for objects near the edges.
- "crop_or_pad": no resizing: crop the centre or pad with black. For images
  that are already about the right size (tiles, crops, icons).

A record whose image does not decode (bytes another tool wrote) is skipped
and counted in a `SkipCounter` instead of ending the run. A damaged shard is
not skipped: a record failing its checksum (flipped bytes, a truncated file)
raises DataLossError while iterating. Check shards first with
`tlframe.records.check_shards`, which names the shard, the offset and the fix.
"""

import collections
import threading

from absl import logging
import tensorflow as tf

from tlframe import imageformat
from tlframe.records import example_format
from tlframe.errors import UserError
from tlframe.options import RESIZE_MODES

# Record shuffle buffer: holds encoded bytes (tens of KB per photo), not pixels.
DEFAULT_SHUFFLE_BUFFER = 1024
# Files read at once; more only helps when reads have latency (gs://).
_INTERLEAVE_CYCLE = 8


# Training augmentation: a random crop keeping at least half the area, a
# horizontal flip, and mild photometric jitter. Kept mild on purpose: the
# backbone is frozen, so heavy distortions only move features off the manifold.
_CROP_AREA_RANGE = (0.5, 1.0)
_CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
_BRIGHTNESS_DELTA = 0.1
_CONTRAST_RANGE = (0.8, 1.2)


def check_resize_mode(resize_mode):
  if resize_mode not in RESIZE_MODES:
    raise UserError(f"resize mode {resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")


def preprocess(image_uint8, image_size=224, resize_mode="center_crop"):
  """uint8 [H, W, 3] -> float32 [image_size, image_size, 3] in [0, 1] by `resize_mode`.

  Pure TensorFlow ops, no Python side effects: the export reuses it inside a
  SavedModel signature on raw bytes.
  """
  check_resize_mode(resize_mode)
  if resize_mode == "imagenet_crop":
    image = imagenet_eval_crop(image_uint8, image_size)
    image.set_shape([image_size, image_size, 3])
    return image
  image = tf.image.convert_image_dtype(image_uint8, tf.float32)
  if resize_mode == "center_crop":
    # Cropping the centre square first, then resizing it, equals resizing the
    # shorter side then cropping, without resizing pixels that are cut anyway.
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    image = tf.image.crop_to_bounding_box(image, (shape[0] - side) // 2, (shape[1] - side) // 2,
                                          side, side)
    image = _resize_unless_at_size(
        image, lambda: tf.image.resize(image, [image_size, image_size], antialias=True),
        image_size)
  elif resize_mode == "letterbox":
    image = _resize_unless_at_size(
        image, lambda: tf.image.resize_with_pad(image, image_size, image_size, antialias=True),
        image_size)
  else:
    image = tf.image.resize_with_crop_or_pad(image, image_size, image_size)
  image = tf.clip_by_value(image, 0.0, 1.0)
  image.set_shape([image_size, image_size, 3])
  return image


def imagenet_eval_crop(image, input_size):
  """torchvision's ImageNet eval preprocessing, scaled to `input_size`.

  uint8 [H, W, 3] -> float32 [S, S, 3] in [0, 1]: the shorter side resized
  (bilinear, antialiased) to S * 256/224, then the central S x S crop.
  """
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  short = round(input_size * 256 / 224)
  # torchvision truncates the longer side and rounds the crop offsets; so do we.
  scale = short / tf.cast(tf.minimum(height, width), tf.float64)
  new_height = tf.cast(tf.cast(height, tf.float64) * scale, tf.int32)
  new_width = tf.cast(tf.cast(width, tf.float64) * scale, tf.int32)
  resized = tf.image.resize(tf.cast(image, tf.float32) / 255.0, [new_height, new_width],
                            method="bilinear", antialias=True)
  top = tf.cast(tf.round((new_height - input_size) / 2), tf.int32)
  left = tf.cast(tf.round((new_width - input_size) / 2), tf.int32)
  return tf.clip_by_value(resized[top:top + input_size, left:left + input_size], 0.0, 1.0)


def _resize_unless_at_size(image, resize, image_size):
  """resize() of an image, skipped when it is already image_size square.

  Resizing to the same size is exact, and the antialiased resize is most of
  the pipeline's CPU time: data sets stored at the backbone's size skip it.
  """
  shape = tf.shape(image)
  at_size = tf.logical_and(shape[0] == image_size, shape[1] == image_size)
  return tf.cond(at_size, lambda: image, resize)


def augment_image(image_uint8, seed, image_size=224, resize_mode="center_crop"):
  """Training-time `preprocess` with a random crop, flip and brightness/contrast.

  `seed` is a shape [2] int tensor; the same seed gives the same result
  (stateless random ops), which is what makes seeded pipelines reproducible.
  """
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=4)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image_uint8), bounding_boxes=tf.zeros([0, 0, 4]), seed=seeds[0],
      area_range=_CROP_AREA_RANGE, aspect_ratio_range=_CROP_ASPECT_RANGE,
      use_image_if_no_bounding_boxes=True)
  image = preprocess(tf.slice(image_uint8, begin, size), image_size, resize_mode)
  image = tf.image.stateless_random_flip_left_right(image, seeds[1])
  image = tf.image.stateless_random_brightness(image, _BRIGHTNESS_DELTA, seeds[2])
  image = tf.image.stateless_random_contrast(image, *_CONTRAST_RANGE, seeds[3])
  return tf.clip_by_value(image, 0.0, 1.0)


class SkipCounter:
  """Counts records skipped because their image did not decode; thread-safe.

  Pass one to `make_dataset(skip_counter=...)` and read `.count` (and the first
  few `.filenames`, and `.by_file`: the count of each record file, by its index
  in make_dataset's files) while or after iterating, to log or fail on bad data.
  """

  _KEEP_FILENAMES = 100

  def __init__(self):
    self._lock = threading.Lock()
    self.count = 0
    self.filenames = []
    self.by_file = collections.Counter()

  def record(self, filename, file_index):
    """Called through tf.py_function with the record's image/filename as a string tensor
    and the index of its record file."""
    filename = filename.numpy().decode("utf-8", "replace")
    with self._lock:
      self.count += 1
      self.by_file[int(file_index.numpy())] += 1
      if len(self.filenames) < self._KEEP_FILENAMES:
        self.filenames.append(filename)
    logging.warning("Skipping a record whose image does not decode: %r", filename)


def try_map(value, fn, placeholder):
  """A one-element dataset of (fn(value), True), or (placeholder, False) where fn fails.

  tf.data has no per-element try/except, so `fn` runs in its own one-element
  dataset whose errors are dropped; `take(1)` of that followed by the
  placeholder then yields the result when `fn` succeeded and the placeholder
  when it raised (an undecodable image, an unreadable file).
  """
  result = tf.data.Dataset.from_tensors(value).map(lambda v: (fn(v), True)).ignore_errors()
  failed = tf.data.Dataset.from_tensors((placeholder, False))
  return result.concatenate(failed).take(1)


def list_files(files):
  """A glob pattern's matches, sorted; a list of files as it is."""
  if not isinstance(files, str):
    return list(files)
  matches = sorted(tf.io.gfile.glob(files))
  if not matches:
    raise UserError(f"no record files match {files}; check the path, or run "
                    "make_tfrecords to create them")
  return matches


def make_dataset(file_pattern, batch_size, *, image_size=224, resize_mode="center_crop",
                 augment=False, shuffle=False, repeat=False, deterministic=True, seed=None,
                 with_filenames=False, with_file_index=False, drop_remainder=False,
                 input_context=None, shuffle_buffer_size=DEFAULT_SHUFFLE_BUFFER,
                 skip_counter=None):
  """A dataset of (images, labels) or (images, labels, filenames) batches.

  file_pattern: a glob pattern of record files, or a list of them.
  images: float32 [B, image_size, image_size, 3] in [0, 1]; labels: int32 [B];
  filenames: string [B] (the image/filename feature). `with_file_index` adds
  the index of each example's record file among the files (a pattern's
  matches sorted) as a last element: int32 [B]. `augment` applies random
  crop/flip/brightness/contrast (training only). `shuffle` shuffles files and
  records, reshuffled each epoch; `repeat` repeats forever. `deterministic`
  keeps the element order fixed; with a `seed` as well, shuffling and
  augmentation repeat exactly from run to run. `input_context` (a
  tf.distribute.InputContext) reads only this input pipeline's share, and
  `batch_size` is then the per-replica batch. Undecodable records are skipped
  and logged, and counted in `skip_counter` (a SkipCounter) when one is given.
  """
  check_resize_mode(resize_mode)
  if skip_counter is None:
    skip_counter = SkipCounter()  # skips are logged even when nobody counts them
  if batch_size < 1:
    raise UserError(f"batch size must be positive, got {batch_size}")
  files = list_files(file_pattern)
  records_sharded = False
  dataset = tf.data.Dataset.from_tensor_slices((files, tf.range(len(files), dtype=tf.int32)))
  if input_context and input_context.num_input_pipelines > 1:
    if len(files) >= input_context.num_input_pipelines:
      dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    else:
      records_sharded = True  # too few files to share out; share records instead
  if shuffle and not records_sharded:
    dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
  # Sharding records needs the same record order in every pipeline.
  dataset = dataset.interleave(
      lambda path, file_index: tf.data.Dataset.zip((
          tf.data.TFRecordDataset(path), tf.data.Dataset.from_tensors(file_index).repeat())),
      cycle_length=min(len(files), _INTERLEAVE_CYCLE),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic or records_sharded)
  if records_sharded:
    dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
  if shuffle:
    dataset = dataset.shuffle(shuffle_buffer_size, seed=seed, reshuffle_each_iteration=True)
  if repeat:
    dataset = dataset.repeat()
  # One random seed pair per element drives the stateless augmentation.
  dataset = tf.data.Dataset.zip((dataset, tf.data.Dataset.random(seed=seed).batch(2)))

  # The element functions below are not autograph-converted (do_not_convert): their only
  # control flow on tensors is explicit (tf.cond), and converting them, and all they call,
  # cost about a second of every run's start.
  @tf.autograph.experimental.do_not_convert
  def parse_and_decode(record, element_seed):
    serialized, file_index = record
    encoded, label, filename = example_format.parse_example(serialized)
    return try_map(encoded, imageformat.decode_image, tf.zeros([1, 1, 3], tf.uint8)).map(
        lambda image, ok: (image, label, filename, file_index, element_seed, ok))

  dataset = dataset.interleave(parse_and_decode, cycle_length=tf.data.AUTOTUNE,
                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)

  @tf.autograph.experimental.do_not_convert
  def keep_decoded(image, label, filename, file_index, element_seed, ok):
    return tf.cond(ok, lambda: True, lambda: _count_skip(skip_counter, filename, file_index))

  dataset = dataset.filter(keep_decoded)

  @tf.autograph.experimental.do_not_convert
  def to_model_input(image, label, filename, file_index, element_seed, ok):
    if augment:
      image = augment_image(image, element_seed, image_size, resize_mode)
    else:
      image = preprocess(image, image_size, resize_mode)
    return ((image, label) + ((filename,) if with_filenames else ())
            + ((file_index,) if with_file_index else ()))

  dataset = dataset.map(to_model_input, num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=deterministic)
  dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
  options = static_options()
  options.deterministic = deterministic
  return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def static_options():
  """tf.data Options without autotuning: tlframe's pipelines take these.

  AUTOTUNE then means as many parallel calls as cores (at most 16) and a
  prefetch buffer that grows as needed. The autotuner's thread re-optimizes
  its model of the pipeline every second or so, and for these pipelines (an
  inner dataset per record, to skip undecodable images) one optimization took
  ~1.2 s of a core; an iterator deleted meanwhile waits for it: measured, 1.25 s
  at the end of bin/train's backbone pass in 6 of 13 runs timed (70 photos, 2
  cores). The head's feature batches take them too.
  """
  options = tf.data.Options()
  options.autotune.enabled = False
  return options


def _count_skip(skip_counter, filename, file_index):
  tf.py_function(skip_counter.record, [filename, file_index], [])
  return False
