"""tlframe: image classifiers by transfer learning on a frozen ImageNet backbone.

Data flows one way, one subpackage per stage:
files -> `records` (sharded TFRecords) -> `pipeline` (fixed-size tf.data batches)
-> `backbone` (frozen featurizer) -> `train` (linear hinge or softmax head)
-> `export` (a SavedModel on image bytes) -> `predict` (`Classifier`), `serve`.
`util` and `cli` serve every stage; README.md's layout table lists the modules.
"""

import os

from tlframe.util import native_logs

# First, before TensorFlow loads: its native start-up lines ("failed call to
# cuInit", oneDNN notices) look like failures to a user of the library as much
# as to one of bin/. TLFRAME_NATIVE_LOGS=1 shows them (tlframe/util/native_logs.py).
native_logs.filter_stderr()

# oneDNN's fused convolutions run the backbone ~2.4x faster on x86 CPUs where
# TensorFlow leaves them off by default (those without AVX512-VNNI/BF16 or AMX,
# e.g. AVX2-only AMD EPYC; bench/bench_backbone.py). TensorFlow reads this once,
# when it loads: import tlframe before tensorflow. An explicit
# TF_ENABLE_ONEDNN_OPTS=0 is respected. See docs/backbone.md.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
# TensorFlow's C++ INFO lines at start-up (CUDA probing on CPU-only machines,
# the oneDNN notice) bury tlframe's progress lines; its warnings and errors
# still show. An explicit TF_CPP_MIN_LOG_LEVEL is respected.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

__version__ = "0.1.0"


def __getattr__(name):
  """`tlframe.Classifier` (tlframe.predict.classifier), imported on first use: `import tlframe`
  itself stays free of TensorFlow, which must load after the settings above."""
  if name == "Classifier":
    from tlframe.predict.classifier import Classifier  # pylint: disable=g-import-not-at-top
    return Classifier
  raise AttributeError(f"module 'tlframe' has no attribute {name!r}")
