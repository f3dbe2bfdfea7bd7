"""The labelled plots, report.html, near-duplicates across splits and suspected label errors."""

import csv
import html.parser
import os
import subprocess
import sys
from xml.etree import ElementTree

import numpy as np
import pytest
import tensorflow as tf

from tlframe.backbone import loading as backbone_lib
from tlframe.train import data_checks
from tlframe.train import feature_cache
from tlframe.predict import plots
from tlframe import records
from tlframe.predict import report
from tlframe import samples

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bin", "train")
NAMES = ["bluebell", "lily-valley", "a <b>&amp;", 'say "cheese"', "Überweg"]


class _Page(html.parser.HTMLParser):
  """Tags, <img> sources and visible text of a page."""

  def __init__(self, page):
    super().__init__()
    self.tags, self.image_sources, self.text = [], [], ""
    self.feed(page)

  def handle_starttag(self, tag, attrs):
    self.tags.append(tag)
    if tag == "img":
      self.image_sources.append(dict(attrs)["src"])

  def handle_data(self, data):
    self.text += data


def _confusion(num_classes, seed=0):
  rng = np.random.default_rng(seed)
  return (np.diag(rng.integers(5, 30, num_classes)) +
          rng.integers(0, 3, [num_classes, num_classes]) * (rng.random([num_classes] * 2) < 0.3))


@pytest.mark.skipif(not plots.available(), reason="matplotlib is not installed")
@pytest.mark.parametrize("num_classes", [2, 5, 40])
def test_confusion_matrix_carries_class_names_counts_and_grows_with_classes(num_classes):
  names = (NAMES * 8)[:num_classes]
  names = [f"{name} {i}" for i, name in enumerate(names)]
  confusion = _confusion(num_classes)
  figure = plots.confusion_matrix_figure(confusion, names)
  axes = figure.axes[0]
  assert [label.get_text() for label in axes.get_xticklabels()] == names
  assert [label.get_text() for label in axes.get_yticklabels()] == names
  assert axes.get_xlabel() == "predicted class" and axes.get_ylabel() == "true class"
  cells = [text.get_text() for text in axes.texts]
  if num_classes <= 15:   # count and row percentage in each non-empty cell
    row = confusion[0] / confusion[0].sum()
    assert f"{confusion[0, 0]}\n{100 * row[0]:.0f}%" in cells
  elif num_classes <= 30:
    assert str(confusion[0, 0]) in cells
  else:
    assert not cells
  # The SVG keeps the names as text elements (escaped as XML: it parses).
  svg = plots.svg_text(figure)
  texts = [element.text for element in ElementTree.fromstring(svg).iter()
           if element.tag.endswith("}text") and element.text]
  for name in names:
    assert texts.count(name) == 2
  width, height = tf.io.decode_png(plots.png_bytes(figure)).shape[1::-1]
  assert width >= 250 and height >= 250


@pytest.mark.skipif(not plots.available(), reason="matplotlib is not installed")
def test_plot_sizes_follow_the_number_of_classes():
  sizes = [tf.io.decode_png(plots.png_bytes(plots.confusion_matrix_figure(
      _confusion(n), [f"class {i}" for i in range(n)]))).shape[0] for n in (2, 12, 40)]
  assert sizes[0] < sizes[1] < sizes[2]


@pytest.mark.skipif(not plots.available(), reason="matplotlib is not installed")
def test_reliability_cv_and_training_plots_are_labelled():
  bins = [dict(lower=i / 4, upper=(i + 1) / 4, count=c, accuracy=a, confidence=f)
          for i, (c, a, f) in enumerate([(0, None, None), (7, 0.3, 0.4), (11, 0.7, 0.62),
                                         (30, 0.9, 0.88)])]
  axes = plots.reliability_figure(bins, 0.0412, 0.1234).axes[0]
  assert "confidence" in axes.get_xlabel() and axes.get_ylabel() == "accuracy"
  assert "ECE 0.041" in axes.get_title() and "before calibration 0.123" in axes.get_title()
  assert sorted(t.get_text() for t in axes.texts) == ["11", "30", "7"]   # images per bin
  rows = [dict(l2=l2, accuracy=a, accuracy_std=0.01, loss=loss, loss_std=0.02,
               feature_normalization="standardize")
          for l2, a, loss in [(1e-4, 0.8, 0.5), (1e-3, 0.9, 0.4), (1e-2, 0.85, 0.45)]]
  figure = plots.cv_curve_figure(dict(rows=rows, best_l2=1e-3, best_normalization="standardize",
                                      folds=5, examples=60))
  axes = figure.axes[0]
  assert axes.get_xscale() == "log" and "held-out accuracy" in axes.get_ylabel()
  assert "held-out loss" in figure.axes[1].get_ylabel()
  legend = [text.get_text() for text in figure.legends[0].get_texts()]
  assert "chosen: l2=0.001, standardize" in legend
  figure = plots.training_curves_figure({"train": {"loss": [(1, 0.9), (2, 0.5)],
                                                   "accuracy": [(1, 0.6), (2, 0.8)]},
                                         "validation": {"loss": [(1, 1.0), (2, 0.7)]}})
  assert [a.get_title() for a in figure.axes] == ["loss by epoch", "accuracy by epoch"]
  assert [line.get_label() for line in figure.axes[0].get_lines()] == ["train", "validation"]


