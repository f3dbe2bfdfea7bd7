"""--fine_tune: only the chosen blocks and the head change, the export matches, strategies agree.

Most tests fine-tune a tiny TF-Hub-style module with BatchNorm (two named
blocks, moving statistics as non-trainable variables; seconds on a CPU); the
slow test fine-tunes the built-in MobileNetV2 through bin/train, kills it with
SIGKILL and resumes.
"""

import dataclasses
import glob
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tlframe.backbone import loading as backbone_lib
from tlframe.train import head as head_lib
from tlframe.train import tuned_blocks
from tlframe.train import layout as model_dir_layout
from tlframe import pipeline
from tlframe import records
from tlframe import train
from tlframe.errors import UserError
from test_cli import assert_one_error_line, run_bin
from test_train_helpers import kill_when_written, make_records, save_tiny_backbone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64


class TinyBatchNormBackbone(tf.Module):
  """Two blocks of conv + BatchNorm (inference mode) + ReLU, pooled: a reusable SavedModel.

  Variables are named tiny/block<i>/...; `trainable_variables` holds the
  kernels, gammas and betas, `variables` also the moving statistics.
  """

  # Shadow tf.Module's computed properties so these become saved attributes.
  variables = ()
  trainable_variables = ()

  def __init__(self):
    super().__init__()
    def variable(seed, shape, name, trainable=True, scale=0.3, offset=0.0):
      value = tf.random.stateless_normal(shape, seed=[seed, 7]) * scale + offset
      return tf.Variable(value, name=name, trainable=trainable)
    self.layers = []
    for index, (shape, stride) in enumerate((([5, 5, 3, 8], 4), ([3, 3, 8, 16], 2)), start=1):
      channels = shape[-1]
      scope = f"tiny/block{index}"
      self.layers.append(dict(
          kernel=variable(index, shape, f"{scope}/conv/kernel"),
          gamma=variable(10 + index, [channels], f"{scope}/bn/gamma", scale=0.1, offset=1.0),
          beta=variable(20 + index, [channels], f"{scope}/bn/beta", scale=0.1),
          moving_mean=variable(30 + index, [channels], f"{scope}/bn/moving_mean", False, 0.1),
          moving_variance=variable(40 + index, [channels], f"{scope}/bn/moving_variance",
                                   False, 0.1, 1.0),
          stride=stride))
    self.trainable_variables = [layer[name] for layer in self.layers
                                for name in ("kernel", "gamma", "beta")]
    self.variables = self.trainable_variables + [layer[name] for layer in self.layers
                                                 for name in ("moving_mean", "moving_variance")]

  @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32)])
  def __call__(self, images):
    x = images
    for layer in self.layers:
      x = tf.nn.conv2d(x, layer["kernel"], layer["stride"], "SAME")
      x = tf.nn.relu(tf.nn.batch_normalization(x, layer["moving_mean"], layer["moving_variance"],
                                               layer["beta"], layer["gamma"], 1e-3))
    return tf.reduce_mean(x, axis=[1, 2])


def _variables_by_name(module):
  return {variable.name: variable.numpy() for variable in module.variables}


def _digest(directory):
  digest = hashlib.sha256()
  for root, _, files in sorted(os.walk(directory)):
    for name in sorted(files):
      with open(os.path.join(root, name), "rb") as f:
        digest.update(name.encode() + f.read())
  return digest.hexdigest()


