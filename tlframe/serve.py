"""An HTTP server for an export that speaks TensorFlow Serving's REST API.

The same client code talks to this server on one machine and to TensorFlow
Serving or KServe's TensorFlow runtime on a cluster, serving the same export
directory (`<model_dir>/export/<N>/`, tlframe.export). Implemented, as TF
Serving answers them (tensorflow_serving/util/json_tensor.cc):

- `POST /v1/models/NAME[/versions/N]:predict` with `{"instances": [...]}` (row
  format: `{"b64": ...}` image bytes, or objects of named inputs such as
  `{"image_bytes": {"b64": ...}, "key": "..."}`) or `{"inputs": ...}`
  (columnar), and an optional `"signature_name"`; answers `{"predictions": [...]}`
  (one object of named outputs per instance) or `{"outputs": {...}}`.
- `GET /v1/models/NAME[/versions/N]` (version status) and `.../metadata`
  (the SignatureDefs, plus the export's tlframe_export.json under "tlframe").
- Errors as `{"error": "..."}` with TF Serving's status codes: 400 for a bad
  request (more than `max_instances_per_request` instances among them), 404 for
  an unknown model or version; 413 for a body over `max_request_bytes`, refused
  while it is read; 408 for a body slower than `client_timeout_s`.

Beyond the protocol: `/healthz` (liveness), `/readyz` (readiness: 503 while
draining), and Prometheus metrics at `/metrics`. Predict requests go through
`batching.DynamicBatcher`, so concurrent requests share one model call, no call
holds more than `max_batch_size` images (a larger request runs in slices), and
TensorFlow runs in its worker thread, off the event loop. Connections are guarded
against clients that send nothing (`_GuardedH11Protocol`). On SIGTERM the server
stops accepting connections, answers every request it has accepted, and
returns normally (exit status 0).

Needs the `serve` extra (FastAPI, uvicorn, prometheus_client); `import tlframe`
does not import this module.
"""

import asyncio
import base64
import binascii
import contextlib
import json
import os
import re
import signal
import socket
import threading
import time

from absl import logging
import fastapi
from google.protobuf import json_format
import numpy as np
import prometheus_client
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
import starlette.requests
import uvicorn
from uvicorn.protocols.http import h11_impl

from tlframe import batching
from tlframe import export
from tlframe import imageformat
from tlframe import serve_page
from tlframe.errors import UserError

DEFAULT_SIGNATURE = export.SERVING_DEFAULT
KEYED_SIGNATURE = export.SERVING_KEYED
IMAGE_BYTES_INPUT = "image_bytes"
KEY_INPUT = "key"

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_BATCH_TIMEOUT_MS = 2.0
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 256
# More instances in one request are refused (400): bounds the request's own arrays and its
# answer. The model never sees more than --max_batch_size of them at once.
DEFAULT_MAX_INSTANCES_PER_REQUEST = 1024
# Seconds a client has to send a request's head (after connecting or after its previous
# answer), and again its body; slower ones are disconnected or answered 408.
DEFAULT_CLIENT_TIMEOUT_S = 30.0
# Seconds a drain waits for accepted requests before cancelling them.
DRAIN_TIMEOUT_S = 60
# After a 413 the rest of the body is read and dropped (at most this much), so
# that the client, still sending, gets the answer instead of a connection reset.
_DISCARD_LIMIT_BYTES = 64 * 1024 * 1024

# TF Serving's URL grammar (tensorflow_serving/model_servers/http_rest_api_util.cc).
_PREDICT_PATH = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+))?:predict", re.IGNORECASE)
_STATUS_PATH = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+))?(/metadata)?", re.IGNORECASE)

_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Doubles hold the powers of ten 1e0 .. 1e22 exactly.
_EXACT_POWERS_OF_TEN = 22


class RequestError(Exception):
  """A request the server refuses: becomes `{"error": message}` with `status`."""

  def __init__(self, status, message):
    super().__init__(message)
    self.status = status
    self.message = message


# ---------------------------------------------------------------------------
# The servable: an export directory loaded once.


def _version_of(export_dir):
  name = os.path.basename(os.path.normpath(export_dir))
  return int(name) if name.isdigit() else 1


