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

The soak table (issue 21) starts a fresh server with the default flags and
runs 64 clients for 60 s against it, a tenth of their requests bad: garbage
bodies, a PNG decompression bomb, 2,000-image bodies, idle sockets that send
half a request head and then nothing (300 at the start, more than
--max_connections, then one every 40th request). It reports the good requests
answered right (the label the export gives the image in-process), answers by
status, p50/p99 of the good ones, and the server's RSS at rest before, at
peak during, and at rest after (5 s idle); then one request of 1,000 images
(allowed: run in slices of --max_batch_size) and the RSS around it. Targets:
every good request answered right, no 5xx, the process alive, RSS peak <= 2x
resting + the batch's own size (its input tensor), end <= 1.2x resting.

  python bench/bench_serve.py [--model=MODEL_OR_EXPORT_DIR] [--seconds=8]
      [--tables=throughput,soak] [--soak_seconds=60] [--soak_clients=64]
"""

import base64
import collections
import http.client
import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

from absl import app
from absl import flags
import numpy as np

import tlframe  # noqa: F401  (before TensorFlow: oneDNN on)
import tensorflow as tf  # pylint: disable=g-bad-import-order
from tlframe.predict import classifier as classifier_lib
from tlframe import export
from tlframe import samples
from bench_common import build_model  # pylint: disable=g-bad-import-order
from bench_common import cpu_model  # pylint: disable=g-bad-import-order

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A model or export dir to serve; default: train one on "
                    "scikit-image's photos with the built-in MobileNetV2.")
flags.DEFINE_float("seconds", 8.0, "Seconds of load per row of the table.")
flags.DEFINE_integer("num_images", 256, "JPEG crops to send (and to classify offline).")
flags.DEFINE_list("tables", ["throughput", "soak"], "Which tables to measure: throughput "
                  "(clients x images per request against the offline rate), soak (hostile mix).")
flags.DEFINE_float("soak_seconds", 60.0, "Seconds of the soak's load.")
flags.DEFINE_integer("soak_clients", 64, "Concurrent clients in the soak.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENTS = (1, 4, 16)
IMAGES_PER_REQUEST = (1, 8)
OFFLINE_BATCH_SIZE = 32
SINGLE_IMAGE_CALLS = 50
SERVER_BATCH_SIZE = 32  # bin/serve's default --max_batch_size
IMAGE_SIZE = 224  # the built-in MobileNetV2's input
BAD_EVERY = 10  # a tenth of the soak's requests are bad
IDLE_SOCKETS_AT_START = 300  # more than bin/serve's default --max_connections (256)
LARGE_REQUEST_IMAGES = 1000


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


def rss_bytes(pid):
  """The process's resident set size (Linux /proc)."""
  with open(f"/proc/{pid}/status") as f:
    return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


class RssSampler:
  """The highest RSS of `pid` seen every 50 ms while running."""

  def __init__(self, pid):
    self.pid = pid
    self.peak = rss_bytes(pid)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()

  def _sample(self):
    while not self._stop.wait(0.05):
      try:
        self.peak = max(self.peak, rss_bytes(self.pid))
      except (OSError, AttributeError):
        return  # the process is gone: reported by the caller

  def stop(self):
    self._stop.set()
    self._thread.join()
    return self.peak


def png_bomb(side=20000):
  """A PNG whose header declares side x side RGB pixels, with the first rows' real (zero) data."""
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  rows = zlib.compress(b"\0" * ((3 * side + 1) * 64), 9)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
          + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def tiny_png():
  """A valid 4x4 PNG: 2,000 of them make a 300 KB body, far under --max_request_bytes."""
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  pixels = b"".join(b"\0" + bytes([200, 40, 40]) * 4 for _ in range(4))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b""))


def open_idle_socket(host, port):
  """A connection that sends half a request head and then nothing."""
  sock = socket.create_connection((host, port), timeout=10)
  sock.sendall(b"POST /v1/models/model:predict HTTP/1.1\r\nHost: a\r\nContent-Typ")
  return sock


