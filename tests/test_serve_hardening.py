"""bin/serve against hostile clients (issue 21): one request or one client cannot take it down.

One server subprocess on 127.0.0.1 with small limits (batches of 8, 16
connections, 2 s for a client to send its request), over an export of a model
trained on the tiny backbone: a request far larger than a batch runs in
slices, idle and slow sockets are closed and never lock out a client with
work, non-finite pixels and bad base64 are refused naming the instance, and a
client that hangs up mid-body costs one log line.
"""

import http.client
import json
import re
import socket
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from tlframe.serve import batching
from tlframe import export
from test_serve import Server, _b64, _metric, train_and_export

MAX_BATCH_SIZE = 8
MAX_CONNECTIONS = 16
CLIENT_TIMEOUT_S = 2
MAX_INSTANCES = 600


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, skimage_photos):
  """A model of the four photos on the tiny backbone (a few epochs: answers need not be good)."""
  return train_and_export(tmp_path_factory.mktemp("hardening_model"), skimage_photos, epochs=3,
                          per_class=4, validation_percentage=25)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
  server = Server(model_dir, tmp_path_factory.mktemp("hardened_server"),
                  f"--max_batch_size={MAX_BATCH_SIZE}", f"--max_connections={MAX_CONNECTIONS}",
                  f"--client_timeout_s={CLIENT_TIMEOUT_S}",
                  f"--max_instances_per_request={MAX_INSTANCES}")
  yield server
  assert server.stop()[0] == 0, server.log()


@pytest.fixture(scope="module")
def tiny_pngs(skimage_photos):
  """12x12 PNGs of the photos (a few hundred bytes each): thousands fit in a small body."""
  return [tf.io.encode_png(tf.cast(tf.image.resize(photo, [12, 12]), tf.uint8)).numpy()
          for photo in skimage_photos.values()]


def test_a_request_larger_than_a_batch_runs_in_slices_and_answers_each_image(
    server, model_dir, tiny_pngs):
  count = 500  # 63 batches of 8: the model never sees the 500 at once
  images = [tiny_pngs[i % len(tiny_pngs)] for i in range(count)]
  before = server.request("GET", "/metrics")[1]
  status, answer = server.predict({"instances": [_b64(data) for data in images]})
  assert status == 200, answer
  assert len(answer["predictions"]) == count
  classifier = tf.saved_model.load(export.resolve_export_dir(model_dir))
  want = classifier.signatures[export.SERVING_DEFAULT](
      image_bytes=tf.constant(tiny_pngs))["probabilities"].numpy()
  for i, prediction in enumerate(answer["predictions"]):
    np.testing.assert_allclose(prediction["probabilities"], want[i % len(tiny_pngs)], atol=1e-5)
  after = server.request("GET", "/metrics")[1]
  calls = (_metric(after, "tlframe_serve_batch_size_count")
           - _metric(before, "tlframe_serve_batch_size_count"))
  within = (_metric(after, f'tlframe_serve_batch_size_bucket{{le="{MAX_BATCH_SIZE}.0"}}')
            - _metric(before, f'tlframe_serve_batch_size_bucket{{le="{MAX_BATCH_SIZE}.0"}}'))
  assert calls >= count / MAX_BATCH_SIZE and within == calls, (calls, within)
  # Past --max_instances_per_request: a 400 that says so, before anything is decoded.
  status, answer = server.predict({"instances": [_b64(tiny_pngs[0])] * (MAX_INSTANCES + 1)})
  assert status == 400 and "over --max_instances_per_request=600" in answer["error"], answer


def _half_open(server, head):
  sock = socket.create_connection((server.host, server.port), timeout=10)
  sock.sendall(head)
  return sock


def _is_closed(sock):
  """True if the server has closed `sock` (EOF or reset), without waiting or reading."""
  try:
    return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
  except BlockingIOError:
    return False
  except ConnectionResetError:
    return True


def _closed_by_server(sock, within_s):
  """True if the server closes `sock` (EOF or reset) within `within_s` seconds."""
  sock.settimeout(within_s)
  try:
    return sock.recv(1 << 16) == b""
  except ConnectionResetError:
    return True
  except socket.timeout:
    return False
  finally:
    sock.close()


