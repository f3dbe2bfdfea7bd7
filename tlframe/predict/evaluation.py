"""Evaluating a classifier's predictions: the library behind bin/evaluate.

From the calibrated probabilities [N, C] of N labelled images it computes
accuracy, top-k accuracy, per-class precision / recall / F1 and macro-F1, the
confusion matrix, the most-confused class pairs, and calibration (the
expected calibration error over 15 equal-width bins, before and after the
model's temperature, and the reliability diagram's bins), and writes:

- `evaluation.json`: all of the above, plus the misclassified images;
- `report.html`: one self-contained page of it all for a person (`report`),
  with the misclassified photos as thumbnails;
- `confusion_matrix.png` / `.svg` and `reliability_diagram.png`: labelled
  plots (`plots`; need matplotlib, the `plots` extra);
- `misclassified.csv`: file, true label, predicted label, its probability,
  most confident mistakes first.
"""

import csv
import io
import os

import numpy as np
import tensorflow as tf
from absl import logging

from tlframe.train import calibration
from tlframe.util import fileio
from tlframe import imageformat
from tlframe.train import metrics
from tlframe.train import layout as model_dir_layout
from tlframe import pipeline
from tlframe.predict import plots
from tlframe.predict import prediction
from tlframe import records
from tlframe.predict import report as report_lib
from tlframe.errors import UserError
from tlframe.util.progress import Progress

REPORT_FILENAME = "evaluation.json"
CONFUSION_PNG = "confusion_matrix.png"
CONFUSION_SVG = "confusion_matrix.svg"
RELIABILITY_PNG = "reliability_diagram.png"
MISCLASSIFIED_CSV = "misclassified.csv"
REPORT_HTML = model_dir_layout.REPORT_FILENAME   # named as in a model dir
DEFAULT_TOP_K = 5


def _label_map(data_labels, model_labels, argument, value):
  """[len(data_labels)] model index of each of the data's class names; UserError for unknown
  ones, naming the data as `argument`=`value`."""
  unknown = [name for name in data_labels if name not in model_labels]
  if unknown:
    raise UserError(f"{argument}={value} has classes the model does not know: "
                    f"{', '.join(unknown[:10])}; the model's classes are "
                    f"{', '.join(model_labels)}", arguments=[argument])
  return np.array([model_labels.index(name) for name in data_labels], np.int64)


def predict_records(classifier, records_dir, split="test", *, batch_size=32):
  """(probabilities [N, C], labels [N] in the model's class order, filenames, skipped) of a split.

  Undecodable records are skipped (and counted), as in training.
  """
  num_examples = records.count_examples(records_dir, split)
  if not num_examples:
    raise UserError(f"{records_dir} has no {split} records: give another split, or rebuild "
                    "the records with test_percentage > 0 or test_filelist",
                    arguments=["split", "test_percentage", "test_filelist"])
  to_model = _label_map(records.read_labels(records_dir), classifier.label_names,
                        "records_dir", records_dir)
  skip_counter = pipeline.SkipCounter()
  dataset = pipeline.make_dataset(
      records.split_file_pattern(records_dir, split), batch_size,
      image_size=classifier.image_size, resize_mode=classifier.info["resize_mode"],
      with_filenames=True, skip_counter=skip_counter)
  progress = Progress(num_examples, what="images")
  probabilities, labels, filenames = [], [], []
  for images, batch_labels, batch_filenames in dataset:
    probabilities.append(classifier.classify_images(images)["probabilities"])
    labels.append(to_model[batch_labels.numpy()])
    filenames.extend(name.decode("utf-8", "replace") for name in batch_filenames.numpy())
    progress.update(len(batch_labels))
  skipped = [dict(path=name, reason="image does not decode") for name in skip_counter.filenames]
  return (np.concatenate(probabilities), np.concatenate(labels), filenames, skipped)