def soak(host, port, path, good, bad_bodies, clients, seconds):
  """Runs the hostile mix; returns its counts, latencies and idle sockets."""
  lock = threading.Lock()
  statuses = collections.Counter()  # (good or the bad kind, status) -> count
  wrong, latencies, idle = [], [], []
  deadline = time.perf_counter() + seconds

  def post(connection, body):
    connection.request("POST", path, body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, response.read()

  def client(offset):
    connection = http.client.HTTPConnection(host, port, timeout=300)
    i = offset
    while time.perf_counter() < deadline:
      if i % BAD_EVERY == 0:
        kind, body = bad_bodies[(i // BAD_EVERY) % len(bad_bodies)]
        if body is None:
          sock = open_idle_socket(host, port)
          with lock:
            idle.append(sock)
            statuses[(kind, "opened")] += 1
        else:
          bad = http.client.HTTPConnection(host, port, timeout=300)
          try:
            status, _ = post(bad, body)
          except OSError as e:
            status = type(e).__name__
          bad.close()
          with lock:
            statuses[(kind, status)] += 1
      else:
        body, label = good[i % len(good)]
        start = time.perf_counter()
        try:
          status, answer = post(connection, body)
        except OSError as e:
          status, answer = type(e).__name__, b""
          connection.close()
          connection = http.client.HTTPConnection(host, port, timeout=300)
        elapsed = time.perf_counter() - start
        right = status == 200 and json.loads(answer)["predictions"][0]["labels"] == label
        with lock:
          statuses[("good", status)] += 1
          latencies.append(elapsed)
          if not right:
            wrong.append((status, answer[:200]))
      i += clients
    connection.close()

  idle.extend(open_idle_socket(host, port) for _ in range(IDLE_SOCKETS_AT_START))
  statuses[("idle socket", "opened")] += IDLE_SOCKETS_AT_START
  threads = [threading.Thread(target=client, args=(t,)) for t in range(clients)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  return statuses, wrong, latencies, idle


def closed_by_server(sockets):
  """How many of `sockets` the server has closed (EOF or reset); closes them all."""
  closed = 0
  for sock in sockets:
    sock.setblocking(False)
    try:
      closed += sock.recv(1 << 16) == b""
    except BlockingIOError:
      pass
    except OSError:
      closed += 1
    sock.close()
  return closed


def soak_table(model, images, labels, small, small_labels, log):
  """The soak's lines (markdown), measured on a fresh server with the default flags.

  `images` with their `labels` are the good requests; `small` (64x64 JPEGs) with
  `small_labels` make the one large request, so that its body fits --max_request_bytes.
  """
  good = [(json.dumps({"instances": [{"b64": base64.b64encode(data).decode("ascii")}]}), label)
          for data, label in zip(images, labels)]
  tiny = {"b64": base64.b64encode(tiny_png()).decode("ascii")}
  bad_bodies = [
      ("garbage", os.urandom(4096)),
      ("PNG bomb 20000x20000", json.dumps(
          {"instances": [{"b64": base64.b64encode(png_bomb()).decode("ascii")}]})),
      ("2,000 images", json.dumps({"instances": [tiny] * 2000})),
      ("idle socket", None),
  ]
  process, host, port, path = start_server(model, log)
  try:
    # Resting: after one pass of good requests at the soak's concurrency, then idle.
    load(host, port, path, [(body, 1) for body, _ in good], FLAGS.soak_clients, 5.0)
    time.sleep(5)
    resting = rss_bytes(process.pid)
    sampler = RssSampler(process.pid)
    started = time.perf_counter()
    statuses, wrong, latencies, idle = soak(host, port, path, good, bad_bodies,
                                            FLAGS.soak_clients, FLAGS.soak_seconds)
    wall = time.perf_counter() - started
    time.sleep(5)
    peak = sampler.stop()
    end = rss_bytes(process.pid)
    # One large request that is allowed: it runs in slices of --max_batch_size.
    sampler = RssSampler(process.pid)
    start = time.perf_counter()
    large = json.dumps({"instances": [{"b64": base64.b64encode(small[i % len(small)]).decode(
        "ascii")} for i in range(LARGE_REQUEST_IMAGES)]})
    connection = http.client.HTTPConnection(host, port, timeout=600)
    connection.request("POST", path, large, {"Content-Type": "application/json"})
    response = connection.getresponse()
    large_answer = json.loads(response.read())
    large_right = response.status == 200 and [p["labels"] for p in large_answer["predictions"]] == [
        small_labels[i % len(small)] for i in range(LARGE_REQUEST_IMAGES)]
    large_seconds = time.perf_counter() - start
    connection.close()
    time.sleep(5)
    large_peak = sampler.stop()
    large_end = rss_bytes(process.pid)
    alive = process.poll() is None
    idle_closed = closed_by_server(idle)  # over --client_timeout_s after the last was opened
  finally:
    process.terminate()
    process.wait()

  mb = 1024 * 1024
  batch_bytes = SERVER_BATCH_SIZE * IMAGE_SIZE * IMAGE_SIZE * 3 * 4
  good_total = sum(n for (kind, _), n in statuses.items() if kind == "good")
  server_errors = sum(n for (_, status), n in statuses.items()
                      if isinstance(status, int) and status >= 500)
  lines = [f"soak: {FLAGS.soak_clients} clients for {wall:.0f} s, 1 request in {BAD_EVERY} bad; "
           "bin/serve with its default flags",
           "", "| requests | answer | count |", "| --- | --- | --- |"]
  for (kind, status), count in sorted(statuses.items(), key=lambda item: str(item[0])):
    lines.append(f"| {kind} | {status} | {count} |")
  lines.append(f"| idle socket | closed by the server after the large request | "
               f"{idle_closed} of {len(idle)} |")
  p50, p99 = (np.percentile(latencies, 50), np.percentile(latencies, 99)) if latencies else (0, 0)
  lines += ["", "| good answered right | 5xx | alive | good p50 ms | good p99 ms | RSS resting MB "
            "| RSS peak MB | RSS end MB | peak target MB | end target MB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| {good_total - len(wrong)} of {good_total} | {server_errors} | {alive} | "
            f"{p50 * 1000:.0f} | {p99 * 1000:.0f} | {resting / mb:.0f} | {peak / mb:.0f} | "
            f"{end / mb:.0f} | {(2 * resting + batch_bytes) / mb:.0f} | {1.2 * resting / mb:.0f} |"]
  lines += ["", f"one request of {LARGE_REQUEST_IMAGES} images (in slices of "
            f"{SERVER_BATCH_SIZE}): {response.status}, labels right: {large_right}, "
            f"{large_seconds:.1f} s; RSS peak {large_peak / mb:.0f} MB, 5 s after "
            f"{large_end / mb:.0f} MB"]
  met = (not wrong and server_errors == 0 and alive and peak <= 2 * resting + batch_bytes
         and end <= 1.2 * resting and large_right and large_peak <= 2 * resting + batch_bytes
         and large_end <= 1.2 * resting)
  lines.append(f"targets (every good answered right, no 5xx, alive, peak <= 2x resting + one "
               f"batch's input ({batch_bytes / mb:.0f} MB), end <= 1.2x resting): "
               f"{'met' if met else 'NOT met'}")
  if wrong:
    lines.append(f"first wrong answers: {wrong[:3]}")
  return lines


def main(argv):
  del argv  # unused
  logging.getLogger("tensorflow").setLevel(logging.WARNING)  # training's INFO lines
  rows, soak_lines = [], []
  with tempfile.TemporaryDirectory() as work_dir:
    model = FLAGS.model or build_model(work_dir)
    export_dir = export.resolve_export_dir(model)
    image_dir = os.path.join(work_dir, "images")
    images = write_images(image_dir)
    encoded = [base64.b64encode(data).decode("ascii") for data in images]
    classifier = classifier_lib.Classifier.load(export_dir)
    classifier.classify_bytes(images[:OFFLINE_BATCH_SIZE])  # warm up
    if "throughput" in FLAGS.tables:
      before = in_process(classifier, images)
      predict_rate = bin_predict_rate(export_dir, image_dir)
      with open(os.path.join(work_dir, "serve.log"), "w") as log:
        process, host, port, path = start_server(model, log)
        try:
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
    if "soak" in FLAGS.tables:
      labels = [label.decode() for i in range(0, len(images), OFFLINE_BATCH_SIZE)
                for label in classifier.classify_bytes(
                    images[i:i + OFFLINE_BATCH_SIZE])["labels"]]
      small = [tf.io.encode_jpeg(tf.cast(tf.image.resize(tf.io.decode_jpeg(data), [64, 64]),
                                         tf.uint8)).numpy() for data in images[:OFFLINE_BATCH_SIZE]]
      small_labels = [label.decode() for label in classifier.classify_bytes(small)["labels"]]
      with open(os.path.join(work_dir, "soak.log"), "w") as log:
        soak_lines = soak_table(model, images, labels, small, small_labels, log)

  print(f"\nbin/serve on {cpu_model()}; {export_dir}; {len(images)} JPEG crops")
  if soak_lines:
    print("\n" + "\n".join(soak_lines))
  if not rows:
    return
  offline, single = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
  print("\nthroughput, default batching:")
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
