"""Temperature scaling: fitting, ECE and calibration.json (its effect on oxford_flowers12: test_flowers12.py)."""

import numpy as np
import pytest

from tlframe.train import calibration
from tlframe.train import layout as model_dir_layout
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
  (tmp_path / model_dir_layout.CALIBRATION_FILENAME).write_text('{"temperature": -1}')
  with pytest.raises(UserError, match="not a positive number"):
    calibration.read_calibration(str(tmp_path))
  with pytest.raises(UserError, match="fitted_on"):
    calibration.calibrate(scores, labels, "test")


def test_an_all_right_held_out_set_is_still_calibrated_within_its_bound():
  """No NLL minimum when every example is right: T follows the rule of succession instead,
  confident in proportion to how many were seen right, never certain, never skipped."""
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 10)
  # Hinge-like margins: right, but only ~0.5 apart, so softmax(scores) is ~0.45 sure.
  scores = rng.normal(size=(30, 3)) * 0.05
  scores[np.arange(30), labels] += 0.5 + rng.uniform(0, 0.3, 30)
  result = calibration.calibrate(scores, labels, "validation")
  assert result["method"] == "temperature" and result["rule"] == "succession"
  assert 1e-3 <= result["temperature"] < 1
  confidence = calibration.softmax(scores, result["temperature"]).max(axis=-1)
  assert confidence.mean() == pytest.approx(31 / 32, abs=1e-6)   # (N + 1) / (N + 2)
  assert np.median(confidence) >= 0.8 and confidence.max() < 1
  assert result["ece_after"] < 0.1 < result["ece_before"]
  assert result["loss"] == pytest.approx(
      calibration.negative_log_likelihood(scores, labels, result["temperature"]))
  # Fewer examples seen right: less confidence.
  few = calibration.calibrate(scores[::5], labels[::5], "validation")
  assert few["temperature"] > result["temperature"]
  # Scores that are already overconfident get T > 1: the rule follows the data both ways.
  assert calibration.calibrate(scores * 1000, labels, "validation")["temperature"] > 1
  wrong_once = calibration.calibrate(scores, np.roll(labels, 1), "validation")
  assert wrong_once["rule"] == "nll"
