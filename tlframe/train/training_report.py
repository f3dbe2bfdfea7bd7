"""bin/train's report.html: the held-out evaluation, the search, the curves and the data checks.

Written into the model dir at the end of a run:
- `report.html` (`report`): the validation split's evaluation (or, without
  one, the out-of-fold predictions on the training split), the near-duplicate
  pairs across splits and the suspected label errors with thumbnails, and the
  plots below;
- `plots/`: confusion_matrix.png, reliability_diagram.png, cv_curve.png
  (held-out accuracy and loss against l2, the choice marked) and
  training_curves.png (loss and accuracy by epoch, read back from the
  TensorBoard logs); only with matplotlib (the `plots` extra);
- `suspect_labels.csv` (`data_checks`).
"""

import os

import tensorflow as tf
from absl import logging

from tlframe.train import calibration as calibration_lib
from tlframe.train import data_checks
from tlframe.predict import evaluation
from tlframe.util import fileio
from tlframe.predict import plots
from tlframe.predict import report as report_lib
from tlframe.train import layout as model_dir_layout

CV_CURVE_PNG = "cv_curve.png"
TRAINING_CURVES_PNG = "training_curves.png"
_CURVE_TAGS = ("epoch/loss", "epoch/accuracy")
_EVENTS_PER_READ = 4096


def read_curves(log_dir):
  """{split: {"loss": [(epoch, value)], "accuracy": [...]}} from the run's TensorBoard logs."""
  curves = {}
  for split in ("train", "validation"):
    series = {}
    paths = sorted(tf.io.gfile.glob(os.path.join(log_dir, split, "events.out.tfevents.*")))
    # Read in batches: one record at a time, the iterator's overhead was most of the reading
    # (0.09 of 0.12 s for a short run's ~700 events).
    for batch in tf.data.TFRecordDataset(paths).batch(_EVENTS_PER_READ):
      for record in batch.numpy():
        event = tf.compat.v1.Event.FromString(record)
        for value in event.summary.value:
          if value.tag in _CURVE_TAGS:
            series.setdefault(value.tag.split("/")[1], {})[event.step] = float(
                tf.make_ndarray(value.tensor))
    if series:
      curves[split] = {name: sorted(points.items()) for name, points in series.items()}
  return curves


def write(model_dir, records_dir, metrics, label_names, *, scores, labels, filenames, split,
          log_dir):
  """Writes report.html, plots/ and suspect_labels.csv into `model_dir`; returns their paths.

  scores, labels, filenames: the head's held-out [N, C] scores on `split`
  ("validation", or "out_of_fold" for the training split's cross-validation
  scores), calibrated here with metrics["calibration"]'s temperature.
  """
  calibration = metrics["calibration"]
  temperature = calibration["temperature"] if calibration else 1.0
  report = evaluation.evaluate(calibration_lib.softmax(scores, temperature), labels,
                               label_names, filenames=filenames, temperature=temperature)
  records_split = "train" if split == "out_of_fold" else split
  what = ("the validation split" if split == "validation" else
          "the training split, out-of-fold (no validation split)")
  report.update(model=model_dir, data=f"{records_dir}: {what}")
  paths = {model_dir_layout.REPORT_FILENAME: os.path.join(model_dir, model_dir_layout.REPORT_FILENAME)}
  figures = [(name, caption, figure) for name, caption, figure in
             evaluation.report_plots(report, title_suffix=f" ({records_split})")]
  if not plots.available():
    logging.warning(plots.MISSING_MESSAGE)
  else:
    if metrics.get("cross_validation"):
      figures.append((CV_CURVE_PNG, "cross-validation of l2",
                      plots.cv_curve_figure(metrics["cross_validation"])))
    curves = read_curves(log_dir)
    if curves:
      figures.append((TRAINING_CURVES_PNG, "training curves",
                      plots.training_curves_figure(curves)))
  page_plots = []
  if figures:
    tf.io.gfile.makedirs(os.path.join(model_dir, model_dir_layout.PLOTS_DIRNAME))
  for name, caption, figure in figures:
    paths[name] = os.path.join(model_dir, model_dir_layout.PLOTS_DIRNAME, name)
    png = plots.png_bytes(figure)
    fileio.atomic_write_bytes(paths[name], png)
    page_plots.append((caption, png))

  checks = dict(metrics["data_checks"])
  if checks["suspects"] is not None:
    suspects_csv = os.path.join(model_dir, model_dir_layout.SUSPECT_LABELS_FILENAME)
    paths[model_dir_layout.SUSPECT_LABELS_FILENAME] = suspects_csv
    data_checks.write_suspects_csv(suspects_csv, checks["suspects"])
  wanted = {}   # split -> files whose thumbnails the page shows
  for pair in checks["near_duplicates"][:report_lib.MAX_THUMBNAILS // 2]:
    for side in "ab":
      wanted.setdefault(pair[f"split_{side}"], set()).add(pair[f"file_{side}"])
  for row in (checks["suspects"] or [])[:report_lib.MAX_THUMBNAILS]:
    wanted.setdefault("train", set()).add(row["file"])
  checks["thumbnails"] = {(name, file): uri for name, files in wanted.items()
                          for file, uri in report_lib.record_thumbnails(
                              records_dir, name, files).items()}
  thumbnails = evaluation.misclassified_thumbnails(report, records_dir=records_dir,
                                                   split=records_split)
  report_lib.write(paths[model_dir_layout.REPORT_FILENAME], report_lib.render(
      report, title=f"Training report: {os.path.basename(os.path.normpath(model_dir))}",
      plots=page_plots, thumbnails=thumbnails, data_checks=checks,
      misclassified_csv=None))
  return paths


def leak_warning(checks, limit=5):
  """Lines for bin/train about near-duplicates across splits; [] when there are none."""
  pairs = checks["near_duplicates"]
  if not pairs:
    return []
  lines = [f"warning: {len(pairs)} near-duplicate pair(s) across splits (cosine similarity >= "
           f"{checks['near_duplicate_threshold']:.2f}): the held-out accuracy counts them as "
           "unseen. Remove one of each pair or move both to one split:"]
  lines += [f"  {pair['similarity']:.3f}  {pair['split_a']}/{pair['file_a']}  "
            f"{pair['split_b']}/{pair['file_b']}" for pair in pairs[:limit]]
  if len(pairs) > limit:
    lines.append(f"  ... and {len(pairs) - limit} more (report.html, metrics.json)")
  return lines
