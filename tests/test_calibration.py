"""Temperature scaling: fitting, ECE and calibration.json (its effect on oxford_flowers12: test_flowers12.py)."""

import numpy as np
import pytest

from tlframe import calibration
from tlframe.errors import UserError


def _sampled_labels(logits, rng):
  """Labels drawn from softmax(logits): the logits are then calibrated by construction."""
  probabilities = calibration.softmax(logits)
  cumulative = probabilities.cumsum(axis=1)
  return (rng.uniform(size=(len(logits), 1)) > cumulative).sum(axis=1)


@pytest.mark.parametrize("scale", [0.1, 1.0, 8.0])
def test_fit_temperature_undoes_a_known_scale(scale):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4000, 6)) * 2.0
  labels = _sampled_labels(logits, rng)
  temperature = calibration.fit_temperature(logits * scale, labels)
  assert temperature == pytest.approx(scale, rel=0.1)
  before = calibration.expected_calibration_error(calibration.softmax(logits * scale), labels)
  after = calibration.expected_calibration_error(
      calibration.softmax(logits * scale, temperature), labels)
  assert after < 0.03 and (scale == 1.0 or after < before)


def test_fit_temperature_minimizes_the_nll_for_hinge_like_margins():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 5, 500)
  margins = rng.normal(size=(500, 5)) * 0.3 + 1.0 * np.eye(5)[labels]   # SVM-like: small scale
  temperature = calibration.fit_temperature(margins, labels)
  best = calibration.negative_log_likelihood(margins, labels, temperature)
  for other in (temperature * 0.9, temperature * 1.1, 1.0):
    assert best <= calibration.negative_log_likelihood(margins, labels, other) + 1e-9
  assert temperature < 1.0  # margins of a few tenths need sharpening


def test_expected_calibration_error_by_hand():
  probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
  labels = np.array([0, 1, 1, 0])
  # Bins of width 1/15: 0.9 -> (0.867, 0.933], 0.8 -> (0.733, 0.8], 0.7 -> (0.667, 0.733],
  # 0.55 -> (0.533, 0.6]; each bin one example: |accuracy - confidence| averaged.
  expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.7) + abs(0 - 0.55)) / 4
  assert calibration.expected_calibration_error(probabilities, labels) == pytest.approx(expected)
  bins = calibration.reliability_bins(probabilities, labels)
  assert [b["count"] for b in bins if b["count"]] == [1, 1, 1, 1]
  assert bins[0]["accuracy"] is None


def test_calibration_file_round_trip(tmp_path):
  assert calibration.read_calibration(str(tmp_path)) == dict(method="none", temperature=1.0,
                                                             fitted_on=None)
  rng = np.random.default_rng(2)
  scores = rng.normal(size=(300, 3)) * 4
  labels = _sampled_labels(scores / 4, rng)
  fitted = calibration.calibrate(scores, labels, "validation")
  assert fitted["temperature"] == pytest.approx(4, rel=0.25)
  assert fitted["ece_after"] < fitted["ece_before"]
  calibration.write_calibration(str(tmp_path), fitted)
  assert calibration.read_calibration(str(tmp_path)) == fitted
  (tmp_path / calibration.CALIBRATION_FILENAME).write_text('{"temperature": -1}')
  with pytest.raises(UserError, match="not a positive number"):
    calibration.read_calibration(str(tmp_path))
  with pytest.raises(UserError, match="fitted_on"):
    calibration.calibrate(scores, labels, "test")


def test_nothing_to_fit_when_every_held_out_example_is_right():
  """The NLL of a perfectly separated set falls without end as T shrinks: no temperature."""
  scores = np.array([[3.0, 0.0], [0.0, 2.0], [5.0, 1.0]])
  result = calibration.calibrate(scores, np.array([0, 1, 0]), "validation")
  assert result["method"] == "none" and result["temperature"] == 1.0
  assert result["ece_after"] == result["ece_before"] and "all 3" in result["reason"]
  wrong_once = calibration.calibrate(scores, np.array([0, 1, 1]), "validation")
  assert wrong_once["method"] == "temperature"
