"""Labelled plots a person reads: confusion matrix, reliability diagram, CV curve, training curves.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display,
no global state), so plotting works in servers and threads alike. Each
`*_figure` function returns a matplotlib Figure; `png_bytes` / `svg_text`
encode one, and `write_figure` writes it atomically. SVG keeps its text as
text (svg.fonttype "none"): class names stay searchable and selectable.

matplotlib is the `plots` extra (pip install 'tlframe[plots]'): without it,
`available()` is False and callers skip the plots with MISSING_MESSAGE.
"""

import io
import math

import numpy as np
import tensorflow as tf

from tlframe.util import fileio

MISSING_MESSAGE = ("labelled plots need matplotlib: pip install 'tlframe[plots]' (the report "
                   "is written without them)")
# Above these many classes the confusion matrix's cells show counts only, then nothing.
_FRACTIONS_UP_TO = 15
_COUNTS_UP_TO = 30
_CMAP = "Blues"


def available():
  """True when matplotlib imports."""
  try:
    import matplotlib  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _figure(width, height):
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
  FigureCanvasAgg(figure)
  return figure


def png_bytes(figure):
  """An RGB PNG of the figure (Agg's pixels without their alpha, which is all opaque)."""
  figure.canvas.draw()
  pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3]
  return tf.io.encode_png(np.ascontiguousarray(pixels)).numpy()


def svg_text(figure):
  import matplotlib  # pylint: disable=g-import-not-at-top
  buffer = io.StringIO()
  with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "tlframe"}):
    figure.savefig(buffer, format="svg")
  return buffer.getvalue()


def write_figure(path, figure):
  """Writes `figure` to `path` (.png or .svg by its extension), atomically."""
  if path.endswith(".svg"):
    fileio.atomic_write_text(path, svg_text(figure))
  else:
    fileio.atomic_write_bytes(path, png_bytes(figure))