class Servable:
  """One loaded export: its signatures, metadata and version."""

  def __init__(self, export_dir):
    self.export_dir = export_dir
    self.version = _version_of(export_dir)
    try:
      self._model = tf.saved_model.load(export_dir)
    except (OSError, ValueError, tf.errors.OpError) as e:
      raise UserError(f"--model: {export_dir} does not load as a SavedModel ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0][:200]}); export the model again") from None
    self.signatures = dict(self._model.signatures)
    if DEFAULT_SIGNATURE not in self.signatures:
      raise UserError(f"--model: {export_dir} has no {DEFAULT_SIGNATURE!r} signature "
                      f"(it has {', '.join(sorted(self.signatures)) or 'none'}); "
                      "serve an export written by bin/export")
    # {signature: {input name: TensorSpec}}
    self.input_specs = {name: fn.structured_input_signature[1]
                        for name, fn in self.signatures.items()}
    self.signature_defs = _signature_defs(export_dir)
    info_path = os.path.join(export_dir, export.EXPORT_INFO_FILENAME)
    self.export_info = None
    if tf.io.gfile.exists(info_path):
      with tf.io.gfile.GFile(info_path) as f:
        self.export_info = json.load(f)

  def run(self, signature, inputs):
    """{input: array [B, ...]} -> {output: array [B, ...]} through one signature."""
    outputs = self.signatures[signature](**{name: tf.constant(value)
                                            for name, value in inputs.items()})
    return {name: value.numpy() for name, value in outputs.items()}

  def warm_up(self):
    """One call on a real PNG, so that the first request does not pay for graph set-up."""
    png = tf.io.encode_png(tf.zeros([8, 8, 3], tf.uint8)).numpy()
    self.run(DEFAULT_SIGNATURE, {IMAGE_BYTES_INPUT: np.array([png], dtype=object)})


