"""Keeps TensorFlow's native start-up noise out of stderr; `import tlframe` installs it.

TensorFlow's C++ runtime writes straight to file descriptor 2, where no Python
setting reaches: CUDA probing on CPU-only machines ("failed call to cuInit",
"Could not find cuda drivers"), oneDNN notices, absl's "before InitializeLog"
banner, INFO lines, libjpeg's "Improper call to JPEG library", and an op's error
("OP_REQUIRES failed", "Local rendezvous is aborting") that reaches Python as
an exception anyway. To a user they look like failures. So fd 2 becomes a pipe whose reader
thread passes every other line on, for the bin/ programs and the library alike
(`tlframe.Classifier` in a user's script or notebook). TLFRAME_NATIVE_LOGS=1
shows everything.
"""

import atexit
import os
import re
import sys
import threading

try:
  import fcntl
except ImportError:   # Windows
  fcntl = None

ENV = "TLFRAME_NATIVE_LOGS"
# A native (C++) log line: severity, date, time, thread, source file:line] -- in
# absl's format ("I0000 00:00:1795760330.016 19932 port.cc:153] ...") or TF's
# older one ("2026-11-27 06:19:16.123456: I tensorflow/core/x.cc:42] ..."). A C++
# source file tells them from absl's Python log lines, which name a .py file.
_NATIVE_LINE = re.compile(rb"^(?:([IWEF])\d{4} [\d:.]+\s+\d+ |\d{4}-\d\d-\d\d [\d:.]+: ([IWEF]) )"
                          rb"[\w/.\-]+\.(?:cc|h|cpp|c):\d+\] (.*)")
# Native warnings and errors that are start-up probing, or an op's error that
# reaches Python as an exception (which tlframe reports, naming the file) and is
# not trouble of its own.
_NATIVE_NOISE = re.compile(rb"cuInit|cuda|CUDA|TensorRT|oneDNN|"
                           rb"computation placer|Unable to register cu|rocm|ROCm|"
                           rb"Local rendezvous is aborting|OP_REQUIRES failed")
_PLAIN_NOISE = (b"WARNING: All log messages before absl::InitializeLog() is called",
                b"Improper call to JPEG library in state")
# The pipe's room for what is written to fd 2 while the reader thread cannot run: C code
# that holds the GIL as it writes (`python -X importtime`: ~300 KB as TensorFlow imports)
# would wait forever on a full pipe of the default 64 KB.
_PIPE_BYTES = 1 << 20
_installed = False


def is_noise(line):
  """Whether one stderr line (bytes) is TensorFlow noise that a user need not see."""
  match = _NATIVE_LINE.match(line)
  if match:
    severity = match.group(1) or match.group(2)
    return severity == b"I" or bool(_NATIVE_NOISE.search(match.group(3)))
  return line.startswith(_PLAIN_NOISE)


def pass_on(lines, write):
  """Calls `write` with each line of `lines` (bytes) that is not `is_noise`."""
  dropping = False
  for line in lines:
    # A dropped line's continuation lines ("\t [[{{function_node ...") go with it.
    dropping = is_noise(line) or (dropping and line[:1] in (b"\t", b" "))
    if not dropping:
      write(line)


def enabled():
  return os.environ.get(ENV, "") in ("", "0")


def filter_stderr():
  """Routes fd 2 through a thread that drops `is_noise` lines (once per process)."""
  global _installed
  if _installed or not enabled():
    return
  _installed = True
  try:
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    _enlarge(write_end)
    pipe_id = _file_id(write_end)
    os.dup2(write_end, 2)
    os.close(write_end)
  except OSError:
    return

  def forward():
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
      pass_on(iter(pipe.readline, b""), lambda line: os.write(original, line))

  thread = threading.Thread(target=forward, name="native-stderr-filter", daemon=True)
  thread.start()

  def restore():
    # Only where fd 2 is still the pipe: a test runner's capture may have replaced
    # it since. Closing the pipe's last writer ends the reader once it has passed
    # everything on.
    try:
      sys.stderr.flush()
    except (OSError, ValueError):
      pass
    if _file_id(2) == pipe_id:
      os.dup2(original, 2)
      thread.join(timeout=5)

  atexit.register(restore)


def _enlarge(pipe):
  try:
    fcntl.fcntl(pipe, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
  except (AttributeError, OSError):   # not Linux, or above /proc/sys/fs/pipe-max-size
    pass


def _file_id(fd):
  try:
    status = os.fstat(fd)
  except OSError:
    return None
  return status.st_dev, status.st_ino
