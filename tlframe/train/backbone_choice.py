"""`--backbone=auto`: the most accurate backbone whose pass over the records fits a time budget.

The rule (`choose`): walk `CANDIDATES`, most accurate first, and take the
first whose backbone pass over the run's images (every split of the records'
manifest, twice with --flip_features) is expected to take at most the budget
(`--backbone_budget_s`, DEFAULT_BUDGET_S) at this machine's images/s, and,
for a concatenation, whose smallest class has at least
options.MIN_IMAGES_PER_CLASS_FOR_CONCATENATION training images; when none
qualifies, the fastest. The order and the minimum were measured with
bench/bench_defaults.py on oxford_flowers12, its k-shot subsets and LFW
(docs/training.md, "--backbone=auto: how it chooses"), not tuned to one set.

Images/s (`MachineSpeeds`): measured on one small batch per built-in part,
the first time a run on this machine needs it, and kept in
`$TLFRAME_CACHE_DIR/backbone_speeds.json`, keyed by the CPU (or GPU) and the
resolved precision. A first measure must be cheap, so only built-ins already
built are measured (a second or two each); one not built yet is estimated
from the measured MobileNetV2 and the relative speeds in RELATIVE_SPEED. A
concatenation's time per image is the sum of its parts'.

A concatenation whose built-in part is not built here is built while choosing;
when that cannot be done (its weights are neither in the caches nor fetchable:
a machine without internet), the next candidate is taken and the reason says so.

An explicit --backbone is never second-guessed, and a rerun into a model dir
keeps the backbone of the model there (a different choice would refuse to
resume). Multi-worker runs do not measure: every worker must make the same
choice without talking to the others, so they take the fastest candidate.
"""

import dataclasses
import os
import platform
import re
import time

import tensorflow as tf
from absl import logging

from tlframe.backbone import loading as backbone_lib
from tlframe.backbone import runtime as backbone_runtime
from tlframe.util import fileio
from tlframe.train import layout as model_dir_layout
from tlframe import options as options_lib
from tlframe import records
from tlframe.errors import UserError

AUTO = options_lib.AUTO_BACKBONE
MOBILENET_V2 = "mobilenet_v2_100_224"
EFFICIENTNET_LITE0 = "efficientnet_lite0"
# Most accurate first; the last is the fastest, the choice when nothing fits.
# Measured (docs/training.md): the concatenation was ahead of MobileNetV2 on
# oxford_flowers12 at every k and on the four smaller sets; the other
# built-ins were not ahead of MobileNetV2 on average, and are slower, so as
# candidates they would never be picked before it (they stay a flag away).
CANDIDATES = (f"{MOBILENET_V2},{EFFICIENTNET_LITE0}", MOBILENET_V2)
# Images/s below any candidate's on a machine TensorFlow runs on (the pair ran at ~3.5 on
# the 2-core reference machine under a load average of ~8): a set whose pass fits the
# budget even at this speed needs no measure to choose the most accurate candidate.
SLOWEST_IMAGES_PER_SECOND = 1.0
# Seconds the backbone pass of the chosen candidate may take: the wait a user
# accepts for better features (a few hundred images run the concatenation even
# on a loaded 2-core machine; thousands on a slow one get MobileNetV2).
DEFAULT_BUDGET_S = options_lib.DEFAULT_BACKBONE_BUDGET_S
# Images/s relative to MobileNetV2, folded float32 at batch 32
# (bench/bench_backbone.py --only_builtins; they follow the networks'
# multiply-adds): the estimate for a built-in not built on this machine yet.
RELATIVE_SPEED = {MOBILENET_V2: 1.0, EFFICIENTNET_LITE0: 0.85, "efficientnet_lite1": 0.59,
                  "efficientnet_lite2": 0.41}
SPEEDS_FILENAME = "backbone_speeds.json"
# Images per measuring call: large enough for the batched kernels, small
# enough that a first measure costs a second or two.
MEASURE_BATCH_SIZE = 8
# Timed calls per measure, the fastest kept: one slow call is a hiccup, not the speed.
MEASURE_CALLS = 3
SEPARATOR = ","


