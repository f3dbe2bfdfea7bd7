"""Calibrated probabilities: temperature scaling of the head's scores, and how to measure it.

A linear head's scores are not probabilities: softmax logits are over- or
under-confident, and hinge (SVM) margins are on no probability scale at all.
Temperature scaling (Guo et al., 2017) divides the scores by one number T,
fitted by the negative log-likelihood of held-out labels, before the softmax:
`probabilities = softmax(scores / T)`. It never changes the argmax, so the
accuracy stays what it was; only the confidences move.

The expected calibration error (ECE) measures the result: examples are put
into equal-width bins of their top probability, and ECE is the mean over
examples of |accuracy - confidence| of their bin.

bin/train fits T on the validation split (or on out-of-fold training scores
when there is none); when every held-out example is right, T follows the rule
of succession instead (`calibrate`), so a tiny set is never left uncalibrated and
writes `<model_dir>/calibration.json`; the export reads it and builds
`softmax(scores / T)` into the SavedModel.
"""

import os

import numpy as np
import tensorflow as tf

from tlframe.util import fileio
from tlframe.train import layout as model_dir_layout
from tlframe.errors import UserError

DEFAULT_NUM_BINS = 15
FITTED_ON = ("validation", "out_of_fold")
# The search range of T. Softmax logits need T near 1; hinge margins of a
# well-separated SVM are a few units apart and may need T well below 1.
_MIN_LOG_T, _MAX_LOG_T = np.log(1e-3), np.log(1e3)
_GRID_POINTS = 61
_GOLDEN_STEPS = 60


def softmax(scores, temperature=1.0):
  """Row-wise softmax of [N, C] scores / temperature, in float64, stable for any scale."""
  logits = np.asarray(scores, np.float64) / temperature
  logits = logits - logits.max(axis=-1, keepdims=True)
  exp = np.exp(logits)
  return exp / exp.sum(axis=-1, keepdims=True)


def per_example_nll(scores, labels, temperature):
  """[N] -log softmax(scores / T)[label] of [N, C] scores and [N] int labels."""
  logits = np.asarray(scores, np.float64) / temperature
  top = logits.max(axis=-1, keepdims=True)
  log_normalizer = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
  return log_normalizer - logits[np.arange(len(labels)), labels]


def negative_log_likelihood(scores, labels, temperature):
  """Mean -log softmax(scores / T)[label] of [N, C] scores and [N] int labels."""
  return float(np.mean(per_example_nll(scores, labels, temperature)))


