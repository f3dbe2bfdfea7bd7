"""Cross-validation of the l2 penalty, and of the feature normalization, on cached features.

All (l2, fold) pairs train together as one stacked head (head.LinearHead's
model axis) in one in-graph loop, so the whole grid costs about one training
run. With --feature_normalization=auto, that is done once per candidate
normalization (options.AUTO_NORMALIZATIONS). The result is data (one row per
normalization and l2); bin/train prints it.
"""

import dataclasses

import numpy as np
import tensorflow as tf
from absl import logging

from tlframe.train import calibration as calibration_lib
from tlframe.train import features as features_lib
from tlframe.train import head as head_lib
from tlframe import options as options_lib
from tlframe.train import trainer as trainer_lib
from tlframe.errors import UserError

# How far the l2 search may widen: beyond these the head is unregularized or zero.
L2_LIMITS = (1e-9, 1e4)
_WIDENING_RATIO = 10 ** 0.5


def stratified_folds(labels, num_folds, seed):
  """Fold index of each example: classes shuffled within and dealt round-robin in turn.

  Dealing continues from one class to the next, so folds differ in size by at
  most one and each class is spread as evenly as its count allows.
  """
  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(np.flatnonzero(labels == label))
                          for label in np.unique(labels)])
  folds = np.zeros(len(labels), np.int64)
  folds[order] = np.arange(len(order)) % num_folds
  return folds


def out_of_fold_scores(strategy, options, train_x, train_y, num_classes, *, shift, scale,
                       l2_values=None, trainers=None):
  """[G, N, C] scores of each example by the model of its l2 that did not train on it.

  For each l2 in `l2_values` (default: options.l2), options.cv_folds models
  train together, model k without fold k. Returns None when there are fewer
  training examples than folds. trainers: a dict in which calls whose options
  differ only in feature_normalization share their trainer (restarted), so
  its loop is traced once.
  """
  num_folds = options.cv_folds
  if len(train_y) < num_folds:
    return None
  grid = np.asarray([options.l2] if l2_values is None else l2_values, np.float32)
  folds = stratified_folds(train_y, num_folds, options.seed)
  # Model g * num_folds + k: l2 = grid[g], trained without fold k.
  held_out = np.tile(np.arange(num_folds), len(grid))
  train_masks = (folds[None, :] != held_out[:, None]).astype(np.float32)   # [M, N]
  weights = train_masks * trainer_lib.class_weights(train_y, num_classes,
                                                    options.class_weight)[train_y]
  global_batch = trainer_lib.effective_batch_size(options, len(train_y),
                                                  strategy.num_replicas_in_sync)
  key = (tuple(grid.tolist()), train_x.shape[1], num_classes, global_batch, train_masks.tobytes())
  trainers = {} if trainers is None else trainers
  if key in trainers:
    trainer = trainers[key]
    trainer.restart(options, (shift, scale))
  else:
    trainer = trainers[key] = trainer_lib.HeadTrainer(
        strategy, options, num_features=train_x.shape[1], num_classes=num_classes,
        steps_per_epoch=len(train_y) // global_batch, global_batch_size=global_batch,
        l2_values=np.repeat(grid, num_folds), normalization=(shift, scale),
        model_fractions=train_masks.mean(axis=1))
  normalized = trainer.normalize(train_x)
  trainer.fit(lambda first: trainer_lib.feature_batches(
      strategy, normalized, train_y, weights, global_batch, options.seed, first, options.epochs))
  _, _, scores = trainer.evaluate(tf.constant(train_x), tf.constant(train_y))
  held_out_model = np.arange(len(grid))[:, None] * num_folds + folds[None, :]   # [G, N]
  return scores.numpy()[held_out_model, np.arange(len(train_y))[None, :]]


