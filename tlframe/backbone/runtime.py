"""How the backbone runs on this machine: precision, oneDNN and thread counts.

`resolve_precision` turns "auto" into bfloat16 where the CPU computes it
natively (AMX or AVX512-BF16) and float32 elsewhere; `configure_threads` sets
TensorFlow's thread pools before any op runs. See docs/backbone.md.
"""

import os
import platform

from absl import logging
import tensorflow as tf

from tlframe.errors import UserError
from tlframe.options import PRECISIONS

DISABLE_BF16_ENV = "TLFRAME_DISABLE_BF16"


def _cpu_flags():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


def bfloat16_supported():
  """Whether this machine computes bfloat16 natively.

  GPUs with compute capability >= 8.0; CPUs with AMX-BF16 or AVX512-BF16.
  `TLFRAME_DISABLE_BF16=1` says no, e.g. to check the float32 fallback.
  """
  if os.environ.get(DISABLE_BF16_ENV, "") not in ("", "0"):
    return False
  gpus = tf.config.list_physical_devices("GPU")
  if gpus:
    capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
    return bool(capability) and tuple(capability) >= (8, 0)
  return bool(_cpu_flags() & {"amx_bf16", "avx512_bf16"})


def resolve_precision(precision):
  """'float32' or 'bfloat16' for a requested `precision` in PRECISIONS."""
  if precision not in PRECISIONS:
    raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}",
                    arguments=["precision"])
  if precision == "auto":
    return "bfloat16" if bfloat16_supported() else "float32"
  if precision == "bfloat16" and not bfloat16_supported():
    logging.warning("precision bfloat16: this machine has no native bfloat16 (AMX/AVX512-BF16 "
                    "CPU or GPU with compute capability >= 8.0); it will be emulated and slow")
  return precision


def onednn_enabled():
  """Whether TensorFlow runs its CPU kernels with oneDNN; None where this TF cannot say."""
  try:
    from tensorflow.python.util import _pywrap_util_port  # pylint: disable=g-import-not-at-top
    return bool(_pywrap_util_port.IsMklEnabled())
  except (ImportError, AttributeError):
    return None


def warn_if_onednn_off():
  """tlframe turns oneDNN on when imported before TensorFlow (see tlframe/__init__.py)."""
  if (platform.machine().lower() in ("x86_64", "amd64") and onednn_enabled() is False
      and os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0"
      and not tf.config.list_physical_devices("GPU")):
    logging.log_first_n(
        logging.WARNING, "oneDNN is off because TensorFlow was imported before tlframe: on this "
        "CPU the backbone may run up to ~2.4x slower. Import tlframe first, or set "
        "TF_ENABLE_ONEDNN_OPTS=1 before starting Python", 1)


def usable_cores():
  """The cores this process may use: a container's CPU set, not the host's."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, cores or 1)


def default_thread_counts():
  """(intra_op, inter_op) defaults: all usable cores for both.

  Measured with bench/bench_backbone.py on the 2-core reference machine:
  intra_op=1 is clearly slower, and nothing beat this (TensorFlow's own
  default) beyond noise; tlframe makes it explicit, counting the cores this
  process may actually use (`usable_cores`).
  """
  cores = usable_cores()
  return cores, cores


def configure_threads(intra_op_threads=None, inter_op_threads=None):
  """Sets TF's thread pools; call before TF runs any op (afterwards TF refuses; we warn)."""
  default_intra, default_inter = default_thread_counts()
  intra = intra_op_threads or default_intra
  inter = inter_op_threads or default_inter
  try:
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
  except RuntimeError as e:  # TF already initialized its thread pools
    logging.warning("could not set threads to intra=%d inter=%d: %s", intra, inter, e)
    return
  logging.info("TF threads: intra_op=%d inter_op=%d", intra, inter)