@dataclasses.dataclass(frozen=True)
class Choice:
  """The resolved backbone and why: what metrics.json and the export's info hold."""
  backbone: str
  reason: str
  num_images: int = None
  budget_s: float = None
  estimated_pass_s: float = None   # of the chosen backbone
  images_per_second: dict = None   # candidate -> the rate the rule used
  smallest_class: int = None       # the fewest training images of any class

  def as_dict(self):
    return dataclasses.asdict(self)


def parts(handle):
  return [part.strip() for part in handle.split(SEPARATOR)]


def concatenation_rate(part_rates):
  """Images/s of parts run one after the other on each image: their times per image add up."""
  return 1.0 / sum(1.0 / rate for rate in part_rates)


def choose(num_images, budget_s, images_per_second, candidates=CANDIDATES,
           smallest_class=None):
  """The first of `candidates` (most accurate first) that qualifies, else the fastest.

  A candidate qualifies when its pass over `num_images` is expected to fit
  `budget_s` and, for a concatenation, `smallest_class` (the fewest training
  images of any class; None: unknown, not checked) is at least
  options_lib.MIN_IMAGES_PER_CLASS_FOR_CONCATENATION. `candidates` must hold a single
  backbone (the list's last). images_per_second: a function handle ->
  images/s on this machine (for a concatenation too), asked only of the
  candidates the count leaves, and not at all when it leaves one or when
  `num_images` would fit the budget even at SLOWEST_IMAGES_PER_SECOND (then
  estimated_pass_s is None). Pure: give it a fake rate to test the rule.
  """
  left = [handle for handle in candidates if _enough_per_class(handle, smallest_class)]
  passed_over = [f"{handle}: a class has {smallest_class} training images, a concatenation "
                 f"needs {options_lib.MIN_IMAGES_PER_CLASS_FOR_CONCATENATION}"
                 for handle in candidates if handle not in left]

  def chosen(handle, reason, estimated_pass_s=None, rates=None):
    if passed_over:
      reason += f" (more accurate but passed over: {'; '.join(passed_over)})"
    return Choice(handle, reason, num_images, budget_s, estimated_pass_s, rates or {},
                  smallest_class)

  if len(left) == 1:
    # Nothing for a speed to decide: no measuring (a first run on a few photos would
    # spend a backbone load and two calls on it).
    return chosen(left[0], f"the only candidate left for {num_images} images")
  if num_images <= budget_s * SLOWEST_IMAGES_PER_SECOND:
    # A few photos fit at any speed: measuring (a load and four calls of each built-in,
    # seconds) would cost a first run more than it could decide.
    return chosen(left[0], f"the most accurate candidate: its pass over {num_images} images "
                  f"fits --backbone_budget_s={budget_s:g} even at "
                  f"{SLOWEST_IMAGES_PER_SECOND:g} images/s (speeds not measured)")
  # Rates only of the candidates the count leaves: a small set measures no second built-in.
  rates = {handle: float(images_per_second(handle)) for handle in left}
  estimates = {handle: num_images / rate for handle, rate in rates.items()}
  for handle in left:
    if estimates[handle] <= budget_s:
      reason = (f"the most accurate candidate whose pass over {num_images} images is expected to "
                f"fit --backbone_budget_s={budget_s:g}: ~{estimates[handle]:.0f} s at "
                f"{rates[handle]:.3g} images/s")
      break
    else:
      passed_over.append(f"{handle}: over, ~{estimates[handle]:.0f} s")
  else:
    handle = max(rates, key=rates.get)
    reason = (f"no candidate qualifies for {num_images} images at --backbone_budget_s="
              f"{budget_s:g}: the fastest, ~{estimates[handle]:.0f} s at {rates[handle]:.3g} "
              "images/s")
  return chosen(handle, reason, estimates[handle], rates)


