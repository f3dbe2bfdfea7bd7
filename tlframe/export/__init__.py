"""The export stage: a trained model dir -> a SavedModel on raw image bytes.

- `layout`: the export's format (version dirs, signature and output names,
  tlframe_export.json, `resolve_export_dir`): all that readers need;
- `exporter`: `export_model`, which writes it (and loads the trainer's modules);
- `templates`: an earlier export's graph reused when only the variables differ.

Names resolve lazily, so `tlframe.export.resolve_export_dir` loads `layout` only.
"""

from tlframe import _lazy

__all__, __getattr__, __dir__ = _lazy.exports(__name__, {
    "layout": ("EXPORT_INFO_FILENAME", "SAVED_MODEL_FILENAME", "FORMAT_VERSION",
               "MAX_TOP_K", "TFLITE_DIRNAME", "TFLITE_FILENAME", "SERVING_DEFAULT",
               "SERVING_KEYED", "PREDICT_IMAGES", "OUTPUTS", "SIGNATURES", "resolve_export_dir",
               "latest_version", "versions"),
    "exporter": ("ClassifierModule", "export_model", "tflite_classify"),
})
