#!/usr/bin/env python3
"""The data checks, measured: suspected label errors and near-duplicate leaks on real photos.

  .venv/bin/python bench/bench_data_checks.py [--data_dir DIR] [--work_dir DIR] [--seeds 3]

On oxford_flowers12 (train: the 720 photos outside TEST_SPLIT.txt; validation:
its 240), with bin/train's default backbone and head:
- Label errors: --flip_percent of the training labels are flipped to another
  class at random (per seed); the cross-validation's out-of-fold scores
  (tuning.tune_head, as bin/train runs it) give the suspected-label list
  (data_checks.suspected_label_errors). Printed: its precision and recall
  against the flipped set at the default threshold and at a few others, and
  a random list of the same length (what a user checking photos at random
  finds).
- Leaks: --leaks training photos, re-encoded as JPEG and resized by 0.9, are
  copied into the test split. Printed: how many of those pairs
  data_checks.near_duplicates reports at its default threshold (and at a few
  others), how many other pairs (false, unless the data set holds real
  duplicates: those are shown), and the similarity of the copies and of the
  closest distinct photos.
The features are cached in $TLFRAME_CACHE_DIR: a rerun on the same
--work_dir skips the backbone pass. Prints the CPU; the numbers do not depend on it.
"""

import argparse
import dataclasses
import os
import pathlib
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# tlframe before tensorflow: importing it sets TensorFlow's oneDNN default (tlframe/__init__.py).
from tlframe.backbone import loading as backbone_lib  # pylint: disable=wrong-import-position
from tlframe.train import data_checks  # pylint: disable=wrong-import-position
from tlframe.train import feature_cache  # pylint: disable=wrong-import-position
from tlframe.train import head as head_lib  # pylint: disable=wrong-import-position
from tlframe import options as options_lib  # pylint: disable=wrong-import-position
from tlframe import records  # pylint: disable=wrong-import-position
from tlframe import samples  # pylint: disable=wrong-import-position
from tlframe.train import tuning  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position
from bench_common import add_data_dir_argument, cpu_model, flowers12_dir  # pylint: disable=wrong-import-position

SUSPECT_THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SIMILARITY_THRESHOLDS = (0.8, 0.85, 0.9, 0.95)


def build_records(flowers_dir, work_dir, num_leaks, seed):
  """Records of flowers12 with `num_leaks` altered training photos in the test split.

  Returns (records dir, {leak file key: its source's key}).
  """
  records_dir = work_dir / "records"
  image_dir = work_dir / "images"
  test_split = (flowers_dir / samples.TEST_SPLIT_FILENAME).read_text().split()
  held_out = set(test_split)
  training = sorted(f"{path.parent.name}/{path.name}" for path in flowers_dir.glob("*/*")
                    if path.suffix.lower() in records.IMAGE_EXTENSIONS)
  training = [key for key in training if key not in held_out]
  sources = np.random.default_rng(seed).choice(training, num_leaks, replace=False)
  leaks = {}
  for key in sorted(sources):
    leaks[f"{os.path.dirname(key)}/leak_{os.path.basename(key)}"] = key
  if not (records_dir / records.MANIFEST_FILENAME).exists():
    for key in training + test_split:
      target = image_dir / key
      target.parent.mkdir(parents=True, exist_ok=True)
      if not target.exists():
        target.symlink_to(flowers_dir / key)
    for leak, key in leaks.items():
      image = tf.io.decode_image(tf.io.read_file(str(flowers_dir / key)), channels=3,
                                 expand_animations=False)
      size = [round(image.shape[0] * 0.9), round(image.shape[1] * 0.9)]
      smaller = tf.cast(tf.round(tf.image.resize(image, size, antialias=True)), tf.uint8)
      tf.io.write_file(str(image_dir / leak), tf.io.encode_jpeg(smaller, quality=85))
    # Inside the image folder: a list's paths are relative to the list.
    (image_dir / "VALIDATION.txt").write_text("\n".join(test_split) + "\n")
    (image_dir / "TEST.txt").write_text("\n".join(leaks) + "\n")
    records.convert(str(records_dir), image_dir=str(image_dir),
                    validation_filelist=str(image_dir / "VALIDATION.txt"),
                    test_filelist=str(image_dir / "TEST.txt"))
  return str(records_dir), leaks