def _options(records_dir, model_dir, module_dir, **overrides):
  # A strong l2 leaves the linear head short of the data, so fine-tuning has a
  # validation loss to lower (its best epoch is then after the start).
  settings = dict(records_dir=records_dir, model_dir=model_dir, backbone=module_dir,
                  precision="float32", l2=0.3, feature_normalization="standardize",
                  epochs=30, batch_size=8, fine_tune=True,
                  fine_tune_blocks="1", fine_tune_epochs=2, fine_tune_batch_size=8,
                  fine_tune_learning_rate=0.01, fine_tune_patience=0, seed=1)
  settings.update(overrides)
  return train.TrainOptions(**settings)


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory, skimage_photos):
  tmp = tmp_path_factory.mktemp("finetune_task")
  records_dir = make_records(str(tmp), skimage_photos, per_class=8, size=80)
  module_dir = str(tmp / "tiny_bn_backbone")
  tf.saved_model.save(TinyBatchNormBackbone(), module_dir)
  return records_dir, module_dir


@pytest.fixture(scope="module")
def fine_tuned(tiny_task, tmp_path_factory):
  records_dir, module_dir = tiny_task
  before = _digest(module_dir)
  model_dir = str(tmp_path_factory.mktemp("finetune_model") / "model")
  options = _options(records_dir, model_dir, module_dir)
  metrics = train.train(options)
  return dict(records_dir=records_dir, module_dir=module_dir, model_dir=model_dir,
              options=options, metrics=metrics, module_digest_before=before)


def test_generic_module_blocks_follow_name_scopes(tiny_task):
  backbone = backbone_lib.load_backbone(tiny_task[1])
  blocks = tuned_blocks.blocks_of(backbone.module)
  assert [[v.name for v in block] for block in blocks] == [
      [f"tiny/block{i}/conv/kernel:0", f"tiny/block{i}/bn/gamma:0", f"tiny/block{i}/bn/beta:0"]
      for i in (1, 2)]
  assert len(tuned_blocks.trainable_variables(backbone, "all")) == 6
  with pytest.raises(UserError, match=r"^fine_tune_blocks=3 but .* has 2 blocks"):
    tuned_blocks.trainable_variables(backbone, 3)


def test_builtin_blocks_are_its_inverted_residual_blocks(builtin_backbone_dirs):
  backbone = backbone_lib.load_backbone(backbone_lib.DEFAULT_HANDLE, precision="float32")
  module = backbone.module
  assert len(tuned_blocks.blocks_of(module)) == len(module.blocks) == 19
  top = tuned_blocks.trainable_variables(backbone, 1)
  assert [v.shape for v in top] == [(1, 1, 320, 1280), (1280,)]
  assert top[0] is module.blocks[-1][0].kernel
  three = tuned_blocks.trainable_variables(backbone, "3")
  assert {v.ref() for v in three} == {v.ref() for block in module.blocks[-3:]
                                      for layer in block for v in layer.trainable}
  assert len(tuned_blocks.trainable_variables(backbone, "all")) == len(module.trainable_variables)
  logits = backbone_lib.load_backbone(backbone_lib.DEFAULT_HANDLE, features="logits",
                                      precision="float32")
  assert [v.shape for v in tuned_blocks.trainable_variables(logits, 1)] == [(1280, 1000), (1000,)]


