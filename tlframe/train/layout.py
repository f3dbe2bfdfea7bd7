"""The model dir's layout: the name of every file and folder a run writes there.

Defined here alone: bin/train's modules write these files and the export,
evaluation and report read them through these names, and `OUTPUTS` is what
`overwrite` removes (tlframe.train.model_dir), so a renamed file can't be left
behind. Light on purpose: readers of a model load no trainer for it.
"""

import os

from tlframe import options as options_lib
from tlframe import records

RUN_OPTIONS_FILENAME = "run_options.json"
METRICS_FILENAME = "metrics.json"
CHECKPOINT_DIRNAME = "checkpoints"
LOGS_DIRNAME = "logs"                      # TensorBoard
FINE_TUNE_SUBDIRNAME = "fine_tune"         # fine-tuning's, in checkpoints/ and in logs/
HEAD_CONFIG_FILENAME = "head_config.json"
HEAD_DIRNAME = "head"
HEAD_CHECKPOINT = os.path.join(HEAD_DIRNAME, "head")      # the head's variables
LABELS_FILENAME = records.LABELS_FILENAME  # the records' labels file, copied
CALIBRATION_FILENAME = "calibration.json"
FINE_TUNED_BACKBONE_DIRNAME = "fine_tuned_backbone"
FINE_TUNED_BACKBONE_CHECKPOINT = os.path.join(FINE_TUNED_BACKBONE_DIRNAME, "variables")
EXPORT_DIRNAME = "export"
REPORT_FILENAME = "report.html"
PLOTS_DIRNAME = "plots"
SUSPECT_LABELS_FILENAME = "suspect_labels.csv"
# Earlier versions wrote an unlabelled confusion matrix here (report.html has the
# labelled one now): a name --overwrite still removes, written by no run.
EARLIER_CONFUSION_FILENAME = "confusion_matrix.png"
# The run's input (bin/train --image_dir converts into it), not one of its outputs.
RECORDS_DIRNAME = options_lib.RECORDS_DIRNAME
# Everything a run writes into the model dir (the lock file aside): what --overwrite removes.
OUTPUTS = (RUN_OPTIONS_FILENAME, CHECKPOINT_DIRNAME, LOGS_DIRNAME, METRICS_FILENAME,
           EARLIER_CONFUSION_FILENAME, HEAD_DIRNAME, HEAD_CONFIG_FILENAME, LABELS_FILENAME,
           CALIBRATION_FILENAME, EXPORT_DIRNAME, FINE_TUNED_BACKBONE_DIRNAME, REPORT_FILENAME,
           PLOTS_DIRNAME, SUSPECT_LABELS_FILENAME)