def fit_temperature(scores, labels):
  """The T > 0 that minimizes the NLL of softmax(scores / T) on ([N, C] scores, [N] labels).

  The NLL is convex in 1/T, so a coarse grid over log T followed by a
  golden-section search in the best grid cell finds the minimum without
  gradients or a starting guess; scores of any scale (softmax logits, hinge
  margins) work. When every example is right and well separated the NLL keeps
  falling as T shrinks and the search stops at the range's end (T = 1e-3):
  `calibrate` uses `succession_temperature` then.
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels, np.int64)
  if scores.ndim != 2 or len(scores) != len(labels) or not len(labels):
    raise UserError(f"temperature fitting needs [N, C] scores and N labels, N > 0; got "
                    f"scores {scores.shape} and {labels.shape} labels")

  def nll(log_t):
    return negative_log_likelihood(scores, labels, np.exp(log_t))

  grid = np.linspace(_MIN_LOG_T, _MAX_LOG_T, _GRID_POINTS)
  values = [nll(log_t) for log_t in grid]
  best = int(np.argmin(values))
  low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
  ratio = (np.sqrt(5.0) - 1.0) / 2.0
  a, b = high - ratio * (high - low), low + ratio * (high - low)
  nll_a, nll_b = nll(a), nll(b)
  for _ in range(_GOLDEN_STEPS):
    if nll_a <= nll_b:
      high, b, nll_b = b, a, nll_a
      a = high - ratio * (high - low)
      nll_a = nll(a)
    else:
      low, a, nll_a = a, b, nll_b
      b = low + ratio * (high - low)
      nll_b = nll(b)
  candidates = [(values[best], grid[best]), (nll_a, a), (nll_b, b)]
  return float(np.exp(min(candidates)[1]))


def reliability_bins(probabilities, labels, num_bins=DEFAULT_NUM_BINS):
  """Per equal-width bin of top probability: lower, upper, count, accuracy, confidence.

  Empty bins have count 0 and accuracy/confidence None.
  """
  probabilities = np.asarray(probabilities, np.float64)
  labels = np.asarray(labels, np.int64)
  confidence = probabilities.max(axis=-1)
  correct = probabilities.argmax(axis=-1) == labels
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  # Bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 goes to bin 0.
  index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
  bins = []
  for i in range(num_bins):
    members = index == i
    count = int(members.sum())
    bins.append(dict(lower=float(edges[i]), upper=float(edges[i + 1]), count=count,
                     accuracy=float(correct[members].mean()) if count else None,
                     confidence=float(confidence[members].mean()) if count else None))
  return bins


def expected_calibration_error(probabilities, labels, num_bins=DEFAULT_NUM_BINS):
  """ECE: sum over bins of count / N * |accuracy - confidence| (equal-width bins)."""
  bins = reliability_bins(probabilities, labels, num_bins)
  total = sum(b["count"] for b in bins)
  if not total:
    return 0.0
  return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"])
                   for b in bins if b["count"]))


def succession_temperature(scores, num_right):
  """The T at which the mean top-class probability of softmax(scores / T) is Laplace's estimate
  of the accuracy, (num_right + 1) / (N + 2), bounded to [1e-3, 1e3].

  The top-class probability of every row falls as T grows, so their mean
  does too, and a bisection over log T finds it. For a held-out set that is
  all right, where the NLL has no minimum (it falls without end as T
  shrinks), this is the temperature the data supports: confident in
  proportion to how many examples were seen right, never certain.
  """
  scores = np.asarray(scores, np.float64)
  target = (num_right + 1.0) / (len(scores) + 2.0)

  def mean_confidence(log_t):
    return float(softmax(scores, np.exp(log_t)).max(axis=-1).mean())

  low, high = _MIN_LOG_T, _MAX_LOG_T
  if mean_confidence(low) <= target:   # ties or near-ties: even the bound's T is not that sure
    return float(np.exp(low))
  if mean_confidence(high) >= target:
    return float(np.exp(high))
  for _ in range(_GOLDEN_STEPS):
    middle = (low + high) / 2
    if mean_confidence(middle) > target:
      low = middle
    else:
      high = middle
  return float(np.exp((low + high) / 2))


def calibrate(scores, labels, fitted_on, num_bins=DEFAULT_NUM_BINS):
  """Fits T on held-out ([N, C] scores, [N] labels); returns calibration.json's dict.

  With some held-out example wrong, T minimizes the NLL (`fit_temperature`;
  rule "nll"). When every one is right, the NLL has no minimum (it keeps
  falling as T shrinks, towards probabilities of exactly 1), so T follows the
  rule of succession instead (`succession_temperature`; rule "succession"):
  the mean top-class probability on the held-out set becomes (N + 1) / (N + 2).
  Either way `loss` is the held-out NLL at the chosen T.
  """
  if fitted_on not in FITTED_ON:
    raise UserError(f"fitted_on must be one of {', '.join(FITTED_ON)}, not {fitted_on!r}")
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels, np.int64)
  num_right = int(np.sum(np.argmax(scores, axis=-1) == labels))
  if num_right == len(labels):
    temperature, rule = succession_temperature(scores, num_right), "succession"
  else:
    temperature, rule = fit_temperature(scores, labels), "nll"
  return dict(method="temperature", temperature=temperature, rule=rule, fitted_on=fitted_on,
              num_bins=num_bins, num_examples=len(labels), num_right=num_right,
              loss=negative_log_likelihood(scores, labels, temperature),
              ece_before=expected_calibration_error(softmax(scores), labels, num_bins),
              ece_after=expected_calibration_error(softmax(scores, temperature), labels,
                                                   num_bins))


def write_calibration(model_dir, calibration):
  """`<model_dir>/calibration.json` (atomic) from `calibrate`'s dict."""
  fileio.atomic_write_json(os.path.join(model_dir, model_dir_layout.CALIBRATION_FILENAME), calibration)


def read_calibration(model_dir):
  """The model's calibration dict; method "none" with T = 1 when there is no file."""
  path = os.path.join(model_dir, model_dir_layout.CALIBRATION_FILENAME)
  if not tf.io.gfile.exists(path):
    return dict(method="none", temperature=1.0, fitted_on=None)
  try:
    calibration = fileio.read_json(path)
    temperature = float(calibration["temperature"])
  except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
    raise UserError(f"{path} is not a calibration file ({type(e).__name__}: {e}); delete it "
                    "to export without calibration, or retrain") from None
  if not (np.isfinite(temperature) and temperature > 0):
    raise UserError(f"{path}: temperature {temperature} is not a positive number; delete the "
                    "file or retrain")
  return calibration
