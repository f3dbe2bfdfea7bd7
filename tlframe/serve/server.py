"""The server's lifecycle: uvicorn with guarded connections and a graceful drain.

`run_server` serves an app (tlframe.serve.app) on one port: connections that
send nothing are closed (`_GuardedH11Protocol`), the number of connections is
bounded, and on SIGTERM the server stops accepting, answers every request it
has accepted, and returns normally (exit status 0).
"""

import contextlib
import signal
import socket
import threading

from absl import logging
import uvicorn
from uvicorn.protocols.http import h11_impl

from tlframe.errors import UserError

DEFAULT_MAX_CONNECTIONS = 256
# Seconds a client has to send a request's head (after connecting or after its previous
# answer), and again its body; slower ones are disconnected or answered 408.
DEFAULT_CLIENT_TIMEOUT_S = 30.0
# Seconds a drain waits for accepted requests before cancelling them.
DRAIN_TIMEOUT_S = 60


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
    raise UserError(f"host={host} port={port}: cannot listen there ({e.strerror}); "
                    "choose another port or host", arguments=["host", "port"]) from None
  state = app.state.server_state
  protocol = type("GuardedH11Protocol", (_GuardedH11Protocol,),
                  {"client_timeout_s": state.client_timeout_s,
                   "max_connections": max_connections})
  config = uvicorn.Config(app, http=protocol, ws="none", log_config=None, access_log=False,
                          lifespan="on", limit_concurrency=max_connections + 1,
                          timeout_graceful_shutdown=DRAIN_TIMEOUT_S)
  _DrainingServer(config, state, on_listening).run(sockets=[sock])
  return state.accepted, state.answered