@pytest.mark.skipif(not plots.available(), reason="matplotlib is not installed")
@pytest.mark.parametrize("grid, labels", [
    ((1e-5, 3e-5, 1e-4, 1e-3, 0.01, 0.1, 1.0, 3.0, 10.0),
     ["10⁻⁵", "10⁻⁴", "10⁻³", "10⁻²", "10⁻¹", "10⁰", "10¹"]),
    ((0.2, 0.3, 0.5), None)])   # under two decades: matplotlib's own labels, minor ticks too
def test_cv_plot_labels_the_decades_of_its_grid(grid, labels):
  rows = [dict(l2=l2, accuracy=0.9, accuracy_std=0.01, loss=0.3, loss_std=0.02,
               feature_normalization="none") for l2 in grid]
  figure = plots.cv_curve_figure(dict(rows=rows, best_l2=grid[1], best_normalization="none",
                                      folds=5, examples=40))
  plots.png_bytes(figure)   # draws it: the ticks and their labels are made
  axis = figure.axes[0].xaxis
  low, high = figure.axes[0].get_xlim()
  shown = [tick.label1.get_text() for tick in axis.get_major_ticks()
           if low <= tick.get_loc() <= high and tick.label1.get_text()]
  minor = [tick.label1.get_text() for tick in axis.get_minor_ticks()
           if low <= tick.get_loc() <= high]
  if labels is not None:
    assert shown == labels and not minor
  else:
    assert len([text for text in shown + minor if text]) >= 2, (shown, minor)


def test_report_page_escapes_every_label_and_file_name():
  names = ["<script>alert(1)</script>", "a&b", 'q"uote']
  evil_file = '<img src=x onerror="alert(2)">.jpg'
  confusion = [[3, 1, 0], [0, 2, 2], [1, 0, 4]]
  report_dict = dict(
      num_examples=13, accuracy=9 / 13, confusion_matrix=confusion, labels=names,
      per_class={name: dict(precision=0.5, recall=0.5, f1=0.5, count=4, predicted=4)
                 for name in names},
      misclassified=[dict(file=evil_file, true_label=names[0], predicted_label=names[1],
                          probability=0.9)],
      model="<m>", data="<d>")
  thumbnail = report.thumbnail_uri(tf.io.encode_png(np.zeros([300, 200, 3], np.uint8)).numpy())
  page = report.render(report_dict, title="<t>", plots=[("<plot>", b"\x89PNG")],
                       thumbnails={evil_file: thumbnail},
                       data_checks=dict(near_duplicates=[], near_duplicate_threshold=0.85,
                                        suspects=[dict(file=evil_file, label=names[2],
                                                       suspected_label=names[0],
                                                       probability=0.8,
                                                       label_probability=0.1)],
                                        suspect_threshold=0.7,
                                        thumbnails={("train", evil_file): thumbnail}))
  parsed = _Page(page)
  assert "script" not in parsed.tags and parsed.tags.count("img") == 3
  assert parsed.image_sources.count(thumbnail) == 2   # the suspect and the mistake
  assert thumbnail.startswith("data:image/jpeg;base64,")
  for text in names + [evil_file, "<t>", "<m>"]:
    assert text in parsed.text   # shown as text, not markup
  assert "a&amp;b" in page and "<script>" not in page
  # The most-confused pairs: largest off-diagonal cells first.
  pairs = report.most_confused_pairs(confusion, names)
  assert [(p["true_label"], p["predicted_label"], p["count"]) for p in pairs] == [
      (names[1], names[2], 2), (names[0], names[1], 1), (names[2], names[0], 1)]


def test_suspects_are_confident_disagreements_ranked_by_the_label_probability():
  labels = np.array([0, 0, 1, 1, 2, 2] + [0, 1, 2] * 10)
  scores = np.eye(3)[labels] * 4.0
  scores[1] = [0.0, 0.0, 4.0]    # labelled 0, clearly a 2
  scores[3] = [0.0, 1.0, 6.0]    # labelled 1, even more clearly a 2
  scores[5] = [0.0, 0.2, 0.1]    # labelled 2, unsure: not suspected at a high threshold
  files = [f"f{i}.jpg" for i in range(len(labels))]
  rows = data_checks.suspected_label_errors(scores, labels, files, ["a", "b", "c"],
                                            threshold=0.7)
  assert [(r["file"], r["label"], r["suspected_label"]) for r in rows] == [
      ("f3.jpg", "b", "c"), ("f1.jpg", "a", "c")]
  assert all(r["probability"] >= 0.7 > r["label_probability"] for r in rows)
  looser = data_checks.suspected_label_errors(scores, labels, files, ["a", "b", "c"],
                                              threshold=0.0)
  assert [r["file"] for r in looser][-1] == "f5.jpg"


