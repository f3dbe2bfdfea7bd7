"""TrainOptions: every setting of a training run, and the checks of their values.

This module imports no TensorFlow, so that bin/train can parse and check its
flags (and answer --help) before paying TensorFlow's start-up. The choice
lists of the later stages live here for the same reason; those stages import
them from here.
"""

import dataclasses
import math
import os
import posixpath

from tlframe.errors import UserError

# Choices of the stages (head, pipeline, backbone, trainer).
LOSSES = ("hinge", "squared_hinge", "softmax")
FEATURE_NORMALIZATIONS = ("auto", "none", "l2", "standardize")
# What "auto" cross-validates between: standardizing suits some backbones'
# features (MobileNetV2's), and amplifies the near-constant dimensions of others
# (EfficientNet-Lite's), whose raw features do better (bench/bench_defaults.py).
# A tie goes to the first: the simpler.
AUTO_NORMALIZATIONS = ("none", "standardize")
# At equal held-out accuracy, normalizations whose calibrated held-out losses differ by
# less than this many standard errors of their (paired, per-example) difference tie
# (tuning.clearly_better). Why not the lower loss alone: there the differences are
# mostly noise, and not unbiased noise: standardizing had the lower calibrated loss on
# 46 of the 57 tied k-shot subsets measured, while its per-dimension std, estimated from
# a few photos, cost accuracy (docs/training.md).
NORMALIZATION_TIE_STANDARD_ERRORS = 2.0
RESIZE_MODES = ("center_crop", "imagenet_crop", "letterbox", "crop_or_pad")
PRECISIONS = ("float32", "bfloat16", "auto")
# What the head trains on: the module kind whose outputs are the features
# (backbone.loading's FEATURE_VECTOR, CLASSIFICATION): a feature vector, or a
# classification module's class scores (logits).
FEATURES = ("feature_vector", "classification")
# Earlier names of those values, still accepted: flagfiles, run_options.json
# and head_config.json that say --features=logits keep working.
FEATURE_ALIASES = {"logits": "classification"}
BUILTIN_BACKBONES = ("mobilenet_v2_100_224", "efficientnet_lite0", "efficientnet_lite1",
                     "efficientnet_lite2")
DEFAULT_BACKBONE = BUILTIN_BACKBONES[0]
# bin/train's default: a backbone chosen from the data size and this machine's
# speed (tlframe/train/backbone_choice.py).
AUTO_BACKBONE = "auto"
# --backbone=auto takes a concatenation (tlframe/train/backbone_choice.py) only when every
# class has at least this many training images.
# Why a count per class: the head estimates each class's direction in the
# features from that class's images; a concatenation doubles the dimensions
# (2,560 for the pair against MobileNetV2's 1,280) that estimate is noisy in,
# and with one or two images per class the pair falls far behind. Cross-
# validation cannot make the call instead: with a few images per class every
# candidate separates the held-out folds at every l2, and with one per class
# there is nothing to hold out. The number is read off both measured sets
# (docs/training.md): against MobileNetV2 the pair is -9.2 and -4.4 points on
# oxford_flowers12 at 1 and 2 per class, ahead from 3 (+1.0, +1.4, +2.0 at 3, 4,
# 5; +0.5 and +0.7 at 10 and 20); on LFW ahead or level from 3 (the smallest
# measured: +1.1; +0.2 at 5). 5 leaves a margin above where both turn.
MIN_IMAGES_PER_CLASS_FOR_CONCATENATION = 5
DEFAULT_BACKBONE_BUDGET_S = 120.0
STRATEGIES = ("default", "mirrored", "multi_worker")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("cosine", "constant")
CLASS_WEIGHTS = ("none", "balanced")
FEATURE_STORAGES = ("float32", "float16")
# Float values (rows x dim, mirrors included) of one split's features kept in
# memory; a larger split streams from the feature cache. 250M is 1 GB of
# float32: ~195k images of a 1280-d backbone.
DEFAULT_MAX_IN_MEMORY_FEATURES = 250_000_000

