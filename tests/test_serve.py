"""bin/serve over a real export of a trained model: TF Serving's REST API over HTTP.

The server runs as a subprocess on a free port; the tests talk HTTP to it:
answers equal the export's own, row and columnar formats agree, bad requests
get TF Serving's status codes and leave the server serving, concurrent clients
are batched, and SIGTERM drains.
"""

import base64
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np
import pytest
import tensorflow as tf

from tlframe.serve import batching
from tlframe import export
from tlframe.train import layout as model_dir_layout
from tlframe import serve
from tlframe import train
from test_train_helpers import make_records, save_tiny_backbone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE = os.path.join(REPO, "bin", "serve")
PREDICT = os.path.join(REPO, "bin", "predict")
MODEL_NAME = "photos"
START_TIMEOUT_S = 120
MAX_REQUEST_BYTES = 1 << 20


def _b64(data):
  return {"b64": base64.b64encode(data).decode("ascii")}


class Server:
  """bin/serve in a subprocess; `url` once it listens."""

  def __init__(self, model, tmp_path, *flags):
    self.log_path = tmp_path / "serve.log"
    self._log = open(self.log_path, "w")
    self.process = subprocess.Popen(
        [sys.executable, SERVE, f"--model={model}", f"--model_name={MODEL_NAME}", "--port=0",
         *flags], stdout=subprocess.PIPE, stderr=self._log, text=True)
    # A server that never says where it listens is killed, so readline() returns.
    watchdog = threading.Timer(START_TIMEOUT_S, self.process.kill)
    watchdog.start()
    line = self.process.stdout.readline()
    watchdog.cancel()
    match = re.search(r"at (http://\S+)/v1/models/", line)
    assert match, f"bin/serve did not start: {line!r}\n{self.log()}"
    parts = urllib.parse.urlsplit(match.group(1))
    self.host, self.port = parts.hostname, parts.port
    self.api = f"/v1/models/{MODEL_NAME}"

  def log(self):
    if not self._log.closed:
      self._log.flush()
    return self.log_path.read_text()

  def request(self, method, path, body=None, connection=None):
    """(status, parsed JSON or text) of one request; `body` dict is sent as JSON."""
    if isinstance(body, dict):
      body = json.dumps(body).encode("utf-8")
    own = connection is None
    connection = connection or http.client.HTTPConnection(self.host, self.port, timeout=60)
    try:
      connection.request(method, path, body=body,
                         headers={"Content-Type": "application/json"} if body else {})
      response = connection.getresponse()
      text = response.read().decode("utf-8")
    finally:
      if own:
        connection.close()
    is_json = response.getheader("Content-Type", "").startswith("application/json")
    return response.status, json.loads(text) if is_json else text

  def predict(self, body, path=None, connection=None):
    return self.request("POST", path or f"{self.api}:predict", body, connection)

  def stop(self):
    """SIGTERM, then (exit status, what it printed after starting)."""
    self.process.send_signal(signal.SIGTERM)
    try:
      output = self.process.communicate(timeout=90)[0]
    finally:
      self._log.close()
    return self.process.returncode, output


def train_and_export(tmp, photos, epochs, **records_options):
  """A model dir trained on crops of `photos` (tiny real backbone), exported."""
  records_dir = make_records(str(tmp), photos, **records_options)
  options = train.TrainOptions(records_dir=records_dir, model_dir=str(tmp / "model"),
                               backbone=save_tiny_backbone(tmp / "tiny_backbone"),
                               loss="softmax", batch_size=8, epochs=epochs)
  train.train(options)
  export.export_model(options.model_dir)
  return options.model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, skimage_photos):
  """A model trained on crops of the four photos, exported."""
  return train_and_export(tmp_path_factory.mktemp("serve_model"), skimage_photos, epochs=30)


@pytest.fixture(scope="module")
def export_dir(model_dir):
  return export.latest_version(os.path.join(model_dir, model_dir_layout.EXPORT_DIRNAME))


@pytest.fixture(scope="module")
def photos(skimage_photos, skimage_textures):
  """{name: encoded bytes}: the four photos as JPEG at their own sizes, a texture as PNG."""
  encoded = {name: tf.io.encode_jpeg(photo, quality=90).numpy()
             for name, photo in skimage_photos.items()}
  encoded["grass.png"] = tf.io.encode_png(skimage_textures["grass"][:200, :300]).numpy()
  return encoded


