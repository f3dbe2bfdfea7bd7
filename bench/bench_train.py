#!/usr/bin/env python3
"""Training benchmark on oxford_flowers12: accuracy, k-shot curve and where the time goes.

  .venv/bin/python bench/bench_train.py [--data_dir DIR] [--work_dir DIR]

Train = the 720 files not in TEST_SPLIT.txt, test = its 240 (given to
make_tfrecords as the validation split, so bin/train reports test accuracy).
Measures, within one run:
1. `bin/train --image_dir` from the photos to an exported model in one
   process (conversion, backbone pass, CV, head, calibration, export; the
   built-in already built, no features cached), against T0 (`python -c
   "import tensorflow"`) plus its backbone pass over the 960 photos. Target:
   at most 1.3x.
2. On the features that run cached: hinge, squared_hinge and softmax heads
   (default settings otherwise) and scikit-learn's LinearSVC with C
   cross-validated (bench/svc_baseline.py). Target: the default >= LinearSVC.
3. 100 head epochs in-graph vs the backbone pass. Target: under 2%.
4. A k-shot curve: k = 1, 5, 10, 20, 60 training images per class.
5. l2 cross-validated (the default) on the k-shot subsets (5-fold CV over the default grid).
6. The Keras transfer-learning tutorial's way on the same records: the frozen
   backbone inside a Keras model with random flips and rotations, dropout 0.2
   and a softmax Dense layer, model.fit for 10 epochs (a backbone pass per
   epoch), for its test accuracy and time to a model (T0 + backbone load +
   model.fit, the decoding not counted). Target: bin/train's whole wall
   at least 7x faster.
7. With --sweep: the grid of head settings the defaults were chosen from.
--json_out writes the numbers (with the CPU, date and command) for
bench/plots.py, which draws the README's pictures from them.
Needs the bench extras (`pip install -e .[bench]`: scikit-learn).
"""

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# tlframe before tensorflow: importing it sets TensorFlow's oneDNN default (tlframe/__init__.py).
from tlframe.backbone import loading as backbone_lib  # pylint: disable=wrong-import-position
from tlframe.train import feature_cache  # pylint: disable=wrong-import-position
from tlframe.train import head as head_lib  # pylint: disable=wrong-import-position
from tlframe import records  # pylint: disable=wrong-import-position
from tlframe import samples  # pylint: disable=wrong-import-position
from tlframe.train import layout as model_dir_layout  # pylint: disable=wrong-import-position
from tlframe import options as options_lib  # pylint: disable=wrong-import-position
from tlframe import pipeline  # pylint: disable=wrong-import-position
from tlframe.train import trainer as trainer_lib  # pylint: disable=wrong-import-position
from tlframe.train import tuning  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position
from bench_common import (add_data_dir_argument, conversion_seconds, cpu_model, flowers12_dir,  # pylint: disable=wrong-import-position
                          import_seconds, k_shot_rows)
from svc_baseline import cross_validated_svc  # pylint: disable=wrong-import-position

K_SHOTS = (1, 5, 10, 20, 60)
LOSSES = ("hinge", "squared_hinge", "softmax")
TIMED_EPOCHS = 100
KERAS_TUTORIAL_EPOCHS = 10


def fresh_feature_cache(work_dir):
  """A new $TLFRAME_CACHE_DIR that shares the built backbones but holds no features,
  so the timed bin/train run does its backbone pass; this process uses it too."""
  cache = work_dir / f"cache-{time.time_ns()}"
  cache.mkdir()
  (cache / "backbones").symlink_to(pathlib.Path(backbone_lib.cache_root()) / "backbones")
  os.environ["TLFRAME_CACHE_DIR"] = str(cache)


def train_from_photos(flowers_dir, model_dir, backbone):
  """(wall s, metrics, conversion s) of `bin/train --image_dir` from the photos to an export;
  TEST_SPLIT.txt is the validation split, so its accuracy is the data set's test accuracy."""
  start = time.monotonic()
  result = subprocess.run(
      [sys.executable, str(REPO / "bin" / "train"), f"--image_dir={flowers_dir}",
       f"--validation_filelist={flowers_dir / samples.TEST_SPLIT_FILENAME}",
       "--test_percentage=0", f"--model_dir={model_dir}", f"--backbone={backbone}"],
      capture_output=True, text=True)
  wall = time.monotonic() - start
  if result.returncode:
    sys.exit(f"bin/train failed:\n{result.stderr[-3000:]}")
  with open(os.path.join(model_dir, model_dir_layout.METRICS_FILENAME)) as f:
    metrics = json.load(f)
  return wall, metrics, conversion_seconds(result.stdout)