def _signature_defs(export_dir):
  """The SignatureDefs as TF Serving's metadata JSON writes them (proto field names)."""
  saved_model = saved_model_pb2.SavedModel()
  with tf.io.gfile.GFile(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
    saved_model.ParseFromString(f.read())
  return {name: json_format.MessageToDict(signature_def,
                                          always_print_fields_with_no_presence=True,
                                          preserving_proto_field_name=True)
          for name, signature_def in saved_model.meta_graphs[0].signature_def.items()}


def check_image_headers(images, max_pixels):
  """Refuses (400) image bytes whose header is no image or declares over `max_pixels` pixels.

  Reads headers only, before any pixel is decoded: a decompression bomb costs nothing.
  """
  for index, data in enumerate(images):
    try:
      imageformat.check_header(data, max_pixels, limit_name="--max_pixels")
    except imageformat.ImageError as e:
      raise RequestError(400, f"instance {index}: {e}") from None


def first_undecodable(images):
  """(index, message) of the first image bytes the export's decoder rejects, else None."""
  for index, data in enumerate(images):
    try:
      imageformat.decode_image(data)
    except tf.errors.InvalidArgumentError as e:
      return index, imageformat.op_error_text(e)
  return None


# ---------------------------------------------------------------------------
# TF Serving's JSON <-> tensors.


def _is_b64(value):
  return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _is_named_object(value):
  return isinstance(value, dict) and not _is_b64(value)


def _short_json(value, limit=200):
  text = json.dumps(value)
  return text if len(text) <= limit else text[:limit] + "..."


def _string_value(value, index):
  if _is_b64(value):
    text = value["b64"]
    try:
      return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
      raise RequestError(400, f"instance {index}: Unable to base64 decode its \"b64\" "
                         "value") from None
  if isinstance(value, str):
    return value.encode("utf-8")
  raise RequestError(400, f"instance {index}: JSON Value: {_short_json(value)} is not of "
                     'expected type: string (bytes go as {"b64": "<base64>"})')


def _to_array(values, name, spec):
  """A list of per-instance JSON values -> one array for input `name` of `spec`."""
  if spec.dtype == tf.string:
    if spec.shape.rank != 1:
      raise RequestError(400, f"input {name!r} of rank {spec.shape.rank} is not supported")
    return np.array([_string_value(value, index) for index, value in enumerate(values)],
                    dtype=object)
  try:
    with np.errstate(over="ignore"):  # a value beyond float32's range becomes inf: refused below
      array = np.asarray(values, dtype=spec.dtype.as_numpy_dtype)
  except (TypeError, ValueError) as e:
    raise RequestError(400, f"input {name!r}: the values are not a dense numeric "
                       f"{spec.dtype.name} tensor: {e}") from None
  if not spec.shape.is_compatible_with(array.shape):
    raise RequestError(400, f"input {name!r}: expecting shape {_shape_text(spec.shape)} but got "
                       f"{list(array.shape)}")
  if spec.dtype.is_floating and array.size:
    # Python's JSON reads NaN and Infinity; a model would answer them with confident nonsense.
    rows = np.atleast_1d(array)
    finite = np.isfinite(rows).reshape(len(rows), -1).all(axis=1)
    if not finite.all():
      index = int(np.argmin(finite))
      raise RequestError(400, f"instance {index}: input {name!r} holds NaN or infinite values "
                         "(or values beyond float32's range); send finite numbers (pixels are "
                         "floats in [0, 1])")
  return array


def _shape_text(shape):
  return "[" + ",".join("-1" if d is None else str(d) for d in shape.as_list()) + "]"


def _row_inputs(instances, specs):
  """The row format (`instances`): one value or one object of named inputs per instance."""
  if not isinstance(instances, list):
    raise RequestError(400, "Excepting 'instances' to be an list/array")
  if not instances:
    raise RequestError(400, "No values in 'instances' array")
  names = sorted(specs)
  objects = _is_named_object(instances[0])
  if not objects and len(names) > 1:
    raise RequestError(400, "instances is a plain list, but expecting list of objects as "
                       f"multiple input tensors required as per tensorinfo_map ({','.join(names)})")
  columns = {name: [] for name in names}
  for index, instance in enumerate(instances):
    if objects:
      if not _is_named_object(instance):
        raise RequestError(400, f"Expecting object but got list at item {index} of input list")
      if sorted(instance) != names:
        raise RequestError(400, f"Failed to process element: {index} of 'instances' list. "
                           f"JSON object: {_short_json(instance)} keys must be equal to: "
                           f"{','.join(names)}")
      for name in names:
        columns[name].append(instance[name])
    else:
      if _is_named_object(instance):
        raise RequestError(400, f"Expecting value/list but got object at item {index} of "
                           "input list")
      columns[names[0]].append(instance)
  return {name: _to_array(values, name, specs[name]) for name, values in columns.items()}


def _columnar_inputs(inputs, specs):
  """The columnar format (`inputs`): one list, or an object of named lists."""
  names = sorted(specs)
  if not _is_named_object(inputs):
    if len(names) > 1:
      raise RequestError(400, "inputs is a plain value/list, but expecting an object as multiple "
                         f"input tensors required as per tensorinfo_map ({','.join(names)})")
    inputs = {names[0]: inputs}
  arrays = {}
  for name in names:
    if name not in inputs:
      raise RequestError(400, f"Missing named input: {name} in 'inputs' object.")
    if not isinstance(inputs[name], list):
      raise RequestError(400, f"input {name!r}: expecting a list with one item per image")
    arrays[name] = _to_array(inputs[name], name, specs[name])
  sizes = {len(array) for array in arrays.values()}
  if len(sizes) > 1:
    raise RequestError(400, f"the named inputs have different batch sizes: {sorted(sizes)}")
  if sizes == {0}:
    raise RequestError(400, "No values in 'inputs'")
  return arrays


def _choose_signature(body, servable):
  """`signature_name`, else serving_keyed for keyed instances, else serving_default."""
  if "signature_name" in body:
    name = body["signature_name"]
    if not isinstance(name, str):
      raise RequestError(400, "'signature_name' key must be a string value.")
    name = name or DEFAULT_SIGNATURE
    if name not in servable.signatures:
      raise RequestError(400, f'Serving signature name: "{name}" not found in signature def')
    return name
  first = body.get("instances", [None])
  first = first[0] if isinstance(first, list) and first else None
  columns = body.get("inputs")
  keyed = ((_is_named_object(first) and KEY_INPUT in first)
           or (_is_named_object(columns) and KEY_INPUT in columns))
  return KEYED_SIGNATURE if keyed and KEYED_SIGNATURE in servable.signatures else DEFAULT_SIGNATURE


def parse_predict_request(body_bytes, servable):
  """A predict body -> (signature name, {input: array}, row format?). Raises RequestError."""
  try:
    body = json.loads(body_bytes)
  except UnicodeDecodeError:
    raise RequestError(400, "JSON Parse error: the body is not UTF-8") from None
  except json.JSONDecodeError as e:
    raise RequestError(400, f"JSON Parse error: {e.msg} at offset: {e.pos}") from None
  except RecursionError:
    raise RequestError(400, "JSON Parse error: nested too deeply") from None
  if not isinstance(body, dict):
    raise RequestError(400, f"JSON Value: {_short_json(body)} Is not object")
  if "instances" in body and "inputs" in body:
    raise RequestError(400, "Not formatted correctly expecting only one of 'inputs' or "
                       "'instances' keys to exist")
  if "instances" not in body and "inputs" not in body:
    raise RequestError(400, "Missing 'inputs' or 'instances' key")
  signature = _choose_signature(body, servable)
  specs = servable.input_specs[signature]
  if "instances" in body:
    return signature, _row_inputs(body["instances"], specs), True
  return signature, _columnar_inputs(body["inputs"], specs), False


def _tf_serving_floats(array):
  """float32 values as the numbers TF Serving writes for them (json_tensor.cc's WriteDecimal).

  That is printf's %g (six significant digits) where it reads back as the same
  float32, else nine digits. Rounded in numpy, so that a 1000-class output
  costs no Python loop; only values beyond 1e-14 .. 1e27, where a power of ten
  is no exact double, are formatted one by one.
  """
  wide = array.astype(np.float64)
  finite = np.isfinite(wide) & (wide != 0)
  exponent = np.floor(np.log10(np.abs(np.where(finite, wide, 1.0))))

  def rounded(digits):
    power = np.clip(digits - 1 - exponent, -_EXACT_POWERS_OF_TEN, _EXACT_POWERS_OF_TEN)
    return np.where(power >= 0, np.round(wide * 10.0**power) / 10.0**power,
                    np.round(wide / 10.0**-power) * 10.0**-power)

  six = rounded(6)
  values = np.where(finite, np.where(six.astype(np.float32) == array, six, rounded(9)), wide)
  inexact = finite & ((exponent < 8 - _EXACT_POWERS_OF_TEN) | (exponent > 5 + _EXACT_POWERS_OF_TEN))
  for index in zip(*np.nonzero(inexact)):
    value = float(wide[index])
    text = f"{value:g}"
    values[index] = float(text if np.float32(text) == array[index] else f"{value:.9g}")
  return values


def _json_values(array):
  """An output array as JSON lists, numbers as TF Serving writes them."""
  if array.dtype == np.float32:
    return _tf_serving_floats(array).tolist()
  if array.dtype == object:
    return np.array([value.decode("utf-8", "replace") for value in array.ravel()],
                    dtype=object).reshape(array.shape).tolist()
  return array.tolist()


def format_predict_response(outputs, row_format):
  """{"predictions": [...]} (row) or {"outputs": {...}} (columnar), TF Serving's shapes."""
  names = sorted(outputs)
  columns = {name: _json_values(outputs[name]) for name in names}
  if not row_format:
    return {"outputs": columns if len(names) > 1 else columns[names[0]]}
  if len(names) == 1:
    return {"predictions": columns[names[0]]}
  size = len(columns[names[0]])
  return {"predictions": [{name: columns[name][i] for name in names} for i in range(size)]}


# ---------------------------------------------------------------------------
# The HTTP application.


class _Metrics:
  """The server's Prometheus metrics, in a registry of its own."""

  def __init__(self):
    self.registry = prometheus_client.CollectorRegistry()
    self.requests = prometheus_client.Counter(
        "tlframe_serve_requests", "HTTP requests answered, by API and status code.",
        ["api", "code"], registry=self.registry)
    self.latency = prometheus_client.Histogram(
        "tlframe_serve_request_latency_seconds", "Time from request to answer, by API.",
        ["api"], registry=self.registry)
    self.in_flight = prometheus_client.Gauge(
        "tlframe_serve_requests_in_flight", "Requests accepted and not yet answered.",
        registry=self.registry)
    self.images = prometheus_client.Counter(
        "tlframe_serve_images", "Images (instances) run through the model.",
        ["signature"], registry=self.registry)
    self.batch_size = prometheus_client.Histogram(
        "tlframe_serve_batch_size", "Images per model call after dynamic batching.",
        buckets=_BATCH_SIZE_BUCKETS, registry=self.registry)
    self.batch_latency = prometheus_client.Histogram(
        "tlframe_serve_batch_latency_seconds", "Time of one model call.",
        registry=self.registry)

  def on_batch(self, group, size, seconds):
    self.images.labels(group[0]).inc(size)
    self.batch_size.observe(size)
    self.batch_latency.observe(seconds)


def _error_response(status, message):
  return fastapi.Response(json.dumps({"error": message}).encode("utf-8"), status_code=status,
                          media_type="application/json")


def _json_response(value):
  return fastapi.Response(json.dumps(value).encode("utf-8"), media_type="application/json")


async def _read_body(request, max_bytes):
  """The request body, refused with 413 as soon as it is known to exceed `max_bytes`."""
  declared = request.headers.get("content-length")
  too_large = RequestError(413, f"the request body is over --max_request_bytes={max_bytes}; "
                           "send fewer images per request")
  if declared is not None and declared.isdigit() and int(declared) > max_bytes:
    # A client waiting for "100 Continue" (curl does for large bodies) sends nothing more.
    if request.headers.get("expect", "").lower() != "100-continue":
      await _discard_body(request)
    raise too_large
  chunks = []
  size = 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > max_bytes:
      await _discard_body(request, size)
      raise too_large
    chunks.append(chunk)
  return b"".join(chunks)


async def _discard_body(request, read=0):
  async for chunk in request.stream():
    read += len(chunk)
    if read > _DISCARD_LIMIT_BYTES:
      return


class _ServerState:
  """What the handlers share: the servable, its batcher, metrics and the drain flag."""

  def __init__(self, servable, model_name, max_request_bytes, max_pixels,
               max_instances_per_request, client_timeout_s):
    self.servable = servable
    self.model_name = model_name
    self.max_request_bytes = max_request_bytes
    self.max_pixels = max_pixels
    self.max_instances_per_request = max_instances_per_request
    self.client_timeout_s = client_timeout_s
    self.metrics = _Metrics()
    self.batcher = None
    self.draining = threading.Event()
    self.accepted = 0  # requests to /v1/, counted on the event loop
    self.answered = 0

  def check_model(self, name, version, status_api=False):
    """404 unless `name` (and `version`, if given) is the one loaded, in TF Serving's words."""
    version = None if version is None else int(version)
    if name == self.model_name and version in (None, self.servable.version):
      return
    if status_api:
      raise RequestError(404, f"Could not find any versions of model {name}" if version is None
                         else f"Could not find version {version} of model {name}")
    servable_id = f"Latest({name})" if version is None else f"Specific({name}, {version})"
    raise RequestError(404, f"Servable not found for request: {servable_id}")

  async def predict(self, body):
    # Parsing megabytes of JSON (float pixels) would stall the event loop's other requests.
    signature, inputs, row_format = await asyncio.to_thread(parse_predict_request, body,
                                                            self.servable)
    size = len(next(iter(inputs.values())))
    if size > self.max_instances_per_request:
      raise RequestError(400, f"{size} instances is over --max_instances_per_request="
                         f"{self.max_instances_per_request}; send them in several requests")
    images = inputs.get(IMAGE_BYTES_INPUT)
    if images is not None:
      check_image_headers(images, self.max_pixels)
    group = (signature,) + tuple((name, inputs[name].shape[1:]) for name in sorted(inputs))
    try:
      future = self.batcher.submit(group, inputs, size)
    except batching.ShuttingDown as e:
      raise RequestError(503, str(e)) from None
    try:
      outputs = await asyncio.wrap_future(future)
    except tf.errors.InvalidArgumentError as e:
      bad = None if images is None else await asyncio.to_thread(first_undecodable, images)
      if bad is not None:
        raise RequestError(400, f"instance {bad[0]}: the image does not decode: {bad[1]}") from None
      raise RequestError(400, imageformat.op_error_text(e)) from None
    except tf.errors.OpError as e:
      raise RequestError(500, imageformat.op_error_text(e)) from None
    return format_predict_response(outputs, row_format)

  def status(self):
    return {"model_version_status": [{
        "version": str(self.servable.version), "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""}}]}

  def metadata(self):
    metadata = {"signature_def": {"signature_def": self.servable.signature_defs}}
    if self.servable.export_info is not None:
      metadata["tlframe"] = self.servable.export_info
    return {"model_spec": {"name": self.model_name, "signature_name": "",
                           "version": str(self.servable.version)},
            "metadata": metadata}


def create_app(servable, model_name="model", max_batch_size=DEFAULT_MAX_BATCH_SIZE,
               batch_timeout_ms=DEFAULT_BATCH_TIMEOUT_MS,
               max_request_bytes=DEFAULT_MAX_REQUEST_BYTES,
               max_pixels=imageformat.DEFAULT_MAX_PIXELS,
               max_instances_per_request=DEFAULT_MAX_INSTANCES_PER_REQUEST,
               client_timeout_s=DEFAULT_CLIENT_TIMEOUT_S):
  """The FastAPI app serving `servable` as `model_name`; run it with `run_server`."""
  state = _ServerState(servable, model_name, max_request_bytes, max_pixels,
                       max_instances_per_request, client_timeout_s)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    del app  # unused
    state.batcher = batching.DynamicBatcher(
        lambda group, inputs: servable.run(group[0], inputs), max_batch_size=max_batch_size,
        batch_timeout_s=batch_timeout_ms / 1000, on_batch=state.metrics.on_batch)
    yield
    # uvicorn has answered every accepted request by now; the queue is empty.
    state.draining.set()
    await asyncio.to_thread(state.batcher.close)

  app = fastapi.FastAPI(title="tlframe serve", lifespan=lifespan, docs_url=None,
                        redoc_url=None, openapi_url=None)
  app.state.server_state = state

  page = serve_page.Page(model_name)

  @app.get("/")
  async def index():
    return fastapi.Response(page.body, media_type="text/html; charset=utf-8", headers=page.headers)

  @app.get("/healthz")
  async def healthz():
    return _json_response({"status": "alive"})

  @app.get("/readyz")
  async def readyz():
    if state.draining.is_set() or state.batcher is None:
      return _error_response(503, "not ready: the server is starting or draining")
    return _json_response({"status": "ready", "model": model_name,
                           "version": str(servable.version)})

  @app.get("/metrics")
  async def metrics():
    return fastapi.Response(prometheus_client.generate_latest(state.metrics.registry),
                            media_type=prometheus_client.CONTENT_TYPE_LATEST)

  @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
  async def tf_serving_api(request: fastapi.Request):
    path = request.url.path
    api = "other"
    started = time.perf_counter()
    state.accepted += 1
    state.metrics.in_flight.inc()
    try:
      predict = _PREDICT_PATH.fullmatch(path) if request.method == "POST" else None
      status = _STATUS_PATH.fullmatch(path) if request.method == "GET" else None
      if predict:
        api = "predict"
        try:
          body = await asyncio.wait_for(_read_body(request, state.max_request_bytes),
                                        state.client_timeout_s)
        except asyncio.TimeoutError:
          raise RequestError(408, f"the request body took over --client_timeout_s="
                             f"{state.client_timeout_s:g} seconds to arrive") from None
        state.check_model(*predict.groups())
        response = _json_response(await state.predict(body))
      elif status:
        name, version, metadata = status.groups()
        api = "metadata" if metadata else "status"
        state.check_model(name, version, status_api=not metadata)
        response = _json_response(state.metadata() if metadata else state.status())
      else:
        raise RequestError(400, f"Malformed request: {request.method} {path}")
    except RequestError as e:
      response = _error_response(e.status, e.message)
      if e.status == 408:
        response.headers["connection"] = "close"  # the rest of the body is not waited for
    except starlette.requests.ClientDisconnect:
      # Nobody to answer; nginx's 499 in the metrics.
      logging.warning("%s %s: the client disconnected before sending the whole body",
                      request.method, path)
      response = fastapi.Response(status_code=499)
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("%s %s failed", request.method, path)
      response = _error_response(500, f"internal error: {type(e).__name__}: {e}")
    finally:
      state.metrics.in_flight.dec()
    state.answered += 1
    state.metrics.requests.labels(api, str(response.status_code)).inc()
    state.metrics.latency.labels(api).observe(time.perf_counter() - started)
    return response

  @app.exception_handler(404)
  async def not_found(request, exc):
    del exc  # unused
    return _error_response(404, f"no such endpoint: {request.method} {request.url.path}; "
                           f"the API is under /v1/models/{model_name}")

  return app


# ---------------------------------------------------------------------------
# Running it.


class _GuardedH11Protocol(h11_impl.H11Protocol):
  """uvicorn's HTTP/1.1 protocol, guarded against clients that hold a connection and send nothing.

  - A request's head (request line and headers) must arrive within
    `client_timeout_s` of the connection, or of the previous answer on it; else
    the connection is closed. (uvicorn's keep-alive timeout stops at the first
    byte, so a client sending one header byte a second would stay forever.)
  - Past `max_connections` open connections, a new one closes the one that has
    waited longest with no request in progress (idle, or still sending its head):
    idle sockets never lock out clients with work. Only when every connection
    has a request in progress does uvicorn answer 503 (its `limit_concurrency`,
    one more than `max_connections`, counts the new connection too).

  run_server subclasses it with the server's `client_timeout_s` and `max_connections`.
  """

  client_timeout_s = DEFAULT_CLIENT_TIMEOUT_S
  max_connections = DEFAULT_MAX_CONNECTIONS

  def connection_made(self, transport):
    super().connection_made(transport)
    self._await_head()
    # Connections closed a moment ago stay in the set until their connection_lost runs.
    open_connections = [connection for connection in self.connections
                        if not connection.transport.is_closing()]
    excess = len(open_connections) - self.max_connections
    if excess > 0:
      waiting = sorted((connection for connection in open_connections
                        if connection is not self and connection._head_timer is not None),
                       key=lambda connection: connection._waiting_since)
      for connection in waiting[:excess]:
        connection.transport.close()

  def _await_head(self):
    self._waiting_since = self.loop.time()
    self._head_timer = self.loop.call_later(self.client_timeout_s, self.transport.close)

  def _stop_waiting(self):
    if self._head_timer is not None:
      self._head_timer.cancel()
      self._head_timer = None

  def handle_events(self):
    super().handle_events()
    if self.cycle is not None and not self.cycle.response_complete:
      self._stop_waiting()  # a request's head arrived

  def on_response_complete(self):
    if not self.transport.is_closing():
      self._stop_waiting()
      self._await_head()  # before a pipelined request's head is handled, which stops it
    super().on_response_complete()

  def connection_lost(self, exc):
    self._stop_waiting()
    super().connection_lost(exc)


class _DrainingServer(uvicorn.Server):
  """uvicorn's server that reports where it listens and drains on SIGTERM with exit status 0."""

  def __init__(self, config, state, on_listening):
    super().__init__(config)
    self._state = state
    self._on_listening = on_listening

  async def startup(self, sockets=None):
    await super().startup(sockets)
    if self.should_exit or not self.servers:
      return
    host, port = self.servers[0].sockets[0].getsockname()[:2]
    if self._on_listening:
      self._on_listening(f"http://{host}:{port}")

  def handle_exit(self, sig, frame):
    if not self._state.draining.is_set():
      logging.info("signal %d: draining (no new connections; answering the accepted requests)",
                   sig)
    self._state.draining.set()
    super().handle_exit(sig, frame)

  @contextlib.contextmanager
  def capture_signals(self):
    # uvicorn re-raises the signal after its graceful shutdown, which makes the
    # exit status 143; a finished drain is a normal exit here.
    if threading.current_thread() is not threading.main_thread():
      yield
      return
    previous = {sig: signal.signal(sig, self.handle_exit)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
      yield
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)


def run_server(app, host="127.0.0.1", port=8501, max_connections=DEFAULT_MAX_CONNECTIONS,
               on_listening=None):
  """Serves `app` until SIGTERM or SIGINT, then drains; `on_listening(url)` once it listens.

  `port` 0 picks a free port. Returns after the drain: (requests accepted,
  requests answered) to the /v1/ API, equal unless the drain timed out.
  """
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  # IPPROTO_TCP explicitly: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
  # sockets that say so, and with it on every keep-alive answer waits ~40 ms for an ACK.
  sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise UserError(f"--host={host} --port={port}: cannot listen there ({e.strerror}); "
                    "choose another port or host") from None
  state = app.state.server_state
  protocol = type("GuardedH11Protocol", (_GuardedH11Protocol,),
                  {"client_timeout_s": state.client_timeout_s,
                   "max_connections": max_connections})
  config = uvicorn.Config(app, http=protocol, ws="none", log_config=None, access_log=False,
                          lifespan="on", limit_concurrency=max_connections + 1,
                          timeout_graceful_shutdown=DRAIN_TIMEOUT_S)
  _DrainingServer(config, state, on_listening).run(sockets=[sock])
  return state.accepted, state.answered