@pytest.fixture(scope="module")
def expected(export_dir, photos):
  """{name: serving_default's outputs for that image alone}, called in-process."""
  signature = tf.saved_model.load(export_dir).signatures[export.SERVING_DEFAULT]
  answers = {}
  for name, data in photos.items():
    outputs = signature(image_bytes=tf.constant([data]))
    answers[name] = {key: value.numpy()[0] for key, value in outputs.items()}
  return answers


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
  server = Server(model_dir, tmp_path_factory.mktemp("server"), "--batch_timeout_ms=10",
                  f"--max_request_bytes={MAX_REQUEST_BYTES}")
  yield server
  assert server.stop()[0] == 0, server.log()


def _assert_prediction(prediction, want):
  assert prediction["labels"] == want["labels"].decode()
  assert prediction["classes"] == want["classes"]
  assert [label.encode() for label in prediction["top_k_labels"]] == list(want["top_k_labels"])
  np.testing.assert_allclose(prediction["probabilities"], want["probabilities"], atol=1e-5)
  np.testing.assert_allclose(prediction["scores"], want["scores"], atol=1e-4)
  np.testing.assert_allclose(prediction["top_k_probabilities"], want["top_k_probabilities"],
                             atol=1e-5)


def test_predictions_over_http_equal_the_export_called_in_process(server, photos, expected):
  names = list(photos)
  status, answer = server.predict({"instances": [_b64(photos[name]) for name in names]})
  assert status == 200, answer
  assert len(answer["predictions"]) == len(names)
  for name, prediction in zip(names, answer["predictions"]):
    assert set(prediction) == set(export.OUTPUTS)
    _assert_prediction(prediction, expected[name])
  # The model learned the photos: each of the four is its own class.
  for name in ("chelsea", "coffee", "rocket", "astronaut"):
    assert expected[name]["labels"].decode() == name


