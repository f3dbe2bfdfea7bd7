#!/usr/bin/env python3
"""Fine-tuning against the linear head alone on oxford_flowers12: test accuracy, wall time, images/s.

  .venv/bin/python bench/bench_finetune.py [--fine_tune_epochs=3] [--blocks=1,3,all]

Records: oxford_flowers12's TEST_SPLIT.txt (240) is the test split, reported
only; of the other 720, --validation_percentage (by hash) is the validation
split that fine-tuning's early stopping and best epoch are chosen on, the rest
trains. Rows, one run each through `train.train` (bin/train's library call):
1. the linear head alone (bin/train's defaults: l2 cross-validated, cached
   features; the first run does the backbone pass);
2. --fine_tune with --fine_tune_blocks=K for each K of --blocks, the other
   fine-tuning flags at their defaults but --fine_tune_epochs (the head stage
   reuses the cached features).
For each: test accuracy, wall time, and for fine-tuning the training images/s
through the backbone (forward + backward of the top K blocks; augmentation
included) against its forward-only evaluation rate. Everything runs on this
machine's CPUs (fine-tuning is meant for GPUs or much more data; see
docs/training.md). --data_dir or $TLFRAME_DATA_DIR (default ../shared/data)
holds oxford_flowers12/.
"""

import os
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
from tlframe import records  # pylint: disable=g-import-not-at-top
from tlframe import samples  # pylint: disable=g-import-not-at-top
from tlframe import train  # pylint: disable=g-import-not-at-top
from bench_common import cpu_model  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", samples.benchmark_data_dir(), "Folder holding oxford_flowers12/.")
flags.DEFINE_list("blocks", ["1", "3", "all"], "The --fine_tune_blocks values to run.")
flags.DEFINE_integer("fine_tune_epochs", 3, "--fine_tune_epochs of each fine-tuning run.")
flags.DEFINE_float("validation_percentage", 15.0,
                   "Share of the 720 non-test images held out for early stopping.")
flags.DEFINE_string("precision", "auto", "bin/train's --precision.")


def build_records(flowers_dir, records_dir):
  records.convert(str(records_dir), image_dir=str(flowers_dir),
                  test_filelist=os.path.join(flowers_dir, samples.TEST_SPLIT_FILENAME),
                  validation_percentage=FLAGS.validation_percentage)
  return str(records_dir)


def run(records_dir, model_dir, **options):
  start = time.monotonic()
  metrics = train.train(train.TrainOptions(records_dir=records_dir, model_dir=str(model_dir),
                                           precision=FLAGS.precision, export=False, **options))
  return metrics, time.monotonic() - start


def _rate(value):
  return "n/a" if value is None else f"{value:.1f}"  # None: a single (traced) step


def _ratio(train_rate, eval_rate):
  return "n/a" if train_rate is None or not eval_rate else f"{train_rate / eval_rate:.2f}x"


def main(argv):
  del argv  # unused
  print(f"CPU: {cpu_model()}", flush=True)
  flowers_dir = pathlib.Path(FLAGS.data_dir) / "oxford_flowers12"
  if not flowers_dir.is_dir():
    sys.exit(f"{flowers_dir} not found: run bench/get_data or set --data_dir")
  logging.set_verbosity(logging.WARNING)
  work_dir = pathlib.Path(tempfile.mkdtemp(prefix="bench_finetune_"))
  try:
    records_dir = build_records(flowers_dir, work_dir / "records")
    counts = {split: records.count_examples(records_dir, split) for split in records.SPLITS}
    print(f"oxford_flowers12: {counts['train']} train, {counts['validation']} validation "
          f"(early stopping), {counts['test']} test images; --fine_tune_epochs="
          f"{FLAGS.fine_tune_epochs}, precision {FLAGS.precision}", flush=True)
    rows = []
    metrics, seconds = run(records_dir, work_dir / "linear")
    rows.append(("linear head alone", metrics, seconds))
    print(f"  linear head: test {metrics['test']['accuracy']:.4f}, {seconds:.0f} s "
          f"(backbone pass {metrics['timings']['backbone_pass_s']:.0f} s)", flush=True)
    for blocks in FLAGS.blocks:
      metrics, seconds = run(records_dir, work_dir / f"fine_tune_{blocks}", fine_tune=True,
                             fine_tune_blocks=blocks, fine_tune_epochs=FLAGS.fine_tune_epochs)
      rows.append((f"fine-tuned, K={blocks}", metrics, seconds))
      print(f"  K={blocks}: test {metrics['test']['accuracy']:.4f}, {seconds:.0f} s", flush=True)

    print(f"\nCPU: {cpu_model()}; backbone {rows[0][1]['backbone']['handle']} "
          f"({rows[0][1]['backbone']['precision']})\n")
    print("| run | test accuracy | validation loss (head alone -> kept) | kept epoch | "
          "wall time (s) | train images/s (fwd+bwd) | eval images/s (fwd) | ratio |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, metrics, seconds in rows:
      tuned = metrics["fine_tune"]
      if tuned is None:
        print(f"| {name} | {metrics['test']['accuracy']:.4f} | | | {seconds:.0f} | | | |")
        continue
      train_rate, eval_rate = tuned["train_images_per_s"], tuned["eval_images_per_s"]
      print(f"| {name} ({tuned['num_parameters']:,} parameters) | "
            f"{metrics['test']['accuracy']:.4f} | {tuned['linear_probe_validation_loss']:.4f} -> "
            f"{tuned['best_validation_loss']:.4f} | {tuned['best_epoch']} of "
            f"{tuned['epochs_completed']} | {seconds:.0f} | {_rate(train_rate)} | "
            f"{_rate(eval_rate)} | {_ratio(train_rate, eval_rate)} |")
    print("\nkept epoch 0 = fine-tuning never lowered the validation loss: the model is the "
          "head alone (on the fine-tuned run's own head stage).")
  finally:
    shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