def cross_validation_set(train_set, options, num_classes):
  """The in-memory FeatureSet l2 is cross-validated on: the training set, or a subsample of it.

  A streamed set (larger than options.max_in_memory_features) gives a
  stratified subsample of that many feature values (at least cv_folds images
  per class), logged.
  """
  if not train_set.streamed:
    return train_set
  values_per_row = train_set.stream.dim * (2 if train_set.has_flips else 1)
  max_rows = max(options.max_in_memory_features // values_per_row,
                 options.cv_folds * num_classes)
  subsample = train_set.subset(features_lib.stratified_rows(train_set.labels, max_rows,
                                                            options.seed))
  logging.info("The training features are streamed: l2 is cross-validated on a stratified "
               "subsample of %d of the %d training images (--max_in_memory_features=%d)",
               len(subsample.labels), len(train_set.labels), options.max_in_memory_features)
  return subsample


def best_l2(rows):
  """The l2 of the rows (dicts of l2, held-out accuracy and calibrated_loss) that tune_l2 chooses.

  Among the rows of the highest held-out accuracy (on tiny or separable sets,
  a plateau of many l2), the one with the lowest held-out loss after
  temperature scaling (`calibrated_loss`); an exact tie goes to the largest
  l2. The temperature undoes the scale of the scores, which l2 sets: the raw
  held-out loss always favours the least regularized head, and the edge of
  the plateau (the largest l2, this rule's tie-break before) is wherever the
  grid ends. What remains is how well the held-out examples are separated
  relative to each other: their margins (docs/training.md).
  """
  top = max(row["accuracy"] for row in rows)
  plateau = [row for row in rows if row["accuracy"] == top]
  return min(plateau, key=lambda row: (row["calibrated_loss"], -row["l2"]))["l2"]


def clearly_better(challenger, incumbent):
  """Whether the `challenger` normalization's CV result beats the `incumbent`'s.

  Each: dict(accuracy (held-out, at its chosen l2), losses ([N] held-out
  losses after temperature scaling, per example)). Better: a higher held-out
  accuracy; at the same accuracy, a mean calibrated loss lower by more than
  options.NORMALIZATION_TIE_STANDARD_ERRORS standard errors of the
  per-example difference (the
  examples are the same for both, so the difference is paired). Anything less
  is a tie, and the incumbent keeps it.
  """
  if challenger["accuracy"] != incumbent["accuracy"]:
    return challenger["accuracy"] > incumbent["accuracy"]
  difference = np.asarray(incumbent["losses"]) - np.asarray(challenger["losses"])
  if len(difference) < 2:
    return False
  standard_error = difference.std(ddof=1) / np.sqrt(len(difference))
  return difference.mean() > options_lib.NORMALIZATION_TIE_STANDARD_ERRORS * standard_error


def tune_head(strategy, options, train_x, train_y, num_classes, *, normalization_constants):
  """The cross-validated feature normalization and l2: (normalization, l2, rows, scores, widened).

  For options.l2 unset (train.run resolves "auto" to standardize when --l2 is
  given). Candidates: options_lib.AUTO_NORMALIZATIONS when
  options.feature_normalization is "auto", else that one; l2: options.l2_grid,
  widened at an edge (tune_l2), each candidate's chosen by best_l2. Between the
  candidates, `clearly_better` decides, in their order (AUTO_NORMALIZATIONS
  lists the simplest first, which keeps a tie). Each row also names its
  `feature_normalization`; scores are the choice's [N, C] out-of-fold scores.
  `normalization_constants(name)` gives the (shift, scale) of that
  normalization of the training features (train.run passes the training
  set's `features.FeatureSet.normalization_constants`).
  """
  candidates = (options_lib.AUTO_NORMALIZATIONS if options.feature_normalization == "auto"
                else (options.feature_normalization,))
  results, trainers = [], {}
  for normalization in candidates:
    candidate = dataclasses.replace(options, feature_normalization=normalization)
    shift, scale = normalization_constants(normalization)
    l2, rows, scores = tune_l2(strategy, candidate, train_x, train_y, num_classes, shift=shift,
                               scale=scale, trainers=trainers)
    rows = [dict(row, feature_normalization=normalization) for row in rows]
    chosen = next(row for row in rows if row["l2"] == l2)
    results.append(dict(normalization=normalization, l2=l2, rows=rows, scores=scores,
                        accuracy=chosen["accuracy"],
                        losses=calibration_lib.per_example_nll(scores, train_y,
                                                               chosen["temperature"])))
  best = results[0]
  for result in results[1:]:
    if clearly_better(result, best):
      best = result
  normalization, l2, scores = best["normalization"], best["l2"], best["scores"]
  if len(candidates) > 1:
    logging.info("Feature normalization by cross-validation: %s (held-out accuracy %.4f)",
                 normalization, best["accuracy"])
  rows = [row for result in results for row in result["rows"]]
  widened = any(len(result["rows"]) > len(set(options.l2_grid)) for result in results)
  return normalization, l2, rows, scores, widened


