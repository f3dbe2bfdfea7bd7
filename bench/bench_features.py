#!/usr/bin/env python3
"""The backbone pass of bin/train against the backbone alone: images/s, one run, side by side.

bin/train's backbone pass is `extraction.extract_features` over the records
(read, decode, resize, the backbone, thumbnails, the features back in numpy).
Its rate is compared with the backbone alone on ready tensors at the same
batch size (a traced function with a fixed input signature): the pass should
run at >= 0.85x the backbone's rate. Rows:
- the pass over oxford_flowers12's training records (720), as bin/train runs it;
- the same with `flip` (each image and its mirror: two backbone images per
  record), against the backbone alone on twice the images.

The machine may be shared: rounds alternate the backbone alone and the pass,
and each keeps its fastest round, so both see the same load. Records are built
from oxford_flowers12 (`samples.make_flowers12_records`; --data_dir or
$TLFRAME_DATA_DIR, default ../shared/data), generated photos when it is absent.

  .venv/bin/python bench/bench_features.py [--rounds=3] [--batch_size=32]
"""

import pathlib
import shutil
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# tlframe before tensorflow: importing it sets TensorFlow's oneDNN default (tlframe/__init__.py).
from tlframe.backbone import loading as backbone_lib  # pylint: disable=g-import-not-at-top
from tlframe.train import extraction  # pylint: disable=g-import-not-at-top
from tlframe import records  # pylint: disable=g-import-not-at-top
from tlframe import samples  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top
from bench_common import cpu_model  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", samples.benchmark_data_dir(),
                    "Folder holding oxford_flowers12/; generated photos are used when absent.")
flags.DEFINE_string("records_dir", None,
                    "Reuse records built by an earlier run here (built there when missing).")
flags.DEFINE_string("backbone", backbone_lib.DEFAULT_HANDLE, "The backbone to time.")
flags.DEFINE_string("precision", "float32", "The backbone's precision (float32, bfloat16, auto).")
flags.DEFINE_integer("batch_size", 32, "bin/train's --extract_batch_size.")
flags.DEFINE_integer("rounds", 3, "Alternating rounds; each variant keeps its fastest.")
flags.DEFINE_bool("flip", True, "Also time the pass with flip=True.")
flags.DEFINE_integer("alone_images", 256, "Images per round of the backbone alone.")

TARGET = 0.85


def build_records(records_dir, work_dir):
  """(records dir, what it holds): oxford_flowers12 when present, else generated crops."""
  if (records_dir / records.MANIFEST_FILENAME).exists():
    return records_dir, "records from an earlier run"
  flowers = pathlib.Path(FLAGS.data_dir) / "oxford_flowers12"
  if flowers.is_dir():
    samples.make_flowers12_records(flowers, records_dir)
    return records_dir, "oxford_flowers12 (real photos, 224x224 JPEG)"
  image_dir = work_dir / "generated"
  samples.write_photo_crops(str(image_dir), samples.load_sample_photos(), per_class=100)
  records.convert(str(records_dir), image_dir=str(image_dir))
  return records_dir, "generated crops of scikit-image photos (JPEG, 150-576 px)"


def backbone_alone(backbone, batch_size, images_per_round):
  """A round: the backbone on ready batches, about `images_per_round` images; returns seconds."""
  size = backbone.input_size
  ready = tf.random.uniform([batch_size, size, size, 3])
  featurize = tf.function(backbone, input_signature=[tf.TensorSpec(ready.shape, tf.float32)])
  featurize(ready).numpy()  # trace
  calls = -(-images_per_round // batch_size)

  def one_round():
    start = time.perf_counter()
    for _ in range(calls):
      featurize(ready).numpy()
    return (time.perf_counter() - start) * images_per_round / (calls * batch_size)

  return one_round


def the_pass(backbone, pattern, num_classes, flip):
  def one_round():
    feature_sets = extraction.extract_features(
        backbone, pattern, batch_size=FLAGS.batch_size, image_size=backbone.input_size,
        resize_mode="center_crop", num_classes=num_classes, flip=flip)
    return feature_sets[0].extract_seconds   # the whole pass's, shared by its files

  return one_round


def fastest_rates(variants):
  """{name: images/s of its fastest round}; rounds alternate between the variants."""
  fastest = dict.fromkeys(variants, float("inf"))
  for _ in range(FLAGS.rounds):
    for name, (one_round, count) in variants.items():
      fastest[name] = min(fastest[name], one_round())
  return {name: variants[name][1] / fastest[name] for name in variants}


def main(argv):
  del argv  # unused
  logging.set_verbosity(logging.WARNING)
  work_dir = pathlib.Path(tempfile.mkdtemp(prefix="bench_features_"))
  try:
    records_dir, description = build_records(
        pathlib.Path(FLAGS.records_dir) if FLAGS.records_dir else work_dir / "records", work_dir)
    backbone = backbone_lib.load_backbone(FLAGS.backbone, precision=FLAGS.precision)
    pattern = records.split_file_pattern(str(records_dir), "train")
    num_classes = len(records.read_labels(str(records_dir)))
    images = records.count_examples(str(records_dir), "train")
    alone_images = min(images, FLAGS.alone_images)
    warm = the_pass(backbone, pattern, num_classes, flip=False)
    warm()  # traces, and fills the page cache with the records
    variants = {
        "alone": (backbone_alone(backbone, FLAGS.batch_size, alone_images), alone_images),
        "pass": (warm, images)}
    if FLAGS.flip:
      variants["alone x2"] = (backbone_alone(backbone, 2 * FLAGS.batch_size, 2 * alone_images),
                              2 * alone_images)
      variants["pass, flip"] = (the_pass(backbone, pattern, num_classes, flip=True), 2 * images)
      variants["pass, flip"][0]()  # traces
    rates = fastest_rates(variants)

    print(f"CPU: {cpu_model()}; data: {description}, {images} images; backbone {backbone}; "
          f"batch {FLAGS.batch_size}; fastest of {FLAGS.rounds} alternating rounds\n")
    print("| variant | backbone images/s | x backbone alone |")
    print("| --- | ---: | ---: |")
    print(f"| backbone alone on tensors, batch {FLAGS.batch_size} | {rates['alone']:.1f} | 1.00x |")
    print(f"| backbone pass (extraction.extract_features) | {rates['pass']:.1f} | "
          f"{rates['pass'] / rates['alone']:.2f}x |")
    ratios = [rates["pass"] / rates["alone"]]
    if FLAGS.flip:
      print(f"| backbone alone on tensors, batch {2 * FLAGS.batch_size} | "
            f"{rates['alone x2']:.1f} | 1.00x |")
      print(f"| backbone pass with flip (image + mirror) | {rates['pass, flip']:.1f} | "
            f"{rates['pass, flip'] / rates['alone x2']:.2f}x |")
      ratios.append(rates["pass, flip"] / rates["alone x2"])
      print(f"\nflip: the pass takes {rates['pass'] / (rates['pass, flip'] / 2):.2f}x the time "
            "of the pass without it")
    print(f"\nTarget pass >= {TARGET}x the backbone alone: "
          f"{'met' if min(ratios) >= TARGET else 'NOT met'} (worst {min(ratios):.2f}x)")
  finally:
    shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
