"""bin/train's own records: photos converted in the same process, by default into
`<model_dir>/records` (model_dir.RECORDS_DIRNAME).

`records_for_training(records_dir, **conversion)` takes records.convert's
arguments. When `records_dir` already holds this very conversion, finished
(the same plan: files, labels, splits and options; every shard's sidecar and
the manifest agree), it writes nothing and decodes nothing, so that the rerun
of a finished model costs no conversion. Otherwise it converts; a conversion
killed midway resumes from its finished shards, as bin/make_tfrecords' does.
"""

import json

import tensorflow as tf
from absl import logging

from tlframe import records


def records_for_training(records_dir, *, num_workers=1, **conversion):
  """(manifest, whether it converted now) of the records of `conversion` in `records_dir`."""
  plan = records.plan_conversion(**conversion)
  if _holds(records_dir, plan):
    logging.info("%s already holds the records of these photos: not converting again",
                 records_dir)
    return records.read_manifest(records_dir), False
  return records.convert(records_dir, num_workers=num_workers, **conversion), True


def _holds(records_dir, plan):
  """Whether `records_dir` holds `plan`'s finished conversion (its manifest last written)."""
  if not tf.io.gfile.exists(tf.io.gfile.join(records_dir, records.MANIFEST_FILENAME)):
    return False
  manifest = records.read_manifest(records_dir)
  if manifest.get("options") != json.loads(json.dumps(plan.options)):
    return False
  written = {shard["name"]: shard["sha256"] for split in manifest["splits"].values()
             for shard in split["shards"]}
  if set(written) != {shard.name for shard in plan.shards}:
    return False
  for shard in plan.shards:
    sidecar = records.read_sidecar(records_dir, shard)
    if sidecar is None or sidecar.get("sha256") != written[shard.name] or not tf.io.gfile.exists(
        tf.io.gfile.join(records_dir, shard.name)):
      return False
  return True
