#!/usr/bin/env python3
"""bin/serve under load: images/s and latency against the offline rate, in one run.

Trains and exports a classifier on the built-in MobileNetV2 (scikit-image's
photos, a minute) unless --model names one, starts bin/serve on it with its
default batching, and measures with 1, 4 and 16 concurrent clients, each
sending 1 image per request (and 8), one request after another over a
keep-alive connection: images/s, p50 and p99 request latency. In the same run,
on the same JPEGs: the export's offline rate at batch 32 and its single-image
latency, called in-process (measured before and after the server's rows, and
averaged, since the machine may be shared), and bin/predict's rate as it
prints it (file reading included).

Targets (issue 11): 16 clients x 1 image reach at least 0.6x the offline
batch-32 rate (batching works); 1 client's p50 is within 1.5x of the
in-process single-image latency.

  python bench/bench_serve.py [--model=MODEL_OR_EXPORT_DIR] [--seconds=8]
"""

import base64
import http.client
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

from absl import app
from absl import flags
import numpy as np

import tlframe  # pylint: disable=unused-import  (before TensorFlow: oneDNN on)
from tlframe import classifier as classifier_lib
from tlframe import export
from tlframe import samples
from bench_common import build_model  # pylint: disable=g-bad-import-order
from bench_common import cpu_model  # pylint: disable=g-bad-import-order

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A model or export dir to serve; default: train one on "
                    "scikit-image's photos with the built-in MobileNetV2.")
flags.DEFINE_float("seconds", 8.0, "Seconds of load per row of the table.")
flags.DEFINE_integer("num_images", 256, "JPEG crops to send (and to classify offline).")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENTS = (1, 4, 16)
IMAGES_PER_REQUEST = (1, 8)
OFFLINE_BATCH_SIZE = 32
SINGLE_IMAGE_CALLS = 50


def write_images(image_dir):
  """--num_images JPEG crops of the photos at their own sizes (50-90% of 300-640 px)."""
  photos = samples.load_sample_photos(samples.SAMPLE_PHOTOS)
  samples.write_photo_crops(image_dir, photos, -(-FLAGS.num_images // len(photos)), seed=1)
  paths = sorted(os.path.join(root, name) for root, _, names in os.walk(image_dir)
                 for name in names)[:FLAGS.num_images]
  return [open(path, "rb").read() for path in paths]


def bin_predict_rate(model, image_dir):
  """bin/predict's images/s at batch 32 over the images, as it prints it."""
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "bin", "predict"), f"--model={model}",
       f"--images={image_dir}", f"--batch_size={OFFLINE_BATCH_SIZE}",
       f"--output={os.path.join(os.path.dirname(image_dir), 'predictions.jsonl')}"],
      capture_output=True, text=True, check=True)
  return float(re.search(r"([\d.]+) images/s", result.stdout).group(1))


def offline_rate(classifier, images):
  """Images/s of the export's serving_default over all images in batches of 32, in-process."""
  start = time.perf_counter()
  for i in range(0, len(images), OFFLINE_BATCH_SIZE):
    classifier.classify_bytes(images[i:i + OFFLINE_BATCH_SIZE])
  return len(images) / (time.perf_counter() - start)


def single_image_latency(classifier, images):
  """Median seconds of the export's serving_default on one image, in-process."""
  times = []
  for i in range(SINGLE_IMAGE_CALLS):
    start = time.perf_counter()
    classifier.classify_bytes([images[i % len(images)]])
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def in_process(classifier, images):
  return offline_rate(classifier, images), single_image_latency(classifier, images)


def start_server(model, log):
  process = subprocess.Popen([sys.executable, os.path.join(REPO, "bin", "serve"),
                              f"--model={model}", "--port=0"],
                             stdout=subprocess.PIPE, stderr=log, text=True)
  match = re.search(r"http://([\d.]+):(\d+)/v1/models/(\S+)", process.stdout.readline())
  if not match:
    process.kill()
    raise RuntimeError("bin/serve did not start; see its log")
  host, port, name = match.groups()
  return process, host, int(port), f"/v1/models/{name}:predict"


