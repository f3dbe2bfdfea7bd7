"""Shared plumbing of the thin absl programs in bin/; only bin/ imports it.

Importing it comes first in every program: it imports `tlframe`, whose import
keeps TensorFlow's native start-up noise out of stderr (tlframe/util/native_logs.py)
before TensorFlow loads, and it keeps TensorFlow's start from importing Keras,
which no program uses (tlframe/util/lazy_keras.py: a second of every start).

`run(main)` then parses the flags (one `error:` line and exit 2 for a bad
flag, naming the flagfile and line it came from and, for an unknown one, the
nearest flag names; --help exits 0), expands `~` in flag values, and turns a
UserError, or a disk that is full or read-only, into one `error:` line and
exit 2. A UserError's message cites the library's arguments (tlframe/errors.py);
the line names the program's flags instead: each argument the error declares
that is a flag of the program, under its own name or the one `flag_names` maps
it to. `command(name)` spells a console command (tensorboard, tlframe-predict)
so that a printed hint runs as printed.
"""

import atexit
import difflib
import errno
import importlib.util
import logging
import os
import re
import shutil
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging

from tlframe.util import lazy_keras
from tlframe.util import native_logs
from tlframe.cli import programs
from tlframe.errors import UserError

lazy_keras.defer()

USAGE_EXIT_CODE = 2
_HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")
_SUGGESTIONS = 3


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


def run(main, *, exit_at_once=False, flag_names=None):
  """Runs `main` under absl with tlframe's flag errors, `~` expansion and UserError handling.

  flag_names: {argument: flag} for a library argument that this program sets
  from a flag of another name (bin/classify's --labels is `labels_file`), so
  that a UserError citing the argument names the flag.
  exit_at_once: when `main` returns, run the exit handlers (flushing the logs and
  output) and end the process without Python's teardown of TensorFlow's objects,
  which takes seconds after a training run and has nothing left to write.
  """

  def guarded_main(argv):
    # TensorFlow's own INFO lines (checkpoint sharding, dataset buffers, SavedModel
    # signatures) would bury tlframe's progress lines; its warnings and errors still show.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    if native_logs.enabled():
      absl_logging.get_absl_handler().addFilter(_TensorFlowInfoFilter())
    try:
      status = main(argv)
    except UserError as e:
      _fail(as_flags(e, flag_names))
    except Exception as e:  # pylint: disable=broad-except  (OSError or TensorFlow's errors)
      message = _disk_error(e)
      if message is None:
        raise
      _fail(message)
    if exit_at_once and not status:
      atexit._run_exitfuncs()  # pylint: disable=protected-access  (what a normal exit runs)
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(0)  # pylint: disable=protected-access
    return status

  app.run(guarded_main, flags_parser=_parse_flags)


def as_flags(error, flag_names=None):
  """The UserError's message with the arguments it cites that are this program's flags as
  those flags (`flag_names` maps an argument to a flag of another name)."""
  flag_names = flag_names or {}
  present = {}
  for argument in error.arguments:
    flag = flag_names.get(argument, argument)
    if flag in flags.FLAGS:
      present[argument] = flag
  return error.with_flags(present)


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
    nearest = nearest_flags(name) if name else []
    hint = f"did you mean {' or '.join(f'--{n}' for n in nearest)}? " if nearest else ""
    message = f"{value}: unknown flag; {hint}see --help for the flags"
  where = _origin_in_flagfiles(name, argv) if name else None
  return f"{where}: {message}" if where else message


def nearest_flags(name):
  """The program's flag names nearest to the unknown `name`, nearest first (at most 3).

  Close spellings (difflib, as git and pip suggest commands), then flags whose
  words' initials `name` spells, or that it starts (`--lr`: --learning_rate).
  absl's own flags (logging, --flagfile) are left out; `--noname` counts for a
  boolean --name.
  """
  names = []
  for module, module_flags in flags.FLAGS.flags_by_module_dict().items():
    if module.startswith("absl."):
      continue
    for flag in module_flags:
      names.append(flag.name)
      if flag.boolean:
        names.append(f"no{flag.name}")
  names = sorted(set(names))
  close = difflib.get_close_matches(name, names, n=_SUGGESTIONS, cutoff=0.7)
  if len(name) >= 2:
    close += [n for n in names if "".join(word[:1] for word in n.split("_")) == name]
    close += [n for n in names if n.startswith(name) and not n.startswith("no")]
  return list(dict.fromkeys(close))[:_SUGGESTIONS]


def command(name):
  """How to type the console command `name` (tensorboard, tlframe-predict) so it runs here.

  `name` itself where PATH finds this interpreter's own copy (an activated
  venv) or the interpreter has none; else the path to the copy beside the
  interpreter (`.venv/bin/tensorboard` from a non-activated venv), relative to
  the current folder when inside it.
  """
  own = os.path.join(os.path.dirname(sys.executable), name)
  if not os.access(own, os.X_OK):
    return name
  found = shutil.which(name)
  if found and os.path.realpath(found) == os.path.realpath(own):
    return name
  relative = os.path.relpath(own)
  return relative if "/" in relative and not relative.startswith("..") else own


def program(name):
  """How to type the bin/ program `name` (predict, make_tfrecords) in a hint that runs as printed.

  Its console command (`tlframe-predict`, see `command`) where tlframe is
  installed beside this interpreter, else this interpreter on the program's file.
  """
  console = programs.PREFIX + name.replace("_", "-")
  if os.access(os.path.join(os.path.dirname(sys.executable), console), os.X_OK):
    return command(console)
  return f"{sys.executable} {os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), name)}"


def check_exists(path, flag, fix):
  """UserError '--flag=path does not exist: fix' for a missing local path, before TensorFlow
  loads. Paths on other filesystems (gs://, ...) are left to the run, which needs TensorFlow."""
  if path and "://" not in path and not os.path.exists(path):
    raise UserError(f"{flag}={path} does not exist: {fix}")


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
        from tlframe.util import fileio  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
        try:
          fileio.check_filesystem(value, flag.name)
        except UserError as e:
          _fail(as_flags(e))


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
