"""The backbone pass distributed, on real photos: mirrored over 2 logical CPUs and 2 local
workers give the one-device features in record order, each worker decodes only its shards, and
a missing or damaged cache part is redone alone."""

import glob
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tlframe.backbone import loading as backbone_lib
from tlframe.train import feature_cache
from tlframe import records
from test_train_helpers import REPO, make_records, run_local_workers, save_tiny_backbone
from test_train_helpers import subprocess_env

KWARGS = dict(batch_size=3, image_size=64, resize_mode="center_crop", num_classes=4,
              num_thumbnails_per_class=2)


@pytest.fixture(scope="module")
def sharded_task(tmp_path_factory, skimage_photos):
  """(records_dir, tiny backbone dir): 12 crops per class of 4 photos, in shards of 8 images."""
  tmp = tmp_path_factory.mktemp("sharded_task")
  return (make_records(str(tmp), skimage_photos, shard_size=8),
          save_tiny_backbone(tmp / "tiny_backbone"))


# Runs in a fresh process: logical devices must be set before TF initializes.
_MIRRORED_SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tlframe.backbone import loading as backbone_lib
from tlframe.train import distribution, extraction, feature_cache
records_dir, backbone_dir, cache = sys.argv[1:4]
kwargs = json.loads(sys.argv[4])
backbone = backbone_lib.load_backbone(backbone_dir)  # outside the strategy's scope
strategy = distribution.make_strategy("mirrored")
cached_one = feature_cache.cached_features(backbone, records_dir, "train",
                                           feature_cache_dir=cache + "/one", **kwargs)
cached = feature_cache.cached_features(backbone, records_dir, "train",
                                       feature_cache_dir=cache + "/two",
                                       strategy=distribution.extraction_strategy(strategy), **kwargs)
# Each replica's share of one step: a batch of its own images, featurized.
featurize = extraction._distributed_featurizer(strategy, backbone, kwargs["batch_size"], 64, False)
images = strategy.experimental_distribute_values_from_function(
    lambda context: tf.fill([kwargs["batch_size"], 64, 64, 3],
                            float(context.replica_id_in_sync_group)))
shares = [t.numpy() for t in strategy.experimental_local_results(featurize(images))]
expected = [backbone(tf.fill([kwargs["batch_size"], 64, 64, 3], float(i))).numpy()
            for i in range(2)]
result = dict(replicas=strategy.num_replicas_in_sync, shares=[s.shape[0] for s in shares],
              shares_match=bool(all(np.allclose(a, b, atol=1e-5)
                                    for a, b in zip(shares, expected))))
for name, feature_set in (("one", cached_one), ("two", cached)):
  result[name] = dict(features=feature_set.features.tolist(), labels=feature_set.labels.tolist(),
                      filenames=feature_set.filenames.tolist(),
                      thumbnail_rows=feature_set.thumbnail_rows.tolist())
print("RESULT " + json.dumps(result))
"""


def _result(stdout):
  return json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])


def test_mirrored_pass_on_two_cpus_equals_one_device(sharded_task, tmp_path):
  records_dir, backbone = sharded_task
  run = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT, records_dir, backbone,
                        str(tmp_path / "cache"), json.dumps(KWARGS)],
                       capture_output=True, text=True, env=subprocess_env(), timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  result = _result(run.stdout)
  assert result["replicas"] == 2
  assert result["shares"] == [KWARGS["batch_size"]] * 2 and result["shares_match"]
  one = result["one"]
  one, two = result["one"], result["two"]
  # 29 training images in shards of 8, 8, 8, 5; 3 per replica: the second step of a shard of 8
  # leaves replica 1 only padding, that of the last shard (5) gives it 2 images of 3.
  assert len(one["labels"]) == records.count_examples(records_dir, "train") == 29
  assert two["labels"] == one["labels"] and two["filenames"] == one["filenames"]
  assert two["thumbnail_rows"] == one["thumbnail_rows"]
  np.testing.assert_allclose(two["features"], one["features"], rtol=1e-5, atol=1e-6)


def _worker_passes(stderr):
  """{shard name: images decoded} from a worker's "Backbone pass over <shard>" log lines."""
  return {match.group(1): int(match.group(2)) for match in re.finditer(
      r"Backbone pass over (\S+\.tfrecord) \(part .*?\): (\d+) images decoded", stderr)}