def tune_l2(strategy, options, train_x, train_y, num_classes, *, shift, scale, trainers=None):
  """k-fold CV over options.l2_grid on cached features, widened at an edge.

  Returns (best l2, table rows sorted by l2, [N, C] out-of-fold scores of the
  best l2). Each row: dict(l2; accuracy and loss over all held-out
  predictions; their standard deviations across folds, accuracy_std and
  loss_std; the held-out loss after temperature scaling, calibrated_loss, and
  that temperature). The best (`best_l2`): the highest held-out accuracy,
  then the lowest calibrated loss. When the best is at an edge of the grid
  with a higher accuracy than the next value inwards (not a tie on a
  plateau), the grid grows by two more steps of its own ratio on that side
  (logged), until the best is inside or l2 reaches L2_LIMITS. trainers: as in
  out_of_fold_scores.
  """
  if len(train_y) < options.cv_folds:
    raise UserError(f"cv_folds={options.cv_folds} but only {len(train_y)} training examples: "
                    "lower cv_folds, or set l2 to skip its cross-validation",
                    arguments=["cv_folds", "l2"])
  folds = stratified_folds(train_y, options.cv_folds, options.seed)
  grid = sorted(set(options.l2_grid))
  ratio = grid[1] / grid[0] if len(grid) > 1 else _WIDENING_RATIO
  rows, scores = {}, {}

  def evaluate(values):
    new_scores = out_of_fold_scores(strategy, options, train_x, train_y, num_classes,
                                    shift=shift, scale=scale, l2_values=values,
                                    trainers=trainers)
    losses = head_lib.per_example_loss(options.loss, tf.constant(new_scores), train_y,
                                       options.label_smoothing).numpy()       # [G, N]
    correct = np.argmax(new_scores, axis=-1) == train_y[None, :]
    by_fold = [folds == k for k in range(options.cv_folds)]
    for g, l2 in enumerate(values):
      scores[l2] = new_scores[g]
      calibrated = calibration_lib.calibrate(new_scores[g], train_y, "out_of_fold")
      rows[l2] = dict(l2=float(l2), accuracy=float(correct[g].mean()),
                      accuracy_std=float(np.std([correct[g][f].mean() for f in by_fold])),
                      loss=float(losses[g].mean()),
                      loss_std=float(np.std([losses[g][f].mean() for f in by_fold])),
                      calibrated_loss=calibrated["loss"], temperature=calibrated["temperature"])

  evaluate(grid)
  while True:
    best = best_l2(rows.values())
    tried = sorted(rows)
    low, high = tried[0], tried[-1]
    # Only while accuracy still rises at the edge: along a plateau of equal
    # held-out accuracy (separable data) the tie-break alone could walk l2 out
    # to L2_LIMITS, a CV run per step, for no held-out gain.
    rising_up = len(tried) == 1 or rows[high]["accuracy"] > rows[tried[-2]]["accuracy"]
    rising_down = len(tried) > 1 and rows[low]["accuracy"] > rows[tried[1]]["accuracy"]
    if best == high and rising_up and high * ratio <= L2_LIMITS[1]:
      more = [high * ratio, high * ratio ** 2]
    elif best == low and rising_down and low / ratio >= L2_LIMITS[0]:
      more = [low / ratio ** 2, low / ratio]
    else:
      break
    logging.info("The best l2 (%g) is at the edge of the grid: also trying %s", best,
                 ", ".join(f"{v:.3g}" for v in more))
    evaluate([v for v in more if L2_LIMITS[0] <= v <= L2_LIMITS[1]])
  return float(best), [rows[l2] for l2 in sorted(rows)], scores[best]
