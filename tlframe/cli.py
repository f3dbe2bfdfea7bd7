"""Shared plumbing for the thin absl programs in bin/."""

import logging
import sys

from absl import app
from absl import flags

from tlframe.errors import UserError

USAGE_EXIT_CODE = 2


def run(main):
  """Runs `main` under absl; a UserError becomes one line on stderr and exit 2."""

  def guarded_main(argv):
    # TensorFlow's own INFO lines (checkpoint sharding, dataset buffers) would
    # bury tlframe's progress lines; its warnings and errors still show.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    try:
      return main(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(USAGE_EXIT_CODE)

  try:
    app.run(guarded_main)
  except flags.Error as e:  # flag validators raising outside main
    print(f"error: {e}", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)
