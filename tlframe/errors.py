"""The one exception type that means "the user must fix something".

The library takes plain arguments (function keywords, TrainOptions fields) and
is called from Python as well as from bin/'s programs, so its messages speak of
arguments: `records_dir=/x does not exist: ...`, `...; pass overwrite=True to
replace it`. A UserError declares the argument names its message cites
(`arguments`), and a program renders the message with its flags instead
(`with_flags`): `--records_dir=/x does not exist: ...`, `...; pass --overwrite
to replace it`. Only declared names are rewritten, as whole words; a program
whose flag has another name than the argument maps it (tlframe/cli/runner.py).
"""

import re


class UserError(Exception):
  """Bad input or arguments: the CLI prints the message on one line and exits 2.

  The message names the file or argument at fault and says how to fix it; no
  traceback is shown for these.

  arguments: the names of the arguments (Python identifiers, as the caller
  spells them: `records_dir`, `overwrite`) that the message cites. Where the
  message cites one, it writes the bare name (`set patience=0`, `raise
  max_in_memory_features`), `name=value`, or for a boolean `name=True` /
  `name=False`; it uses a declared name for that argument only (not as an
  English word nor inside a path), since `with_flags` rewrites every whole-word
  occurrence of it.
  """

  def __init__(self, message, *, arguments=()):
    super().__init__(message)
    self.arguments = tuple(arguments)
    for name in self.arguments:
      if not name.isidentifier():
        raise ValueError(f"UserError argument {name!r} is not a Python name")

  def with_flags(self, flag_names):
    """The message with each cited argument in `flag_names` ({argument: flag}) as its flag.

    `name=True` becomes `--flag`, `name=False` `--noflag`, `name=value`
    `--flag=value` and a bare `name` `--flag`. A name the message declares
    but `flag_names` lacks, or one it does not declare, stays as it is; so do
    occurrences inside a longer word, a path (`/name`, `name.txt`) or an
    existing flag (`--name`).
    """
    names = [name for name in self.arguments if name in flag_names]
    if not names:
      return str(self)
    # Longest first, so that of two names where one ends the other the longer one wins.
    alternatives = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w./=-])({alternatives})(?:=(True|False)\b)?(?![\w/-]|\.\w)")

    def flag(match):
      name, boolean = match.group(1), match.group(2)
      prefix = "no" if boolean == "False" else ""
      return f"--{prefix}{flag_names[name]}"

    return pattern.sub(flag, str(self))
