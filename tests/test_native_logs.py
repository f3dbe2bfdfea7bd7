"""The stderr filter that `import tlframe` installs (tlframe/util/native_logs.py)."""

import subprocess
import sys

from test_train_helpers import subprocess_env


def test_a_flood_written_while_holding_the_gil_passes_through():
  # `python -X importtime` writes a line per module from C, holding the GIL, so the
  # filter's thread cannot read meanwhile: TensorFlow's ~300 KB of them overfilled a
  # default pipe (64 KB) and the import waited forever.
  run = subprocess.run([sys.executable, "-X", "importtime", "-c", "import tlframe, tensorflow"],
                       capture_output=True, text=True, env=subprocess_env(), timeout=120)
  assert run.returncode == 0, run.stderr[-3000:]
  lines = [line for line in run.stderr.splitlines() if line.startswith("import time:")]
  assert len(lines) > 1000 and any(line.endswith("| tensorflow") for line in lines), lines[-5:]