def fit_head(x, y, test_x, test_y, options, *, timed=False, l2_values=None):
  """(test accuracy, seconds of TIMED_EPOCHS in-graph epochs or None) of one head.

  With `l2_values`, trains one head per value at once (stacked) and the
  accuracy is a list.
  """
  strategy = tf.distribute.get_strategy()
  batch = trainer_lib.effective_batch_size(options, len(y), 1)
  if timed:  # one extra epoch traces the loop before the timed epochs
    options = dataclasses.replace(options, epochs=TIMED_EPOCHS + 1)
  trainer = trainer_lib.HeadTrainer(
      strategy, options, num_features=x.shape[1], num_classes=int(test_y.max()) + 1,
      steps_per_epoch=len(y) // batch, global_batch_size=batch, l2_values=l2_values,
      normalization=head_lib.normalization_constants(x, options.feature_normalization))
  weights = np.ones([trainer.num_models, len(y)], np.float32)
  iterator = iter(trainer_lib.feature_batches(strategy, trainer.normalize(x), y, weights, batch,
                                        options.seed, 0, options.epochs))
  seconds = None
  if timed:
    trainer.run_epochs(iterator, tf.constant(1, tf.int64))
    start = time.monotonic()
    trainer.run_epochs(iterator, tf.constant(TIMED_EPOCHS, tf.int64))
    trainer.head.kernel.numpy()  # waits for the loop to finish
    seconds = time.monotonic() - start
  else:
    trainer.run_epochs(iterator, tf.constant(options.epochs, tf.int64))
  _, accuracy, _ = trainer.evaluate(tf.constant(test_x), tf.constant(test_y))
  if l2_values is not None:
    return accuracy.numpy().tolist(), seconds
  return float(accuracy[0]), seconds


def sweep(x, y, test_x, test_y, defaults):
  """Test accuracy over the settings the defaults were chosen from (docs/training.md)."""
  grid = (1e-5, 1e-4, 1e-3, 1e-2)
  print(f"\nSweep: test accuracy (%) at l2 = {', '.join(f'{v:g}' for v in grid)}; "
        f"{defaults.epochs} epochs, Adam, cosine\n")
  print("| normalization | batch | lr | " + " | ".join(LOSSES) + " |")
  print("| --- | --- | --- | " + " | ".join("---" for _ in LOSSES) + " |")
  for normalization in options_lib.FEATURE_NORMALIZATIONS:
    for batch in (64, 256, 1024):
      for learning_rate in (0.003, 0.01, 0.03):
        cells = []
        for loss in LOSSES:
          options = dataclasses.replace(defaults, loss=loss, batch_size=batch,
                                        learning_rate=learning_rate,
                                        feature_normalization=normalization)
          accuracies, _ = fit_head(x, y, test_x, test_y, options, l2_values=grid)
          cells.append(" ".join(f"{100 * a:.1f}" for a in accuracies))
        print(f"| {normalization} | {batch} | {learning_rate:g} | " + " | ".join(cells) + " |",
              flush=True)


def load_images(records_dir, split, image_size, filenames):
  """uint8 [N, S, S, 3] images of a split (center crop), in the order of `filenames`."""
  dataset = pipeline.make_dataset(records.split_file_pattern(records_dir, split), 64,
                                  image_size=image_size, with_filenames=True)
  by_name = {}
  for images, _, names in dataset:
    pixels = tf.cast(tf.round(images * 255), tf.uint8).numpy()
    by_name.update(zip((n.decode() for n in names.numpy()), pixels))
  return np.stack([by_name[str(name)] for name in filenames])