# The l2 values cross-validated when --l2 is unset: half decades from 1e-5 to
# 10, which holds the optimum from a few images per class (small l2) to
# thousands of weakly separable ones (l2 near 1; for the SVM, C = 1/(l2 N)).
# tuning.tune_l2 widens it when the best value sits on an edge.
# The largest --seed: 31 bits suit every generator the run seeds (NumPy's, TensorFlow's).
MAX_SEED = 2**31 - 1

DEFAULT_L2_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
# On cached features a step is a matmul, so big batches (the whole set when it
# has up to 1024 images) are fastest; through the backbone, memory bounds it.
FEATURES_BATCH_SIZE = 1024
AUGMENTED_BATCH_SIZE = 64
# Where bin/train converts photos (--image_dir, --filelist) without --records_dir:
# <model_dir>/records (model_dir.py keeps it apart from the run's outputs).
RECORDS_DIRNAME = "records"
# --fine_tune_blocks=all trains every block of the backbone.
ALL_BLOCKS = "all"


@dataclasses.dataclass
class TrainOptions:
  """Everything bin/train's flags set; see configs/template.cfg for each one's meaning.

  The head defaults (softmax, standardized features, Adam at 0.003 with cosine
  decay, 100 epochs, batch 1024) were chosen by measurement on oxford_flowers12
  with bench/bench_train.py: see docs/training.md. l2 = None (the default)
  chooses l2 by cross-validation on the cached features.
  """
  records_dir: str
  model_dir: str
  backbone: str = AUTO_BACKBONE   # resolved by backbone_choice.resolve before the backbone loads
  backbone_budget_s: float = DEFAULT_BACKBONE_BUDGET_S   # what --backbone=auto's pass may take
  features: str = "feature_vector"
  input_size: int = None
  precision: str = "auto"   # bfloat16 where the hardware computes it natively, else float32
  resize_mode: str = "center_crop"
  loss: str = "softmax"
  l2: float = None   # None: chosen by cv_folds-fold cross-validation over l2_grid
  label_smoothing: float = 0.0
  class_weight: str = "none"
  feature_normalization: str = "auto"   # cross-validated with l2 among AUTO_NORMALIZATIONS
  optimizer: str = "adam"
  learning_rate: float = 0.003
  momentum: float = 0.9
  lr_schedule: str = "cosine"
  warmup_epochs: float = 0.0
  epochs: int = 100
  batch_size: int = None   # None: FEATURES_BATCH_SIZE, or AUGMENTED_BATCH_SIZE with augment
  patience: int = 0
  augment: bool = False
  flip_features: bool = False
  l2_grid: tuple = DEFAULT_L2_GRID
  cv_folds: int = 5
  strategy: str = "default"
  seed: int = 0
  checkpoint_every_epochs: int = 25
  extract_batch_size: int = 32
  feature_cache_dir: str = ""   # "": $TLFRAME_CACHE_DIR/features
  feature_storage: str = "float32"
  max_in_memory_features: int = DEFAULT_MAX_IN_MEMORY_FEATURES
  log_every_steps: int = 10
  num_thumbnails_per_class: int = 16
  overwrite: bool = False
  export: bool = True
  force_export: bool = False   # redo a finished run whose settings did not change
  # Fine-tuning after the head (tlframe/train/finetune.py, docs/training.md).
  fine_tune: bool = False
  fine_tune_blocks: str = "1"   # a number of top blocks, or ALL_BLOCKS
  fine_tune_epochs: int = 10
  fine_tune_learning_rate: float = 1e-4
  fine_tune_head_learning_rate: float = None   # None: fine_tune_learning_rate
  fine_tune_weight_decay: float = 0.01
  fine_tune_batch_size: int = 32
  fine_tune_patience: int = 3

  def __post_init__(self):
    self.features = canonical_features(self.features)


