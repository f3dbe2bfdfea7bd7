#!/usr/bin/env python3
"""The defaults, chosen by measurement: each backbone and option against a cross-validated LinearSVC.

  .venv/bin/python bench/bench_defaults.py [--data_dir DIR] [--work_dir DIR] [--seeds 3]

For each data set and each feature option (backbone, resize mode, flip
features), one backbone pass over train and test, then for k = 5, 10, 20
training images per class (and all of them) over --seeds random subsets:
- tlframe's default head on those features (softmax, l2 and the feature
  normalization cross-validated by tuning.tune_head, as bin/train does; with
  flip features, trained on both views and scored by their average), and the
  same with each other loss in --losses, and
- scikit-learn's LinearSVC with C cross-validated (GridSearchCV, stratified
  folds over C = 1e-5..0.1) on the same features: the classic baseline.
--precision=bfloat16 runs the backbones in bfloat16, for the accuracy of
bfloat16 features (emulated where the CPU lacks it: the same numbers, slowly).
Prints test accuracy (mean over seeds, and its spread), seconds of each, and
the backbone pass's images/s (taken under whatever else runs on the machine:
compare rates within one run).

Then, per data set and k, what `--backbone=auto` (tlframe/train/backbone_choice.py,
bin/train's default) would choose for records of those training images plus
the test split, at this machine's cached images/s and --backbone_budget_s,
against every backbone run: test accuracy (mean ± standard deviation over the
subsets) and seconds (the backbone pass over those images at this run's rate,
plus the head's training).

Data sets: oxford_flowers12 (its TEST_SPLIT.txt is the test split; 60 train
images per class) and scikit-image's LFW subset (100 face / 100 not-face
photos, 25x25 grayscale, half held out by file-name hash), a second real set
of another kind: 2 classes, tiny low-resolution images.
Needs the bench extras (`pip install -e .[bench]`: scikit-learn, scikit-image).
"""

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# tlframe before tensorflow: importing it sets TensorFlow's oneDNN default (tlframe/__init__.py).
from tlframe.backbone import loading as backbone_lib  # pylint: disable=wrong-import-position
from tlframe.train import backbone_choice  # pylint: disable=wrong-import-position
from tlframe.train import feature_cache  # pylint: disable=wrong-import-position
from tlframe.train import features as features_lib  # pylint: disable=wrong-import-position
from tlframe.train import head as head_lib  # pylint: disable=wrong-import-position
from tlframe import options as options_lib  # pylint: disable=wrong-import-position
from tlframe import records  # pylint: disable=wrong-import-position
from tlframe import samples  # pylint: disable=wrong-import-position
from tlframe.train import trainer as trainer_lib  # pylint: disable=wrong-import-position
from tlframe.train import tuning  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position
from bench_common import add_data_dir_argument, cpu_model, k_shot_rows  # pylint: disable=wrong-import-position
from svc_baseline import cross_validated_svc  # pylint: disable=wrong-import-position

K_SHOTS = "1,5,10,20,all"   # training images per class; all: every one
MOBILENET, LITE0 = "mobilenet_v2_100_224", "efficientnet_lite0"
# (backbone, resize mode, flip features): every built-in at the default crop,
# the concatenation of the two fastest, then the crop and flip options.
FEATURE_OPTIONS = (
    (MOBILENET, "center_crop", False),
    (LITE0, "center_crop", False),
    ("efficientnet_lite1", "center_crop", False),
    ("efficientnet_lite2", "center_crop", False),
    (f"{MOBILENET},{LITE0}", "center_crop", False),
    (LITE0, "imagenet_crop", False),
    (LITE0, "letterbox", False),
    (LITE0, "center_crop", True),
)


def flowers12_records(data_dir, work_dir):
  flowers_dir = pathlib.Path(data_dir) / "oxford_flowers12"
  if not flowers_dir.is_dir():
    return None
  records_dir = work_dir / "flowers12-records"
  if not (records_dir / records.MANIFEST_FILENAME).exists():
    samples.make_flowers12_records(flowers_dir, records_dir)
  return str(records_dir)


