"""Shared plumbing of the thin absl programs in bin/; only bin/ imports it.

Importing it (first thing in every program, before TensorFlow loads) filters
TensorFlow's native start-up noise out of stderr: CUDA probing on CPU-only
machines ("failed call to cuInit", "Could not find cuda drivers"), the oneDNN
notice, absl's "before InitializeLog" banner, INFO lines of the C++ runtime
and libjpeg's "Improper call to JPEG library". Those are written by C++ straight
to file descriptor 2, where no Python setting reaches, so fd 2 becomes a pipe
whose reader thread passes every other line on. TLFRAME_NATIVE_LOGS=1 shows
everything.

`run(main)` then parses the flags (one `error:` line and exit 2 for a bad
flag, naming the flagfile and line it came from; --help exits 0), expands
`~` in flag values, and turns a UserError, or a disk that is full or
read-only, into one `error:` line and exit 2.
"""

import atexit
import errno
import importlib.util
import logging
import os
import re
import sys
import threading

from absl import app
from absl import flags
from absl import logging as absl_logging

from tlframe.errors import UserError

USAGE_EXIT_CODE = 2
NATIVE_LOGS_ENV = "TLFRAME_NATIVE_LOGS"
_HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")
# A native (C++) log line: severity, date, time, thread, source file:line] -- in
# absl's format ("I0000 00:00:1795760330.016 19932 port.cc:153] ...") or TF's
# older one ("2026-11-27 06:19:16.123456: I tensorflow/core/x.cc:42] ..."). A C++
# source file tells them from absl's Python log lines, which name a .py file.
_NATIVE_LINE = re.compile(rb"^(?:([IWEF])\d{4} [\d:.]+\s+\d+ |\d{4}-\d\d-\d\d [\d:.]+: ([IWEF]) )"
                          rb"[\w/.\-]+\.(?:cc|h|cpp|c):\d+\] (.*)")
# Native warnings and errors that are start-up probing, not trouble.
_NATIVE_NOISE = re.compile(rb"cuInit|cuda|CUDA|TensorRT|oneDNN|"
                           rb"computation placer|Unable to register cu|rocm|ROCm")
_PLAIN_NOISE = (b"WARNING: All log messages before absl::InitializeLog() is called",
                b"Improper call to JPEG library in state")


def _is_noise(line):
  match = _NATIVE_LINE.match(line)
  if match:
    severity = match.group(1) or match.group(2)
    return severity == b"I" or bool(_NATIVE_NOISE.search(match.group(3)))
  return line.startswith(_PLAIN_NOISE)


def _filter_native_stderr():
  """Routes fd 2 through a thread that drops `_is_noise` lines (see the module doc)."""
  if os.environ.get(NATIVE_LOGS_ENV, "") not in ("", "0"):
    return
  # TensorFlow's own INFO level too, where it honours the setting.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  try:
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
  except OSError:
    return

  def forward():
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
      for line in iter(pipe.readline, b""):
        if not _is_noise(line):
          os.write(original, line)

  thread = threading.Thread(target=forward, name="native-stderr-filter", daemon=True)
  thread.start()

  def restore():
    # Closing the pipe's last writer ends the reader once it has passed everything on.
    try:
      sys.stderr.flush()
    except (OSError, ValueError):
      pass
    os.dup2(original, 2)
    thread.join(timeout=5)

  atexit.register(restore)


_filter_native_stderr()


class _TensorFlowInfoFilter(logging.Filter):
  """Drops INFO records logged through absl from inside the tensorflow package.

  Some TensorFlow modules log with absl directly (functional_saver's "Sharding
  callback duration", signature_serialization's renamed inputs on every export),
  so the "tensorflow" logger's level does not reach them.
  """

  def __init__(self):
    super().__init__()
    spec = importlib.util.find_spec("tensorflow")   # finds the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec else []
    self._prefixes = tuple(os.path.join(location, "") for location in locations)

  def filter(self, record):
    return record.levelno > logging.INFO or not record.pathname.startswith(self._prefixes)


def run(main):
  """Runs `main` under absl with tlframe's flag errors, `~` expansion and UserError handling."""

  def guarded_main(argv):
    # TensorFlow's own INFO lines (checkpoint sharding, dataset buffers, SavedModel
    # signatures) would bury tlframe's progress lines; its warnings and errors still show.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    if os.environ.get(NATIVE_LOGS_ENV, "") in ("", "0"):
      absl_logging.get_absl_handler().addFilter(_TensorFlowInfoFilter())
    try:
      return main(argv)
    except UserError as e:
      _fail(str(e))
    except Exception as e:  # pylint: disable=broad-except  (OSError or TensorFlow's errors)
      message = _disk_error(e)
      if message is None:
        raise
      _fail(message)

  app.run(guarded_main, flags_parser=_parse_flags)