def load(host, port, path, bodies, clients, seconds):
  """(images/s, p50 s, p99 s) of `clients` threads sending `bodies` for `seconds`."""
  latencies, images, failures = [], [0], []
  lock = threading.Lock()
  deadline = time.perf_counter() + seconds

  def client(offset):
    connection = http.client.HTTPConnection(host, port, timeout=120)
    i = offset
    while time.perf_counter() < deadline:
      body, size = bodies[i % len(bodies)]
      start = time.perf_counter()
      connection.request("POST", path, body, {"Content-Type": "application/json"})
      response = connection.getresponse()
      response.read()
      elapsed = time.perf_counter() - start
      with lock:
        if response.status != 200:
          failures.append(response.status)
        latencies.append(elapsed)
        images[0] += size
      i += clients
    connection.close()

  start = time.perf_counter()
  threads = [threading.Thread(target=client, args=(t,)) for t in range(clients)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  wall = time.perf_counter() - start
  if failures:
    raise RuntimeError(f"{len(failures)} requests failed: {sorted(set(failures))}")
  return images[0] / wall, np.percentile(latencies, 50), np.percentile(latencies, 99)


def main(argv):
  del argv  # unused
  logging.getLogger("tensorflow").setLevel(logging.WARNING)  # training's INFO lines
  with tempfile.TemporaryDirectory() as work_dir:
    model = FLAGS.model or build_model(work_dir)
    export_dir = export.resolve_export_dir(model)
    image_dir = os.path.join(work_dir, "images")
    images = write_images(image_dir)
    encoded = [base64.b64encode(data).decode("ascii") for data in images]
    classifier = classifier_lib.Classifier.load(export_dir)
    classifier.classify_bytes(images[:OFFLINE_BATCH_SIZE])  # warm up
    before = in_process(classifier, images)
    predict_rate = bin_predict_rate(export_dir, image_dir)
    with open(os.path.join(work_dir, "serve.log"), "w") as log:
      process, host, port, path = start_server(model, log)
      try:
        rows = []
        for per_request in IMAGES_PER_REQUEST:
          bodies = [(json.dumps({"instances": [{"b64": encoded[(i + j) % len(encoded)]}
                                               for j in range(per_request)]}), per_request)
                    for i in range(0, len(encoded), per_request)]
          load(host, port, path, bodies, 1, 1.0)  # warm up
          for clients in CLIENTS:
            rows.append((clients, per_request) + load(host, port, path, bodies, clients,
                                                      FLAGS.seconds))
      finally:
        process.terminate()
        process.wait()
    after = in_process(classifier, images)
  offline, single = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2

  print(f"\nbin/serve on {cpu_model()}; {export_dir}; "
        f"{len(images)} JPEG crops, default batching")
  print(f"offline, the export in-process at batch {OFFLINE_BATCH_SIZE}: {offline:.1f} images/s "
        f"({before[0]:.1f} before the server rows, {after[0]:.1f} after); bin/predict: "
        f"{predict_rate:.1f} images/s (file reading included)")
  print(f"in-process single image: {single * 1000:.1f} ms ({before[1] * 1000:.1f} before, "
        f"{after[1] * 1000:.1f} after)\n")
  print("| clients | images/request | images/s | x offline | p50 ms | p99 ms |")
  print("| --- | --- | --- | --- | --- | --- |")
  for clients, per_request, rate, p50, p99 in rows:
    print(f"| {clients} | {per_request} | {rate:.1f} | {rate / offline:.2f} | "
          f"{p50 * 1000:.1f} | {p99 * 1000:.1f} |")
  batched = next(rate for c, n, rate, _, _ in rows if (c, n) == (16, 1)) / offline
  alone = next(p50 for c, n, _, p50, _ in rows if (c, n) == (1, 1)) / single
  print(f"\n16 clients x 1 image: {batched:.2f}x the offline rate (target >= 0.6): "
        f"{'met' if batched >= 0.6 else 'NOT met'}")
  print(f"1 client x 1 image: p50 {alone:.2f}x the in-process single-image latency "
        f"(target <= 1.5): {'met' if alone <= 1.5 else 'NOT met'}")


if __name__ == "__main__":
  app.run(main)