def lfw_records(work_dir):
  """scikit-image's LFW subset as records: face / not_face, half of each held out."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  records_dir = work_dir / "lfw-records"
  if (records_dir / records.MANIFEST_FILENAME).exists():
    return str(records_dir)
  images = skimage.data.lfw_subset()   # [200, 25, 25] float in [0, 1]: 100 faces, then 100 not
  image_dir = work_dir / "lfw-images"
  for index, image in enumerate(images):
    label = "face" if index < 100 else "not_face"
    (image_dir / label).mkdir(parents=True, exist_ok=True)
    png = tf.io.encode_png(tf.cast(tf.round(image[..., None] * 255), tf.uint8))
    tf.io.write_file(str(image_dir / label / f"{index:03d}.png"), png)
  records.convert(str(records_dir), image_dir=str(image_dir), validation_percentage=50,
                  test_percentage=0)
  return str(records_dir)


def feature_sets(records_dir, backbone, resize_mode, flip):
  """(train, test FeatureSet, images/s of the pass or None when both came from the cache)."""
  extract = dict(backbone=backbone, records_dir=records_dir, batch_size=32,
                 image_size=backbone.input_size, resize_mode=resize_mode,
                 num_classes=len(records.read_labels(records_dir)), flip=flip)
  train = feature_cache.cached_features(split="train", **extract)
  test = feature_cache.cached_features(split="validation", **extract)
  if train.from_cache or test.from_cache:
    return train, test, None
  images = (len(train.labels) + len(test.labels)) * (2 if flip else 1)
  return train, test, images / (train.extract_seconds + test.extract_seconds)


def option_features(records_dir, handle, resize_mode, flip, precision, rates):
  """(train, test FeatureSet, images/s or None, the backbone's precision) of one feature option.

  A concatenation whose parts take the same input size is assembled from its
  parts' features, side by side, as ConcatenatedModule computes them (each
  part on the same images): its rows reuse the parts' cached passes, and its
  images/s is the parts' combined rate. `rates`: (handle, resize mode, flip)
  -> images/s of the passes run so far in this bench run, updated here.
  """
  backbones = [backbone_lib.load_backbone(part, precision=precision)
               for part in backbone_choice.parts(handle)]
  if len({backbone.input_size for backbone in backbones}) > 1:
    backbones = [backbone_lib.load_backbone(handle, precision=precision)]
  sets = []
  for backbone in backbones:
    train, test, rate = feature_sets(records_dir, backbone, resize_mode, flip)
    key = (backbone.handle, resize_mode, flip)
    rates[key] = rate or rates.get(key)
    sets.append((train, test, rates[key], backbone.precision))
  if len(sets) == 1:
    return sets[0]

  def side_by_side(split, name):
    views = [getattr(parts[split], name) for parts in sets]
    return None if views[0] is None else np.concatenate(views, axis=1)

  train, test = (dataclasses.replace(sets[0][split], features=side_by_side(split, "features"),
                                     flipped_features=side_by_side(split, "flipped_features"))
                 for split in (0, 1))
  part_rates = [parts[2] for parts in sets]
  rate = None if None in part_rates else backbone_choice.concatenation_rate(part_rates)
  return train, test, rate, "bfloat16" if "bfloat16" in [parts[3] for parts in sets] else "float32"


def default_head(train, rows, test, num_classes, loss):
  """(test accuracy, seconds, "l2 normalization" chosen) of bin/train's default head on `rows`.

  With `loss` instead of the default's softmax, all else as bin/train does it.
  """
  start = time.monotonic()
  subset = dataclasses.replace(
      train, features=train.features[rows], labels=train.labels[rows],
      flipped_features=None if train.flipped_features is None else train.flipped_features[rows])
  options = options_lib.TrainOptions(records_dir="", model_dir="", loss=loss)
  strategy = tf.distribute.get_strategy()
  x, y = subset.training_examples()
  normalization, l2, _, _, _ = tuning.tune_head(
      strategy, options, subset.features, subset.labels, num_classes,
      normalization_constants=lambda name: head_lib.normalization_constants(x, name))
  options = dataclasses.replace(options, l2=l2, feature_normalization=normalization)
  shift, scale = head_lib.normalization_constants(x, normalization)
  batch = trainer_lib.effective_batch_size(options, len(y), 1)
  trainer = trainer_lib.HeadTrainer(
      strategy, options, num_features=x.shape[1], num_classes=num_classes,
      steps_per_epoch=len(y) // batch, global_batch_size=batch, normalization=(shift, scale))
  weights = np.ones([1, len(y)], np.float32)
  normalized = trainer.normalize(x)
  trainer.fit(lambda first: trainer_lib.feature_batches(strategy, normalized, y, weights, batch,
                                                        options.seed, first, options.epochs))
  scores = features_lib.average_flip_scores(
      lambda f: trainer.evaluate(tf.constant(f), tf.constant(test.labels))[2][0].numpy(), test)
  accuracy = float(np.mean(np.argmax(scores, axis=1) == test.labels))
  return accuracy, time.monotonic() - start, f"{l2:g} {normalization[:4]}"


def spread(values):
  return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def bench_set(name, records_dir, seeds, option_list, losses, precision, k_shots):
  labels = records.read_labels(records_dir)
  print(f"\n## {name}: {len(labels)} classes\n")
  print("| backbone | resize | flip | images/s | k | loss | tlframe default (%) | "
        "l2, normalization chosen | LinearSVC, C CV'd (%) | C chosen | head s | SVC s |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  results, rates = [], {}
  for handle, resize_mode, flip in option_list:
    train, test, rate, backbone_precision = option_features(records_dir, handle, resize_mode,
                                                            flip, precision, rates)
    per_class = np.bincount(train.labels).min()
    for k in k_shots:
      if k is not None and k >= per_class:
        continue
      if k is not None and k * len(labels) < options_lib.TrainOptions.cv_folds:
        print(f"(k={k}: {k * len(labels)} training images, fewer than the cross-validation's "
              "folds: skipped)")
        continue
      subsets = [k_shot_rows(train.labels, k, seed) for seed in range(seeds if k else 1)]
      svc_runs = [cross_validated_svc(train.features[rows], train.labels[rows], test.features,
                                      test.labels) for rows in subsets]
      svc = [run[0] for run in svc_runs]
      for loss in losses:
        runs = [default_head(train, rows, test, len(labels), loss) for rows in subsets]
        ours = [run[0] for run in runs]
        row = dict(data=name, backbone=handle, precision=backbone_precision,
                   num_classes=len(labels), num_test=len(test.labels),
                   resize_mode=resize_mode, flip=flip,
                   images_per_second=rate, k=k or int(per_class), loss=loss, tlframe=ours,
                   svc=svc, l2=[run[2] for run in runs], svc_c=[run[2] for run in svc_runs],
                   head_seconds=float(np.mean([run[1] for run in runs])),
                   svc_seconds=float(np.mean([run[1] for run in svc_runs])))
        results.append(row)
        print(f"| {handle} | {resize_mode} | {'yes' if flip else 'no'} | "
              f"{'cached' if rate is None else f'{rate:.0f}'} | {row['k']} | {loss} | "
              f"{spread(ours)} | {', '.join(row['l2'])} | {spread(svc)} | "
              f"{' '.join(f'{v:g}' for v in row['svc_c'])} | {row['head_seconds']:.1f} | "
              f"{row['svc_seconds']:.1f} |", flush=True)
  return results


def auto_table(results, budget_s, precision):
  """Per data set and k: bin/train's auto choice against every backbone run, accuracy and seconds."""
  speeds = backbone_choice.machine_speeds(precision)
  runs = [row for row in results if row["resize_mode"] == "center_crop" and not row["flip"]
          and row["loss"] == "softmax"]
  handles = list(dict.fromkeys(row["backbone"] for row in runs))
  print(f"\n## --backbone=auto (budget {budget_s:g} s; images/s cached for {speeds.key}) "
        "against each backbone: test accuracy %, mean ± std over the subsets (seconds: pass over "
        "train + test at this run's rate, plus the head)\n")
  print("| data | k | images | auto choice | auto % | " + " | ".join(handles) + " |")
  print("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in handles) + " |")
  for data in dict.fromkeys(row["data"] for row in runs):
    for k in dict.fromkeys(row["k"] for row in runs if row["data"] == data):
      by_handle = {row["backbone"]: row for row in runs if row["data"] == data and row["k"] == k}
      any_row = next(iter(by_handle.values()))
      images = any_row["num_classes"] * k + any_row["num_test"]
      choice = backbone_choice.choose(images, budget_s, speeds, smallest_class=k)
      chosen = by_handle.get(choice.backbone)
      auto = "not run" if chosen is None else spread(chosen["tlframe"])
      cells = []
      for handle in handles:
        row = by_handle.get(handle)
        if row is None:
          cells.append("-")
          continue
        seconds = (f"{images / row['images_per_second'] + row['head_seconds']:.0f} s"
                   if row["images_per_second"] else "cached")
        cells.append(f"{spread(row['tlframe'])} ({seconds})")
      estimate = (f"~{choice.estimated_pass_s:.0f} s" if choice.estimated_pass_s is not None
                  else "the only candidate")
      print(f"| {data} | {k} | {images} | {choice.backbone} ({estimate}) | "
            f"{auto} | "
            + " | ".join(cells) + " |", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_data_dir_argument(parser)
  parser.add_argument("--work_dir", default=None,
                      help="Where records go (default: a temp dir, removed). The features are "
                           "cached in $TLFRAME_CACHE_DIR, so a rerun on the same work dir "
                           "skips the backbone passes.")
  parser.add_argument("--seeds", type=int, default=3,
                      help="Random k-shot subsets per k (all images: one run).")
  parser.add_argument("--k_shots", default=K_SHOTS,
                      help="Comma-separated training images per class to subsample (all: every "
                           "one); those not below the smallest class are skipped.")
  parser.add_argument("--only", default=None,
                      help="Comma-separated indices into the option list, to rerun a few.")
  parser.add_argument("--losses", default="softmax",
                      help="Comma-separated head losses to run (bin/train's default: softmax; "
                           "also hinge, squared_hinge), each with l2 and the normalization "
                           "cross-validated.")
  parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                      help="The backbones' precision (bfloat16 runs emulated, slowly, on a CPU "
                           "without native bfloat16: the numbers are the same, the speed not).")
  parser.add_argument("--datasets", default="oxford_flowers12,lfw",
                      help="Comma-separated: oxford_flowers12, lfw.")
  parser.add_argument("--json_out", default=None, help="Also write the rows to this JSON file.")
  parser.add_argument("--backbone_budget_s", type=float,
                      default=options_lib.DEFAULT_BACKBONE_BUDGET_S,
                      help="The budget of the --backbone=auto table (bin/train's default).")
  parser.add_argument("--auto_table_from", default=None,
                      help="Comma-separated --json_out files of earlier runs: print only the "
                           "--backbone=auto table of their rows together.")
  args = parser.parse_args()
  if args.auto_table_from:
    rows = [row for path in args.auto_table_from.split(",")
            for row in json.load(open(path))["rows"]]
    auto_table(rows, args.backbone_budget_s, args.precision)
    return
  option_list = FEATURE_OPTIONS if args.only is None else [
      FEATURE_OPTIONS[int(i)] for i in args.only.split(",")]
  losses = args.losses.split(",")
  k_shots = [None if k == "all" else int(k) for k in args.k_shots.split(",")]
  unknown = sorted(set(losses) - set(options_lib.LOSSES))
  if unknown:
    parser.error(f"--losses: {', '.join(unknown)} not in {', '.join(options_lib.LOSSES)}")
  print(f"CPU: {cpu_model()}; TensorFlow {tf.__version__}; {args.precision} backbones")
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    work_dir = pathlib.Path(args.work_dir or tmp)
    work_dir.mkdir(parents=True, exist_ok=True)
    datasets = args.datasets.split(",")
    flowers = flowers12_records(args.data_dir, work_dir)
    if "oxford_flowers12" in datasets and flowers is None:
      print(f"(oxford_flowers12 not found under {args.data_dir}: skipped)")
    elif "oxford_flowers12" in datasets:
      results += bench_set("oxford_flowers12", flowers, args.seeds, option_list, losses,
                           args.precision, k_shots)
    if "lfw" in datasets:
      results += bench_set("LFW subset (face / not face)", lfw_records(work_dir), args.seeds,
                           option_list, losses, args.precision, k_shots)
  auto_table(results, args.backbone_budget_s, args.precision)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(dict(rows=results, cpu=cpu_model(), date=datetime.date.today().isoformat(),
                     command=" ".join(["bench/bench_defaults.py"] + sys.argv[1:])), f, indent=2)
    print(f"\nWrote {args.json_out}")


if __name__ == "__main__":
  main()
