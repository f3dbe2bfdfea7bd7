"""Stage-free helpers: `fileio` (atomic writes, filesystems), `locking` (one run per
directory), `progress` (counts, rate, ETA), `native_logs` (TensorFlow's start-up
noise). Imported as modules (`from tlframe.util import fileio`); this package
itself loads nothing, as `tlframe/__init__.py` needs before TensorFlow loads.
"""

__all__ = ["fileio", "locking", "native_logs", "progress"]