def _altered_copy(photo):
  """The photo resized by 0.9 and re-encoded as JPEG: a copy a hash does not find."""
  size = [round(photo.shape[0] * 0.9), round(photo.shape[1] * 0.9)]
  smaller = tf.cast(tf.round(tf.image.resize(photo, size, antialias=True)), tf.uint8)
  return tf.io.encode_jpeg(smaller, quality=80).numpy()


def test_near_duplicates_across_splits_are_found_on_real_photos(tmp_path, builtin_backbone_dirs):
  """Ten distinct real photos in three splits, plus altered copies of two training photos
  in the test split: exactly those two pairs are reported."""
  photos = samples.load_sample_photos(("chelsea", "coffee", "rocket", "astronaut", "brick",
                                       "grass", "gravel", "camera", "coins", "moon"))
  splits = {"train": ["chelsea", "rocket", "brick", "camera", "coins"],
            "validation": ["astronaut", "grass"], "test": ["coffee", "gravel", "moon"]}
  image_dir = tmp_path / "images"
  for name, photo in photos.items():
    (image_dir / name).mkdir(parents=True)
    (image_dir / name / "photo.png").write_bytes(tf.io.encode_png(photo).numpy())
  for name in ("chelsea", "brick"):
    (image_dir / name / "copy.jpg").write_bytes(_altered_copy(photos[name]))
  lists = {split: [f"{name}/photo.png" for name in names] for split, names in splits.items()}
  lists["test"] += ["chelsea/copy.jpg", "brick/copy.jpg"]
  for split in ("validation", "test"):
    (image_dir / f"{split}.txt").write_text("\n".join(lists[split]) + "\n")
  records_dir = str(tmp_path / "records")
  records.convert(records_dir, image_dir=str(image_dir),
                  validation_filelist=str(image_dir / "validation.txt"),
                  test_filelist=str(image_dir / "test.txt"))
  backbone = backbone_lib.load_backbone(backbone_lib.DEFAULT_HANDLE)
  feature_sets = {split: feature_cache.cached_features(
      backbone, records_dir, split, batch_size=8, image_size=backbone.input_size,
      resize_mode="center_crop", num_classes=len(photos),
      feature_cache_dir=str(tmp_path / "cache")) for split in records.SPLITS}
  checks = data_checks.check(feature_sets, None, None, sorted(photos))
  pairs = {(p["split_a"], p["file_a"], p["split_b"], p["file_b"])
           for p in checks["near_duplicates"]}
  assert pairs == {("train", "chelsea/photo.png", "test", "chelsea/copy.jpg"),
                   ("train", "brick/photo.png", "test", "brick/copy.jpg")}, checks
  assert checks["suspects"] is None


@pytest.mark.slow
def test_bin_train_lists_a_mislabelled_photo_as_suspect(tmp_path, skimage_photos,
                                                       builtin_backbone_dirs):
  """Real crops of 4 photos, one cat crop filed under coffee: bin/train names it, ranked first,
  in its output, suspect_labels.csv and report.html, and changes nothing."""
  image_dir = tmp_path / "images"
  samples.write_photo_crops(str(image_dir), skimage_photos, per_class=8, size=96)
  mislabelled = tf.io.encode_jpeg(skimage_photos["chelsea"][40:260, 60:300]).numpy()
  (image_dir / "coffee" / "odd_one.jpg").write_bytes(mislabelled)
  records_dir = tmp_path / "records"
  records.convert(str(records_dir), image_dir=str(image_dir), validation_percentage=0,
                  test_percentage=0)
  model_dir = tmp_path / "model"
  result = subprocess.run(
      [sys.executable, TRAIN, f"--records_dir={records_dir}", f"--model_dir={model_dir}",
       "--feature_normalization=standardize", "--epochs=40", "--noexport"],
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "coffee/odd_one.jpg (coffee, looks like chelsea)" in result.stdout, result.stdout
  with open(model_dir / "suspect_labels.csv") as f:
    rows = list(csv.DictReader(f))
  assert rows[0]["file"] == "coffee/odd_one.jpg" and rows[0]["suspected_label"] == "chelsea"
  assert float(rows[0]["probability"]) >= data_checks.DEFAULT_SUSPECT_CONFIDENCE
  assert len(rows) <= 2   # the 32 right labels stay off the list (at most one borderline)
  page = _Page((model_dir / "report.html").read_text(encoding="utf-8"))
  assert "coffee/odd_one.jpg" in page.text and "looks like: chelsea" in page.text
  assert records.read_labels(str(records_dir)) == sorted(skimage_photos)   # nothing changed
