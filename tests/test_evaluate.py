"""bin/evaluate on a held-out split of real photos, its numbers against numpy, and bin/train's
report.html and data checks on the same trained model."""

import base64
import csv
import html.parser
import json
import os
import subprocess
import sys
from xml.etree import ElementTree

import numpy as np
import pytest
import tensorflow as tf

from tlframe.predict import evaluation
from tlframe.records import example_format
from tlframe.predict import plots
from tlframe import records
from tlframe.predict import report as report_lib
from tlframe.predict.classifier import Classifier
from production_fixtures import CLASSES
from production_fixtures import trained_model  # pylint: disable=unused-import  (a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATE = os.path.join(REPO, "bin", "evaluate")


class _Page(html.parser.HTMLParser):
  """The <img> sources and the visible text of an HTML page."""

  def __init__(self):
    super().__init__()
    self.image_sources, self.text = [], ""

  def handle_starttag(self, tag, attrs):
    if tag == "img":
      self.image_sources.append(dict(attrs)["src"])

  def handle_data(self, data):
    self.text += data


def _parse_page(path):
  page = _Page()
  page.feed(open(path, encoding="utf-8").read())
  return page


def _svg_texts(path):
  return [element.text for element in ElementTree.parse(path).iter()
          if element.tag.endswith("}text") and element.text]


def _numpy_report(probabilities, labels, num_classes, k, num_bins=15):
  """The metrics, computed here independently of tlframe."""
  predicted = probabilities.argmax(axis=1)
  confusion = np.zeros([num_classes, num_classes], int)
  for t, p in zip(labels, predicted):
    confusion[t, p] += 1
  tp = np.diag(confusion).astype(float)
  precision = np.divide(tp, confusion.sum(0), out=np.zeros(num_classes),
                        where=confusion.sum(0) > 0)
  recall = np.divide(tp, confusion.sum(1), out=np.zeros(num_classes), where=confusion.sum(1) > 0)
  f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(num_classes),
                 where=precision + recall > 0)
  present = (confusion.sum(0) + confusion.sum(1)) > 0
  top_k = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
  confidence = probabilities.max(axis=1)
  ece = 0.0
  for low, high in zip(np.linspace(0, 1, num_bins + 1)[:-1], np.linspace(0, 1, num_bins + 1)[1:]):
    members = (confidence > low) & (confidence <= high)
    if members.any():
      ece += members.mean() * abs((predicted[members] == labels[members]).mean() -
                                  confidence[members].mean())
  return dict(accuracy=np.mean(predicted == labels), confusion=confusion, precision=precision,
              recall=recall, f1=f1, macro_f1=f1[present].mean(),
              top_k_accuracy=np.mean([t in row for t, row in zip(labels, top_k)]), ece=ece,
              wrong=int(np.sum(predicted != labels)))


def _check_report(report, expected, label_names):
  assert report["accuracy"] == pytest.approx(expected["accuracy"])
  assert report["top_k_accuracy"] == pytest.approx(expected["top_k_accuracy"])
  assert report["macro_f1"] == pytest.approx(expected["macro_f1"])
  assert report["confusion_matrix"] == expected["confusion"].tolist()
  for i, name in enumerate(label_names):
    per_class = report["per_class"][name]
    assert per_class["precision"] == pytest.approx(expected["precision"][i])
    assert per_class["recall"] == pytest.approx(expected["recall"][i])
    assert per_class["f1"] == pytest.approx(expected["f1"][i])
  # Absolute: float32 probabilities, from the export run on different batches and summed
  # in another order, agree to ~1e-7, and so do the ECEs made of them.
  assert report["calibration"]["expected_calibration_error"] == pytest.approx(expected["ece"],
                                                                               abs=1e-6)
  assert len(report["misclassified"]) == expected["wrong"]


@pytest.mark.slow
def test_evaluate_on_the_test_split_matches_numpy(trained_model, tmp_path):
  output_dir = tmp_path / "evaluation"
  result = subprocess.run([sys.executable, EVALUATE, f"--model={trained_model.model_dir}",
                           f"--records_dir={trained_model.records_dir}",
                           f"--output_dir={output_dir}", "--top_k=2"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "accuracy:" in result.stdout and "confusion matrix" in result.stdout
  assert "top-2 accuracy:" in result.stdout   # 2 < 4 classes; top-4 would not be printed
  report = json.load(open(output_dir / "evaluation.json"))
  # The same predictions, made here from the test records' bytes with the export.
  pattern = records.split_file_pattern(trained_model.records_dir, "test")
  examples = [example_format.parse_example(s) for s in
              tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern)))]
  assert report["num_examples"] == len(examples) >= 6
  classifier = Classifier.load(trained_model.model_dir)
  probabilities = classifier.predict([e[0].numpy() for e in examples]).probabilities
  labels = np.array([int(e[1]) for e in examples])
  _check_report(report, _numpy_report(probabilities, labels, 4, k=2), CLASSES)
  assert report["accuracy"] >= 0.9
  confusion_png = tf.io.decode_png((output_dir / "confusion_matrix.png").read_bytes())
  assert confusion_png.shape[2] == 3 and min(confusion_png.shape[:2]) >= 250
  # The class names are on the plot's axes: text in the SVG, once per axis.
  svg_texts = _svg_texts(output_dir / "confusion_matrix.svg")
  for name in CLASSES:
    assert svg_texts.count(name) == 2, (name, svg_texts)
  reliability_png = tf.io.decode_png((output_dir / "reliability_diagram.png").read_bytes())
  assert reliability_png.shape[2] == 3 and reliability_png.shape[0] >= 300
  page = _parse_page(output_dir / "report.html")
  assert all(src.startswith("data:image/") for src in page.image_sources)
  assert len(page.image_sources) == 2 + min(len(report["misclassified"]), 60)
  assert "http://" not in page.text and "https://" not in page.text
  rows = list(csv.reader(open(output_dir / "misclassified.csv")))
  assert rows[0] == ["file", "true_label", "predicted_label", "probability"]
  assert len(rows) - 1 == len(report["misclassified"])
  again = subprocess.run([sys.executable, EVALUATE, f"--model={trained_model.model_dir}",
                          f"--records_dir={trained_model.records_dir}",
                          f"--output_dir={output_dir}"], capture_output=True, text=True,
                         timeout=300)
  assert again.returncode == 2 and "--overwrite" in again.stderr