def confusion_matrix_figure(confusion, label_names, title="Confusion matrix"):
  """Rows: true class, columns: predicted; the shade is the row's fraction.

  Cells show the count and, up to 15 classes, the row's percentage; above 30
  classes only the shade. The figure grows with the number of classes and the
  longest name.
  """
  confusion = np.asarray(confusion, np.int64)
  num_classes = len(label_names)
  fractions = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  cell = 0.62 if num_classes <= _FRACTIONS_UP_TO else (0.42 if num_classes <= _COUNTS_UP_TO
                                                       else 0.25)
  name_inches = 0.075 * max(len(name) for name in label_names) + 0.6
  side = min(max(2.5, cell * num_classes), 40.0)   # 40 inches: 4000 pixels
  figure = _figure(side + name_inches + 1.4, side + name_inches + 0.8)
  axes = figure.add_subplot()
  image = axes.imshow(fractions, cmap=_CMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
  ticks = np.arange(num_classes)
  font = 9 if num_classes <= _FRACTIONS_UP_TO else (7 if num_classes <= _COUNTS_UP_TO else 5)
  axes.set_xticks(ticks, labels=label_names, rotation=45 if num_classes > 2 else 0,
                  ha="right" if num_classes > 2 else "center", rotation_mode="anchor",
                  fontsize=font)
  axes.set_yticks(ticks, labels=label_names, fontsize=font)
  axes.set_xlabel("predicted class")
  axes.set_ylabel("true class")
  axes.set_title(title)
  if num_classes <= _COUNTS_UP_TO:
    for i in range(num_classes):
      for j in range(num_classes):
        if not confusion[i, j] and i != j:
          continue
        text = (f"{confusion[i, j]}\n{100 * fractions[i, j]:.0f}%"
                if num_classes <= _FRACTIONS_UP_TO else f"{confusion[i, j]}")
        axes.text(j, i, text, ha="center", va="center", fontsize=font - 1,
                  color="white" if fractions[i, j] > 0.5 else "black")
  colorbar = figure.colorbar(image, ax=axes, shrink=0.8)
  colorbar.set_label("fraction of the true class's images")
  return figure


def reliability_figure(bins, ece_after, ece_before=None, title="Reliability diagram"):
  """Accuracy against confidence per bin of `calibration.reliability_bins`, counts on top.

  The legend gives the expected calibration error after (the probabilities
  shown) and, when known, before temperature scaling.
  """
  figure = _figure(5.2, 5.0)
  axes = figure.add_subplot()
  drawn = [b for b in bins if b["count"]]
  lefts = [b["lower"] for b in drawn]
  widths = [b["upper"] - b["lower"] for b in drawn]
  accuracy = [b["accuracy"] for b in drawn]
  axes.bar(lefts, accuracy, width=widths, align="edge", color="#4a78b5", edgecolor="#1f3f6e",
           label="accuracy of the bin")
  axes.plot([(b["lower"] + b["upper"]) / 2 for b in drawn], [b["confidence"] for b in drawn],
            linestyle="none", marker="_", markersize=14, markeredgewidth=2.5, color="#d62728",
            label="mean confidence of the bin")
  axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
  for b in drawn:
    axes.text((b["lower"] + b["upper"]) / 2, max(b["accuracy"], b["confidence"]) + 0.015,
              str(b["count"]), ha="center", va="bottom", fontsize=7)
  axes.set_xlim(0, 1)
  axes.set_ylim(0, 1.08)
  axes.set_xlabel("confidence (top probability)")
  axes.set_ylabel("accuracy")
  ece = f"ECE {ece_after:.3f}" + (f" (before calibration {ece_before:.3f})"
                                  if ece_before is not None else "")
  axes.set_title(f"{title}\n{ece}; numbers: images per bin", fontsize=10)
  axes.legend(loc="upper left", fontsize=8)
  return figure


_SUPERSCRIPTS = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _power_of_ten(value, _=None):
  """A log axis's tick label: "10⁻³" in plain text (superscript characters), "" off the decades."""
  exponent = round(math.log10(value)) if value > 0 else None
  if exponent is None or not math.isclose(value, 10.0 ** exponent, rel_tol=1e-6):
    return ""
  return "10" + str(exponent).translate(_SUPERSCRIPTS)


def cv_curve_figure(cv):
  """Held-out accuracy and loss against l2 (log scale), one line per normalization, choice marked.

  `cv`: train.run's metrics["cross_validation"] (rows of l2, accuracy, loss and
  their std across folds; best_l2, best_normalization).
  """
  figure = _figure(6.4, 5.0)
  accuracy_axes = figure.add_subplot()
  loss_axes = accuracy_axes.twinx()
  normalizations = sorted({row["feature_normalization"] for row in cv["rows"]})
  for index, normalization in enumerate(normalizations):
    rows = sorted((row for row in cv["rows"] if row["feature_normalization"] == normalization),
                  key=lambda row: row["l2"])
    l2 = [row["l2"] for row in rows]
    suffix = f" ({normalization})" if len(normalizations) > 1 else ""
    style = ("-", "--", ":", "-.")[index % 4]
    accuracy_axes.errorbar(l2, [row["accuracy"] for row in rows],
                           yerr=[row["accuracy_std"] for row in rows], color="tab:blue",
                           linestyle=style, marker="o", markersize=3, capsize=2,
                           label=f"held-out accuracy{suffix}")
    loss_axes.plot(l2, [row["loss"] for row in rows], color="tab:orange", linestyle=style,
                   marker="s", markersize=3, label=f"held-out loss{suffix}")
  best = next(row for row in cv["rows"] if row["l2"] == cv["best_l2"] and
              row["feature_normalization"] == cv["best_normalization"])
  accuracy_axes.axvline(cv["best_l2"], color="green", linestyle=":")
  accuracy_axes.plot([cv["best_l2"]], [best["accuracy"]], marker="*", markersize=14,
                     color="green", linestyle="none",
                     label=f"chosen: l2={cv['best_l2']:.3g}, {cv['best_normalization']}")
  accuracy_axes.set_xscale("log")
  l2_values = [row["l2"] for row in cv["rows"]]
  if max(l2_values) >= 100 * min(l2_values):
    # Two decades or more (the default grid spans six) are labelled enough by their
    # decades. The log axis's minor ticks (eight a decade, shared with the twin) and its
    # default labels (math text, parsed by pyparsing) were half of the figure's drawing time.
    from matplotlib import ticker  # pylint: disable=g-import-not-at-top
    accuracy_axes.xaxis.set_minor_locator(ticker.NullLocator())
    accuracy_axes.xaxis.set_major_formatter(ticker.FuncFormatter(_power_of_ten))
  accuracy_axes.set_xlabel("l2 penalty")
  accuracy_axes.set_ylabel("held-out accuracy (± std across folds)", color="tab:blue")
  loss_axes.set_ylabel("held-out loss", color="tab:orange")
  accuracy_axes.set_title(f"{cv['folds']}-fold cross-validation on {cv['examples']} images")
  handles = (accuracy_axes.get_legend_handles_labels(), loss_axes.get_legend_handles_labels())
  figure.legend(handles[0][0] + handles[1][0], handles[0][1] + handles[1][1], fontsize=7,
                loc="outside lower center", ncols=2)
  return figure


def training_curves_figure(curves):
  """Loss and accuracy by epoch: `curves` is {split: {"loss": [(epoch, value)], "accuracy": ...}}."""
  figure = _figure(8.0, 3.4)
  for index, metric in enumerate(("loss", "accuracy")):
    axes = figure.add_subplot(1, 2, index + 1)
    for split, series in sorted(curves.items()):
      points = series.get(metric) or []
      if points:
        epochs, values = zip(*points)
        axes.plot(epochs, values, marker="o" if len(points) < 30 else None, markersize=3,
                  label=split)
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} by epoch")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
  return figure