def test_only_the_top_block_and_the_head_change(fine_tuned):
  metrics, model_dir = fine_tuned["metrics"], fine_tuned["model_dir"]
  assert metrics["fine_tune"]["epochs_completed"] == 2
  assert metrics["fine_tune"]["best_epoch"] >= 1, metrics["fine_tune"]
  assert (metrics["fine_tune"]["best_validation_loss"]
          < metrics["fine_tune"]["linear_probe_validation_loss"])
  # The module's files are never written; the model dir holds the change.
  assert _digest(fine_tuned["module_dir"]) == fine_tuned["module_digest_before"]
  config = head_lib.HeadConfig.read(model_dir)
  assert config.fine_tune == {"blocks": 1, "directory": model_dir_layout.FINE_TUNED_BACKBONE_DIRNAME}

  original = backbone_lib.load_backbone(fine_tuned["module_dir"])
  tuned = backbone_lib.load_backbone(fine_tuned["module_dir"])
  tuned_blocks.restore_backbone_variables(tuned, model_dir, config.fine_tune["blocks"])
  before, after = _variables_by_name(original.module), _variables_by_name(tuned.module)
  changed = sorted(name for name in before if not np.array_equal(before[name], after[name]))
  assert changed == sorted(f"tiny/block2/{name}:0" for name in
                           ("conv/kernel", "bn/gamma", "bn/beta"))
  # Bit-identical: the lower block and every BatchNorm statistic.
  for name in before:
    if name not in changed:
      assert before[name].tobytes() == after[name].tobytes(), name

  # The head moved on from the linear-probed one (the head stage's last checkpoint).
  probed = head_lib.LinearHead(config.num_features, config.num_classes,
                               feature_normalization=config.feature_normalization)
  tf.train.Checkpoint(head=probed).read(tf.train.latest_checkpoint(
      os.path.join(model_dir, model_dir_layout.CHECKPOINT_DIRNAME))).expect_partial()
  final, _ = head_lib.load_head(model_dir)
  assert not np.allclose(final.kernel.numpy(), probed.kernel.numpy(), atol=1e-4)
  np.testing.assert_array_equal(final.feature_scale.numpy(), probed.feature_scale.numpy())


def test_the_export_scores_as_the_training_graph_in_evaluation_mode(fine_tuned):
  metrics = fine_tuned["metrics"]
  exported = tf.saved_model.load(metrics["export_dir"])
  predict = exported.signatures["predict_images"]
  images, labels = next(iter(pipeline.make_dataset(
      records.split_file_pattern(fine_tuned["records_dir"], "validation"), 1000,
      image_size=SIZE)))
  scores = predict(images=images)["scores"]
  # The training graph's validation loss of the weights it kept, recomputed from the export.
  loss = float(tf.reduce_mean(head_lib.softmax_loss(scores, labels)))
  assert loss == pytest.approx(metrics["fine_tune"]["best_validation_loss"], rel=1e-5, abs=1e-6)
  accuracy = float(np.mean(np.argmax(scores.numpy(), axis=-1) == labels.numpy()))
  assert accuracy == metrics["validation"]["accuracy"]
  info = json.load(open(os.path.join(metrics["export_dir"], "tlframe_export.json")))
  assert info["fine_tuned_blocks"] == 1


def test_tensorboard_has_its_own_fine_tuning_run(fine_tuned):
  from tensorboard.backend.event_processing import event_accumulator
  logs = os.path.join(fine_tuned["model_dir"], model_dir_layout.LOGS_DIRNAME, model_dir_layout.FINE_TUNE_SUBDIRNAME)
  tags = {}
  for run in ("train", "validation"):
    accumulator = event_accumulator.EventAccumulator(os.path.join(logs, run))
    accumulator.Reload()
    tags[run] = set(accumulator.Tags()["tensors"])
  assert {"epoch/loss", "epoch/accuracy", "epoch/learning_rate_backbone",
          "epoch/learning_rate_head", "epoch/accuracy_gap_train_minus_validation",
          "epoch/loss_gap_validation_minus_train"} <= tags["train"]
  assert {"epoch/loss", "epoch/accuracy"} <= tags["validation"]


@pytest.mark.parametrize("flags, message", [
    (["--fine_tune_blocks=0"], "--fine_tune_blocks=0: give a number of top blocks >= 1, or all"),
    (["--fine_tune_blocks=top"], "--fine_tune_blocks=top"),
    (["--fine_tune_learning_rate=nan"], "--fine_tune_learning_rate=nan is not a finite number"),
    (["--fine_tune_epochs=0"], "--fine_tune_epochs=0 must be positive"),
    (["--flip_features"], "--fine_tune trains on random flips"),
])
def test_bad_fine_tuning_flags_are_one_line_before_any_work(flags, message, tmp_path):
  result = run_bin("train", "--records_dir=r", f"--model_dir={tmp_path}/m", "--fine_tune", *flags)
  assert_one_error_line(result, message)
  assert not os.path.exists(tmp_path / "m")


