"""The small-data path: calibration and the l2 choice on tiny sets, bin/train from photos in
one command (and its resume after kill -9), and the rerun of a finished model dir."""

import pytest

from tlframe import tuning


def test_the_l2_plateau_is_decided_by_the_calibrated_loss_not_the_grid_edge():
  rows = [dict(l2=l2, accuracy=accuracy, calibrated_loss=loss) for l2, accuracy, loss in [
      (1e-3, 0.9, 0.01), (1e-2, 1.0, 0.30), (0.1, 1.0, 0.12), (1.0, 1.0, 0.20), (10.0, 1.0, 0.25)]]
  assert tuning.best_l2(rows) == 0.1            # the plateau's lowest calibrated loss
  rows[3]["calibrated_loss"] = 0.12
  assert tuning.best_l2(rows) == 1.0            # an exact tie: the more regularized
  rows[0]["accuracy"] = 1.01
  assert tuning.best_l2(rows) == 1e-3           # accuracy first