def predict_image_dir(classifier, image_dir, *, batch_size=32,
                      max_pixels=imageformat.DEFAULT_MAX_PIXELS):
  """As predict_records, for a folder with one sub-folder of images per class.

  Files that do not read or decode are skipped, each with its reason; so is a
  file whose header declares over `max_pixels` pixels, before decoding.
  """
  sources, skipped, _ = records.list_image_dir(image_dir)
  if not sources:
    raise UserError(f"image_dir={image_dir} has no images in class sub-folders",
                    arguments=["image_dir"])
  class_names = sorted({source.label for source in sources})
  to_model = dict(zip(class_names, _label_map(class_names, classifier.label_names,
                                              "image_dir", image_dir)))
  paths = [source.path for source in sources]
  true_labels = {source.path: to_model[source.label] for source in sources}
  probabilities, labels, filenames = [], [], []
  for row in prediction.predict_files(classifier, paths, batch_size=batch_size,
                                      max_pixels=max_pixels):
    if row.error:
      skipped.append(dict(path=row.path, reason=row.error))
      continue
    probabilities.append(row.probabilities)
    labels.append(true_labels[row.path])
    filenames.append(row.path)
  if not probabilities:
    raise UserError(f"image_dir={image_dir}: no image could be read and decoded",
                    arguments=["image_dir"])
  return np.stack(probabilities), np.array(labels, np.int64), filenames, skipped


def uncalibrated(probabilities, temperature):
  """softmax(scores) from softmax(scores / T): log p = scores / T + a constant per row."""
  logs = np.log(np.maximum(np.asarray(probabilities, np.float64), np.finfo(np.float64).tiny))
  return calibration.softmax(logs * temperature)


def evaluate(probabilities, labels, label_names, *, filenames=None, top_k=DEFAULT_TOP_K,
             num_bins=calibration.DEFAULT_NUM_BINS, temperature=None):
  """The evaluation report (a JSON-ready dict) of [N, C] probabilities and [N] true labels.

  Ties between classes go to the lower index (np.argmax), as in the export.
  `temperature`: the one the probabilities were calibrated with, if known:
  the report then also gives the ECE before calibration. Misclassified
  images are listed most confident first.
  """
  probabilities = np.asarray(probabilities, np.float64)
  labels = np.asarray(labels, np.int64)
  num_classes = len(label_names)
  filenames = list(filenames) if filenames is not None else [""] * len(labels)
  report = metrics.classification_metrics(probabilities, labels, label_names)
  confusion = np.asarray(report["confusion_matrix"])
  predicted_counts = confusion.sum(axis=0)
  f1_classes = []
  for index, per_class in enumerate(report["per_class"].values()):
    precision, recall = per_class["precision"], per_class["recall"]
    per_class["f1"] = (2 * precision * recall / (precision + recall)
                       if precision + recall > 0 else 0.0)
    per_class["predicted"] = int(predicted_counts[index])
    if per_class["count"] or per_class["predicted"]:
      f1_classes.append(per_class["f1"])
  k = min(top_k, num_classes)
  # The true class is in the top k when fewer than k classes beat it (ties: lower index first).
  true_probability = probabilities[np.arange(len(labels)), labels]
  beaten_by = ((probabilities > true_probability[:, None]) |
               ((probabilities == true_probability[:, None]) &
                (np.arange(num_classes)[None, :] < labels[:, None]))).sum(axis=1)
  predictions = np.argmax(probabilities, axis=1)
  wrong = np.flatnonzero(predictions != labels)
  report.update(
      top_k=k,
      top_k_accuracy=float(np.mean(beaten_by < k)) if len(labels) else 0.0,
      macro_f1=float(np.mean(f1_classes)) if f1_classes else 0.0,
      calibration=dict(
          num_bins=num_bins,
          expected_calibration_error=calibration.expected_calibration_error(
              probabilities, labels, num_bins),
          expected_calibration_error_uncalibrated=(
              None if temperature is None else calibration.expected_calibration_error(
                  uncalibrated(probabilities, temperature), labels, num_bins)),
          temperature=temperature,
          reliability_bins=calibration.reliability_bins(probabilities, labels, num_bins)),
      labels=list(label_names),
      most_confused=report_lib.most_confused_pairs(confusion, label_names),
      misclassified=[dict(file=filenames[i], true_label=label_names[labels[i]],
                          predicted_label=label_names[predictions[i]],
                          probability=float(probabilities[i, predictions[i]]))
                     for i in wrong[np.argsort(-probabilities[wrong, predictions[wrong]],
                                               kind="stable")]])
  return report


