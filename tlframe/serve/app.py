"""The HTTP application: an export served with TensorFlow Serving's REST API.

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
against clients that send nothing, and SIGTERM drains (tlframe.serve.server).
The JSON codec is tlframe.serve.rest; the loaded export, tlframe.serve.servable.

Needs the `serve` extra (FastAPI, uvicorn, prometheus_client); `import tlframe`
does not import this package.
"""

import asyncio
import contextlib
import json
import re
import threading
import time

from absl import logging
import fastapi
import prometheus_client
import starlette.requests
import tensorflow as tf

from tlframe import imageformat

from tlframe.serve import batching
from tlframe.serve import page as serve_page
from tlframe.serve.rest import (IMAGE_BYTES_INPUT, RequestError, format_predict_response,
                                parse_predict_request)
from tlframe.serve.servable import check_image_headers, first_undecodable
from tlframe.serve.server import DEFAULT_CLIENT_TIMEOUT_S

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_BATCH_TIMEOUT_MS = 2.0
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
# After a 413 the rest of the body is read and dropped (at most this much), so
# that the client, still sending, gets the answer instead of a connection reset.
_DISCARD_LIMIT_BYTES = 64 * 1024 * 1024
# More instances in one request are refused (400): bounds the request's own arrays and its
# answer. The model never sees more than --max_batch_size of them at once.
DEFAULT_MAX_INSTANCES_PER_REQUEST = 1024

# TF Serving's URL grammar (tensorflow_serving/model_servers/http_rest_api_util.cc).
_PREDICT_PATH = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+))?:predict", re.IGNORECASE)
_STATUS_PATH = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+))?(/metadata)?", re.IGNORECASE)

_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


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