@pytest.mark.slow
def test_predictions_over_http_equal_bin_predicts(server, model_dir, photos, tmp_path):
  names = list(photos)
  status, answer = server.predict({"instances": [_b64(photos[name]) for name in names]})
  assert status == 200, answer
  for name, data in photos.items():
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / (name if "." in name else f"{name}.jpg")).write_bytes(data)
  result = subprocess.run([sys.executable, PREDICT, f"--model={model_dir}",
                           f"--images={tmp_path / 'images'}", "--top_k=4",
                           f"--output={tmp_path / 'predictions.jsonl'}"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  offline = [json.loads(line) for line in open(tmp_path / "predictions.jsonl")]
  assert len(offline) == len(names)
  for row in offline:
    name = os.path.basename(row["path"]).replace(".jpg", "")
    prediction = answer["predictions"][names.index(name)]
    assert row["label"] == prediction["labels"]
    # All four classes: the same probability for each (ties may be listed in either order).
    assert {top["label"]: top["probability"] for top in row["top_k"]} == pytest.approx(
        dict(zip(prediction["top_k_labels"], prediction["top_k_probabilities"])), abs=1e-5)


def test_columnar_keyed_and_pixel_requests_agree_with_rows(server, photos, expected):
  names = ["rocket", "chelsea", "grass.png"]
  status, rows = server.predict({"instances": [_b64(photos[name]) for name in names]})
  assert status == 200, rows
  status, columns = server.predict({"inputs": [_b64(photos[name]) for name in names]})
  assert status == 200, columns
  assert set(columns["outputs"]) == set(export.OUTPUTS)
  for i, row in enumerate(rows["predictions"]):
    column = {key: values[i] for key, values in columns["outputs"].items()}
    for key in ("labels", "classes", "top_k_labels"):
      assert column[key] == row[key]
    for key in ("probabilities", "scores", "top_k_probabilities"):
      np.testing.assert_allclose(column[key], row[key], atol=1e-5)
  # Keyed instances go to serving_keyed and come back with their keys, named or not.
  keyed = [{"image_bytes": _b64(photos[name]), "key": f"id-{name}"} for name in names]
  for body in ({"instances": keyed}, {"signature_name": export.SERVING_KEYED, "instances": keyed},
               {"inputs": {"image_bytes": [_b64(photos[n]) for n in names],
                           "key": [f"id-{n}" for n in names]}}):
    status, answer = server.predict(body)
    assert status == 200, answer
    predictions = answer.get("predictions") or [
        {key: values[i] for key, values in answer["outputs"].items()} for i in range(len(names))]
    for name, prediction in zip(names, predictions):
      assert prediction.pop("key") == f"id-{name}"
      _assert_prediction(prediction, expected[name])
  # predict_images takes float pixels in [0, 1] and resizes them inside, as training did.
  pixels = tf.image.convert_image_dtype(tf.io.decode_jpeg(photos["coffee"]), tf.float32).numpy()
  pixels = pixels[::4, ::4]  # a smaller image than the model's input: resized inside
  status, answer = server.predict({"signature_name": export.PREDICT_IMAGES,
                                   "instances": [pixels.tolist()]})
  assert status == 200, answer
  assert answer["predictions"][0]["labels"] == "coffee"


def test_status_metadata_and_probes(server, export_dir):
  version = os.path.basename(export_dir)
  status, answer = server.request("GET", server.api)
  assert status == 200
  assert answer == {"model_version_status": [{"version": version, "state": "AVAILABLE",
                                              "status": {"error_code": "OK",
                                                         "error_message": ""}}]}
  assert server.request("GET", f"{server.api}/versions/{version}")[0] == 200
  status, metadata = server.request("GET", f"{server.api}/metadata")
  assert status == 200
  assert metadata["model_spec"] == {"name": MODEL_NAME, "signature_name": "", "version": version}
  signatures = metadata["metadata"]["signature_def"]["signature_def"]
  assert {export.SERVING_DEFAULT, export.SERVING_KEYED, export.PREDICT_IMAGES} <= set(signatures)
  image_bytes = signatures[export.SERVING_DEFAULT]["inputs"]["image_bytes"]
  assert image_bytes["dtype"] == "DT_STRING"
  assert image_bytes["tensor_shape"]["dim"] == [{"size": "-1", "name": ""}]
  assert signatures[export.SERVING_DEFAULT]["method_name"] == "tensorflow/serving/predict"
  assert set(signatures[export.SERVING_KEYED]["outputs"]) == set(export.OUTPUTS) | {"key"}
  images = signatures[export.PREDICT_IMAGES]["inputs"]["images"]
  assert [d["size"] for d in images["tensor_shape"]["dim"]] == ["-1", "-1", "-1", "3"]
  assert metadata["metadata"]["tlframe"]["labels"] == ["astronaut", "chelsea", "coffee", "rocket"]
  assert server.request("GET", "/healthz")[0] == 200
  assert server.request("GET", "/readyz") == (200, {"status": "ready", "model": MODEL_NAME,
                                                    "version": version})


def _truncated_png(photos):
  data = photos["grass.png"]
  return data[:len(data) // 3]  # a valid header, then the pixel data stops


def test_bad_requests_get_their_status_and_message_and_the_next_one_succeeds(server, photos,
                                                                           export_dir):
  good = {"instances": [_b64(photos["chelsea"])]}
  old_version = int(os.path.basename(export_dir)) - 1
  cases = [
      # (method, path, body, status, words in the error)
      ("POST", None, b'{"instances": [', 400, "JSON Parse error"),
      ("POST", None, b"[1, 2]", 400, "Is not object"),
      ("POST", None, {"signature_name": export.SERVING_DEFAULT}, 400, "Missing 'inputs' or"),
      ("POST", None, {"instances": [], "inputs": []}, 400, "only one of 'inputs' or 'instances'"),
      ("POST", None, {"instances": []}, 400, "No values in 'instances'"),
      ("POST", None, {"instances": [{"b64": "not base64!"}]}, 400, "base64"),
      ("POST", None, {"instances": [42]}, 400, "not of expected type: string"),
      ("POST", None, {"instances": [{"pixels": _b64(photos["coffee"])}]}, 400,
       "keys must be equal to: image_bytes"),
      ("POST", None, {"signature_name": "classify", "instances": [_b64(photos["coffee"])]}, 400,
       'Serving signature name: "classify" not found'),
      ("POST", None, {"instances": [_b64(photos["coffee"]), _b64(b"GIF89a but no image"),
                                    _b64(photos["rocket"])]}, 400, "instance 1: "),
      ("POST", None, {"instances": [_b64(photos["coffee"]), _b64(_truncated_png(photos))]}, 400,
       "instance 1: the image does not decode"),
      ("POST", None, {"signature_name": export.PREDICT_IMAGES, "instances": [[[0.5, 0.5]]]}, 400,
       "expecting shape [-1,-1,-1,3]"),
      ("POST", "/v1/models/other:predict", good, 404, "Servable not found for request: Latest"),
      ("POST", f"{server.api}/versions/{old_version}:predict", good, 404,
       f"Specific({MODEL_NAME}, {old_version})"),
      ("GET", "/v1/models/other", None, 404, "Could not find any versions of model other"),
      ("GET", f"{server.api}/versions/{old_version}", None, 404,
       f"Could not find version {old_version}"),
      ("POST", f"{server.api}:explain", good, 400, "Malformed request"),
      ("POST", None, {"instances": [_b64(b"\xff" * MAX_REQUEST_BYTES)]}, 413,
       "max_request_bytes"),
  ]
  for method, path, body, want_status, words in cases:
    status, answer = server.request(method, path or f"{server.api}:predict", body)
    assert (status, words) == (want_status, words) and words in answer["error"], (body, answer)
    # One line for a person: no TensorFlow node names or stack.
    assert not re.search(r"\n|\{\{|\[Op:|Graph execution", answer["error"]), answer["error"]
    status, answer = server.predict(good)
    assert status == 200 and answer["predictions"][0]["labels"] == "chelsea", answer


def _metric(text, name):
  return sum(float(value) for value in re.findall(rf"^{re.escape(name)} (\S+)$", text, re.M))


def test_concurrent_clients_are_batched_and_one_bad_image_fails_alone(server, photos, expected):
  names = list(photos)
  results = [None] * 200
  bad_index = 77  # this one sends an image that decodes only as far as its header

  def client(thread_index):
    connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
    for i in range(thread_index, len(results), 16):
      data = _truncated_png(photos) if i == bad_index else photos[names[i % len(names)]]
      results[i] = server.predict({"instances": [_b64(data)]}, connection=connection)
    connection.close()

  threads = [threading.Thread(target=client, args=(t,)) for t in range(16)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  for i, (status, answer) in enumerate(results):
    if i == bad_index:
      assert status == 400 and "instance 0: the image does not decode" in answer["error"]
      continue
    assert status == 200, answer
    _assert_prediction(answer["predictions"][0], expected[names[i % len(names)]])
  metrics = server.request("GET", "/metrics")[1]
  batches = _metric(metrics, "tlframe_serve_batch_size_count")
  batches_of_one = _metric(metrics, 'tlframe_serve_batch_size_bucket{le="1.0"}')
  assert batches > batches_of_one, "no model call held more than one request"
  images = _metric(metrics, 'tlframe_serve_images_total{signature="serving_default"}')
  assert images >= 199
  assert _metric(metrics, 'tlframe_serve_requests_total{api="predict",code="200"}') >= 199
  assert _metric(metrics, 'tlframe_serve_request_latency_seconds_count{api="predict"}') >= 200


@pytest.mark.slow
def test_sigterm_during_a_burst_answers_every_accepted_request(model_dir, photos, tmp_path):
  # A batch waits 300 ms for more requests, so many are in flight when the signal comes.
  server = Server(model_dir, tmp_path, "--batch_timeout_ms=300", "--max_batch_size=64")
  names = list(photos)
  answered, failures, stop = [], [], threading.Event()
  lock = threading.Lock()

  def client(thread_index):
    for i in range(thread_index, 10**6, 16):
      name = names[i % len(names)]
      body = {"instances": [{"image_bytes": _b64(photos[name]), "key": f"{i}:{name}"}]}
      try:
        status, answer = server.predict(body)
      except OSError as e:  # refused, or reset before the server took the connection
        with lock:
          failures.append((time.monotonic(), e))
        return
      with lock:
        answered.append((time.monotonic(), status, answer))
      if stop.is_set():
        return

  threads = [threading.Thread(target=client, args=(t,)) for t in range(16)]
  for thread in threads:
    thread.start()
  while len(answered) < 32:
    time.sleep(0.05)
  time.sleep(0.1)
  signalled_at = time.monotonic()
  stop.set()
  status, output = server.stop()
  assert status == 0, server.log()
  for thread in threads:
    thread.join()
  for _, status, answer in answered:
    assert status == 200, answer
    prediction = answer["predictions"][0]
    assert prediction["key"].split(":")[1] == prediction["labels"] or prediction["key"].endswith(
        "grass.png")
  assert any(at > signalled_at for at, _, _ in answered), "nothing was in flight at SIGTERM"
  assert all(at > signalled_at for at, _ in failures)
  drained = re.search(r"stopped: (\d+) of (\d+) API requests accepted were answered", output)
  assert drained, output
  assert int(drained.group(1)) == int(drained.group(2)) == len(answered)


@pytest.mark.slow
def test_bad_model_flag_is_one_line_and_exit_2(tmp_path):
  result = subprocess.run([sys.executable, SERVE, f"--model={tmp_path}"], capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path}: no saved_model.pb")
  assert "Traceback" not in result.stderr


class _Recorder:
  """A model stand-in for the batcher alone: doubles `x`, refuses negatives, records batches."""

  def __init__(self, delay_s=0.0):
    self.batches = []
    self.delay_s = delay_s

  def __call__(self, group, inputs):
    self.batches.append((group, len(inputs["x"])))
    time.sleep(self.delay_s)
    if (inputs["x"] < 0).any():
      raise ValueError("negative input")
    return {"y": inputs["x"] * 2}


def test_batcher_merges_queued_requests_up_to_the_limit_and_isolates_a_failure():
  model = _Recorder(delay_s=0.05)
  batcher = batching.DynamicBatcher(model, max_batch_size=8, batch_timeout_s=0.2)
  first = batcher.submit("a", {"x": np.array([1.0])}, 1)  # runs alone after its timeout
  time.sleep(0.25)
  # Queued while the first batch runs: 3 + 4 fit in 8, the next 3 do not.
  futures = [batcher.submit("a", {"x": np.array([10.0, 11.0, 12.0])}, 3),
             batcher.submit("a", {"x": np.array([20.0, -1.0, 22.0, 23.0])}, 4),
             batcher.submit("a", {"x": np.array([30.0, 31.0, 32.0])}, 3),
             batcher.submit("b", {"x": np.array([40.0])}, 1)]
  batcher.close()  # drains the queue
  assert first.result()["y"].tolist() == [2.0]
  np.testing.assert_array_equal(futures[0].result()["y"], [20.0, 22.0, 24.0])
  with pytest.raises(ValueError, match="negative"):
    futures[1].result()
  np.testing.assert_array_equal(futures[2].result()["y"], [60.0, 62.0, 64.0])
  np.testing.assert_array_equal(futures[3].result()["y"], [80.0])
  # The merged call failed, so its two requests reran alone; groups never mix.
  assert model.batches == [("a", 1), ("a", 7), ("a", 3), ("a", 4), ("a", 3), ("b", 1)]
  with pytest.raises(batching.ShuttingDown):
    batcher.submit("a", {"x": np.array([1.0])}, 1)


def test_batcher_waits_at_most_the_timeout_from_the_oldest_request():
  model = _Recorder()
  batcher = batching.DynamicBatcher(model, max_batch_size=64, batch_timeout_s=0.3)
  start = time.monotonic()
  future = batcher.submit("a", {"x": np.array([1.0, 2.0])}, 2)
  future.result(timeout=5)
  waited = time.monotonic() - start
  cancelled = batcher.submit("a", {"x": np.array([5.0])}, 1)
  assert cancelled.cancel()  # a client that went away: dropped, never run
  kept = batcher.submit("a", {"x": np.array([6.0])}, 1)
  assert kept.result(timeout=5)["y"].tolist() == [12.0]
  batcher.close()
  assert 0.3 <= waited < 3.0
  assert model.batches == [("a", 2), ("a", 1)]


def test_floats_are_written_as_tf_serving_writes_them():
  """json_tensor.cc: printf %g (6 digits) if it reads back as the same float32, else %.9g."""
  rng = np.random.default_rng(0)
  values = np.concatenate([rng.random(3000), rng.normal(0, 30, 3000),
                           10.0 ** rng.uniform(-40, 38, 3000),
                           [0.0, 1.0, 0.2, 0.5250508, 1e6, 1234567.0, 1e-45, 3e38]]).astype(np.float32)

  def printf(value):
    text = f"{float(value):g}"
    return float(text) if np.float32(text) == value else float(f"{float(value):.9g}")

  answer = serve.format_predict_response({"probabilities": values.reshape([-1, 4])}, True)
  written = np.array(answer["predictions"]).ravel()
  assert written.tolist() == [printf(value) for value in values]
  assert json.dumps(written[-8:-2].tolist()) == "[0.0, 1.0, 0.2, 0.525050819, 1000000.0, 1234567.0]"
