"""report.html: one self-contained page of an evaluation, for a person to read.

The page holds the summary numbers, per-class precision / recall / F1, the
plots (`plots`), the most-confused class pairs, the misclassified photos as
thumbnails (most confident mistakes first) and, from bin/train, the data's
own problems (`data_checks`: near-duplicates across splits, suspected label
errors). Every image is embedded as a data: URI and the page loads nothing
else (no scripts, fonts or styles from the network), so it can be mailed,
archived or opened offline. Every label and file name is HTML-escaped.
"""

import base64
import datetime
import html

import numpy as np
import tensorflow as tf

from tlframe.util import fileio
from tlframe.records import example_format
from tlframe.train import layout as model_dir_layout
from tlframe import records

THUMBNAIL_SIZE = 128
MAX_THUMBNAILS = 60   # per section: the page stays a few MB; the CSVs list them all
MAX_CONFUSED_PAIRS = 10
_SCAN_BATCH_SIZE = 256   # records whose file names are parsed at once

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;
max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:1.8em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:right}th{background:#f3f5f8}td.name,th.name{text-align:left}
.summary td:first-child{text-align:left}
.plots img{max-width:100%;margin:.5em 1em .5em 0;vertical-align:top;border:1px solid #eee}
.grid{display:flex;flex-wrap:wrap;gap:.6em}
figure{margin:0;width:140px;font-size:.78em;overflow-wrap:anywhere}
figure img{width:128px;height:128px;object-fit:contain;background:#f4f4f4;display:block}
.pair{display:flex;gap:.3em;border:1px solid #e3e3e3;padding:.3em;width:auto}
.pair figure{width:128px}
.warn{background:#fff4e0;border-left:4px solid #e69500;padding:.5em .8em}
.note{color:#666;font-size:.9em}
"""


def data_uri(data, mime):
  return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail_uri(encoded, size=THUMBNAIL_SIZE):
  """A JPEG data: URI of an encoded image shrunk to fit size x size; None if it does not decode."""
  try:
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError, ValueError):
    return None
  height, width = int(image.shape[0]), int(image.shape[1])
  scale = min(1.0, size / max(height, width, 1))
  if scale < 1.0:
    target = [max(1, round(height * scale)), max(1, round(width * scale))]
    image = tf.cast(tf.round(tf.image.resize(image, target, antialias=True)), tf.uint8)
  return data_uri(tf.io.encode_jpeg(image, quality=85).numpy(), "image/jpeg")


def record_thumbnails(records_dir, split, filenames):
  """{filename: thumbnail data: URI} of the given files of a split, read from its records."""
  wanted = set(filenames)
  found = {}
  if not wanted or not records.count_examples(records_dir, split):
    return found
  shards = sorted(tf.io.gfile.glob(records.split_file_pattern(records_dir, split)))
  # File names parsed a batch at a time (one op per record took a second per thousand);
  # only the wanted records' images are parsed and decoded.
  for serialized in tf.data.TFRecordDataset(shards).batch(_SCAN_BATCH_SIZE):
    names = example_format.parse_filenames(serialized).numpy()
    for row, name in enumerate(names):
      name = name.decode("utf-8", "replace")
      if name not in wanted or name in found:
        continue
      uri = thumbnail_uri(example_format.parse_example(serialized[row])[0].numpy())
      if uri:
        found[name] = uri
      if len(found) == len(wanted):
        return found
  return found


def file_thumbnails(paths):
  """{path: thumbnail data: URI} of image files; unreadable ones are left out."""
  found = {}
  for path in paths:
    try:
      with tf.io.gfile.GFile(path, "rb") as f:
        uri = thumbnail_uri(f.read())
    except (tf.errors.OpError, OSError):
      continue
    if uri:
      found[path] = uri
  return found


def most_confused_pairs(confusion, label_names, limit=MAX_CONFUSED_PAIRS):
  """Off-diagonal cells, largest first: dicts of true_label, predicted_label, count, fraction."""
  confusion = np.asarray(confusion, np.int64)
  totals = confusion.sum(axis=1)
  cells = [(int(confusion[i, j]), i, j) for i in range(len(label_names))
           for j in range(len(label_names)) if i != j and confusion[i, j]]
  cells.sort(key=lambda cell: (-cell[0], cell[1], cell[2]))
  return [dict(true_label=label_names[i], predicted_label=label_names[j], count=count,
               fraction=count / max(1, totals[i])) for count, i, j in cells[:limit]]


def _e(value):
  return html.escape(str(value), quote=True)


def _figure_html(uri, lines, alt):
  image = (f'<img src="{uri}" alt="{_e(alt)}">' if uri else
           '<div class="note" style="width:128px;height:128px">(no preview)</div>')
  return f"<figure>{image}<figcaption>{'<br>'.join(lines)}</figcaption></figure>"


def _summary(report):
  rows = [("images", f"{report['num_examples']}")]
  rows.append(("accuracy", f"{report['accuracy']:.4f}"))
  if "top_k_accuracy" in report:
    rows.append((f"top-{report['top_k']} accuracy", f"{report['top_k_accuracy']:.4f}"))
  if "macro_f1" in report:
    rows.append(("macro-F1", f"{report['macro_f1']:.4f}"))
  calibration = report.get("calibration") or {}
  if "expected_calibration_error" in calibration:
    before = calibration.get("expected_calibration_error_uncalibrated")
    rows.append(("expected calibration error", f"{calibration['expected_calibration_error']:.4f}"
                 + (f" (before calibration: {before:.4f})" if before is not None else "")))
  if report.get("skipped"):
    rows.append(("skipped (unreadable or not decodable)", f"{len(report['skipped'])}"))
  return ('<table class="summary">' + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>"
                                              for k, v in rows) + "</table>")


def _per_class(report):
  lines = ['<table><tr><th class="name">class</th><th>precision</th><th>recall</th><th>F1</th>'
           '<th>images</th><th>predicted</th></tr>']
  for name, row in report["per_class"].items():
    lines.append(f'<tr><td class="name">{_e(name)}</td><td>{row["precision"]:.3f}</td>'
                 f'<td>{row["recall"]:.3f}</td><td>{row.get("f1", float("nan")):.3f}</td>'
                 f'<td>{row["count"]}</td><td>{row.get("predicted", "")}</td></tr>')
  return "".join(lines) + "</table>"


def _confused(pairs):
  if not pairs:
    return "<p>No class was confused with another.</p>"
  lines = ['<table><tr><th class="name">true class</th><th class="name">predicted as</th>'
           '<th>images</th><th>of the true class</th></tr>']
  for pair in pairs:
    lines.append(f'<tr><td class="name">{_e(pair["true_label"])}</td>'
                 f'<td class="name">{_e(pair["predicted_label"])}</td><td>{pair["count"]}</td>'
                 f'<td>{100 * pair["fraction"]:.1f}%</td></tr>')
  return "".join(lines) + "</table>"


def _more(total, shown, where):
  if total <= shown:
    return ""
  return (f'<p class="note">{shown} of {total} shown'
          + (f"; all are in {_e(where)}" if where else "") + ".</p>")


def _misclassified(rows, thumbnails, csv_name):
  if not rows:
    return "<p>No image was misclassified.</p>"
  shown = rows[:MAX_THUMBNAILS]
  cells = [_figure_html(thumbnails.get(row["file"]),
                        [f"<b>{_e(row['predicted_label'])}</b> {row['probability']:.2f}",
                         f"true: {_e(row['true_label'])}", _e(row["file"])],
                        f"{row['file']}: true {row['true_label']}, predicted "
                        f"{row['predicted_label']}") for row in shown]
  return (f'<p class="note">Most confident mistakes first: bold is the predicted class and '
          f'its probability.</p><div class="grid">{"".join(cells)}</div>'
          + _more(len(rows), len(shown), csv_name))


def _suspects(rows, thumbnails, csv_name, threshold):
  if rows is None:
    return ("<p>Not checked: the check needs the cross-validation's out-of-fold "
            "predictions, and none ran (--l2 was given with validation data, or there are "
            "fewer training images than --cv_folds). Leave --l2 unset to check the labels.</p>")
  intro = (f"<p>Training photos whose out-of-fold prediction (a head that never saw the photo) "
           f"gives another class at least {threshold:.2f}, least likely labels first. Check "
           f"them: nothing was changed.</p>")
  if not rows:
    return intro + "<p>None found.</p>"
  shown = rows[:MAX_THUMBNAILS]
  cells = [_figure_html(thumbnails.get(row["file"]),
                        [f"label: <b>{_e(row['label'])}</b> ({row['label_probability']:.2f})",
                         f"looks like: {_e(row['suspected_label'])} ({row['probability']:.2f})",
                         _e(row["file"])],
                        f"{row['file']}: labelled {row['label']}, looks like "
                        f"{row['suspected_label']}") for row in shown]
  return (intro + f'<div class="grid">{"".join(cells)}</div>'
          + _more(len(rows), len(shown), csv_name))


def _near_duplicates(pairs, thumbnails, threshold):
  if pairs is None:
    return ""
  intro = (f"<p>Pairs of photos in different splits whose backbone features have a cosine "
           f"similarity of at least {threshold:.2f}.</p>")
  if not pairs:
    return intro + "<p>None found.</p>"
  shown = pairs[:MAX_THUMBNAILS // 2]
  cells = []
  for pair in shown:
    sides = [_figure_html(thumbnails.get((pair[f"split_{s}"], pair[f"file_{s}"])),
                          [f"{_e(pair[f'split_{s}'])}: {_e(pair[f'file_{s}'])}"],
                          f"{pair[f'split_{s}']} {pair[f'file_{s}']}") for s in "ab"]
    cells.append(f'<div class="pair">{"".join(sides)}<div class="note">similarity<br>'
                 f'{pair["similarity"]:.3f}</div></div>')
  return (intro + f'<p class="warn">{len(pairs)} pair(s): held-out accuracy counts these '
          f'photos as unseen. Remove one of each pair, or move both to one split.</p>'
          f'<div class="grid">{"".join(cells)}</div>'
          + _more(len(pairs), len(shown), model_dir_layout.METRICS_FILENAME))


def render(report, *, title, plots=(), thumbnails=None, misclassified_csv="misclassified.csv",
           data_checks=None):
  """The page (a str) of `evaluation.evaluate`'s report.

  plots: (caption, PNG bytes) pairs. thumbnails: {file: data: URI} of the
  misclassified files. misclassified_csv: where all mistakes are listed (None:
  nowhere else). data_checks (bin/train): dict with near_duplicates
  (pairs or None), near_duplicate_threshold, suspects (rows or None),
  suspect_threshold, suspects_csv and thumbnails {(split, file): URI}.
  """
  thumbnails = thumbnails or {}
  parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           '<link rel="icon" href="data:,">',
           f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
           f"<h1>{_e(title)}</h1>"]
  about = [f"{_e(key)}: {_e(report[key])}" for key in ("model", "data") if report.get(key)]
  about.append(f"written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
  parts.append(f'<p class="note">{"<br>".join(about)}</p>')
  parts.append("<h2>Summary</h2>" + _summary(report))
  if data_checks is not None:
    checks_thumbnails = data_checks.get("thumbnails", {})
    if data_checks.get("near_duplicates") is not None:
      parts.append("<h2>Near-duplicates across splits</h2>" + _near_duplicates(
          data_checks["near_duplicates"], checks_thumbnails,
          data_checks["near_duplicate_threshold"]))
    parts.append("<h2>Suspected label errors</h2>" + _suspects(
        data_checks.get("suspects"), {file: uri for (split, file), uri in
                                      checks_thumbnails.items() if split == "train"},
        data_checks.get("suspects_csv", model_dir_layout.SUSPECT_LABELS_FILENAME),
        data_checks["suspect_threshold"]))
  if plots:
    parts.append("<h2>Plots</h2><div class=\"plots\">" + "".join(
        f'<img src="{data_uri(png, "image/png")}" alt="{_e(caption)}" title="{_e(caption)}">'
        for caption, png in plots) + "</div>")
  parts.append("<h2>Per class</h2>" + _per_class(report))
  parts.append("<h2>Most-confused classes</h2>" + _confused(
      most_confused_pairs(report["confusion_matrix"], report["labels"])))
  parts.append(f"<h2>Misclassified ({len(report['misclassified'])})</h2>"
               + _misclassified(report["misclassified"], thumbnails, misclassified_csv))
  parts.append("</body></html>\n")
  return "\n".join(parts)


def write(path, page):
  fileio.atomic_write_text(path, page)
