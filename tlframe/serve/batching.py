"""Dynamic batching: concurrent requests merged into one model call, as TF Serving batches.

Each request is submitted as a dict of input arrays whose first dimension is
its number of images, with a `group` key: requests with the same group (same
signature, same per-image shapes) can be concatenated. One worker thread takes
requests from the queue in arrival order until it holds `max_batch_size`
images or the oldest request has waited `batch_timeout_s`, runs each group as
one call, and slices the outputs back to their requests. The timeout counts
from the oldest request's arrival, so requests that queued while the previous
batch ran go at once.

No model call holds more than `max_batch_size` images, whatever one request
holds: a larger request runs in slices of that size (its outputs are joined
again), and after each slice its rest goes to the back of the queue, so that
the requests that came meanwhile take their turn. A model's memory is that of
one batch, and one huge request cannot starve the others.

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
  taken: int = 0  # images already given to a batch
  outputs: list = dataclasses.field(default_factory=list)  # one {name: array} per slice run


@dataclasses.dataclass
class _Slice:
  """Images [start, end) of one request, in one batch."""
  request: _Request
  start: int
  end: int

  @property
  def size(self):
    return self.end - self.start

  def inputs(self):
    if (self.start, self.end) == (0, self.request.size):
      return self.request.inputs
    return {name: value[self.start:self.end] for name, value in self.request.inputs.items()}


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
    """The slices of the next batch, oldest request first; None once closed and empty."""
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
      batch, room = [], self._max_batch_size
      while self._pending and room:
        request = self._pending[0]
        left = request.size - request.taken
        # A request that fits goes whole; one larger than any batch goes in slices.
        if left > room and (batch or left <= self._max_batch_size):
          break
        self._pending.popleft()
        count = min(left, room)
        self._pending_size -= count
        # A request whose caller gave up (client gone) is dropped; the rest can no longer be
        # cancelled. A request whose earlier slice failed is done.
        if request.taken == 0 and not request.future.set_running_or_notify_cancel():
          self._pending_size -= left - count
          continue
        if request.future.done():
          self._pending_size -= left - count
          continue
        batch.append(_Slice(request, request.taken, request.taken + count))
        request.taken += count
        room -= count
        if request.taken < request.size:
          self._pending.append(request)  # its rest: after the requests that came meanwhile
    return batch
  def _work(self):
    while True:
      batch = self._next_batch()
      if batch is None:
        return
      groups = collections.defaultdict(list)
      for piece in batch:
        groups[piece.request.group].append(piece)
      for group, pieces in groups.items():
        self._run_group(group, pieces)

  def _run_group(self, group, pieces):
    try:
      outputs = self._call(group, pieces)
    except Exception as e:  # pylint: disable=broad-except
      if len(pieces) == 1:
        if not pieces[0].request.future.done():
          pieces[0].request.future.set_exception(e)
        return
      # Find the request at fault by running each alone; the others still succeed.
      for piece in pieces:
        self._run_group(group, [piece])
      return
    start = 0
    for piece in pieces:
      end = start + piece.size
      request = piece.request
      request.outputs.append({name: value[start:end] for name, value in outputs.items()})
      start = end
      if piece.end == request.size and not request.future.done():
        parts = request.outputs
        request.future.set_result(parts[0] if len(parts) == 1 else
                                  {name: np.concatenate([part[name] for part in parts])
                                   for name in parts[0]})
        request.outputs = []

  def _call(self, group, pieces):
    if len(pieces) == 1:
      inputs = pieces[0].inputs()
    else:
      inputs = {name: np.concatenate([piece.inputs()[name] for piece in pieces])
                for name in pieces[0].request.inputs}
    size = sum(piece.size for piece in pieces)
    start = self._clock()
    outputs = self._run_batch(group, inputs)
    if self._on_batch:
      self._on_batch(group, size, self._clock() - start)
    return outputs