def test_streamed_features_are_refused_before_the_backbone_pass(tiny_task, tmp_path):
  """Fine-tuning needs the features in memory; the manifest's split sizes tell, before any decode."""
  records_dir, module_dir = tiny_task
  cache = tmp_path / "cache"
  with pytest.raises(UserError, match="^fine_tune recomputes the features in memory.*train and "
                                      "validation"):
    train.train(_options(records_dir, str(tmp_path / "model"), module_dir,
                         max_in_memory_features=1, feature_cache_dir=str(cache)))
  assert not glob.glob(str(cache / "**" / "*.npz"), recursive=True)


def test_a_module_without_trainable_variables_is_refused(tiny_task, tmp_path):
  records_dir, _ = tiny_task
  module_dir = save_tiny_backbone(tmp_path / "no_trainable_variables")
  result = run_bin("train", f"--records_dir={records_dir}", f"--model_dir={tmp_path}/model",
                   f"--backbone={module_dir}", "--fine_tune", timeout=300)
  assert_one_error_line(result, "--fine_tune", "exposes no trainable_variables")
  assert not os.path.exists(tmp_path / "model" / "metrics.json")


def _fine_tuned_weights(options, metrics):
  """The run's fine-tuned backbone variables and head kernel, with its metrics, as JSON data."""
  tuned = backbone_lib.load_backbone(options["backbone"])
  variables = tuned_blocks.restore_backbone_variables(tuned, options["model_dir"],
                                                  options["fine_tune_blocks"])
  trained_head, _ = head_lib.load_head(options["model_dir"])
  return dict(replicas=metrics["num_replicas"], fine_tune=metrics["fine_tune"],
              validation=metrics["validation"]["accuracy"],
              variables=[v.numpy().tolist() for v in variables],
              kernel=trained_head.kernel.numpy().tolist())


# Runs in a fresh process: logical devices must be set before TF initializes.
_MIRRORED_SCRIPT = r"""
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, sys.argv[2])
from tlframe import train
from test_finetune import _fine_tuned_weights
options = json.loads(sys.argv[1])
metrics = train.train(train.TrainOptions(**options))
print("RESULT " + json.dumps(_fine_tuned_weights(options, metrics)))
"""


def test_mirrored_on_two_cpus_matches_one_device(fine_tuned, tmp_path):
  """The same run as `fine_tuned` (one device) under MirroredStrategy on 2 logical CPUs."""
  options = dict(dataclasses.asdict(fine_tuned["options"]), strategy="mirrored", export=False,
                 model_dir=str(tmp_path / "mirrored"))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  env.pop("TF_CONFIG", None)
  run = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT, json.dumps(options),
                        os.path.dirname(os.path.abspath(__file__))], capture_output=True,
                       text=True, env=env, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
  mirrored = json.loads(line[len("RESULT "):])
  default = _fine_tuned_weights(dataclasses.asdict(fine_tuned["options"]), fine_tuned["metrics"])
  assert default["replicas"] == 1 and mirrored["replicas"] == 2
  for key in ("best_epoch", "epochs_completed"):
    assert mirrored["fine_tune"][key] == default["fine_tune"][key]
  assert mirrored["fine_tune"]["best_validation_loss"] == pytest.approx(
      default["fine_tune"]["best_validation_loss"], rel=1e-3)
  assert mirrored["validation"] == pytest.approx(default["validation"], abs=0.05)
  # Same batches, gradients all-reduced: the same weights up to float summation order.
  for ours, theirs in zip(mirrored["variables"] + [mirrored["kernel"]],
                          default["variables"] + [default["kernel"]]):
    theirs = np.asarray(theirs)
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-3,
                               atol=1e-3 * np.abs(theirs).max())


