#!/usr/bin/env python3
"""Backbone speed on this machine: one run, ratios measured side by side.

Tables:
1. Matmul peak (a large fp32 and bf16 tf.linalg.matmul): the roofline.
2. Feature-vector images/s at batch 1/8/32/64 for the built-in MobileNetV2:
   unfolded fp32 (conv -> BatchNorm -> ReLU6), folded fp32 and folded bf16
   (the exports tlframe ships), as ratios to unfolded and as a fraction of the
   matmul peak (0.60 GFLOP per image).
3. The same module called raw (`tf.saved_model.load`) and through
   `tlframe.backbone.load_backbone`: the loader should add nothing.
4. Export form x oneDNN off/on x intra/inter-op thread counts: images/s at
   batch 32, each in a fresh process (TF fixes oneDNN and its thread pools when
   it starts), against the straightforward export (unfolded, TF's defaults).
5. oxford_flowers12 test accuracy of a linear SVM (scikit-learn LinearSVC) on
   fp32 vs bf16 features.
6. Every built-in (MobileNetV2, EfficientNet-Lite0/1/2), folded fp32 feature
   vector at its own input size: images/s at batch 32, relative to MobileNetV2
   (`--only_builtins` prints just this table, in about a minute plus builds).

Calls alternate between the variants compared and each keeps its fastest
call: the machine may be shared, and this way all variants see the same load. Needs the bench
extras (`pip install -e .[bench]`).

  python bench/bench_backbone.py [--data_dir=...] [--skip_accuracy] [--skip_threads] [--only_builtins]
"""

import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_list("batch_sizes", ["1", "8", "32", "64"], "Batch sizes to time.")
flags.DEFINE_float("seconds", 4.0, "Seconds of calls per variant and batch size; the fastest call counts.")
flags.DEFINE_string("data_dir", None,
                    "Folder holding oxford_flowers12; default $TLFRAME_DATA_DIR or ../shared/data.")
flags.DEFINE_bool("skip_accuracy", False, "Skip the oxford_flowers12 fp32 vs bf16 accuracy table.")
flags.DEFINE_bool("skip_threads", False, "Skip the oneDNN and thread-count table.")
flags.DEFINE_bool("only_builtins", False, "Print only the table of every built-in at batch 32.")
flags.DEFINE_string("settings_child", None,
                    "Internal: 'module_dir,intra,inter': time that SavedModel at batch 32 with "
                    "these threads in this process and print the rate.")

GFLOP_PER_IMAGE = 0.60  # MobileNetV2 1.0 at 224: ~300M multiply-adds


def best_rates(variants, make_inputs, items_of, keys):
  """{(variant, key): items/s of its fastest call}.

  Calls alternate between the variants (A, B, C, A, B, C, ...) for
  --seconds per variant, so all of them see the same load from other processes,
  and each keeps its fastest call: the one least disturbed by them.
  """
  best = {}
  for key in keys:
    inputs = make_inputs(key)
    for fn in variants.values():
      fn(inputs).numpy()  # trace and warm up
    fastest = dict.fromkeys(variants, float("inf"))
    deadline = time.perf_counter() + FLAGS.seconds * len(variants)
    rounds = 0
    while rounds < 3 or time.perf_counter() < deadline:
      for name, fn in variants.items():
        start = time.perf_counter()
        fn(inputs).numpy()
        fastest[name] = min(fastest[name], time.perf_counter() - start)
      rounds += 1
    for name in variants:
      best[name, key] = items_of(key) / fastest[name]
  return best


def matmul_peak_gflops(tf, n=2048):
  a = tf.random.uniform([n, n])
  b = tf.random.uniform([n, n])
  variants = {dtype.name: tf.function(lambda x, y, d=dtype: tf.reduce_sum(
      tf.cast(tf.linalg.matmul(tf.cast(x, d), tf.cast(y, d)), tf.float32)))
              for dtype in (tf.float32, tf.bfloat16)}
  rates = best_rates({k: (lambda pair, f=f: f(*pair)) for k, f in variants.items()},
                     lambda _: (a, b), lambda _: 2 * n**3 / 1e9, ["matmul"])
  return {name: rates[name, "matmul"] for name in variants}


def print_table(header, rows):
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  for row in [header, ["-" * w for w in widths]] + rows:
    print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
  print()


def image_batches(tf):
  """Makes a random [batch, 224, 224, 3] image batch for a batch size."""
  return lambda batch: tf.random.stateless_uniform([batch, 224, 224, 3], seed=[batch, 0])


def export_unfolded(backbone, mobilenet_v2, torch_pth, export_dir):
  """The built-in network without BatchNorm folding (conv -> BatchNorm -> ReLU6): the reference."""
  data = torch_pth.find_weights(download_dir=os.path.join(backbone.cache_root(), "downloads"))
  unfolded_net = mobilenet_v2.InvertedResidualNet(
      mobilenet_v2.MOBILENET_V2_100_224, torch_pth.load_state_dict(data), fold_batch_norm=False)
  mobilenet_v2.export_saved_model(unfolded_net, export_dir)
  return export_dir


