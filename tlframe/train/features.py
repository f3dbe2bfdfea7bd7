"""A split's features as the training stage uses them: `FeatureSet`.

A FeatureSet holds a split's backbone features, labels and file names in
record order, and a few thumbnails per class for TensorBoard's sample grids
and the embedding projector's sprite. It is made by the backbone pass
(`extraction.extract_features`) or read from the feature cache
(`feature_cache.cached_features`), and the head's training, tuning,
calibration and evaluation read it without caring which.

Beyond memory: a split whose features exceed `max_in_memory_features` float
values is not loaded; its FeatureSet holds labels, file names and thumbnails,
and its features stay in the cache parts (`FeatureSet.stream`, a
feature_cache.Stream), read part by part (`parts`, `average_flip_scores`,
`subset`) or streamed by tf.data (trainer.streamed_feature_batches).

With `flip`, the backbone pass also ran on each image's left-right mirror:
`FeatureSet.flipped_features`, extra training examples (`training_examples`)
and a second view whose scores evaluation averages with the first
(`average_flip_scores`; the export does the same).
"""

import dataclasses

import numpy as np

from tlframe.train import head as head_lib

THUMBNAIL_SIZE = 48


@dataclasses.dataclass
class FeatureSet:
  """A split's features [N, D] float32 and labels [N] int32, in record order.

  flipped_features: [N, D] features of the left-right mirrored images, row
  for row, when extracted with `flip` (else None): extra training examples,
  and a second view whose scores `average_flip_scores` averages with the first.
  thumbnails: uint8 [K, THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3] of up to
  `num_thumbnails_per_class` images per class; thumbnail_rows: their row in
  `features`. extract_seconds: time this run spent getting the features (the
  backbone pass, or loading the cache when from_cache). stream: set (and
  features None) when the features stay in the cache parts (`streamed`).
  """
  features: np.ndarray
  labels: np.ndarray
  filenames: np.ndarray
  thumbnails: np.ndarray
  thumbnail_rows: np.ndarray
  extract_seconds: float = 0.0
  from_cache: bool = False
  skipped: int = 0
  flipped_features: np.ndarray = None
  stream: object = None   # a feature_cache.Stream when the features stay in the cache

  @property
  def thumbnail_labels(self):
    return self.labels[self.thumbnail_rows]

  @property
  def streamed(self):
    return self.stream is not None

  @property
  def has_flips(self):
    return self.stream.flip if self.streamed else self.flipped_features is not None

  @property
  def num_training_examples(self):
    return len(self.labels) * (2 if self.has_flips else 1)

  def training_examples(self):
    """(features, labels) to train a head on: the mirrors' rows follow the originals' when kept."""
    if self.flipped_features is None:
      return self.features, self.labels
    return (np.concatenate([self.features, self.flipped_features]),
            np.concatenate([self.labels, self.labels]))

  def normalization_constants(self, feature_normalization):
    """head.normalization_constants of the set's training examples; over the parts when streamed."""
    if not self.streamed:
      return head_lib.normalization_constants(self.training_examples()[0], feature_normalization)
    if feature_normalization != "standardize":
      return head_lib.normalization_constants(np.zeros([0, self.stream.dim], np.float32),
                                              feature_normalization)
    total = np.zeros([self.stream.dim], np.float64)
    squares = np.zeros_like(total)
    for features, flipped, _ in self.parts():
      for rows in (features, flipped) if flipped is not None else (features,):
        total += rows.sum(axis=0, dtype=np.float64)
        squares += np.square(rows, dtype=np.float64).sum(axis=0)
    count = self.num_training_examples
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
    return head_lib.standardization_constants(mean, std)

  def parts(self):
    """(features, flipped or None, labels) of each cache part in order; one when in memory."""
    if not self.streamed:
      yield self.features, self.flipped_features, self.labels
      return
    yield from self.stream.parts()

  def subset(self, rows):
    """An in-memory FeatureSet of the given rows (sorted), with their thumbnails."""
    rows = np.sort(np.asarray(rows, np.int64))
    if self.streamed:
      wanted = np.zeros(len(self.labels), bool)
      wanted[rows] = True
      picked = [(f[wanted[start:start + len(y)]],
                 None if flipped is None else flipped[wanted[start:start + len(y)]])
                for (f, flipped, y), start in zip(self.parts(), np.cumsum((0,) + self.stream.rows))]
      features = np.concatenate([f for f, _ in picked])
      flipped = np.concatenate([f for _, f in picked]) if self.has_flips else None
    else:
      features = self.features[rows]
      flipped = None if self.flipped_features is None else self.flipped_features[rows]
    shown = np.isin(self.thumbnail_rows, rows)
    return FeatureSet(features=features, flipped_features=flipped, labels=self.labels[rows],
                      filenames=self.filenames[rows], thumbnails=self.thumbnails[shown],
                      thumbnail_rows=np.searchsorted(rows, self.thumbnail_rows[shown]),
                      from_cache=self.from_cache)

  def thumbnail_subset(self):
    """The rows that have thumbnails, in memory (the embedding projector's points)."""
    return self.subset(self.thumbnail_rows)


def average_flip_scores(scores_of, feature_set):
  """[N, C] scores of each image: `scores_of(features)` averaged over it and its mirror.

  The plain scores when the set has no flipped features; part by part when
  streamed. The export averages the same two scores (export.ClassifierModule's
  `average_flips`).
  """
  scores = []
  for features, flipped, _ in feature_set.parts():
    part = scores_of(features)
    scores.append(part if flipped is None else (part + scores_of(flipped)) / 2)
  return np.concatenate(scores)


def stratified_rows(labels, max_rows, seed):
  """Sorted rows, `max_rows` of them (all when fewer), each class kept in its share.

  Each class gets its share rounded down (at least one row), and the rows left
  over go to the classes with the largest remainders.
  """
  if len(labels) <= max_rows:
    return np.arange(len(labels))
  classes, counts = np.unique(labels, return_counts=True)
  quotas = counts * max_rows / len(labels)
  taken = np.minimum(counts, np.maximum(1, np.floor(quotas))).astype(np.int64)
  by_remainder = np.argsort(-(quotas - np.floor(quotas)), kind="stable")
  for index in by_remainder[:max(0, max_rows - taken.sum())]:
    taken[index] += taken[index] < counts[index]
  rng = np.random.default_rng(seed)
  rows = [rng.permutation(np.flatnonzero(labels == label))[:take]
          for label, take in zip(classes, taken)]
  return np.sort(np.concatenate(rows))