def canonical_features(features):
  """The FEATURES value `features` names: itself, or the value of an alias (FEATURE_ALIASES)."""
  return FEATURE_ALIASES.get(features, features)


def fine_tune_blocks(value):
  """fine_tune_blocks as an int >= 1, or ALL_BLOCKS; UserError otherwise."""
  text = str(value).strip().lower()
  if text == ALL_BLOCKS:
    return ALL_BLOCKS
  count = int(text) if text.isdigit() else 0
  if count < 1:
    raise UserError(f"fine_tune_blocks={value}: give a number of top blocks >= 1, or "
                    f"{ALL_BLOCKS}", arguments=["fine_tune_blocks"])
  return count


def field_names():
  return [field.name for field in dataclasses.fields(TrainOptions)]


def defaults():
  """{name: default} of every TrainOptions field that has one."""
  return {field.name: field.default for field in dataclasses.fields(TrainOptions)
          if field.default is not dataclasses.MISSING}


def check(options):
  """Raises UserError for any bad value or combination, before anything runs.

  Checks values only; that the records exist is checked when the run starts
  (the path may be on any TensorFlow filesystem).
  """
  def bad(message, *arguments):
    raise UserError(message, arguments=arguments)

  if not options.records_dir:
    bad("records_dir is required: the folder bin/make_tfrecords wrote", "records_dir")
  if not options.model_dir:
    bad("model_dir is required: where checkpoints, logs and metrics go", "model_dir")
  check_dirs_apart(options.records_dir, options.model_dir)
  for name, allowed in (("loss", LOSSES), ("feature_normalization", FEATURE_NORMALIZATIONS),
                        ("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES),
                        ("class_weight", CLASS_WEIGHTS), ("strategy", STRATEGIES),
                        ("features", FEATURES), ("precision", PRECISIONS),
                        ("resize_mode", RESIZE_MODES), ("feature_storage", FEATURE_STORAGES)):
    if getattr(options, name) not in allowed:
      bad(f"{name}={getattr(options, name)} is unknown: use one of {', '.join(allowed)}", name)
  # NaN passes every comparison, so finiteness comes first.
  for name in ("l2", "label_smoothing", "learning_rate", "momentum", "warmup_epochs",
               "fine_tune_learning_rate", "fine_tune_head_learning_rate",
               "fine_tune_weight_decay"):
    value = getattr(options, name)
    if value is not None and not math.isfinite(value):
      example = defaults()[name] if defaults()[name] is not None else 0.01
      bad(f"{name}={value} is not a finite number: give a number such as {example:g}", name)
  if not all(math.isfinite(l2) for l2 in options.l2_grid):
    bad(f"l2_grid={','.join(f'{v:g}' for v in options.l2_grid)} holds a value that is not a "
        "finite number: give finite numbers", "l2_grid")
  for name in ("epochs", "learning_rate", "checkpoint_every_epochs", "extract_batch_size",
               "log_every_steps", "max_in_memory_features"):
    if not getattr(options, name) > 0:
      bad(f"{name}={getattr(options, name)} must be positive", name)
  if not (math.isfinite(options.backbone_budget_s) and options.backbone_budget_s > 0):
    bad(f"backbone_budget_s={options.backbone_budget_s} must be a positive number of seconds",
        "backbone_budget_s")
  if options.batch_size is not None and options.batch_size < 1:
    bad(f"batch_size={options.batch_size} must be positive", "batch_size")
  if options.input_size is not None and options.input_size < 1:
    bad(f"input_size={options.input_size} must be positive", "input_size")
  if options.l2 is not None and options.l2 < 0:
    bad(f"l2={options.l2} must be >= 0", "l2")
  if options.l2 is None and (not options.l2_grid or any(l2 <= 0 for l2 in options.l2_grid)):
    bad("l2_grid must hold numbers > 0 (or set l2 to skip the search)", "l2_grid", "l2")
  if not 0 <= options.momentum < 1:
    bad(f"momentum={options.momentum} must be in [0, 1)", "momentum")
  if not 0 <= options.label_smoothing < 1:
    bad(f"label_smoothing={options.label_smoothing} must be in [0, 1)", "label_smoothing")
  if options.label_smoothing and options.loss != "softmax":
    bad("label_smoothing applies to loss=softmax only: drop it or use loss=softmax",
        "label_smoothing", "loss")
  if options.patience < 0 or options.warmup_epochs < 0 or options.num_thumbnails_per_class < 0:
    bad("patience, warmup_epochs and num_thumbnails_per_class must be >= 0",
        "patience", "warmup_epochs", "num_thumbnails_per_class")
  if options.warmup_epochs >= options.epochs:
    bad(f"warmup_epochs={options.warmup_epochs} must be less than epochs={options.epochs}",
        "warmup_epochs", "epochs")
  if options.flip_features and options.augment:
    bad("flip_features adds mirrored images to cached features; augment already trains on "
        "random flips: use one of them", "flip_features", "augment")
  if options.fine_tune:
    _check_fine_tune(options)
  if not 0 <= options.seed <= MAX_SEED:
    bad(f"seed={options.seed} must be in [0, {MAX_SEED}]", "seed")
  if options.cv_folds < 2:
    bad(f"cv_folds={options.cv_folds} must be at least 2", "cv_folds")
  if options.strategy == "multi_worker" and not os.environ.get("TF_CONFIG"):
    bad("strategy=multi_worker needs the TF_CONFIG environment variable (cluster and task); "
        "see docs/training.md, or use strategy=default|mirrored", "strategy")


def check_dirs_apart(records_dir, model_dir):
  """UserError when model_dir is records_dir, inside it or contains it.

  bin/train writes and (with --overwrite) removes files in its model dir
  (labels.txt, ...): in the records dir, those are the records' own. Symlinks
  are resolved, so a link into the records is refused too. The one exception
  is <model_dir>/records, where bin/train --image_dir converts: the model dir
  treats that folder as its input and never writes or removes anything in it.
  """
  records, model = _comparable_path(records_dir), _comparable_path(model_dir)
  if records == model.rstrip("/") + "/" + RECORDS_DIRNAME:
    return
  if model == records:
    where = "is the same folder as"
  elif model.startswith(records.rstrip("/") + "/"):
    where = "is inside"
  elif records.startswith(model.rstrip("/") + "/"):
    where = "contains"
  else:
    return
  raise UserError(f"model_dir={model_dir} {where} records_dir={records_dir}: training "
                  "writes (and with overwrite=True removes) files there that would mix with the "
                  "records'; give a model_dir outside the records",
                  arguments=["model_dir", "records_dir", "overwrite"])


def _comparable_path(path):
  """`path` absolute and normalized, symlinks resolved (for local paths), "/" separated."""
  if "://" in path:
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"
  return os.path.realpath(os.path.expanduser(path)).replace(os.sep, "/")


def _check_fine_tune(options):
  fine_tune_blocks(options.fine_tune_blocks)
  for name in ("fine_tune_epochs", "fine_tune_learning_rate", "fine_tune_batch_size"):
    if not getattr(options, name) > 0:
      raise UserError(f"{name}={getattr(options, name)} must be positive", arguments=[name])
  if options.fine_tune_head_learning_rate is not None and options.fine_tune_head_learning_rate <= 0:
    raise UserError(f"fine_tune_head_learning_rate={options.fine_tune_head_learning_rate} "
                    "must be positive", arguments=["fine_tune_head_learning_rate"])
  if options.fine_tune_weight_decay < 0 or options.fine_tune_patience < 0:
    raise UserError("fine_tune_weight_decay and fine_tune_patience must be >= 0",
                    arguments=["fine_tune_weight_decay", "fine_tune_patience"])
  if options.flip_features:
    raise UserError("flip_features adds mirrored images to cached features; fine_tune "
                    "trains on random flips and recomputes the features: use one of them",
                    arguments=["flip_features", "fine_tune"])