def test_report_numbers_equal_numpy_with_errors_and_ties():
  """Probabilities with mistakes, an unused class and a tie: every number as numpy has it."""
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 4, 200)
  logits = rng.normal(size=(200, 5)) + 2.5 * np.eye(5)[labels]
  probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  probabilities[0] = [0.4, 0.4, 0.1, 0.05, 0.05]  # a tie goes to the lower index
  names = ["a", "b", "c", "d", "never"]
  filenames = [f"img{i}.jpg" for i in range(200)]
  report = evaluation.evaluate(probabilities, labels, names, filenames=filenames, top_k=3)
  expected = _numpy_report(probabilities, labels, 5, k=3)
  assert 0.5 < expected["accuracy"] < 0.95 and expected["wrong"] > 10
  _check_report(report, expected, names)
  wrong = report["misclassified"][0]
  index = int(wrong["file"][3:-4])
  assert names.index(wrong["true_label"]) == labels[index]
  assert wrong["predicted_label"] == names[probabilities[index].argmax()]
  bins = report["calibration"]["reliability_bins"]
  assert len(bins) == 15 and sum(b["count"] for b in bins) == 200


def test_evaluate_an_image_dir_skips_bad_files(trained_model, tmp_path):
  image_dir = tmp_path / "held_out"
  for name, photo in trained_model.photos.items():
    (image_dir / name).mkdir(parents=True)
    (image_dir / name / "full.png").write_bytes(tf.io.encode_png(photo).numpy())
  (image_dir / "coffee" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
  classifier = Classifier.load(trained_model.export_dir)
  probabilities, labels, filenames, skipped = evaluation.predict_image_dir(
      classifier, str(image_dir))
  assert len(filenames) == 4 and [s["path"] for s in skipped] == [
      str(image_dir / "coffee" / "broken.jpg")]
  report = evaluation.evaluate(probabilities, labels, classifier.label_names,
                               filenames=filenames)
  assert report["accuracy"] == 1.0 and report["num_examples"] == 4
  paths = evaluation.write_report(str(tmp_path / "out"), report)
  for name in (evaluation.CONFUSION_PNG, evaluation.RELIABILITY_PNG):
    assert tf.io.decode_png(open(paths[name], "rb").read()).shape[2] == 3
  # A model that errs on purpose: the report shows each mistake's photo, read from its file.
  wrong = np.roll(labels, 1)
  report = evaluation.evaluate(probabilities, wrong, classifier.label_names, filenames=filenames)
  thumbnails = evaluation.misclassified_thumbnails(report)
  assert sorted(thumbnails) == sorted(filenames)
  paths = evaluation.write_report(str(tmp_path / "wrong"), report, thumbnails=thumbnails)
  page = _parse_page(paths[evaluation.REPORT_HTML])
  assert sum(src.startswith("data:image/jpeg") for src in page.image_sources) == 4
  decoded = tf.io.decode_jpeg(base64.b64decode(page.image_sources[-1].split(",", 1)[1]))
  assert max(decoded.shape[:2]) == 128


def test_training_writes_the_report_the_checks_and_suspect_labels(trained_model):
  model_dir = trained_model.model_dir
  checks = trained_model.metrics["data_checks"]
  # The fixture's images are crops of one photo per class: a pair across splits may be two
  # crops of one photo, never two photos.
  assert checks["near_duplicates"], "overlapping crops of one photo are near-duplicates"
  for pair in checks["near_duplicates"]:
    assert pair["split_a"] != pair["split_b"] and pair["similarity"] >= 0.85
    assert pair["file_a"].split("/")[0] == pair["file_b"].split("/")[0], pair
  assert checks["suspects"] == []   # every label there is right
  with open(os.path.join(model_dir, "suspect_labels.csv")) as f:
    assert f.read().split(",")[:3] == ["rank", "file", "label"]
  with open(os.path.join(model_dir, "report.html"), encoding="utf-8") as f:
    page = _Page()
    page.feed(f.read())
  assert all(src.startswith("data:image/") for src in page.image_sources)
  shown_pairs = min(len(checks["near_duplicates"]), report_lib.MAX_THUMBNAILS // 2)
  assert len(page.image_sources) == (
      (4 if plots.available() else 0) + 2 * shown_pairs +
      min(len(trained_model.metrics["validation"]["confusion_matrix"]) and
          sum(r[c] for i, r in enumerate(trained_model.metrics["validation"]["confusion_matrix"])
              for c in range(len(r)) if c != i), report_lib.MAX_THUMBNAILS))
  for heading in ("Near-duplicates across splits", "Suspected label errors",
                  "Most-confused classes", "Per class"):
    assert heading in page.text
  for name in CLASSES:
    assert name in page.text
  if plots.available():
    for name in ("confusion_matrix.png", "reliability_diagram.png", "cv_curve.png",
                 "training_curves.png"):
      assert os.path.getsize(os.path.join(model_dir, "plots", name)) > 1000
