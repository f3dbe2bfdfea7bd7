"""Progress lines for long work: items done/total, items/s and ETA, through absl logging."""

import time

from absl import logging


class Progress:
  """Logs `what: done/total (pct), rate/s, ETA` at most every `interval_s` seconds."""

  def __init__(self, total, what="images", interval_s=5.0, clock=time.monotonic):
    self.total = total
    self.what = what
    self.interval_s = interval_s
    self._clock = clock
    self._start = clock()
    self._last_log = self._start
    self.done = 0

  def update(self, n=1):
    self.done += n
    now = self._clock()
    if now - self._last_log >= self.interval_s or self.done == self.total:
      self._last_log = now
      logging.info("%s", self.line())

  @property
  def elapsed_s(self):
    return self._clock() - self._start

  @property
  def rate(self):
    elapsed = self.elapsed_s
    return self.done / elapsed if elapsed > 0 else 0.0

  def line(self):
    rate = self.rate
    if self.total:
      pct = 100.0 * self.done / self.total
      remaining = (self.total - self.done) / rate if rate > 0 else float("inf")
      eta = _format_seconds(remaining)
      return (f"{self.what}: {self.done}/{self.total} ({pct:.0f}%), "
              f"{rate:.1f} {self.what}/s, ETA {eta}")
    return f"{self.what}: {self.done}, {rate:.1f} {self.what}/s"


def _format_seconds(seconds):
  if seconds == float("inf"):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