def _fail(message):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(USAGE_EXIT_CODE)


def _disk_error(error):
  """One line for a full or read-only disk or a denied write (OSError or TF's errors), else None."""
  code = getattr(error, "errno", None)
  text = getattr(error, "message", None) or str(error)
  full = code == errno.ENOSPC or "No space left on device" in text
  read_only = code == errno.EROFS or "Read-only file system" in text
  denied = (code in (errno.EACCES, errno.EPERM) or type(error).__name__ == "PermissionDeniedError"
            or "Permission denied" in text)
  if not (full or read_only or denied):
    return None
  path = getattr(error, "filename", None) or _path_in(text) or "the output folder"
  if full:
    return (f"cannot write {path}: no space left on device; free some space and rerun "
            "(finished work is kept and reused)")
  if read_only:
    return f"cannot write {path}: the file system is read-only; choose a writable folder"
  return f"cannot write {path}: permission denied; choose a folder you can write to"


def _path_in(text):
  match = re.search(r"(?:^|\s|')(/[^\s':;,]+)", text)
  return match.group(1) if match else None


def _parse_flags(argv):
  """absl's flag parsing with tlframe's errors: exit 0 for help, exit 2 with one line else."""
  args = argv[1:argv.index("--", 1)] if "--" in argv[1:] else argv[1:]
  if any(arg in _HELP_FLAGS for arg in args):
    app.usage(shorthelp=True, writeto_stdout=True)
    sys.exit(0)
  try:
    remaining = flags.FLAGS(argv)
  except flags.CantOpenFlagFileError as e:
    _fail(f"{_flagfile_in(str(e), argv)}: cannot open the flagfile; check its path")
  except flags.Error as e:
    _fail(_describe_flag_error(e, argv))
  _expand_home_in_flags()
  _check_filesystems()
  return remaining


def _flagfile_in(message, argv):
  for arg in argv[1:]:
    if arg.startswith("--flagfile="):
      path = arg.split("=", 1)[1]
      if path in message:
        return f"--flagfile={path}"
  return "--flagfile"


def _describe_flag_error(error, argv):
  """`error`'s message with the flag's origin (flagfile and line) when it came from a file."""
  name = getattr(error, "flagname", None)
  if name is None:
    match = re.search(r"flag --(\w+)", str(error))
    name = match.group(1) if match else None
  message = str(error).strip().splitlines()[0]
  if isinstance(error, flags.UnrecognizedFlagError):
    value = getattr(error, "flagvalue", "") or f"--{name}"
    message = f"{value}: unknown flag; see --help for the flags"
  where = _origin_in_flagfiles(name, argv) if name else None
  return f"{where}: {message}" if where else message


def _origin_in_flagfiles(name, argv):
  """'FILE line N' for the flagfile line that sets --name (or --noname), else None."""
  pattern = re.compile(rf"^\s*--(no)?{re.escape(name)}(=|\s*$)")
  pending = [arg.split("=", 1)[1] for arg in argv[1:] if arg.startswith("--flagfile=")]
  seen = set()
  while pending:
    path = os.path.expanduser(pending.pop(0))
    if path in seen:
      continue
    seen.add(path)
    try:
      with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    except OSError:
      continue
    for number, line in enumerate(lines, 1):
      if pattern.match(line):
        return f"{path} line {number}"
      if line.strip().startswith("--flagfile="):
        pending.append(line.strip().split("=", 1)[1])
  return None


def _check_filesystems():
  """One line now for a flag's path on a filesystem this TensorFlow lacks (s3:// without
  tensorflow-io), rather than a "no such directory" later. http(s):// is a TF-Hub handle."""
  for flag in flags.FLAGS._flags().values():  # pylint: disable=protected-access
    for value in flag.value if isinstance(flag.value, list) else [flag.value]:
      if (isinstance(value, str) and "://" in value
          and not value.startswith(("http://", "https://"))):
        from tlframe import fileio  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
        try:
          fileio.check_filesystem(value, f"--{flag.name}")
        except UserError as e:
          _fail(str(e))


def _expand_home_in_flags():
  """`~` and `~user` at the start of any flag value become the home folder.

  The shell expands `~` only where a word starts, so `--image_dir=~/photos`
  reaches the program unexpanded.
  """
  for flag in flags.FLAGS._flags().values():  # pylint: disable=protected-access
    value = flag.value
    if isinstance(value, str) and value.startswith("~"):
      flag.value = os.path.expanduser(value)
    elif isinstance(value, list) and any(isinstance(v, str) and v.startswith("~") for v in value):
      flag.value = [os.path.expanduser(v) if isinstance(v, str) else v for v in value]
