"""The console entry points `tlframe-<program>`: each runs bin/<program> as `__main__`.

bin/ stays the one source of the programs (flags are parsed only there); the
package ships it as `tlframe_bin` (pyproject.toml), so that after `pip
install` the programs run from any folder, e.g. `tlframe-train --help`. An
entry point's name says which program: `tlframe-make-tfrecords` runs
bin/make_tfrecords.
"""

import importlib.util
import os
import runpy
import sys

PREFIX = "tlframe-"


def program_path(name):
  """The file of bin/<name> where it is installed (a clone's bin/ for editable installs)."""
  spec = importlib.util.find_spec("tlframe_bin")
  for directory in spec.submodule_search_locations if spec else ():
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  raise SystemExit(f"error: program {name!r} is not installed with tlframe; reinstall tlframe")


def main():
  """Runs the program named by this entry point (argv[0]) with the command line as given."""
  command = os.path.basename(sys.argv[0])
  command = os.path.splitext(command)[0] if command.endswith(".exe") else command
  name = command[len(PREFIX):].replace("-", "_") if command.startswith(PREFIX) else command
  path = program_path(name)
  sys.argv[0] = command
  runpy.run_path(path, run_name="__main__")