def keras_tutorial(images, labels, test_images, test_labels, backbone, num_classes, seed=0):
  """(test accuracy, seconds of model.fit) of the Keras transfer-learning tutorial's recipe.

  tensorflow.org's "Transfer learning and fine-tuning" before fine-tuning:
  random flips and rotations, the frozen base model, dropout 0.2, a Dense
  layer, Adam, model.fit for 10 epochs, so every epoch runs the backbone over
  every training image. Softmax over the classes instead of its binary output,
  and Adam's default learning rate (10 epochs at the tutorial's 1e-4 leave 12
  classes under-fitted). The decoded images are held in memory (the tutorial
  decodes them every epoch), which only favours it.
  """
  import keras  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(seed)

  class FrozenBackbone(keras.layers.Layer):
    def call(self, inputs):
      return backbone(inputs)

  size = backbone.input_size
  inputs = keras.Input([size, size, 3])
  augmented = keras.layers.RandomRotation(0.2)(keras.layers.RandomFlip("horizontal")(inputs))
  features = FrozenBackbone(trainable=False)(augmented)
  outputs = keras.layers.Dense(num_classes, activation="softmax")(
      keras.layers.Dropout(0.2)(features))
  model = keras.Model(inputs, outputs)
  model.compile(optimizer=keras.optimizers.Adam(), loss="sparse_categorical_crossentropy",
                metrics=["accuracy"])

  def batches(x, y, shuffle):
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
      dataset = dataset.shuffle(len(y), seed=seed)
    return dataset.batch(32).map(lambda a, b: (tf.cast(a, tf.float32) / 255, b))

  start = time.monotonic()
  # shuffle=False: the dataset reshuffles itself each epoch (Keras cannot shuffle a dataset).
  model.fit(batches(images, labels, True), epochs=KERAS_TUTORIAL_EPOCHS, shuffle=False,
            verbose=0)
  seconds = time.monotonic() - start
  _, accuracy = model.evaluate(batches(test_images, test_labels, False), verbose=0)
  return float(accuracy), seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_data_dir_argument(parser)
  parser.add_argument("--work_dir", default=None,
                      help="Where records and models go (default: a temp dir, removed).")
  parser.add_argument("--backbone", default=backbone_lib.DEFAULT_HANDLE)
  parser.add_argument("--json_out", default=None,
                      help="Also write the numbers to this JSON file (bench/plots.py reads it).")
  parser.add_argument("--sweep", action="store_true",
                      help="Also print the loss x normalization x batch x learning-rate sweep "
                           "the defaults were chosen from (a few minutes).")
  args = parser.parse_args()
  flowers_dir = flowers12_dir(args.data_dir)
  with tempfile.TemporaryDirectory() as tmp:
    work_dir = pathlib.Path(args.work_dir or tmp)
    work_dir.mkdir(parents=True, exist_ok=True)
    results = run(flowers_dir, work_dir, args.backbone, args.sweep)
  if args.json_out:
    results.update(cpu=cpu_model(), date=datetime.date.today().isoformat(),
                   command=" ".join(["bench/bench_train.py"] + sys.argv[1:]))
    with open(args.json_out, "w") as f:
      json.dump(results, f, indent=2)
    print(f"\nWrote {args.json_out}")