def speed_tables(tf, backbone, folded_dir, unfolded_dir):
  peak_before = matmul_peak_gflops(tf)
  unfolded = tf.saved_model.load(unfolded_dir)
  folded = tf.saved_model.load(folded_dir)
  variants = {
      "unfolded fp32": tf.function(lambda x: unfolded(x)),
      "folded fp32": tf.function(lambda x: folded(x)),
      "folded bf16": tf.function(lambda x: tf.cast(folded(tf.cast(x, tf.bfloat16)), tf.float32)),
  }
  batches = [int(b) for b in FLAGS.batch_sizes]
  rates = best_rates(variants, image_batches(tf), lambda b: b, batches)
  # Measured before and after the models, keeping the best: one busy moment must not lower the roofline.
  peak = {k: max(v, peak_before[k]) for k, v in matmul_peak_gflops(tf).items()}
  print("Matmul peak (2048x2048, fastest call, before and after the models)")
  print_table(["dtype", "GFLOP/s", "images/s roofline"],
              [[k, f"{v:.0f}", f"{v / GFLOP_PER_IMAGE:.0f}"] for k, v in peak.items()])
  print(f"Feature vector images/s (MobileNetV2, {GFLOP_PER_IMAGE} GFLOP/image; % of fp32 matmul peak)")
  rows = []
  for batch in batches:
    base = rates["unfolded fp32", batch]
    for name in variants:
      rate = rates[name, batch]
      rows.append([batch, name, f"{rate:.1f}", f"{rate / base:.2f}x",
                   f"{100 * rate * GFLOP_PER_IMAGE / peak['float32']:.0f}%",
                   f"{100 * rate * GFLOP_PER_IMAGE / peak['bfloat16']:.0f}%"])
  print_table(["batch", "variant", "images/s", "vs unfolded", "of fp32 peak", "of bf16 peak"], rows)

  through_loader = backbone.load_backbone(backbone.DEFAULT_HANDLE)
  loader_variants = {"raw SavedModel": variants["folded fp32"],
                     "tlframe loader": tf.function(lambda x: through_loader(x))}
  rates = best_rates(loader_variants, image_batches(tf), lambda b: b, batches)
  print("Raw SavedModel vs through tlframe.backbone.load_backbone (folded fp32, images/s)")
  print_table(["batch", "raw", "loader", "loader/raw"],
              [[b, f"{rates['raw SavedModel', b]:.1f}", f"{rates['tlframe loader', b]:.1f}",
                f"{rates['tlframe loader', b] / rates['raw SavedModel', b]:.2f}"] for b in batches])


def settings_child(tf, spec):
  """Times one SavedModel (`module_dir,intra,inter`) at batch 32 and prints `RATE images/s`."""
  module_dir, intra, inter = spec.rsplit(",", 2)
  tf.config.threading.set_intra_op_parallelism_threads(int(intra))
  tf.config.threading.set_inter_op_parallelism_threads(int(inter))
  model = tf.saved_model.load(module_dir)
  fn = tf.function(lambda x: model(x))
  rates = best_rates({"m": fn}, image_batches(tf), lambda b: b, [32])
  print(f"RATE {rates['m', 32]:.2f}")


def process_settings_table(folded_dir, unfolded_dir, rounds=2):
  """Export form, oneDNN off/on and thread counts, each in its own process.

  TensorFlow fixes oneDNN and its thread pools when it starts, hence a process
  per setting. Settings alternate, and each keeps the best of `rounds` processes.
  """
  dirs = {"unfolded": unfolded_dir, "folded": folded_dir}
  settings = (("unfolded", "0", "0,0"), ("folded", "0", "0,0"), ("unfolded", "1", "0,0"),
              ("folded", "1", "0,0"), ("folded", "1", "1,1"), ("folded", "1", "2,1"),
              ("folded", "1", "2,2"))
  best = dict.fromkeys(settings, 0.0)
  for _ in range(rounds):
    for form, onednn, threads in settings:
      env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn)
      result = subprocess.run([sys.executable, __file__,
                               f"--settings_child={dirs[form]},{threads}",
                               f"--seconds={FLAGS.seconds}"],
                              capture_output=True, text=True, env=env)
      lines = [line for line in result.stdout.splitlines() if line.startswith("RATE ")]
      if not lines:
        raise RuntimeError(f"child {form} {onednn} {threads} failed: {result.stderr[-500:]}")
      best[form, onednn, threads] = max(best[form, onednn, threads], float(lines[0].split()[1]))
  straightforward = best["unfolded", "0", "0,0"]
  rows = []
  for form, onednn, threads in settings:
    intra, inter = (x if x != "0" else "TF default" for x in threads.split(","))
    rate = best[form, onednn, threads]
    rows.append([form + " fp32", {"0": "off", "1": "on"}[onednn], intra, inter, f"{rate:.1f}",
                 f"{rate / straightforward:.2f}x"])
  print(f"Export form, oneDNN and threads (batch 32, images/s; {os.cpu_count()} CPUs; each "
        f"setting in fresh processes, best of {rounds}; vs the straightforward export: "
        "unfolded, TensorFlow's defaults)")
  print_table(["variant", "oneDNN", "intra_op", "inter_op", "images/s", "vs straightforward"],
              rows)