@pytest.mark.slow
def test_two_local_workers_share_the_pass_and_train_like_one(sharded_task, tmp_path):
  """bin/train --strategy=multi_worker, 2 processes: worker i decodes shards i, i+2, ... only."""
  records_dir, backbone = sharded_task
  common = [sys.executable, os.path.join(REPO, "bin", "train"), f"--records_dir={records_dir}",
            f"--backbone={backbone}", "--batch_size=8", "--epochs=15",
            "--checkpoint_every_epochs=5", "--noexport"]
  outputs = run_local_workers(common + [f"--model_dir={tmp_path}/multi", "--strategy=multi_worker",
                                        f"--feature_cache_dir={tmp_path}/cache_multi"])
  for returncode, _, stderr in outputs:
    assert returncode == 0, stderr[-3000:]
  single = subprocess.run(common + [f"--model_dir={tmp_path}/single",
                                    f"--feature_cache_dir={tmp_path}/cache_single"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]

  manifest = records.read_manifest(records_dir)
  for index, (_, _, stderr) in enumerate(outputs):
    expected = {shard["name"]: shard["records"] for split in ("train", "validation")
                for number, shard in enumerate(manifest["splits"][split]["shards"])
                if number % 2 == index}
    assert _worker_passes(stderr) == expected
  assert sum(_worker_passes(single.stderr).values()) == 48
  # The same parts (the key does not depend on the strategy), with the same features.
  multi_parts = sorted(glob.glob(str(tmp_path / "cache_multi" / "*" / "part-*.npz")))
  single_parts = sorted(glob.glob(str(tmp_path / "cache_single" / "*" / "part-*.npz")))
  assert [os.path.relpath(p, tmp_path / "cache_multi") for p in multi_parts] == [
      os.path.relpath(p, tmp_path / "cache_single") for p in single_parts]
  assert len(multi_parts) == 7  # 4 train and 3 validation shards
  for multi_path, single_path in zip(multi_parts, single_parts):
    multi_part, single_part = feature_cache.read_part(multi_path), feature_cache.read_part(single_path)
    number = int(re.search(r"part-(\d+)-of", multi_path).group(1))
    assert multi_part["extracted_by"] == f"worker {number % 2} of 2"
    np.testing.assert_array_equal(multi_part["labels"], single_part["labels"])
    np.testing.assert_allclose(multi_part["features"], single_part["features"], rtol=1e-5)
  multi = json.load(open(tmp_path / "multi" / "metrics.json"))
  default = json.load(open(tmp_path / "single" / "metrics.json"))
  assert multi["num_replicas"] == 2 and default["num_replicas"] == 1
  for split in ("train", "validation"):
    assert multi[split]["accuracy"] == pytest.approx(default[split]["accuracy"], abs=0.05)
  assert not [name for name in os.listdir(tmp_path / "multi") if name.startswith(".worker")]


def test_a_missing_or_damaged_part_is_redone_alone(sharded_task, tmp_path, caplog):
  """A restarted worker 1 of 2 redoes only its lost parts and reads the rest from the cache."""
  records_dir, backbone_dir = sharded_task
  backbone = backbone_lib.load_backbone(backbone_dir)
  cache = str(tmp_path / "cache")
  full = feature_cache.cached_features(backbone, records_dir, "train", feature_cache_dir=cache,
                                       **KWARGS)
  parts = sorted(glob.glob(os.path.join(cache, "train-*", "part-*.npz")))
  assert len(parts) == 4 and not full.from_cache
  os.remove(parts[1])                                            # never written (killed)
  open(parts[3], "wb").write(open(parts[3], "rb").read()[:300])  # damaged
  kept = {path: os.stat(path).st_mtime_ns for path in parts if path not in parts[1:4:2]}
  caplog.set_level(logging.INFO, logger="absl")
  again = feature_cache.cached_features(backbone, records_dir, "train", feature_cache_dir=cache,
                                        worker=(1, 2), **KWARGS)
  assert f"Ignoring unreadable feature cache {parts[3]}" in caplog.text
  redone = _worker_passes(caplog.text)
  assert sorted(redone) == ["train-00001-of-00004.tfrecord", "train-00003-of-00004.tfrecord"]
  assert {path: os.stat(path).st_mtime_ns for path in kept} == kept
  assert not again.from_cache
  for number in (1, 3):
    assert feature_cache.read_part(parts[number])["extracted_by"] == "worker 1 of 2"
  np.testing.assert_array_equal(again.features, full.features)
  np.testing.assert_array_equal(again.labels, full.labels)
  np.testing.assert_array_equal(again.thumbnail_rows, full.thumbnail_rows)
  np.testing.assert_array_equal(again.thumbnails, full.thumbnails)
  assert feature_cache.cached_features(backbone, records_dir, "train", feature_cache_dir=cache,
                                       **KWARGS).from_cache
