"""The prediction side: an export -> predictions, evaluations and their reports.

- `classifier`: `Classifier`, the Python API on an export;
- `prediction`: bin/predict's files and folders -> rows;
- `evaluation`: bin/evaluate's metrics and report;
- `report`, `plots`: the HTML report and its figures.

These read the export's format (tlframe.export.layout), never the trainer.
"""

from tlframe import _lazy

__all__, __getattr__, __dir__ = _lazy.exports(__name__, {
    "classifier": ("Classifier", "Predictions"),
    "prediction": ("predict_files",),
    "evaluation": ("evaluate",),
})