def builtins_table(tf, backbone, batch=32):
  """Images/s of every built-in's feature vector (folded fp32) at its own size, side by side."""
  models = {name: backbone.load_backbone(name) for name in backbone.BUILTIN_NAMES}
  variants = {}
  for name, model in models.items():
    images = tf.random.stateless_uniform([batch, model.input_size, model.input_size, 3], seed=[1, 0])
    featurize = tf.function(lambda x, m=model: m(x))
    variants[name] = lambda _, f=featurize, x=images: f(x)
  rates = best_rates(variants, lambda _: None, lambda b: b, [batch])
  base = rates[backbone.DEFAULT_HANDLE, batch]
  print(f"Built-in backbones, feature vector, folded float32, batch {batch} (images/s, fastest "
        f"call; vs {backbone.DEFAULT_HANDLE})")
  print_table(["backbone", "input", "features", "images/s", f"vs {backbone.DEFAULT_HANDLE}"],
              [[name, f"{m.input_size} px", m.output_dim, f"{rates[name, batch]:.1f}",
                f"{rates[name, batch] / base:.2f}x"] for name, m in models.items()])


def data_dir():
  from tlframe import samples  # pylint: disable=g-import-not-at-top
  return pathlib.Path(FLAGS.data_dir or samples.benchmark_data_dir())


def accuracy_table(tf, backbone):
  from sklearn.svm import LinearSVC  # pylint: disable=g-import-not-at-top
  from tlframe import imageformat  # pylint: disable=g-import-not-at-top
  root = data_dir() / "oxford_flowers12"
  if not root.is_dir():
    print(f"oxford_flowers12 not found under {root.parent}: set --data_dir; accuracy skipped\n")
    return
  test_split = set((root / "TEST_SPLIT.txt").read_text().split())
  classes = sorted(p.name for p in root.iterdir() if p.is_dir())
  files = sorted((c, f) for c in classes for f in os.listdir(root / c))
  labels = np.array([classes.index(c) for c, _ in files])
  is_test = np.array([f"{c}/{f}" in test_split for c, f in files])

  def load(path):
    image = imageformat.decode_image(tf.io.read_file(path))
    return tf.image.resize(tf.cast(image, tf.float32) / 255.0, [224, 224])

  dataset = tf.data.Dataset.from_tensor_slices([str(root / c / f) for c, f in files])
  dataset = dataset.map(load).batch(32).prefetch(2)
  rows = []
  for precision in ("float32", "bfloat16"):
    model = backbone.load_backbone(backbone.DEFAULT_HANDLE, precision=precision)
    featurize = tf.function(lambda x, m=model: m(x))
    start = time.perf_counter()
    features = np.concatenate([featurize(batch).numpy() for batch in dataset])
    seconds = time.perf_counter() - start
    svm = LinearSVC(C=1.0, max_iter=10000).fit(features[~is_test], labels[~is_test])
    accuracy = (svm.predict(features[is_test]) == labels[is_test]).mean()
    rows.append([precision, f"{100 * accuracy:.1f}%", f"{len(files) / seconds:.0f}"])
    if precision == "float32":
      reference = features
  spread = np.abs(features - reference).max() / (reference.max() - reference.min())
  print(f"oxford_flowers12: LinearSVC on {(~is_test).sum()} train / {is_test.sum()} test images")
  print_table(["features", "test accuracy", "images/s (incl. decode)"], rows)
  print(f"bf16 vs fp32 features: max |diff| = {100 * spread:.1f}% of the fp32 range\n")


def main(argv):
  del argv
  # tlframe first: importing it sets TensorFlow's oneDNN default (tlframe/__init__.py).
  from tlframe import backbone  # pylint: disable=g-import-not-at-top
  from tlframe.backbone import inverted_residual as mobilenet_v2, torch_pth
  import bench_common  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if FLAGS.settings_child:
    settings_child(tf, FLAGS.settings_child)
    return
  backbone.configure_threads()
  builtin = backbone.ensure_builtin(backbone.DEFAULT_HANDLE)
  print(f"{bench_common.cpu_model()}; TensorFlow {tf.__version__}; oneDNN: "
        f"{backbone.onednn_enabled()}; CPU bf16 support: {backbone.bfloat16_supported()}; "
        f"cache {builtin}\n")
  if FLAGS.only_builtins:
    builtins_table(tf, backbone)
    return
  folded_dir = os.path.join(builtin, "feature_vector")
  with tempfile.TemporaryDirectory() as tmp:
    unfolded_dir = export_unfolded(backbone, mobilenet_v2, torch_pth, tmp)
    speed_tables(tf, backbone, folded_dir, unfolded_dir)
    if not FLAGS.skip_threads:
      process_settings_table(folded_dir, unfolded_dir)
  builtins_table(tf, backbone)
  if not FLAGS.skip_accuracy:
    accuracy_table(tf, backbone)


if __name__ == "__main__":
  app.run(main)