def test_idle_and_slow_clients_are_timed_out_and_never_lock_out_the_others(server, tiny_pngs):
  good = {"instances": [_b64(tiny_pngs[0])]}
  # Three times --max_connections sockets that send a few header bytes and then nothing.
  opened_at = time.monotonic()
  idle = [_half_open(server, b"POST /v1/models/x:predict HTTP/1.1\r\nHost: a\r\n")
          for _ in range(3 * MAX_CONNECTIONS)]
  # Until the first of them could time out, only making room closes them: the oldest, and
  # no more than needed.
  before_timeouts = opened_at + CLIENT_TIMEOUT_S - 0.2
  while (sum(map(_is_closed, idle)) < 2 * MAX_CONNECTIONS
         and time.monotonic() < before_timeouts - 0.3):
    time.sleep(0.05)
  closed = [_is_closed(sock) for sock in idle]
  if time.monotonic() < before_timeouts:
    assert sum(closed) == 2 * MAX_CONNECTIONS and not any(closed[-MAX_CONNECTIONS:]), closed
  for _ in range(3):
    status, answer = server.predict(good)
    assert status == 200, answer
  # A client that sends its head a byte at a time gets no more time than an idle one.
  trickle = socket.create_connection((server.host, server.port), timeout=10)
  started = time.monotonic()
  closed = False
  for byte in b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"y" * 100:
    try:
      trickle.sendall(bytes([byte]))
    except OSError:
      closed = True
      break
    time.sleep(0.1)
  assert closed or _closed_by_server(trickle, 1), "a head sent a byte at a time was not cut off"
  assert time.monotonic() - started < CLIENT_TIMEOUT_S + 3
  # A body that stops arriving: 408, and the connection closed.
  slow_body = _half_open(server, b"POST /v1/models/photos:predict HTTP/1.1\r\nHost: a\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"ins")
  slow_body.settimeout(CLIENT_TIMEOUT_S + 5)
  answer = b""
  while chunk := slow_body.recv(1 << 16):  # until the server closes it
    answer += chunk
  slow_body.close()
  assert answer.startswith(b"HTTP/1.1 408 ") and b"--client_timeout_s=2 seconds" in answer, answer
  # The idle sockets still open are closed once their time is up.
  deadline = time.monotonic() + CLIENT_TIMEOUT_S + 3
  assert all(_closed_by_server(sock, max(0.1, deadline - time.monotonic())) for sock in idle)
  # A keep-alive connection serves request after request, as long as they come in time.
  connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
  for _ in range(2):
    assert server.predict(good, connection=connection)[0] == 200
    time.sleep(0.5)
  connection.close()


def test_non_finite_pixels_and_bad_base64_are_refused_naming_the_instance(server, tiny_pngs):
  pixels = np.full([8, 8, 3], 0.5).tolist()
  for bad in (float("nan"), float("inf"), -float("inf"), 1e39):  # 1e39: inf as a float32
    broken = np.full([8, 8, 3], 0.5)
    broken[3, 4, 1] = bad
    body = json.dumps({"signature_name": export.PREDICT_IMAGES,
                       "instances": [pixels, pixels, broken.tolist()]}).encode()
    status, answer = server.predict(body)
    assert status == 400 and answer["error"].startswith(
        "instance 2: input 'images' holds NaN or infinite values"), (bad, answer)
  status, answer = server.predict({"signature_name": export.PREDICT_IMAGES,
                                   "inputs": [pixels, pixels]})
  assert status == 200, answer
  status, answer = server.predict({"instances": [_b64(tiny_pngs[0]), {"b64": "not base64!"}]})
  assert status == 400 and answer["error"].startswith("instance 1: Unable to base64 decode"), \
      answer


def test_a_client_that_hangs_up_mid_body_costs_one_log_line(server):
  log_before = server.log()
  sock = _half_open(server, b"POST /v1/models/photos:predict HTTP/1.1\r\nHost: a\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                    + b'{"instances": [' + b" " * 2000)
  time.sleep(0.2)
  sock.close()
  deadline = time.monotonic() + 10
  while "disconnected" not in server.log()[len(log_before):] and time.monotonic() < deadline:
    time.sleep(0.1)
  time.sleep(0.3)  # anything it would log after that line
  new = server.log()[len(log_before):]
  lines = [line for line in new.splitlines() if line.strip()]
  assert len(lines) == 1 and re.search(
      r"POST /v1/models/photos:predict: the client disconnected before sending the whole body",
      lines[0]), new
  assert server.predict({"instances": []})[0] == 400  # still serving


def test_batcher_runs_a_large_request_in_slices_taking_turns_with_the_others():
  calls = []
  release = threading.Event()

  def model(group, inputs):
    del group  # unused
    calls.append(len(inputs["x"]))
    release.wait(10)  # the first call holds the worker while the others queue
    if (inputs["x"] < 0).any():
      raise ValueError("negative input")
    return {"y": inputs["x"] * 2}

  batcher = batching.DynamicBatcher(model, max_batch_size=8, batch_timeout_s=0)
  first = batcher.submit("a", {"x": np.array([5.0])}, 1)
  while not calls:
    time.sleep(0.01)
  large = batcher.submit("a", {"x": np.arange(20.0)}, 20)
  small = batcher.submit("a", {"x": np.array([1.0, 2.0, 3.0])}, 3)
  failing = batcher.submit("a", {"x": np.concatenate([np.arange(8.0), [-1.0], np.arange(11.0)])},
                           20)
  release.set()
  batcher.close()
  assert first.result()["y"].tolist() == [10.0]
  np.testing.assert_array_equal(large.result()["y"], np.arange(20.0) * 2)
  np.testing.assert_array_equal(small.result()["y"], [2.0, 4.0, 6.0])
  with pytest.raises(ValueError, match="negative"):
    failing.result()
  # 8 of the large request, then the small one, then the two large ones' slices in turn; the
  # failing request's second slice fails, and its last 4 images are never run.
  assert calls == [1, 8, 3, 8, 8, 8, 4], calls
