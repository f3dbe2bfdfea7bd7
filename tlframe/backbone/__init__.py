"""The backbone stage: a frozen ImageNet network as a featurizer.

- `loading`: handles (TF-Hub URLs, local SavedModels, built-ins), the built-in
  cache, `load_backbone`;
- `runtime`: precision (bfloat16 where native), oneDNN, thread counts;
- `inverted_residual`: the built-in networks (MobileNetV2, EfficientNet-Lite0/1/2)
  built in TensorFlow from their published weights;
- `torch_pth`: those weights, read from PyTorch checkpoints without torch;
- `imagenet`: bin/classify's ImageNet top-k (not part of training).
"""

from tlframe import _lazy

__all__, __getattr__, __dir__ = _lazy.exports(__name__, {
    "loading": ("DEFAULT_HANDLE", "BUILTIN_NAMES", "PRECISIONS", "FEATURES", "FEATURE_VECTOR",
                "CLASSIFICATION", "CONCATENATION_SEPARATOR", "BUILTIN_FORMAT_VERSION",
                "FLOAT32_ONLY_SUFFIX", "CLASS_NAMES_FILE", "cache_root", "builtin_dir",
                "builtin_module_dirname", "build_builtin", "ensure_builtin", "is_builtin_built",
                "resolve_handle", "Backbone", "ConcatenatedModule", "load_backbone"),
    "runtime": ("DISABLE_BF16_ENV", "bfloat16_supported", "resolve_precision", "onednn_enabled",
                "usable_cores", "default_thread_counts", "configure_threads"),
})