def _train_command(records_dir, model_dir):
  return [sys.executable, os.path.join(REPO, "bin", "train"), f"--records_dir={records_dir}",
          f"--model_dir={model_dir}", f"--backbone={backbone_lib.DEFAULT_HANDLE}",
          "--precision=float32", "--l2=0.3",
          "--feature_normalization=standardize", "--epochs=30",
          "--fine_tune", "--fine_tune_blocks=1", "--fine_tune_epochs=2",
          "--fine_tune_batch_size=8", "--fine_tune_patience=0", "--seed=1", "--noexport"]


@pytest.mark.slow
def test_builtin_sigkill_then_rerun_continues_from_the_fine_tuning_checkpoint(
    tmp_path, skimage_photos, builtin_backbone_dirs):
  """The built-in MobileNetV2, K=1: bin/train killed mid fine-tuning, rerun, vs a whole run."""
  records_dir = make_records(str(tmp_path), skimage_photos, per_class=6, size=96)
  cached_module = builtin_backbone_dirs["feature_vector"]
  before = _digest(cached_module)
  whole = subprocess.run(_train_command(records_dir, tmp_path / "whole"), capture_output=True,
                         text=True, timeout=900)
  assert whole.returncode == 0, whole.stderr[-3000:]

  model_dir = tmp_path / "killed"
  process = subprocess.Popen(_train_command(records_dir, model_dir),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  kill_when_written(process, model_dir / "checkpoints" / model_dir_layout.FINE_TUNE_SUBDIRNAME /
                    "checkpoint", "fine-tuning checkpoint", timeout_s=600)
  resumed = subprocess.run(_train_command(records_dir, model_dir), capture_output=True,
                           text=True, timeout=900)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Fine-tuning resumed from" in resumed.stderr
  assert "fine-tuning: top 1 blocks" in resumed.stdout

  metrics = json.load(open(model_dir / "metrics.json"))["fine_tune"]
  reference = json.load(open(tmp_path / "whole" / "metrics.json"))["fine_tune"]
  assert 0 < metrics["epochs_run_now"] < reference["epochs_run_now"] == 2
  assert metrics["best_epoch"] == reference["best_epoch"]
  assert metrics["best_validation_loss"] == pytest.approx(reference["best_validation_loss"],
                                                          rel=1e-4, abs=1e-6)
  assert _digest(cached_module) == before  # the cached built-in is never written

  def load(model_dir=None):
    backbone = backbone_lib.load_backbone(backbone_lib.DEFAULT_HANDLE, precision="float32")
    if model_dir:
      tuned_blocks.restore_backbone_variables(backbone, str(model_dir), 1)
    return backbone

  def last_trained_top_block(model_dir):
    """The top block after the last epoch (the kept weights may be the start's)."""
    variables = tuned_blocks.trainable_variables(load(), 1)
    tf.train.Checkpoint(backbone_variables=variables).read(tf.train.latest_checkpoint(
        model_dir / "checkpoints" / model_dir_layout.FINE_TUNE_SUBDIRNAME)).expect_partial()
    return [variable.numpy() for variable in variables]

  original = load()
  resumed_top = last_trained_top_block(model_dir)
  for ours, theirs, start in zip(resumed_top, last_trained_top_block(tmp_path / "whole"),
                                 tuned_blocks.trainable_variables(original, 1)):
    assert not np.allclose(ours, start.numpy()), "the top block did not train"
    # The resumed run saw the batches and the state of the uninterrupted one.
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
  # In the model dir: every block but the top one bit-identical to the built-in.
  for name in ("whole", "killed"):
    tuned = load(tmp_path / name)
    for block, tuned_block in zip(original.module.blocks[:-1], tuned.module.blocks[:-1]):
      for layer, tuned_layer in zip(block, tuned_block):
        for variable, tuned_variable in zip(layer.trainable, tuned_layer.trainable):
          assert variable.numpy().tobytes() == tuned_variable.numpy().tobytes()
