#!/usr/bin/env python3
"""The small-data path's fixed costs: a few photos per class to an exported model, in seconds.

  .venv/bin/python bench/bench_small.py [--data_dir DIR] [--seeds 3] [--classes 2,5]

On subsets of oxford_flowers12 (--classes classes drawn by seed, --per_class
training photos and --validation_per_class validation photos of each, drawn by
seed), measures in one run:
- T0: `python -c "import tensorflow"`, the floor of any run in a fresh process
  (the median of three);
- cold: `bin/train --image_dir` from the photos to an exported model, with an
  empty $TLFRAME_CACHE_DIR (the built-in backbone is built from its wheel);
- warm: the same into a new model dir, the built-in already built (the features
  not cached: the backbone pass runs), the first model of its export graph:
  the graph is traced in a thread while the run trains, kept as the graph's
  template (tlframe/export/templates.py), and the export written from it;
- next: the same again into another new model dir: a later model of the same
  backbone and class count, whose export is written from the template the warm
  run kept (nothing traced);
- rerun: the same command on the finished warm model dir (nothing to do: it
  must write nothing, checked);
each with its stages from metrics.json (conversion, backbone load or build,
backbone pass, cross-validation, head, calibration, export; "rest" is process
start-up, imports and exit). Targets, as differences to T0 measured in the same
run: warm (and next) <= T0 + 3 s, cold <= T0 + 10 s, rerun <= T0 + 1 s, export <= 1.5 s.
Timings depend on whatever else runs on the machine: compare within one run.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_common import add_data_dir_argument, conversion_seconds, cpu_model, flowers12_dir, import_seconds  # pylint: disable=wrong-import-position

TRAIN = REPO / "bin" / "train"
STAGES = (("conversion", "conversion_s"), ("load", "backbone_load_s"),
          ("pass", "backbone_pass_s"), ("CV", "cross_validation_s"),
          ("head", "head_training_s"), ("calib.", "calibration_s"), ("export", "export_s"))


def photo_subset(flowers_dir, work_dir, num_classes, per_class, validation_per_class, seed):
  """(image dir of symlinked photos, validation filelist) of a random class and photo subset."""
  rng = np.random.default_rng(seed)
  classes = sorted(path.name for path in flowers_dir.iterdir() if path.is_dir())
  chosen = sorted(rng.choice(classes, num_classes, replace=False))
  image_dir = work_dir / f"photos-{num_classes}c-seed{seed}"
  validation = []
  for name in chosen:
    photos = sorted((flowers_dir / name).glob("*.jpg"))
    picked = [photos[i] for i in rng.permutation(len(photos))[:per_class + validation_per_class]]
    (image_dir / name).mkdir(parents=True)
    for index, photo in enumerate(picked):
      (image_dir / name / photo.name).symlink_to(photo)
      if index >= per_class:
        validation.append(f"{image_dir.name}/{name}/{photo.name},{name}")  # relative to the list
  filelist = work_dir / f"validation-{num_classes}c-seed{seed}.csv"
  filelist.write_text("\n".join(validation) + "\n")
  return image_dir, filelist


def snapshot(directory):
  return {str(path): (path.stat().st_size, path.stat().st_mtime_ns)
          for path in sorted(directory.rglob("*")) if path.is_file()}


def run_train(image_dir, filelist, model_dir, cache_dir):
  """(wall seconds, stages dict, stdout) of one bin/train process."""
  env = dict(os.environ, TLFRAME_CACHE_DIR=str(cache_dir),
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  command = [sys.executable, str(TRAIN), f"--image_dir={image_dir}",
             f"--validation_filelist={filelist}", "--test_percentage=0",
             f"--model_dir={model_dir}"]
  start = time.monotonic()
  result = subprocess.run(command, env=env, capture_output=True, text=True)
  wall = time.monotonic() - start
  if result.returncode:
    sys.exit(f"bin/train failed:\n{result.stderr[-3000:]}")
  metrics = json.loads((model_dir / "metrics.json").read_text())
  stages = {name: metrics["timings"].get(key, 0.0) for name, key in STAGES}
  stages["conversion"] = conversion_seconds(result.stdout)
  if "is up to date" in result.stdout:
    stages = {name: 0.0 for name, _ in STAGES}
  return wall, stages, result.stdout


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_data_dir_argument(parser)
  parser.add_argument("--work_dir", default=None, help="Default: a temp dir, removed.")
  parser.add_argument("--seeds", type=int, default=3, help="Random subsets per class count.")
  parser.add_argument("--classes", default="2,5", help="Comma-separated class counts.")
  parser.add_argument("--per_class", type=int, default=10, help="Training photos per class.")
  parser.add_argument("--validation_per_class", type=int, default=4,
                      help="Validation photos per class (the calibration's held-out set).")
  args = parser.parse_args()
  flowers_dir = flowers12_dir(args.data_dir)
  with tempfile.TemporaryDirectory() as tmp:
    work_dir = pathlib.Path(args.work_dir or tmp)
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_model()}; load average {os.getloadavg()[0]:.1f} at start")
    t0 = import_seconds()
    print(f"T0 (python -c 'import tensorflow'): {t0:.1f} s\n")
    header = ("| classes | seed | run | wall s | - T0 | "
              + " | ".join(name for name, _ in STAGES) + " | rest | files written |")
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    summary = {}
    for num_classes in (int(c) for c in args.classes.split(",")):
      for seed in range(args.seeds):
        image_dir, filelist = photo_subset(flowers_dir, work_dir, num_classes, args.per_class,
                                           args.validation_per_class, seed)
        cold_cache = work_dir / f"cache-cold-{num_classes}c-{seed}"
        warm_cache = work_dir / f"cache-warm-{num_classes}c-{seed}"
        runs = [("cold", work_dir / f"model-cold-{num_classes}c-{seed}", cold_cache),
                ("warm", work_dir / f"model-warm-{num_classes}c-{seed}", warm_cache),
                ("next", work_dir / f"model-next-{num_classes}c-{seed}", warm_cache),
                ("rerun", work_dir / f"model-warm-{num_classes}c-{seed}", warm_cache)]
        for name, model_dir, cache_dir in runs:
          if name == "warm":   # the built backbone of the cold run; no cached features
            warm_cache.mkdir()
            (warm_cache / "backbones").symlink_to(cold_cache / "backbones")
          before = snapshot(model_dir) if model_dir.exists() else {}
          wall, stages, _ = run_train(image_dir, filelist, model_dir, cache_dir)
          written = sum(1 for path, stamp in snapshot(model_dir).items()
                        if before.get(path) != stamp)
          rest = wall - sum(stages.values())
          summary.setdefault((num_classes, name), []).append(
              (wall - t0, stages["export"], written))
          print(f"| {num_classes} | {seed} | {name} | {wall:.1f} | {wall - t0:+.1f} | "
                + " | ".join(f"{stages[stage]:.2f}" for stage, _ in STAGES)
                + f" | {rest:.1f} | {written} |", flush=True)
    targets = {"cold": 10.0, "warm": 3.0, "next": 3.0, "rerun": 1.0}
    print("\nMedians over seeds (wall - T0; target; export s, target 1.5; files written):")
    for (num_classes, name), values in summary.items():
      over = statistics.median(v[0] for v in values)
      export = statistics.median(v[1] for v in values)
      print(f"  {num_classes} classes, {name:>5}: T0 {over:+.1f} s (target +{targets[name]:g}: "
            f"{'met' if over <= targets[name] else 'MISSED'}); export {export:.2f} s; "
            f"files written {max(v[2] for v in values)}")


if __name__ == "__main__":
  main()