def confusion_text(confusion, label_names):
  """The confusion matrix as an aligned text table (rows: true class, columns: predicted)."""
  confusion = np.asarray(confusion)
  width = max([len(str(confusion.max())) if confusion.size else 1] +
              [len(str(i)) for i in range(len(label_names))]) + 1
  name_width = max(len(name) for name in label_names) + len(str(len(label_names))) + 3
  lines = [" " * name_width + "predicted: " + "".join(f"{i:>{width}}"
                                                       for i in range(len(label_names)))]
  for i, name in enumerate(label_names):
    lines.append(f"{f'{i}: {name}':<{name_width}}" + " " * len("predicted: ") +
                 "".join(f"{count:>{width}}" for count in confusion[i]))
  return "\n".join(lines)


def report_plots(report, *, title_suffix=""):
  """[(file name, caption, Figure)] of the report's labelled plots; [] without matplotlib."""
  if not plots.available():
    return []
  calibration_report = report["calibration"]
  return [
      (CONFUSION_PNG, "confusion matrix", plots.confusion_matrix_figure(
          report["confusion_matrix"], report["labels"],
          title=f"Confusion matrix{title_suffix} ({report['num_examples']} images)")),
      (RELIABILITY_PNG, "reliability diagram", plots.reliability_figure(
          calibration_report["reliability_bins"],
          calibration_report["expected_calibration_error"],
          calibration_report.get("expected_calibration_error_uncalibrated"),
          title=f"Reliability diagram{title_suffix}")),
  ]


def misclassified_thumbnails(report, *, records_dir=None, split=None):
  """{file: data: URI} of the misclassified images the report page shows.

  From the split's records when `records_dir` is given, else from the files.
  """
  files = [row["file"] for row in report["misclassified"][:report_lib.MAX_THUMBNAILS]]
  if records_dir:
    return report_lib.record_thumbnails(records_dir, split, files)
  return report_lib.file_thumbnails(files)


def write_report(output_dir, report, *, thumbnails=None, title="Evaluation"):
  """Writes evaluation.json, report.html, misclassified.csv and the plots into `output_dir`.

  Returns {file name: path} of what was written (the plots only with
  matplotlib; without it one warning says how to get them).
  """
  tf.io.gfile.makedirs(output_dir)
  paths = {name: os.path.join(output_dir, name)
           for name in (REPORT_FILENAME, REPORT_HTML, MISCLASSIFIED_CSV)}
  figures = report_plots(report)
  if not figures:
    logging.warning(plots.MISSING_MESSAGE)
  page_plots = []
  for name, caption, figure in figures:
    paths[name] = os.path.join(output_dir, name)
    png = plots.png_bytes(figure)
    fileio.atomic_write_bytes(paths[name], png)
    page_plots.append((caption, png))
    if name == CONFUSION_PNG:  # text stays text in the SVG: names searchable, any size
      paths[CONFUSION_SVG] = os.path.join(output_dir, CONFUSION_SVG)
      fileio.atomic_write_text(paths[CONFUSION_SVG], plots.svg_text(figure))
  table = io.StringIO()
  writer = csv.writer(table, lineterminator="\n")
  writer.writerow(["file", "true_label", "predicted_label", "probability"])
  for row in report["misclassified"]:
    writer.writerow([row["file"], row["true_label"], row["predicted_label"],
                     f"{row['probability']:.6f}"])
  fileio.atomic_write_text(paths[MISCLASSIFIED_CSV], table.getvalue())
  fileio.atomic_write_json(paths[REPORT_FILENAME], report)
  report_lib.write(paths[REPORT_HTML], report_lib.render(
      report, title=title, plots=page_plots, thumbnails=thumbnails))
  return paths
