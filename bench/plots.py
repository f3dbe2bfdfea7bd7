#!/usr/bin/env python3
"""The README's pictures, drawn from the numbers bench/bench_train.py wrote.

  .venv/bin/python bench/bench_train.py --json_out=docs/bench_train.json   # ~10 min on 2 cores
  .venv/bin/python bench/plots.py                                          # docs/*.png

Writes into --output_dir:
- kshot_accuracy.png: oxford_flowers12 test accuracy against training images
  per class (log axis) for tlframe's default head, scikit-learn's LinearSVC on
  the same features and the Keras tutorial's model.fit through the backbone;
- time_to_model.png: seconds from the command to a trained model, tlframe's
  bin/train against the Keras tutorial's way, split into where they go;
- flowers12_confusion.png: the confusion matrix of that bin/train run on the
  data set's 240 test photos.
Each names the CPU, the date and the command of the run it shows. Needs the
bench extras (`pip install -e .[bench]`: matplotlib).
"""

import argparse
import json
import os
import textwrap

import matplotlib
matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
DPI = 100
COLOURS = {"tlframe": "#1f5fa8", "LinearSVC": "#e08a1e", "Keras tutorial": "#7a7a7a"}


def caption(figure, results):
  """The run's machine, date and command along the picture's bottom edge (wrapped to fit)."""
  text = f"{results['cpu']} · {results['date']} · {results['command']}"
  figure.text(0.01, 0.012, textwrap.fill(text, int(figure.get_figwidth() * 17)),
              fontsize=7, color="#555555", ha="left", va="bottom")


def kshot_accuracy(results, path):
  rows = results["k_shot"]
  ks = [row["k"] for row in rows]
  figure, axes = plt.subplots(figsize=(7, 4.4))
  lines = [("tlframe", "tune_l2",
            f"tlframe default head ({results['default_loss']}, l2 cross-validated)"),
           ("LinearSVC", "LinearSVC", "scikit-learn LinearSVC (C cross-validated), same features"),
           ("Keras tutorial", "Keras tutorial",
            "Keras tutorial: model.fit through the frozen backbone, 10 epochs")]
  for colour, key, label in lines:
    accuracy = [100 * row[key] for row in rows]
    axes.plot(ks, accuracy, "o-", color=COLOURS[colour], label=label, linewidth=2)
  axes.set_xscale("log")
  axes.set_xticks(ks)
  axes.set_xticklabels([str(k) for k in ks])
  axes.minorticks_off()
  axes.set_xlabel("training images per class")
  axes.set_ylabel("test accuracy (%), 240 photos")
  axes.set_title(f"oxford_flowers12, 12 classes: accuracy from k photos per class "
                 f"({results['backbone']})", fontsize=10)
  axes.grid(True, alpha=0.3)
  axes.legend(loc="lower right", fontsize=8)
  figure.tight_layout(rect=(0, 0.04, 1, 1))
  caption(figure, results)
  figure.savefig(path, dpi=DPI)
  plt.close(figure)


def time_to_model(results, path):
  run, keras = results["bin_train"], results["keras_tutorial"]
  # Runs from the photos (bench_train since the one-command path) also time the
  # conversion and the export; earlier runs from records had neither.
  conversion, export = run.get("conversion_s", 0.0), run.get("export_s", 0.0)
  other = max(0.0, run["wall_s"] - run["startup_s"] - run["backbone_pass_s"]
              - run["head_training_s"] - conversion - export)
  train_images, test_images = results["train_images"], results["test_images"]
  ours = [("start-up", run["startup_s"], "#b9c9de")]
  if conversion:
    ours.append(("photos to records", conversion, "#c7c7c7"))
  ours += [(f"backbone pass, once ({train_images + test_images} images)", run["backbone_pass_s"],
            COLOURS["tlframe"]),
           ("head: 100 epochs", run["head_training_s"], "#2ca02c")]
  if export:
    ours.append(("export (SavedModel)", export, "#ff9896"))
  ours.append(("l2 cross-validation, summaries, files" if conversion else
               "summaries, checkpoints, files", other, "#9edae5"))
  bars = [
      (f"tlframe bin/train\n{100 * run['accuracy']:.1f}% test accuracy", ours),
      (f"Keras tutorial\n{100 * keras['accuracy']:.1f}% test accuracy",
       [("start-up", run["startup_s"], "#b9c9de"),
        (f"model.fit: {keras['epochs']} epochs through the backbone "
         f"({keras['epochs']} x {train_images} images)", keras["fit_s"],
         COLOURS["Keras tutorial"])]),
  ]
  figure, axes = plt.subplots(figsize=(7, 4.0))
  labelled = set()
  for y, (name, parts) in enumerate(bars):
    left = 0.0
    for label, seconds, colour in parts:
      axes.barh(y, seconds, left=left, color=colour, edgecolor="white",
                label=None if label in labelled else label)
      labelled.add(label)
      left += seconds
    axes.text(left, y, f"  {left:.0f} s", va="center", fontsize=9)
  axes.set_yticks(range(len(bars)))
  axes.set_yticklabels([name for name, _ in bars], fontsize=9)
  axes.invert_yaxis()
  axes.set_xlabel("seconds from the command to a trained model")
  axes.set_xlim(0, 1.15 * max(sum(p[1] for p in parts) for _, parts in bars))
  axes.set_title(f"oxford_flowers12: time to a model, same machine, same "
                 f"{train_images} training photos", fontsize=10)
  figure.tight_layout(rect=(0, 0.22, 1, 1))
  figure.legend(fontsize=7, loc="lower center", ncol=2, bbox_to_anchor=(0.5, 0.05), frameon=False)
  caption(figure, results)
  figure.savefig(path, dpi=DPI)
  plt.close(figure)


def confusion_matrix(results, path):
  run = results["bin_train"]
  counts = np.asarray(run["confusion_matrix"])
  labels = results["labels"]
  fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  figure, axes = plt.subplots(figsize=(6.4, 6.0))
  axes.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
  for (row, column), count in np.ndenumerate(counts):
    if count:
      axes.text(column, row, str(count), ha="center", va="center", fontsize=8,
                color="white" if fractions[row, column] > 0.5 else "black")
  axes.set_xticks(range(len(labels)))
  axes.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
  axes.set_yticks(range(len(labels)))
  axes.set_yticklabels(labels, fontsize=8)
  axes.set_xlabel("predicted")
  axes.set_ylabel("true class")
  axes.set_title(f"oxford_flowers12 test photos ({counts.sum()}): bin/train default flags, "
                 f"{100 * run['accuracy']:.1f}%", fontsize=10)
  figure.tight_layout(rect=(0, 0.05, 1, 1))
  caption(figure, results)
  figure.savefig(path, dpi=DPI)
  plt.close(figure)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--results", default=os.path.join(DOCS, "bench_train.json"),
                      help="The JSON of bench/bench_train.py --json_out.")
  parser.add_argument("--output_dir", default=DOCS, help="Where the PNGs go.")
  args = parser.parse_args()
  with open(args.results) as f:
    results = json.load(f)
  os.makedirs(args.output_dir, exist_ok=True)
  for name, draw in (("kshot_accuracy.png", kshot_accuracy), ("time_to_model.png", time_to_model),
                     ("flowers12_confusion.png", confusion_matrix)):
    path = os.path.join(args.output_dir, name)
    draw(results, path)
    print(f"Wrote {path} ({os.path.getsize(path) // 1024} KB)")


if __name__ == "__main__":
  main()
