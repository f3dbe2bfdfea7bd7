"""The one exception type that means "the user must fix something"."""


class UserError(Exception):
  """Bad input or flags: the CLI prints the message on one line and exits 2.

  The message names the file or flag at fault and says how to fix it; no
  traceback is shown for these.
  """