def precision_recall(found, truth):
  found, truth = set(found), set(truth)
  hits = len(found & truth)
  return (hits / len(found) if found else float("nan")), hits / max(1, len(truth))


def bench_label_errors(train, label_names, flip_percent, seeds):
  num_classes = len(label_names)
  options = options_lib.TrainOptions(records_dir="", model_dir="")
  strategy = tf.distribute.get_strategy()
  rows = []
  for seed in range(seeds):
    rng = np.random.default_rng(1000 + seed)
    num_flipped = round(len(train.labels) * flip_percent / 100)
    flipped = rng.choice(len(train.labels), num_flipped, replace=False)
    labels = train.labels.copy()
    labels[flipped] = (labels[flipped] + rng.integers(1, num_classes, num_flipped)) % num_classes
    _, _, _, scores, _ = tuning.tune_head(
        strategy, options, train.features, labels, num_classes,
        normalization_constants=lambda name: head_lib.normalization_constants(train.features,
                                                                              name))
    truth = {str(train.filenames[i]) for i in flipped}
    by_threshold = {}
    for threshold in sorted(set(SUSPECT_THRESHOLDS) |
                            {data_checks.DEFAULT_SUSPECT_CONFIDENCE}):
      suspects = data_checks.suspected_label_errors(scores, labels, train.filenames,
                                                    label_names, threshold=threshold)
      found = [row["file"] for row in suspects]
      random_pick = rng.choice(train.filenames, len(found), replace=False)
      by_threshold[threshold] = (len(found), *precision_recall(found, truth),
                                 *precision_recall([str(f) for f in random_pick], truth))
    # The ranking's quality: of the top len(flipped) (the number a user would check).
    ranked = data_checks.suspected_label_errors(scores, labels, train.filenames, label_names,
                                                threshold=0.0)
    top = [row["file"] for row in ranked[:num_flipped]]
    rows.append(dict(seed=seed, flipped=num_flipped, by_threshold=by_threshold,
                     top_precision=precision_recall(top, truth)[0]))
  print(f"\n## Suspected label errors: {flip_percent:g}% of {len(train.labels)} training labels "
        f"flipped ({rows[0]['flipped']}), {seeds} seeds (mean ± std)\n")
  print("| threshold | listed | precision | recall | random list: precision | recall |")
  print("| --- | --- | --- | --- | --- | --- |")
  for threshold in rows[0]["by_threshold"]:
    values = np.array([row["by_threshold"][threshold] for row in rows], np.float64)
    mark = " (default)" if threshold == data_checks.DEFAULT_SUSPECT_CONFIDENCE else ""
    cells = [f"{np.nanmean(values[:, i]):.2f} ± {np.nanstd(values[:, i]):.2f}"
             for i in range(1, 5)]
    print(f"| {threshold:g}{mark} | {values[:, 0].mean():.1f} | " + " | ".join(cells) + " |")
  top = [row["top_precision"] for row in rows]
  print(f"\nPrecision of the top {rows[0]['flipped']} of the ranking (as many as were flipped): "
        f"{np.mean(top):.2f} ± {np.std(top):.2f} (random: {flip_percent / 100:.2f})")
  return rows


def _small(path):
  image = tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False)
  return tf.image.resize(image, [64, 64], antialias=True).numpy()


