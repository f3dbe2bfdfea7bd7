"""TensorFlow's start without Keras, for bin/'s programs (`defer()`, from tlframe.cli).

`import tensorflow` imports Keras as it starts (`keras.src.optimizers`, "so that
any function/method that needs to happen at load time will trigger", says
the `tensorflow` package's `__init__`). That is about a second of every program's start
(`import tensorflow`: 3.3 s, 2.3 s without it, on a 2-core AMD EPYC), and tlframe uses no Keras: its
optimizers are its own (tlframe/train/optimizers.py), its backbones load with
`tf.saved_model.load`. After `defer()`, that one import, made by TensorFlow's
`__init__` module itself, fails as TensorFlow expects of a missing Keras (an
ImportError it passes over); `tf.keras` and `import keras` still load Keras on
first use. The library alone never calls it: a process that imports tlframe
as a library keeps TensorFlow's behaviour.
"""

import importlib.abc
import importlib.machinery
import sys

# TensorFlow imports one or the other as it starts (TF_USE_LEGACY_KERAS picks tf_keras).
_KERAS_PACKAGES = ("keras", "tf_keras")


class _DeferredLoader(importlib.abc.Loader):

  def create_module(self, spec):
    return None

  def exec_module(self, module):
    raise ImportError(f"{module.__name__} loads on first use, not as TensorFlow starts "
                      "(tlframe/util/lazy_keras.py)")


class _KerasAtTensorFlowStart(importlib.abc.MetaPathFinder):
  """Finds Keras as usual, except for TensorFlow's `__init__`, which gets a spec that fails
  to load (its `importlib.util.find_spec` look-ups still see where Keras is)."""

  def find_spec(self, fullname, path=None, target=None):
    if fullname not in _KERAS_PACKAGES or not _tensorflow_is_starting():
      return None
    spec = importlib.machinery.PathFinder.find_spec(fullname, path)
    if spec is not None:
      spec.loader = _DeferredLoader()
    return spec


def _tensorflow_is_starting():
  """Whether the `tensorflow` package's own module code (its `__init__`) is on the stack."""
  frame = sys._getframe(1)  # pylint: disable=protected-access
  while frame is not None:
    if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "tensorflow":
      return True
    frame = frame.f_back
  return False


def defer():
  """Keras is not imported by TensorFlow's start in this process (see the module doc).

  A no-op once TensorFlow or Keras is imported, or when called again.
  """
  if "tensorflow" in sys.modules or any(name in sys.modules for name in _KERAS_PACKAGES):
    return
  if not any(isinstance(finder, _KerasAtTensorFlowStart) for finder in sys.meta_path):
    sys.meta_path.insert(0, _KerasAtTensorFlowStart())
