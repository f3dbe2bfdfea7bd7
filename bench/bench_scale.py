#!/usr/bin/env python3
"""The backbone pass distributed: images/s with 1 vs 2 replicas and 1 vs 2 workers, one run.

bin/train's backbone pass (`feature_cache.cached_features`: every record shard
into its cache part) is timed four ways over the same records, each into a
fresh cache:
- 1 replica, then 2 replicas of a MirroredStrategy over 2 logical CPU devices
  (each batch split across them, `--strategy=mirrored`);
- 1 worker, then 2 local worker processes on 127.0.0.1 (TF_CONFIG,
  `--strategy=multi_worker`: worker i extracts shards i, i+2, ... and reads the
  other's parts), timed inside each worker from a collective barrier to having
  every part.
On a CPU the logical devices and the workers share the same cores: no speed-up
is expected. What the rows show is the work each replica and worker does and
the overhead of sharing it out; the backbone alone on ready tensors gives the
compute, and the scaling formula printed below puts the rest next to the
compute time of N devices per worker and M workers:
  t(N, M) per image = (c / N + p) / M + o_r + o_w
(c: the backbone's compute per image on one device; p: the rest of the pass,
done by each worker for its own shards; o_r, o_w: what splitting over replicas
and workers added here).
With oxford_flowers12 present (--data_dir or $TLFRAME_DATA_DIR), a second table
trains the default head on its features stored as float32 and as float16
(`--feature_storage`) and compares test accuracy and cache size.

  .venv/bin/python bench/bench_scale.py [--images_per_class=48] [--shard_size=24]
"""

import glob
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# tlframe before tensorflow: importing it sets TensorFlow's oneDNN default (tlframe/__init__.py).
from tlframe.backbone import loading as backbone_lib  # pylint: disable=g-import-not-at-top
from tlframe.train import distribution  # pylint: disable=g-import-not-at-top
from tlframe.train import extraction  # pylint: disable=g-import-not-at-top
from tlframe.train import feature_cache  # pylint: disable=g-import-not-at-top
from tlframe import records  # pylint: disable=g-import-not-at-top
from tlframe import samples  # pylint: disable=g-import-not-at-top
from tlframe import train  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top
from bench_common import cpu_model  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", samples.benchmark_data_dir(),
                    "Folder holding oxford_flowers12/ (the float16 table); skipped when absent.")
flags.DEFINE_string("backbone", backbone_lib.DEFAULT_HANDLE, "The backbone to time.")
flags.DEFINE_integer("images_per_class", 48, "Crops per sample photo (4 photos) to time.")
flags.DEFINE_integer("shard_size", 24, "Records per shard: one cache part each.")
flags.DEFINE_integer("batch_size", 32, "Images per replica per batch (--extract_batch_size).")
flags.DEFINE_integer("rounds", 2, "Alternating rounds of all the rows; each keeps its fastest.")
flags.DEFINE_bool("float16_table", True, "Also train on oxford_flowers12 with float16 storage.")
# Internal: this script run as one of the workers.
flags.DEFINE_string("worker_of", None, "Internal: time the pass as a worker over these records.")
flags.DEFINE_string("worker_cache", None, "Internal: the workers' shared cache dir.")


def _kwargs():
  return dict(batch_size=FLAGS.batch_size, image_size=224, resize_mode="center_crop",
              num_classes=4)


def time_pass(backbone, records_dir, cache, **kwargs):
  """Seconds of one backbone pass into a fresh cache (the parts' pipelines included)."""
  shutil.rmtree(cache, ignore_errors=True)
  start = time.monotonic()
  feature_set = feature_cache.cached_features(backbone, records_dir, "train", feature_cache_dir=cache,
                                              **_kwargs(), **kwargs)
  assert not feature_set.from_cache
  return time.monotonic() - start, len(feature_set.labels)