def run(flowers_dir, work_dir, backbone_handle, with_sweep):
  """Prints the tables; returns their numbers as a JSON-ready dict."""
  for part in backbone_handle.split(","):   # built outside the timed run, as bin/train loads it
    if part in backbone_lib.BUILTIN_NAMES:
      backbone_lib.ensure_builtin(part, precision=backbone_lib.resolve_precision(
          options_lib.TrainOptions.precision))
  t0 = import_seconds()
  fresh_feature_cache(work_dir)
  model_dir = work_dir / f"model-{time.time_ns()}"
  wall, metrics, conversion = train_from_photos(flowers_dir, model_dir, backbone_handle)
  records_dir = str(model_dir / options_lib.RECORDS_DIRNAME)   # where bin/train converted
  timings = metrics["timings"]
  backbone_pass = timings["backbone_pass_s"]

  # At the precision the run resolved (bfloat16 where the CPU has it): its cached features.
  backbone = backbone_lib.load_backbone(backbone_handle,
                                        precision=metrics["backbone"]["precision"])
  labels = records.read_labels(records_dir)
  extract = dict(backbone=backbone, records_dir=records_dir, batch_size=32,
                 image_size=backbone.input_size, resize_mode="center_crop",
                 num_classes=len(labels), num_thumbnails_per_class=16)
  train_set = feature_cache.cached_features(split="train", **extract)
  test_set = feature_cache.cached_features(split="validation", **extract)
  assert train_set.from_cache and test_set.from_cache
  x, y = train_set.features, train_set.labels
  test_x, test_y = test_set.features, test_set.labels
  # The fixed-l2 rows use l2=1e-3 (the default before l2 was cross-validated by default).
  defaults = options_lib.TrainOptions(records_dir=records_dir, model_dir="", l2=1e-3)

  print(f"\noxford_flowers12 ({len(y)} train / {len(test_y)} test images, {len(labels)} "
        f"classes), backbone {backbone_handle}, default flags\n")
  print("| head | test accuracy | head training |")
  print("| --- | --- | --- |")
  results = dict(train_images=len(y), test_images=len(test_y), labels=labels,
                 backbone=backbone_handle, default_loss=defaults.loss, heads={})
  for loss in LOSSES:
    accuracy, seconds = fit_head(x, y, test_x, test_y,
                                 dataclasses.replace(defaults, loss=loss), timed=True)
    results["heads"][loss] = dict(accuracy=accuracy, seconds=seconds)
    print(f"| {loss} (tlframe) | {accuracy:.4f} | {seconds * 1000:.0f} ms / {TIMED_EPOCHS} "
          f"epochs ({100 * seconds / backbone_pass:.2f}% of the backbone pass) |")
  svc_accuracy, svc_seconds, svc_c = cross_validated_svc(x, y, test_x, test_y)
  results["heads"]["LinearSVC"] = dict(accuracy=svc_accuracy, seconds=svc_seconds, C=svc_c)
  print(f"| LinearSVC, C={svc_c:g} by 5-fold CV (scikit-learn) | {svc_accuracy:.4f} | "
        f"{svc_seconds * 1000:.0f} ms with the CV |")
  print(f"| bin/train (default flags: {defaults.loss}, end to end) | "
        f"{metrics['validation']['accuracy']:.4f} | "
        f"{timings['head_training_s'] * 1000:.0f} ms incl. tracing, checkpoints, summaries |")
  images = load_images(records_dir, "train", backbone.input_size, train_set.filenames)
  test_images = load_images(records_dir, "validation", backbone.input_size, test_set.filenames)
  keras_accuracy, keras_seconds = keras_tutorial(images, y, test_images, test_y, backbone,
                                                 len(labels))
  print(f"| Keras tutorial: model.fit through the frozen backbone, {KERAS_TUTORIAL_EPOCHS} "
        f"epochs | {keras_accuracy:.4f} | {keras_seconds * 1000:.0f} ms "
        f"({keras_seconds / backbone_pass:.1f}x the backbone pass) |")
  keras_total = t0 + timings["backbone_load_s"] + keras_seconds
  results["bin_train"] = dict(accuracy=metrics["validation"]["accuracy"],
                              confusion_matrix=metrics["validation"]["confusion_matrix"],
                              wall_s=wall, startup_s=t0, backbone_pass_s=backbone_pass,
                              head_training_s=timings["head_training_s"],
                              conversion_s=conversion, export_s=timings.get("export_s", 0.0))
  results["keras_tutorial"] = dict(accuracy=keras_accuracy, fit_s=keras_seconds,
                                   epochs=KERAS_TUTORIAL_EPOCHS, total_s=keras_total)

  print(f"\n| time ({cpu_model()}) | seconds |")
  print("| --- | --- |")
  print(f"| T0: python -c 'import tensorflow' | {t0:.2f} |")
  print(f"| in bin/train: conversion of the photos | {conversion:.2f} |")
  print(f"| in bin/train: backbone load | {timings['backbone_load_s']:.2f} |")
  print(f"| in bin/train: backbone pass ({len(y) + len(test_y)} images) | {backbone_pass:.2f} |")
  print(f"| in bin/train: l2 cross-validation | {timings['cross_validation_s']:.2f} |")
  print(f"| in bin/train: head training | {timings['head_training_s']:.2f} |")
  print(f"| in bin/train: export | {timings.get('export_s', 0.0):.2f} |")
  print(f"| bin/train --image_dir wall, photos to an export | {wall:.2f} |")
  print(f"| wall / (T0 + backbone pass) | {wall / (t0 + backbone_pass):.3f} (target <= 1.3) |")
  print(f"| Keras tutorial to a model (T0 + backbone load + model.fit) | {keras_total:.2f} |")
  print(f"| Keras tutorial / bin/train | {keras_total / wall:.1f}x (target >= 7) |")

  print(f"\nk-shot: k training images per class (same seed for every method), test on all "
        f"{len(test_y)}\n")
  print("| k | hinge | squared_hinge | softmax | LinearSVC | "
        f"{defaults.loss}, l2 cross-validated (best l2) | Keras tutorial |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  results["k_shot"] = []
  for k in K_SHOTS:
    rows = k_shot_rows(y, k)
    kx, ky = x[rows], y[rows]
    row = {loss: fit_head(kx, ky, test_x, test_y, dataclasses.replace(defaults, loss=loss))[0]
           for loss in LOSSES}
    row["LinearSVC"] = cross_validated_svc(kx, ky, test_x, test_y)[0]
    shift, scale = head_lib.normalization_constants(kx, defaults.feature_normalization)
    best_l2, _, _ = tuning.tune_l2(tf.distribute.get_strategy(), defaults, kx, ky, len(labels),
                               shift=shift, scale=scale)
    row["tune_l2"] = fit_head(kx, ky, test_x, test_y, dataclasses.replace(defaults, l2=best_l2))[0]
    row["Keras tutorial"] = (keras_accuracy if k >= len(y) // len(labels) else keras_tutorial(
        images[rows], ky, test_images, test_y, backbone, len(labels))[0])
    cells = [f"{row[name]:.4f}" for name in (*LOSSES, "LinearSVC")]
    cells += [f"{row['tune_l2']:.4f} ({best_l2:g})", f"{row['Keras tutorial']:.4f}"]
    print(f"| {k} | " + " | ".join(cells) + " |", flush=True)
    results["k_shot"].append(dict(k=k, best_l2=best_l2, **row))
  if with_sweep:
    sweep(x, y, test_x, test_y, defaults)
  return results


if __name__ == "__main__":
  main()