def _enough_per_class(handle, smallest_class):
  return (len(parts(handle)) == 1 or smallest_class is None
          or smallest_class >= options_lib.MIN_IMAGES_PER_CLASS_FOR_CONCATENATION)


def smallest_class(manifest):
  """The fewest training images of any class (the manifest's train per_class), None if unknown."""
  per_class = manifest["splits"].get("train", {}).get("per_class")
  return min(per_class.values()) if per_class else None


def images_to_pass(manifest, flip_features):
  """Images the backbone pass runs on: every split's records, twice when mirrors are cached too."""
  count = sum(int(split.get("examples", 0)) for split in manifest["splits"].values())
  return count * (2 if flip_features else 1)


# ---------------------------------------------------------------------------
# This machine's speeds.


def machine_key(precision, gpu_names=()):
  """What the speeds depend on: the accelerator (else the CPU and its cores) and the precision."""
  if gpu_names:
    device = " + ".join(gpu_names)
  else:
    model = platform.processor() or platform.machine()
    try:
      with open("/proc/cpuinfo") as f:
        found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
      model = found.group(1).strip() if found else model
    except OSError:
      pass
    device = f"{model}, {backbone_runtime.usable_cores()} cores"
  return f"{device} / {precision}"


def cpu_busy():
  """Why the CPU is too busy now for a speed worth keeping ("load average L on N cores"), or
  None: a 1-minute load average above the number of cores, more work than the cores run at
  once (this run's own last seconds, or the user's last command, stay below that)."""
  if not hasattr(os, "getloadavg"):
    return None
  cores = backbone_runtime.usable_cores()
  load = os.getloadavg()[0]
  return f"load average {load:.1f} on {cores} cores" if load > cores else None


class MachineSpeeds:
  """handle -> images/s on this machine: cached measures, measuring what is missing and cheap.

  measure(builtin) -> images/s: runs one built-in on a small batch (the
  default, `measure_builtin`, loads it with TensorFlow). is_built(builtin):
  whether measuring it costs no build. busy() -> None, or why the machine is
  too busy for a measure to be kept (`cpu_busy`): such a measure serves this
  run only, and the next run measures again, so a slow moment is not cached
  for good. The cache is a JSON file {machine key: {built-in: images/s}}
  written atomically (a concurrent writer's entry may be lost and is measured
  again).
  """

  def __init__(self, key, cache_path, measure, is_built, busy=lambda: None):
    self.key = key
    self._cache_path = cache_path
    self._measure = measure
    self._is_built = is_built
    self._busy = busy

  def _read(self):
    return _read_json_or_none(self._cache_path) or {}   # unreadable: measured again, rewritten

  def _builtin_rate(self, name, known):
    if name in known:
      return known[name]
    if name == MOBILENET_V2 or self._is_built(name):
      known[name] = float(self._measure(name))
      return known[name]
    # Not built here yet: estimated from MobileNetV2 (built first, measured).
    return self._builtin_rate(MOBILENET_V2, known) * RELATIVE_SPEED[name]

  def __call__(self, handle):
    cache = self._read()
    known = dict(cache.get(self.key, {}))
    before = dict(known)
    rate = concatenation_rate([self._builtin_rate(part, known) for part in parts(handle)])
    if known != before:
      busy = self._busy()
      if busy:
        logging.info("Backbone speeds measured while the machine was busy (%s): used for this "
                     "run, not kept", busy)
        return rate
      cache = self._read()   # another run may have written meanwhile: keep its entries
      cache[self.key] = dict(cache.get(self.key, {}), **known)
      os.makedirs(os.path.dirname(self._cache_path), exist_ok=True)
      fileio.atomic_write_json(self._cache_path, cache)
    return rate


