"""Dynamic batching: concurrent requests merged into one model call, as TF Serving batches.

Each request is submitted as a dict of input arrays whose first dimension is
its number of images, with a `group` key: requests with the same group (same
signature, same per-image shapes) can be concatenated. One worker thread takes
requests from the queue in arrival order until it holds `max_batch_size`
images or the oldest request has waited `batch_timeout_s`, runs each group as
one call, and slices the outputs back to their requests. The timeout counts
from the oldest request's arrival, so requests that queued while the previous
batch ran go at once.

If a merged call fails, each of its requests is rerun alone, so that one bad
request (an undecodable image) fails only itself.
"""

import collections
import concurrent.futures
import dataclasses
import threading
import time

import numpy as np


@dataclasses.dataclass
class _Request:
  group: object
  inputs: dict
  size: int
  future: concurrent.futures.Future
  arrived_at: float


class ShuttingDown(Exception):
  """The batcher was closed; no new requests are taken."""


class DynamicBatcher:
  """Runs `run_batch(group, inputs) -> {name: array}` on merged requests in one thread.

  `on_batch(group, size, seconds)` is called after every model call (metrics).
  """

  def __init__(self, run_batch, max_batch_size=32, batch_timeout_s=0.002, on_batch=None,
               clock=time.monotonic):
    if max_batch_size < 1 or batch_timeout_s < 0:
      raise ValueError("max_batch_size must be >= 1 and batch_timeout_s >= 0")
    self._run_batch = run_batch
    self._max_batch_size = max_batch_size
    self._timeout_s = batch_timeout_s
    self._on_batch = on_batch
    self._clock = clock
    self._pending = collections.deque()
    self._pending_size = 0
    self._closed = False
    self._cond = threading.Condition()
    self._thread = threading.Thread(target=self._work, name="batcher", daemon=True)
    self._thread.start()

  def submit(self, group, inputs, size):
    """Queues one request of `size` images; returns a Future of its output dict."""
    future = concurrent.futures.Future()
    with self._cond:
      if self._closed:
        raise ShuttingDown("the server is shutting down")
      self._pending.append(_Request(group, inputs, size, future, self._clock()))
      self._pending_size += size
      self._cond.notify()
    return future

  def close(self):
    """Stops taking requests, finishes the queued ones, and stops the worker."""
    with self._cond:
      self._closed = True
      self._cond.notify()
    self._thread.join()

  def _next_batch(self):
    """The requests of the next batch, oldest first; None once closed and empty."""
    with self._cond:
      while not self._pending and not self._closed:
        self._cond.wait()
      if not self._pending:
        return None
      deadline = self._pending[0].arrived_at + self._timeout_s
      while self._pending_size < self._max_batch_size and not self._closed:
        remaining = deadline - self._clock()
        if remaining <= 0:
          break
        self._cond.wait(remaining)
      batch = [self._pending.popleft()]
      size = batch[0].size
      while self._pending and size + self._pending[0].size <= self._max_batch_size:
        batch.append(self._pending.popleft())
        size += batch[-1].size
      self._pending_size -= size
    # A request whose caller gave up (client gone) is dropped; the rest can no longer be cancelled.
    return [request for request in batch if request.future.set_running_or_notify_cancel()]

  def _work(self):
    while True:
      batch = self._next_batch()
      if batch is None:
        return
      groups = collections.defaultdict(list)
      for request in batch:
        groups[request.group].append(request)
      for group, requests in groups.items():
        self._run_group(group, requests)

  def _run_group(self, group, requests):
    try:
      outputs = self._call(group, requests)
    except Exception as e:  # pylint: disable=broad-except
      if len(requests) == 1:
        requests[0].future.set_exception(e)
        return
      # Find the request at fault by running each alone; the others still succeed.
      for request in requests:
        self._run_group(group, [request])
      return
    start = 0
    for request in requests:
      end = start + request.size
      request.future.set_result({name: value[start:end] for name, value in outputs.items()})
      start = end

  def _call(self, group, requests):
    if len(requests) == 1:
      inputs = requests[0].inputs
    else:
      inputs = {name: np.concatenate([r.inputs[name] for r in requests])
                for name in requests[0].inputs}
    size = sum(r.size for r in requests)
    start = self._clock()
    outputs = self._run_batch(group, inputs)
    if self._on_batch:
      self._on_batch(group, size, self._clock() - start)
    return outputs
