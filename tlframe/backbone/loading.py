"""The frozen featurizer: resolve a TF-Hub handle, load it, run it in float32 or bfloat16.

A handle is one of
- a URL (tfhub.dev, Kaggle Models, a .tar.gz): resolved by tensorflow_hub into
  its cache (`TFHUB_CACHE_DIR`);
- a directory holding a TF2 SavedModel (local or any TF filesystem);
- a built-in name (`BUILTIN_NAMES`): built once from published weights into
  `$TLFRAME_CACHE_DIR` (default ~/.cache/tlframe), atomically, so concurrent
  first uses are safe; the process that built it takes it as built the first
  time (the functions and variables it saved), not loaded back;
- several of these separated by commas (`mobilenet_v2_100_224,efficientnet_lite0`):
  their features side by side (`ConcatenatedModule`).

Modules are loaded with `tf.saved_model.load`, not `hub.KerasLayer` (a tf-keras
layer that cannot go into a Keras 3 model); `Backbone.__call__` is callable
inside `tf.function`. Under tf.distribute, load it outside `strategy.scope()`:
the frozen module has no state to mirror, and one restored inside a
MirroredStrategy scope cannot run in the cross-replica context of the feature
pass. Fine-tuning (tlframe/train/finetune.py) loads a second copy inside the scope
on purpose: its variables are then mirrored, and it runs only in replica
context (`strategy.run`).
"""

import hashlib
import os

import tensorflow as tf
from absl import logging

from tlframe.util import fileio
from tlframe.backbone import inverted_residual
from tlframe import options
from tlframe.backbone import torch_pth
from tlframe.backbone.runtime import resolve_precision, warn_if_onednn_off
from tlframe.errors import UserError

DEFAULT_HANDLE = options.DEFAULT_BACKBONE
# Built-in name -> (network, its weights file).
_BUILTINS = {
    "mobilenet_v2_100_224": (inverted_residual.MOBILENET_V2_100_224, torch_pth.MOBILENET_V2_WEIGHTS),
    "efficientnet_lite0": (inverted_residual.EFFICIENTNET_LITE0, torch_pth.EFFICIENTNET_LITE0_WEIGHTS),
    "efficientnet_lite1": (inverted_residual.EFFICIENTNET_LITE1, torch_pth.EFFICIENTNET_LITE1_WEIGHTS),
    "efficientnet_lite2": (inverted_residual.EFFICIENTNET_LITE2, torch_pth.EFFICIENTNET_LITE2_WEIGHTS),
}
BUILTIN_NAMES = options.BUILTIN_BACKBONES
PRECISIONS = options.PRECISIONS
FEATURES = options.FEATURES   # each the kind of module that gives them: FEATURE_VECTOR, CLASSIFICATION
FEATURE_VECTOR = "feature_vector"
CLASSIFICATION = "classification"
CONCATENATION_SEPARATOR = ","
# Bump when the built-in export changes, so old cache entries are not reused.
BUILTIN_FORMAT_VERSION = "v4"
FLOAT32_ONLY_SUFFIX = "-float32"
CLASS_NAMES_FILE = os.path.join(os.path.dirname(__file__), "imagenet_classes.txt")
# Google's classification modules have 1001 outputs, class 0 being "background".
_CLASSIFIER_DIMS = (1000, 1001)


# ---------------------------------------------------------------------------
# Cache and built-ins.

# Modules this process built and published, not yet opened, by directory: the first
# `load_backbone` of one takes it as built (`_BuiltModule`) instead of loading back what
# it just wrote (~0.5 s a module).
_built_here = {}


class _BuiltModule(tf.Module):
  """A built-in as this process built it, in place of the SavedModel it wrote.

  As the restored module would: its `__call__` holds the concrete functions saved
  (`__call__.concrete_functions`) and runs the one of the images' dtype (tracing the
  network's Python code again would cost more than the load), and its other attributes
  are the network's saved ones (TF-Hub's `variables` and `trainable_variables` in their
  order, `blocks`, ...).
  """

  # The network's lists, not tf.Module's computed properties (a restored module's are
  # the saved lists).
  variables = property(lambda self: self.network.variables)
  trainable_variables = property(lambda self: self.network.trainable_variables)

  def __init__(self, network, functions):
    super().__init__()
    self.network = network
    by_dtype = {dtype.name: function for dtype, function in functions.items()}

    def call(images):
      return by_dtype[images.dtype.name](images)

    call.concrete_functions = list(functions.values())
    self.__call__ = call

  def __getattr__(self, name):
    if name.startswith("_") or name == "network":   # not set yet: tf.Module's own look-ups
      raise AttributeError(name)
    return getattr(self.network, name)

  def __call__(self, images):
    return self.__dict__["__call__"](images)