def bench_leaks(feature_sets, leaks, image_dir):
  """Leaks reported, and the other pairs: the same picture twice in the data set, or not."""
  splits = {split: ((lambda s=s: [s.features]), s.filenames)
            for split, s in feature_sets.items()}
  centre = feature_sets["train"].features.mean(axis=0)
  lowest = min(SIMILARITY_THRESHOLDS)
  pairs = data_checks.near_duplicates(splits, centre=centre, threshold=lowest - 0.05)
  # Within the data set, the same picture twice: pixels equal within 3 of 255 at 64x64.
  same = {}
  for pair in pairs:
    files = [leaks.get(pair[f"file_{side}"], pair[f"file_{side}"]) for side in "ab"]
    key = (pair["file_a"], pair["file_b"])
    if files[0] == files[1]:
      same[key] = "leak"
    else:
      difference = np.abs(_small(image_dir / files[0]) - _small(image_dir / files[1])).mean()
      same[key] = "duplicate" if difference < 3 else "other"
  print(f"\n## Near-duplicate leaks: {len(leaks)} training photos, re-encoded (JPEG q85) and "
        "resized by 0.9, copied into the test split\n")
  print(f"| threshold | leaks reported (of {len(leaks)}) | pairs of the same picture already "
        "in the data set | other pairs |")
  print("| --- | --- | --- | --- |")
  for threshold in sorted(set(SIMILARITY_THRESHOLDS) |
                          {data_checks.DEFAULT_NEAR_DUPLICATE_SIMILARITY}):
    kinds = [same[(p["file_a"], p["file_b"])] for p in pairs if p["similarity"] >= threshold]
    mark = " (default)" if threshold == data_checks.DEFAULT_NEAR_DUPLICATE_SIMILARITY else ""
    print(f"| {threshold:g}{mark} | {kinds.count('leak')} | {kinds.count('duplicate')} | "
          f"{kinds.count('other')} |")
  leak_similarity = [p["similarity"] for p in pairs if same[(p["file_a"], p["file_b"])] ==
                     "leak"]
  others = [p for p in pairs if same[(p["file_a"], p["file_b"])] == "other"]
  print(f"\nSimilarity of the {len(leaks)} copies to their originals: min "
        f"{min(leak_similarity, default=float('nan')):.3f}, median "
        f"{np.median(leak_similarity) if leak_similarity else float('nan'):.3f} "
        f"({len(leak_similarity)} above {lowest - 0.05:.2f}). The other pairs (look at them: "
        "another shot of the same flower is a near-duplicate too):")
  for pair in (p for p in others if p["similarity"] >= lowest):
    print(f"  {pair['similarity']:.3f}  {pair['split_a']}/{pair['file_a']}  "
          f"{pair['split_b']}/{pair['file_b']}")
  return dict(leak_similarity=leak_similarity, others=others)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_data_dir_argument(parser)
  parser.add_argument("--work_dir", default=None,
                      help="Where images and records go (default: a temp dir, removed); reuse "
                           "it to skip the conversion.")
  parser.add_argument("--seeds", type=int, default=3, help="Random label flips to average.")
  parser.add_argument("--flip_percent", type=float, default=5.0,
                      help="Percent of the training labels flipped.")
  parser.add_argument("--leaks", type=int, default=20,
                      help="Training photos copied (altered) into the test split.")
  args = parser.parse_args()
  flowers_dir = flowers12_dir(args.data_dir)
  print(f"CPU: {cpu_model()}; TensorFlow {tf.__version__}; backbone "
        f"{options_lib.DEFAULT_BACKBONE}; defaults: suspect threshold "
        f"{data_checks.DEFAULT_SUSPECT_CONFIDENCE}, near-duplicate similarity "
        f"{data_checks.DEFAULT_NEAR_DUPLICATE_SIMILARITY}")
  with tempfile.TemporaryDirectory() as tmp:
    work_dir = pathlib.Path(args.work_dir or tmp)
    work_dir.mkdir(parents=True, exist_ok=True)
    records_dir, leaks = build_records(flowers_dir, work_dir, args.leaks, seed=0)
    label_names = records.read_labels(records_dir)
    backbone = backbone_lib.load_backbone(options_lib.DEFAULT_BACKBONE)
    defaults = options_lib.TrainOptions(records_dir="", model_dir="")
    feature_sets = {
        split: feature_cache.cached_features(
            backbone, records_dir, split, batch_size=32, image_size=backbone.input_size,
            resize_mode=defaults.resize_mode, num_classes=len(label_names))
        for split in records.SPLITS}
    train = feature_sets["train"]
    print(f"{len(train.labels)} training, {len(feature_sets['validation'].labels)} validation, "
          f"{len(feature_sets['test'].labels)} test photos; {len(label_names)} classes")
    bench_leaks(feature_sets, leaks, work_dir / "images")
    bench_label_errors(dataclasses.replace(train), label_names, args.flip_percent, args.seeds)


if __name__ == "__main__":
  main()
