"""The classic baseline the benches compare with: scikit-learn's LinearSVC, C cross-validated.

LinearSVC (one-vs-rest squared hinge, L2 penalty) on the same features as
tlframe's head, its C chosen by GridSearchCV over stratified folds: half
decades from 1e-5 to 0.1 (no larger C was ever chosen on our sets, and they
leave liblinear unconverged after 20k iterations, minutes per fit); with one
image per class, C=1 (scikit-learn's default). In tlframe's units,
l2 ~ 1/(C N) for N training images.
Needs the bench extras (scikit-learn).
"""

import time

import numpy as np

C_GRID = np.logspace(-5, -1, 9)


def cross_validated_svc(x, y, test_x, test_y):
  """(test accuracy, seconds, chosen C) of LinearSVC with C by stratified k-fold CV."""
  from sklearn.model_selection import GridSearchCV, StratifiedKFold  # pylint: disable=g-import-not-at-top
  from sklearn.svm import LinearSVC  # pylint: disable=g-import-not-at-top
  start = time.monotonic()
  smallest_class = np.bincount(y).min()
  if smallest_class < 2:  # nothing to hold out: scikit-learn's default C
    model, c = LinearSVC(max_iter=20000).fit(x, y), 1.0
  else:
    folds = StratifiedKFold(min(5, smallest_class), shuffle=True, random_state=0)
    model = GridSearchCV(LinearSVC(max_iter=20000), {"C": C_GRID}, cv=folds, n_jobs=1).fit(x, y)
    c = float(model.best_params_["C"])
  accuracy = float(np.mean(model.predict(test_x) == test_y))
  return accuracy, time.monotonic() - start, c
