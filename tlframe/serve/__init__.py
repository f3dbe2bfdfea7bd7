"""The serving stage: an export behind TensorFlow Serving's REST API.

- `servable`: an export directory loaded once, and the request images' checks;
- `rest`: TF Serving's predict JSON <-> tensors;
- `batching`: concurrent requests batched into one model call;
- `app`: the FastAPI routes, health, readiness and Prometheus metrics;
- `page`: the browser page at `/`;
- `server`: uvicorn with guarded connections and a graceful drain.

Needs the `serve` extra (FastAPI, uvicorn, prometheus_client); `import tlframe`
does not import this package.
"""

from tlframe import _lazy

__all__, __getattr__, __dir__ = _lazy.exports(__name__, {
    "servable": ("Servable", "check_image_headers", "first_undecodable"),
    "rest": ("DEFAULT_SIGNATURE", "KEYED_SIGNATURE", "IMAGE_BYTES_INPUT", "KEY_INPUT",
             "RequestError", "parse_predict_request", "format_predict_response"),
    "app": ("DEFAULT_MAX_BATCH_SIZE", "DEFAULT_BATCH_TIMEOUT_MS", "DEFAULT_MAX_REQUEST_BYTES",
            "DEFAULT_MAX_INSTANCES_PER_REQUEST", "create_app"),
    "server": ("DEFAULT_MAX_CONNECTIONS", "DEFAULT_CLIENT_TIMEOUT_S", "DRAIN_TIMEOUT_S",
               "run_server"),
})