def measure_builtin(name, precision, batch_size=MEASURE_BATCH_SIZE, timed_calls=MEASURE_CALLS):
  """Images/s of built-in `name` on a batch of random images: the fastest of `timed_calls`
  calls after a first (tracing) one, so that a moment's hiccup is not taken for the speed."""
  model = backbone_lib.load_backbone(name, precision=precision)
  images = tf.random.stateless_uniform([batch_size, model.input_size, model.input_size, 3],
                                       seed=[0, 0])
  run = tf.function(model.__call__)
  run(images).numpy()   # traces
  fastest = float("inf")
  for _ in range(timed_calls):
    start = time.perf_counter()
    run(images).numpy()
    fastest = min(fastest, time.perf_counter() - start)
  return batch_size / fastest


def machine_speeds(precision):
  """The MachineSpeeds of this machine at `precision` ("auto" resolved), cached in the cache dir."""
  resolved = backbone_lib.resolve_precision(precision)
  gpus = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
          for gpu in tf.config.list_physical_devices("GPU")]
  return MachineSpeeds(
      machine_key(resolved, gpus), os.path.join(backbone_lib.cache_root(), SPEEDS_FILENAME),
      measure=lambda name: measure_builtin(name, resolved),
      is_built=lambda name: backbone_lib.is_builtin_built(name, precision=resolved),
      busy=(lambda: None) if gpus else cpu_busy)   # a GPU's speed does not share the CPU's load


# ---------------------------------------------------------------------------
# A run's options.


def resolve(options, images_per_second=None):
  """(options with a concrete backbone, Choice or None): None when --backbone was given.

  images_per_second: handle -> images/s; default this machine's
  (`machine_speeds`), measured at first need.
  """
  if options.backbone != AUTO:
    return options, None
  earlier = os.path.join(options.model_dir, model_dir_layout.RUN_OPTIONS_FILENAME)
  previous = _read_json_or_none(earlier) if not options.overwrite else None
  if previous and previous.get("backbone") not in (None, AUTO):
    choice = Choice(previous["backbone"], f"the backbone of the model already in "
                    f"--model_dir={options.model_dir} (its earlier run chose it; --overwrite "
                    "chooses again)")
    return dataclasses.replace(options, backbone=choice.backbone), choice
  if options.strategy == "multi_worker":
    choice = Choice(CANDIDATES[-1], "multi-worker runs take the fastest candidate: every worker "
                    "must choose the same without measuring")
    return dataclasses.replace(options, backbone=choice.backbone), choice
  manifest = records.read_manifest(options.records_dir)
  candidates, unavailable = list(CANDIDATES), []
  while True:
    choice = choose(images_to_pass(manifest, options.flip_features), options.backbone_budget_s,
                    images_per_second or machine_speeds(options.precision),
                    candidates=candidates, smallest_class=smallest_class(manifest))
    missing = None if choice.backbone == candidates[-1] else _unbuildable(choice.backbone, options)
    if missing is None:
      break
    # Offline, say, with only MobileNetV2's weights: the next candidate, not a stop.
    logging.warning("--backbone=auto: %s is not available here (%s); choosing among the rest",
                    choice.backbone, missing)
    unavailable.append(f"{choice.backbone}: {missing}")
    candidates.remove(choice.backbone)
  if unavailable:
    choice = dataclasses.replace(choice, reason=f"{choice.reason} (not available here: "
                                                f"{'; '.join(unavailable)})")
  logging.info("--backbone=auto: %s, %s", choice.backbone, choice.reason)
  return dataclasses.replace(options, backbone=choice.backbone), choice


def _unbuildable(handle, options):
  """None when every built-in part of `handle` is built, or builds now; else why one cannot
  (its weights are neither here nor fetchable: a machine without internet)."""
  precision = backbone_lib.resolve_precision(options.precision)
  features = options_lib.canonical_features(options.features)
  for part in parts(handle):
    if part in backbone_lib.BUILTIN_NAMES:
      try:   # at once when built
        backbone_lib.ensure_builtin(part, kinds=(features,), precision=precision)
      except UserError as e:
        return f"{part}: {e}"
  return None


def _read_json_or_none(path):
  if not tf.io.gfile.exists(path):
    return None
  try:
    return fileio.read_json(path)
  except (ValueError, UnicodeDecodeError):
    return None   # unreadable: model_dir.prepare says so
