"""The data's own problems, found on the backbone features: reported, never changed.

- Near-duplicates across splits: a photo in validation or test that is (nearly)
  a training photo makes the held-out accuracy a memory test. Two images are a
  pair when the cosine similarity of their backbone features, centred on the
  training mean, reaches a threshold. The default was chosen on measured data
  (bench/bench_data_checks.py, docs/production.md): re-encoded, 0.9-resized
  copies of oxford_flowers12 photos sit at or above it, distinct photos below.
- Suspected label errors: training photos whose out-of-fold prediction (the
  cross-validation's: a head that never saw the photo) confidently disagrees
  with the photo's label, ranked by how little probability the out-of-fold
  head leaves for the given label (cleanlab's "self-confidence" ranking).
  The out-of-fold scores are temperature-scaled on themselves first, so that
  hinge margins and softmax logits alike become probabilities.
"""

import csv
import io

import numpy as np

from tlframe.train import calibration
from tlframe.util import fileio

# Cosine similarity of centred MobileNetV2 features at which two photos count
# as near-duplicates (bench/bench_data_checks.py: copies >= 0.9, distinct photos
# of one class well below; see docs/production.md).
DEFAULT_NEAR_DUPLICATE_SIMILARITY = 0.85
# The out-of-fold probability of another class from which a label is suspected.
DEFAULT_SUSPECT_CONFIDENCE = 0.7
MAX_REPORTED_PAIRS = 1000
_BLOCK_ROWS = 2048


def _unit_rows(features, centre):
  rows = np.asarray(features, np.float32) - centre
  return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def near_duplicates(splits, *, centre=None, threshold=DEFAULT_NEAR_DUPLICATE_SIMILARITY,
                    max_pairs=MAX_REPORTED_PAIRS):
  """Pairs of images in different splits whose centred features' cosine similarity >= threshold.

  `splits`: {split name: (blocks, filenames)}, where `blocks()` yields the
  split's [n, D] feature rows in order, in one or more blocks (a streamed
  split never has to be in memory whole). `centre`: [D] subtracted first
  (default: the first split's mean; bin/train passes the training mean).
  Returns dicts (split_a, file_a, split_b, file_b, similarity), most similar
  first, at most `max_pairs` of them, split_a before split_b in `splits`' order.
  """
  names = list(splits)
  if centre is None:
    blocks, _ = splits[names[0]]
    total, count = 0.0, 0
    for block in blocks():
      total = total + np.asarray(block, np.float64).sum(axis=0)
      count += len(block)
    centre = (total / max(count, 1)).astype(np.float32)
  centre = np.asarray(centre, np.float32)
  pairs = []
  for a_index, name_a in enumerate(names):
    for name_b in names[a_index + 1:]:
      blocks_a, files_a = splits[name_a]
      blocks_b, files_b = splits[name_b]
      start_a = 0
      for block_a in _blocks(blocks_a):
        unit_a = _unit_rows(block_a, centre)
        start_b = 0
        for block_b in _blocks(blocks_b):
          similarity = unit_a @ _unit_rows(block_b, centre).T
          for i, j in zip(*np.nonzero(similarity >= threshold)):
            pairs.append(dict(split_a=name_a, file_a=str(files_a[start_a + i]), split_b=name_b,
                              file_b=str(files_b[start_b + j]),
                              similarity=float(similarity[i, j])))
          start_b += len(block_b)
        start_a += len(block_a)
      pairs.sort(key=lambda pair: -pair["similarity"])
      del pairs[max_pairs:]
  pairs.sort(key=lambda pair: -pair["similarity"])
  return pairs


def _blocks(make_blocks):
  """The blocks of `make_blocks()`, each cut into at most _BLOCK_ROWS rows (bounded memory)."""
  for block in make_blocks():
    for start in range(0, len(block), _BLOCK_ROWS):
      yield block[start:start + _BLOCK_ROWS]


def suspected_label_errors(out_of_fold_scores, labels, filenames, label_names, *,
                           threshold=DEFAULT_SUSPECT_CONFIDENCE):
  """Training images whose out-of-fold head gives another class >= threshold probability.

  Returns dicts (file, label, suspected_label, probability: of the suspected
  class, label_probability: of the given one), ranked by label_probability,
  lowest first (the most likely mistakes first).
  """
  scores = np.asarray(out_of_fold_scores, np.float64)
  labels = np.asarray(labels, np.int64)
  predicted = scores.argmax(axis=1)
  temperature = (calibration.fit_temperature(scores, labels)
                 if np.any(predicted != labels) else 1.0)
  probabilities = calibration.softmax(scores, temperature)
  rows = np.arange(len(labels))
  confidence = probabilities[rows, predicted]
  label_probability = probabilities[rows, labels]
  suspects = np.flatnonzero((predicted != labels) & (confidence >= threshold))
  suspects = suspects[np.argsort(label_probability[suspects], kind="stable")]
  return [dict(file=str(filenames[i]), label=label_names[labels[i]],
               suspected_label=label_names[predicted[i]], probability=float(confidence[i]),
               label_probability=float(label_probability[i])) for i in suspects]


def check(feature_sets, out_of_fold_scores, cv_set, label_names, *,
          similarity=DEFAULT_NEAR_DUPLICATE_SIMILARITY, confidence=DEFAULT_SUSPECT_CONFIDENCE):
  """bin/train's checks, as metrics.json's `data_checks` dict.

  feature_sets: {split: features.FeatureSet or None}, train first (its mean
  centres the features). out_of_fold_scores: [N, C] of `cv_set`'s rows, or
  None (too few images: `suspects` is then None).
  """
  splits = {split: ((lambda s=feature_set: (part[0] for part in s.parts())),
                    feature_set.filenames)
            for split, feature_set in feature_sets.items() if feature_set is not None}
  pairs = near_duplicates(splits, threshold=similarity) if len(splits) > 1 else []
  suspects = (None if out_of_fold_scores is None else suspected_label_errors(
      out_of_fold_scores, cv_set.labels, cv_set.filenames, label_names, threshold=confidence))
  return dict(near_duplicates=pairs, near_duplicate_threshold=similarity, suspects=suspects,
              suspect_threshold=confidence, suspects_checked=None if suspects is None else
              len(cv_set.labels))


def write_suspects_csv(path, suspects):
  """suspect_labels.csv (atomic): rank, file, label, suspected_label and both probabilities."""
  table = io.StringIO()
  writer = csv.writer(table, lineterminator="\n")
  writer.writerow(["rank", "file", "label", "suspected_label", "probability",
                   "label_probability"])
  for rank, row in enumerate(suspects, 1):
    writer.writerow([rank, row["file"], row["label"], row["suspected_label"],
                     f"{row['probability']:.4f}", f"{row['label_probability']:.4f}"])
  fileio.atomic_write_text(path, table.getvalue())