def cache_root():
  """tlframe's cache: `$TLFRAME_CACHE_DIR`, default ~/.cache/tlframe.

  It holds the built backbones (`backbones/`), downloaded weights
  (`downloads/`), the per-machine backbone speeds (`backbone_speeds.json`,
  written by tlframe/train/backbone_choice.py), the export templates
  (`export_templates/`, tlframe/export/templates.py) and, unless
  `feature_cache_dir` says otherwise, the feature cache (`features/`).
  """
  return os.environ.get("TLFRAME_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "tlframe")


def builtin_dir(name):
  return os.path.join(cache_root(), "backbones", f"{name}-{BUILTIN_FORMAT_VERSION}")


def builtin_module_dirname(kind, precision=None):
  """The directory of a built-in's `kind` module in a build, for a load at `precision`.

  `kind` itself is the TF-Hub module, with a float32 and a bfloat16 entry point;
  `<kind>-float32` (precision "float32") has the float32 one alone and loads in
  half the time: a float32 run loads nothing it does not run.
  """
  return f"{kind}{FLOAT32_ONLY_SUFFIX}" if precision == "float32" else kind


def _module_built(export_dir, kind, precision):
  return tf.io.gfile.exists(os.path.join(export_dir, builtin_module_dirname(kind, precision),
                                         "saved_model.pb"))


def build_builtin(name, export_dir, *, weights_file=None, fold_batch_norm=True, exist_ok=False,
                  kinds=(FEATURE_VECTOR, CLASSIFICATION), precision=None, cpp_loadable=True):
  """Builds built-in `name`'s `kinds` into `export_dir`/{feature_vector,classification}.

  precision "float32" builds the float32-only modules instead
  (`builtin_module_dirname`). cpp_loadable=False (the cache's modules, which
  only tf.saved_model.load opens) leaves out the ops TF Serving restores
  variables with (inverted_residual.export_saved_model). Each module is
  written into a temporary sibling directory that is renamed into place when
  complete; if another process finished it first, its result is kept and ours
  discarded. With exist_ok, the modules already there are kept and only the
  missing ones built. Returns `export_dir`.
  """
  if name not in BUILTIN_NAMES:
    raise UserError(f"unknown built-in backbone {name!r}; built-ins are {', '.join(BUILTIN_NAMES)}")
  if tf.io.gfile.isdir(export_dir) and not exist_ok:
    raise UserError(f"{export_dir} already exists; delete it or choose another export directory")
  missing = [kind for kind in kinds if not _module_built(export_dir, kind, precision)]
  if not missing:
    return export_dir
  network, weights = _BUILTINS[name]
  data = torch_pth.find_weights(weights, weights_file=weights_file,
                                download_dir=os.path.join(cache_root(), "downloads"))
  state_dict = torch_pth.load_state_dict(data, source=weights.filename)
  dtypes = (tf.float32,) if precision == "float32" else (tf.float32, tf.bfloat16)
  for kind in missing:
    target = os.path.join(export_dir, builtin_module_dirname(kind, precision))
    tmp = fileio.temp_path_for(target if "://" in target else os.path.abspath(target))
    tf.io.gfile.makedirs(os.path.dirname(tmp))
    try:
      logging.info("Building %s (%s) into %s", name, kind, target)
      model = inverted_residual.InvertedResidualNet(
          network, state_dict, kind=kind, fold_batch_norm=fold_batch_norm,
          class_names_file=CLASS_NAMES_FILE if kind == CLASSIFICATION else None)
      functions = inverted_residual.export_saved_model(model, tmp, dtypes=dtypes,
                                                       cpp_loadable=cpp_loadable)
      try:
        fileio.publish_directory(tmp, target, last_name="saved_model.pb")
        if not tf.distribute.has_strategy():   # as the module doc says of loading
          _built_here[target] = _BuiltModule(model, functions)
      except tf.errors.AlreadyExistsError:
        logging.info("%s was built concurrently by another process; using that one", target)
    finally:
      if tf.io.gfile.exists(tmp):
        tf.io.gfile.rmtree(tmp)
  return export_dir


def ensure_builtin(name, kinds=(FEATURE_VECTOR, CLASSIFICATION), precision=None):
  """The built-in's directory in the cache, building the modules missing there on first use
  (a run builds only the kind and precision it uses: a fraction of building them all)."""
  return build_builtin(name, builtin_dir(name), exist_ok=True, kinds=kinds, precision=precision,
                       cpp_loadable=False)


def is_builtin_built(name, features=FEATURE_VECTOR, precision=None):
  """Whether loading built-in `name` at `precision` (as resolved) costs no build."""
  return _module_built(builtin_dir(name), features, precision)


# ---------------------------------------------------------------------------
# Handle resolution.


def _is_url(handle):
  return handle.startswith(("http://", "https://"))


def _hub_cache_entry(handle):
  """Where tensorflow_hub caches a URL handle: `<TFHUB_CACHE_DIR>/<sha1(handle)>`."""
  from tensorflow_hub import resolver  # pylint: disable=g-import-not-at-top
  root = resolver.tfhub_cache_dir(use_temp=True)
  return os.path.join(root, hashlib.sha1(handle.encode("utf8")).hexdigest())


def _check_complete(directory, handle):
  if not tf.io.gfile.exists(os.path.join(directory, "saved_model.pb")):
    raise UserError(
        f"the TF-Hub cache directory {directory} for {handle} is stale or half-written (no "
        f"saved_model.pb): delete {directory} (and {directory}.lock if present) and retry")


def _resolve_url(handle):
  import tensorflow_hub as hub  # pylint: disable=g-import-not-at-top
  entry = _hub_cache_entry(handle)
  if tf.io.gfile.isdir(entry) and tf.io.gfile.listdir(entry):
    _check_complete(entry, handle)  # hub itself would return it as is
  elif tf.io.gfile.exists(entry + ".lock"):
    logging.warning("%s.lock exists: another process is downloading %s, or a download was "
                    "killed (then delete the lock file)", entry, handle)
  try:
    path = hub.resolve(handle)
  except Exception as e:  # hub raises whatever urllib/tarfile raise
    raise UserError(f"could not fetch {handle} ({type(e).__name__}: {e}); check the handle and the "
                    "network, or download the module and pass its directory") from None
  _check_complete(path, handle)
  return path


def resolve_handle(handle, *, features=FEATURE_VECTOR, precision=None):
  """The local SavedModel directory for `handle` (a URL, a directory or a built-in name).

  `features="classification"` (or its old name `logits`) selects a built-in's
  classification variant; for other handles the module itself decides what
  it outputs. precision "float32" selects a built-in's float32-only module
  (`builtin_module_dirname`); other modules are what they are.
  """
  features = options.canonical_features(features)
  if features not in FEATURES:
    raise UserError(f"features must be one of {', '.join(FEATURES)}, not {features!r}")
  if handle in BUILTIN_NAMES:
    # A FEATURES value is the kind of module that gives those features.
    return os.path.join(ensure_builtin(handle, kinds=(features,), precision=precision),
                        builtin_module_dirname(features, precision))
  if _is_url(handle):
    return _resolve_url(handle)
  if tf.io.gfile.isdir(handle):
    if not tf.io.gfile.exists(os.path.join(handle, "saved_model.pb")):
      raise UserError(f"{handle} has no saved_model.pb: give the directory of a TF2 SavedModel")
    return handle
  raise UserError(
      f"backbone handle {handle!r} is not a URL, an existing SavedModel directory, or a "
      f"built-in name ({', '.join(BUILTIN_NAMES)})")


# ---------------------------------------------------------------------------
# Loading.

_warned_no_bf16 = set()


def _first_input_spec(concrete_function):
  args, kwargs = concrete_function.structured_input_signature
  for spec in list(args) + list(kwargs.values()):
    if isinstance(spec, tf.TensorSpec):
      return spec
  return None


def _call_functions(module, path):
  """The concrete functions `module.__call__` was saved with, by image dtype."""
  call = getattr(module, "__call__", None)
  concrete = getattr(call, "concrete_functions", None)
  if not concrete:
    raise UserError(f"{path} is not a TF2 SavedModel with a __call__ function (TF1 Hub format "
                    "modules are not supported): use the module's TF2 version")
  functions = {}
  for function in concrete:
    spec = _first_input_spec(function)
    if spec is not None and spec.shape.rank == 4:
      functions.setdefault(spec.dtype, function)
  if tf.float32 not in functions:
    raise UserError(f"{path}: __call__ takes no float32 [batch, height, width, 3] images; "
                    "not a TF-Hub image module")
  return functions


def _module_fingerprint(path):
  """A digest of the module's graph and variable index: changes when the module does."""
  digest = hashlib.sha256()
  for name in ("saved_model.pb", os.path.join("variables", "variables.index")):
    file_path = os.path.join(path, name)
    if tf.io.gfile.exists(file_path):
      with tf.io.gfile.GFile(file_path, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()[:16]


class Backbone:
  """A frozen image module: float32 [B, S, S, 3] in [0, 1] -> float32 [B, output_dim].

  Attributes: handle, path (SavedModel directory; a concatenation's are joined
  by commas), module (a tf.Module whose `__call__` a SavedModel can hold),
  input_size, output_dim, kind ("feature_vector" | "classification"),
  precision ("float32" | "bfloat16", as resolved), cache_key (identifies
  module, size, kind and precision: anything that changes the features).
  """

  def __init__(self, handle, path, module, input_size, output_dim, kind, precision, fingerprint):
    self.handle = handle
    self.path = path
    self.module = module
    self.input_size = input_size
    self.output_dim = output_dim
    self.kind = kind
    self.precision = precision
    self._compute_dtype = tf.bfloat16 if precision == "bfloat16" else tf.float32
    self._fingerprint = fingerprint
    self.cache_key = f"{fingerprint}-{input_size}px-{kind}-{output_dim}d-{precision}"

  def __call__(self, images):
    outputs = self.module(tf.cast(images, self._compute_dtype))
    return tf.cast(outputs, tf.float32)

  def in_float32(self):
    """This backbone computing in float32, on the same loaded module (every module has a
    float32 entry point): a bfloat16 run's export needs no second load."""
    if self.precision == "float32":
      return self
    return Backbone(self.handle, self.path, self.module, self.input_size, self.output_dim,
                    self.kind, "float32", self._fingerprint)

  def __repr__(self):
    return (f"Backbone({self.handle!r}, input_size={self.input_size}, output_dim="
            f"{self.output_dim}, kind={self.kind!r}, precision={self.precision!r})")


class ConcatenatedModule(tf.Module):
  """Frozen modules side by side: float32 or bfloat16 [B, S, S, 3] -> float32 [B, sum of dims].

  S is the largest part's input size; each smaller part gets the images resized
  (antialiased, as the pipeline resizes) to its own size inside the call, so
  one image size flows through the pipeline. A part runs in bfloat16 when the
  images are bfloat16 and the part has that entry point, else in float32. It
  is a tf.Module holding the parts' loaded modules, so an export saves it as it
  saves one module.
  """

  def __init__(self, parts, input_size):
    super().__init__(name="concatenated_backbone")
    self.parts = [part.module for part in parts]
    self.part_sizes = [part.input_size for part in parts]
    self.part_bfloat16 = [part.precision == "bfloat16" for part in parts]
    self.input_size = input_size
    for dtype in (tf.float32, tf.bfloat16):
      self.__call__.get_concrete_function(tf.TensorSpec([None, input_size, input_size, 3], dtype))

  # No autograph: the loop is over Python lists, and every trace (the run's, the export's)
  # is faster without converting the code.
  @tf.function(autograph=False)
  def __call__(self, images):
    features = []
    for module, size, bfloat16 in zip(self.parts, self.part_sizes, self.part_bfloat16):
      x = tf.cast(images, tf.float32)
      if size != self.input_size:
        x = tf.image.resize(x, [size, size], antialias=True)
      dtype = tf.bfloat16 if bfloat16 and images.dtype == tf.bfloat16 else tf.float32
      features.append(tf.cast(module(tf.cast(x, dtype)), tf.float32))
    return tf.concat(features, axis=1)


def load_backbone(handle=DEFAULT_HANDLE, *, features=FEATURE_VECTOR, input_size=None,
                  precision="float32"):
  """Resolves and loads `handle` frozen (outside any strategy.scope(); see the module doc).

  input_size: required for modules that accept any image size (e.g. 299 for
  Inception v3); must match a module's fixed size. precision: "float32",
  "bfloat16" or "auto" (bfloat16 where the machine has it natively); a module
  without a bfloat16 entry runs float32 with a warning. A handle of several
  handles separated by commas loads their concatenation (`ConcatenatedModule`):
  its input size is the largest part's (or input_size, which parts of any size
  get). features: options.FEATURES, or an alias of one (`logits`).
  """
  features = options.canonical_features(features)
  warn_if_onednn_off()
  requested_precision = resolve_precision(precision)
  if CONCATENATION_SEPARATOR in handle and not tf.io.gfile.isdir(handle):
    return _load_concatenation(handle, features, input_size, precision, requested_precision)
  path, module, functions, fixed_size = _open_module(handle, features, requested_precision)
  if fixed_size is not None and input_size not in (None, fixed_size):
    raise UserError(f"input_size={input_size} but {handle} takes {fixed_size}x{fixed_size} "
                    f"images; leave it unset or set {fixed_size}", arguments=["input_size"])
  size = fixed_size or input_size
  if not size:
    raise UserError(f"{handle} accepts any image size: set input_size (e.g. 299 for Inception "
                    "v3, 224 for most modules)", arguments=["input_size"])
  return _backbone(handle, path, module, functions, size, features, precision,
                   requested_precision)


def _open_module(handle, features, precision):
  """(path, loaded module, its __call__ functions by dtype, its fixed input size or None)."""
  path = resolve_handle(handle, features=features, precision=precision)
  module = _built_here.pop(path, None)
  if module is None:
    try:
      module = tf.saved_model.load(path)
    except (OSError, ValueError, tf.errors.OpError) as e:
      raise UserError(f"could not load the SavedModel in {path} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200]}); if it is a cache entry, delete "
                      f"{path}") from None
  functions = _call_functions(module, path)
  return path, module, functions, _first_input_spec(functions[tf.float32]).shape[1]


def _backbone(handle, path, module, functions, size, features, precision, requested_precision):
  precision_used = requested_precision
  if requested_precision == "bfloat16" and tf.bfloat16 not in functions:
    if handle not in _warned_no_bf16:
      _warned_no_bf16.add(handle)
      logging.warning("%s has no bfloat16 entry point; --precision=%s runs it in float32",
                      handle, precision)
    precision_used = "float32"

  # Read from the saved signature, not by running the module: a call here
  # would happen in a strategy's cross-replica context and break replica calls.
  outputs = functions[tf.float32].structured_outputs
  if not (isinstance(outputs, (tf.Tensor, tf.TensorSpec)) and outputs.shape.rank == 2
          and outputs.shape[1] is not None):
    raise UserError(f"{handle}: __call__ returns {outputs!r:.200}, not a [batch, dim] tensor; "
                    "not a TF-Hub image module")
  output_dim = int(outputs.shape[1])
  kind = CLASSIFICATION if output_dim in _CLASSIFIER_DIMS else FEATURE_VECTOR
  if features == CLASSIFICATION and kind != CLASSIFICATION:
    raise UserError(f"{handle} is a feature-vector module ({output_dim} outputs); logits need a "
                    "classification module")
  return Backbone(handle, path, module, size, output_dim, kind, precision_used,
                  _module_fingerprint(path))


def _load_concatenation(handle, features, input_size, precision, requested_precision):
  """The Backbone of `ConcatenatedModule` over the comma-separated handles in `handle`."""
  handles = [part.strip() for part in handle.split(CONCATENATION_SEPARATOR)]
  if len(handles) < 2 or not all(handles):
    raise UserError(f"handle={handle}: give two or more handles separated by commas, e.g. "
                    "mobilenet_v2_100_224,efficientnet_lite0", arguments=["handle"])
  opened = [_open_module(part, features, requested_precision) for part in handles]
  fixed_sizes = [fixed for _, _, _, fixed in opened if fixed]
  largest = max(fixed_sizes, default=None)
  if input_size is not None and largest is not None and (
      input_size < largest or (input_size != largest and len(fixed_sizes) == len(opened))):
    raise UserError(f"input_size={input_size} but the largest part of {handle} takes "
                    f"{largest}x{largest} images; leave it unset or set {largest}"
                    + (" or more" if len(fixed_sizes) < len(opened) else ""),
                    arguments=["input_size"])
  size = input_size or largest
  if len(fixed_sizes) < len(opened) and not input_size:
    raise UserError(f"a part of {handle} accepts any image size: set input_size (at least "
                    f"{largest or 224})", arguments=["input_size"])
  parts = [_backbone(part, path, module, functions, fixed or size, features, precision,
                     requested_precision)
           for part, (path, module, functions, fixed) in zip(handles, opened)]
  module = ConcatenatedModule(parts, size)
  return Backbone(handle, CONCATENATION_SEPARATOR.join(part.path for part in parts), module, size,
                  sum(part.output_dim for part in parts), FEATURE_VECTOR,
                  "bfloat16" if any(p.precision == "bfloat16" for p in parts) else "float32",
                  "+".join(part.cache_key for part in parts))
