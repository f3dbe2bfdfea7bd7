"""What bin/'s programs share: `runner` (flags, user errors -> one line and exit 2),
`programs` (the `tlframe-*` entry points), `conversion_flags` (make_tfrecords'
and train's conversion flags). `runner`'s API is re-exported: `cli.run(main)`.
"""

from tlframe.cli.runner import USAGE_EXIT_CODE, check_exists, command, nearest_flags, program, run

__all__ = ["USAGE_EXIT_CODE", "check_exists", "command", "nearest_flags", "program", "run"]