def worker_main():
  """One worker: barrier, then this worker's parts and the wait for the others'."""
  strategy = distribution.make_strategy("multi_worker")
  backbone = backbone_lib.load_backbone(FLAGS.backbone, precision="float32")
  worker = distribution.worker_index_and_count(strategy)
  # Warm up (trace) on a batch of zeros, then a collective as the common start line.
  backbone(tf.zeros([FLAGS.batch_size, 224, 224, 3]))
  strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)
  start = time.monotonic()
  feature_set = feature_cache.cached_features(backbone, FLAGS.worker_of, "train",
                                              feature_cache_dir=FLAGS.worker_cache, worker=worker,
                                              **_kwargs())
  seconds = time.monotonic() - start
  decoded = sum(len(feature_cache.read_part(path)["labels"]) for path in
                glob.glob(os.path.join(FLAGS.worker_cache, "*", "part-*.npz"))
                if feature_cache.read_part(path)["extracted_by"].startswith(f"worker {worker[0]} "))
  print("RESULT " + json.dumps(dict(seconds=seconds, images=len(feature_set.labels),
                                    decoded=decoded)))


def time_workers(records_dir, cache, count):
  """(seconds of the slowest worker, images, images decoded by each) of `count` local workers."""
  shutil.rmtree(cache, ignore_errors=True)
  processes = []
  for tf_config in distribution.local_tf_configs(count):
    env = dict(os.environ, TF_CONFIG=tf_config)
    processes.append(subprocess.Popen(
        [sys.executable, __file__, f"--worker_of={records_dir}", f"--worker_cache={cache}",
         f"--backbone={FLAGS.backbone}", f"--batch_size={FLAGS.batch_size}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  results = []
  for process in processes:
    stdout, stderr = process.communicate(timeout=1800)
    if process.returncode:
      raise RuntimeError(f"a worker failed:\n{stderr[-3000:]}")
    results.append(json.loads(next(line[7:] for line in stdout.splitlines()
                                   if line.startswith("RESULT "))))
  return (max(r["seconds"] for r in results), results[0]["images"],
          [r["decoded"] for r in results])


def float16_table(work_dir):
  """Rows (storage, test accuracy, cache MB, backbone pass s) on oxford_flowers12."""
  flowers = pathlib.Path(FLAGS.data_dir) / "oxford_flowers12"
  records_dir = os.path.join(work_dir, "flowers12_records")
  samples.make_flowers12_records(flowers, records_dir)
  rows = []
  for storage in ("float32", "float16"):
    cache = os.path.join(work_dir, f"cache_{storage}")
    metrics = train.train(train.TrainOptions(
        records_dir=records_dir, model_dir=os.path.join(work_dir, f"model_{storage}"),
        backbone=FLAGS.backbone, precision="float32", feature_storage=storage,
        feature_cache_dir=cache, export=False))
    size = sum(os.path.getsize(path) for path in glob.glob(os.path.join(cache, "*", "*.npz")))
    rows.append((storage, metrics["validation"]["accuracy"], metrics["l2"], size / 2**20))
  return rows


def time_backbone_alone(backbone, images):
  """Seconds of the backbone alone on `images` ready tensors (the pass's compute)."""
  # pylint: disable-next=protected-access
  featurize = extraction._featurizer(backbone, FLAGS.batch_size, 224, False)
  batch = tf.random.stateless_uniform([FLAGS.batch_size, 224, 224, 3], seed=[1, 2])
  featurize(batch).numpy()
  start = time.monotonic()
  for _ in range(-(-images // FLAGS.batch_size)):
    featurize(batch).numpy()
  return time.monotonic() - start


def main(argv):
  del argv
  if FLAGS.worker_of:
    worker_main()
    return
  print(f"CPU: {cpu_model()} (no GPU: the replicas are logical CPU devices and the workers "
        "local processes on the same cores; expect no speed-up, read the overheads)")
  logging.set_verbosity(logging.WARNING)
  work_dir = tempfile.mkdtemp(prefix="bench_scale_")
  try:
    image_dir = os.path.join(work_dir, "images")
    samples.write_photo_crops(image_dir, samples.load_sample_photos(samples.SAMPLE_PHOTOS[:4]),
                              FLAGS.images_per_class)
    records_dir = os.path.join(work_dir, "records")
    records.convert(records_dir, image_dir=image_dir, validation_percentage=0,
                    test_percentage=0, shard_size=FLAGS.shard_size)
    num_parts = len(records.read_manifest(records_dir)["splits"]["train"]["shards"])
    images = records.count_examples(records_dir, "train")
    backbone = backbone_lib.load_backbone(FLAGS.backbone, precision="float32")
    strategy = distribution.make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2, tf.config.list_logical_devices("CPU")
    cache = os.path.join(work_dir, "cache")
    time_pass(backbone, records_dir, cache)   # warm-up: traces, file cache
    time_pass(backbone, records_dir, cache, strategy=strategy)
    # The machine may be shared: rounds alternate the variants, each keeps its fastest.
    best = dict(alone=float("inf"), replicas_1=float("inf"), replicas_2=float("inf"),
                workers_1=float("inf"), workers_2=float("inf"))
    decoded = {}
    for _ in range(FLAGS.rounds):
      best["alone"] = min(best["alone"], time_backbone_alone(backbone, images))
      for replicas, kwargs in ((1, {}), (2, dict(strategy=strategy))):
        best[f"replicas_{replicas}"] = min(best[f"replicas_{replicas}"],
                                           time_pass(backbone, records_dir, cache, **kwargs)[0])
      for count in (1, 2):
        seconds, _, decoded[count] = time_workers(records_dir, cache, count)
        best[f"workers_{count}"] = min(best[f"workers_{count}"], seconds)

    print(f"\nBackbone pass ({FLAGS.backbone}, float32, batch {FLAGS.batch_size} per replica) "
          f"over {images} images in {num_parts} shards/parts, fastest of {FLAGS.rounds} "
          "alternating rounds:\n")
    print("| setup | images/s | s | images each replica/worker computed |")
    print("|---|---|---|---|")
    print(f"| backbone alone on ready tensors (the compute) | {images / best['alone']:.1f} | "
          f"{best['alone']:.2f} | {images} |")
    for replicas in (1, 2):
      seconds = best[f"replicas_{replicas}"]
      print(f"| {replicas} replica{'s' * (replicas > 1)} (mirrored, logical CPUs) | "
            f"{images / seconds:.1f} | {seconds:.2f} | "
            f"{' + '.join([str(images // replicas)] * replicas)} (each batch split) |")
    for count in (1, 2):
      seconds = best[f"workers_{count}"]
      print(f"| {count} worker{'s' * (count > 1)} (multi_worker, local processes) | "
            f"{images / seconds:.1f} | {seconds:.2f} | {' + '.join(map(str, decoded[count]))} |")

    def per_image(seconds):
      return 1000 * seconds / images

    compute = per_image(best["alone"])
    pipeline = per_image(best["replicas_1"] - best["alone"])
    split_replicas = per_image(best["replicas_2"] - best["replicas_1"])
    split_workers = per_image(best["workers_2"] - best["workers_1"])
    print("\nScaling, in ms per image (the same cores do all the work here, so the 2-replica "
          "and 2-worker rows differ from the 1 only by what sharing the work out costs; a "
          "negative difference is noise):")
    print(f"  c   = backbone compute on one device         = {compute:.2f}")
    print(f"  p   = the rest of the pass (decode, gather, cache parts) = {pipeline:.2f}")
    print(f"  o_r = 2 replicas - 1 replica                 = {split_replicas:+.2f}")
    print(f"  o_w = 2 workers - 1 worker                   = {split_workers:+.2f}")
    print("  t(N GPUs per worker, M workers) per image = (c / N + p) / M + o_r + o_w")
    print("  (c from your device, e.g. bench/bench_backbone.py; p is CPU work each worker does "
          "for its own shards)")
    for gpus, machines in ((1, 1), (2, 1), (8, 1), (8, 4)):
      value = ((compute / gpus + pipeline) / machines + max(0.0, split_replicas) * (gpus > 1) +
               max(0.0, split_workers) * (machines > 1))
      print(f"    with this CPU's c and p, N={gpus}, M={machines}: {value:.2f} ms/image "
            f"= {1000 / value:.1f} images/s")

    if FLAGS.float16_table and (pathlib.Path(FLAGS.data_dir) / "oxford_flowers12").is_dir():
      print("\nFeature storage on oxford_flowers12 (default head, l2 cross-validated; "
            "accuracy on its 240 test images):\n")
      print("| --feature_storage | test accuracy | chosen l2 | cache MB |")
      print("|---|---|---|---|")
      for storage, accuracy, l2, megabytes in float16_table(work_dir):
        print(f"| {storage} | {accuracy:.4f} | {l2:g} | {megabytes:.2f} |")
  finally:
    shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
  if "--worker_of" not in " ".join(sys.argv):
    # Two logical CPU devices for the mirrored rows: before TensorFlow initializes.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
  app.run(main)
