"""What a model dir keeps between runs, and whether a new run may use it.

A model dir is a model of one set of records through one backbone. A run
records its settings in `run_options.json`; the next run into the same dir:
- with the same settings resumes from the last checkpoint;
- with other head settings (loss, l2, epochs, ...) trains a new head on the
  same features; the earlier run's TensorBoard logs move to
  `logs/earlier-<N>/`, so TensorBoard shows both runs;
- with other records or another backbone (what the model is a model of) is
  refused, naming what changed, unless `overwrite`, which removes the earlier
  model's files (and says which) first.
A folder that holds other files and no run_options.json is refused too
(unless `overwrite`, which still removes only what bin/train writes). The
records bin/train converts from photos (`records/`, RECORDS_DIRNAME) are the
model's input, not one of its outputs: they are neither foreign nor removed.

`finished_run` tells a rerun with nothing changed from one with work to do.
"""

import dataclasses
import hashlib
import json
import os

import tensorflow as tf
from absl import logging

from tlframe.util import fileio
from tlframe import options as options_lib
from tlframe import records
from tlframe.errors import UserError
from tlframe.train.layout import (CHECKPOINT_DIRNAME, LOGS_DIRNAME, METRICS_FILENAME, OUTPUTS,
                                  RECORDS_DIRNAME, RUN_OPTIONS_FILENAME)

# What the model is a model of: a change makes another model.
_MODEL_IDENTITY = ("records", "backbone", "features", "input_size", "precision", "resize_mode")
# How a run is carried out, not what it computes: a change still resumes.
_NOT_IN_RUN_IDENTITY = ("strategy", "checkpoint_every_epochs", "extract_batch_size",
                        "log_every_steps", "num_thumbnails_per_class", "overwrite", "export",
                        "force_export", "feature_cache_dir", "max_in_memory_features",
                        "backbone_budget_s")


def records_identity(records_dir):
  """The records dir and a digest of its shards' sha256 (from the manifest)."""
  manifest = records.read_manifest(records_dir)
  shards = [[split, shard["name"], shard["sha256"]]
            for split, info in sorted(manifest["splits"].items()) for shard in info["shards"]]
  digest = hashlib.sha256(json.dumps(shards).encode("utf-8")).hexdigest()[:16]
  return f"{os.path.abspath(records_dir) if '://' not in records_dir else records_dir}@{digest}"


def run_identity(options):
  """The settings that decide a run's result, as JSON-ready data."""
  identity = {name: value for name, value in dataclasses.asdict(options).items()
              if name not in _NOT_IN_RUN_IDENTITY and name != "records_dir"}
  identity["records"] = records_identity(options.records_dir)
  return json.loads(json.dumps(identity))


def _current_names(identity):
  """A recorded run identity with values renamed since as they are named now
  (`features`: logits -> classification), so an earlier run's dir still resumes."""
  if isinstance(identity, dict) and "features" in identity:
    return dict(identity, features=options_lib.canonical_features(identity["features"]))
  return identity


def _existing_outputs(model_dir):
  return [name for name in OUTPUTS if tf.io.gfile.exists(os.path.join(model_dir, name))]


def _remove(model_dir, names):
  for name in names:
    path = os.path.join(model_dir, name)
    if tf.io.gfile.isdir(path):
      tf.io.gfile.rmtree(path)
    elif tf.io.gfile.exists(path):
      tf.io.gfile.remove(path)


def _archive_logs(model_dir):
  """Moves logs/{train,validation,...} to logs/earlier-<N>/ and returns that folder."""
  logs = os.path.join(model_dir, LOGS_DIRNAME)
  current = [name.rstrip("/") for name in tf.io.gfile.listdir(logs)
             if not name.startswith("earlier-")]
  if not current:
    return None
  earlier = [int(name.rstrip("/")[len("earlier-"):]) for name in tf.io.gfile.listdir(logs)
             if name.startswith("earlier-") and name.rstrip("/")[len("earlier-"):].isdigit()]
  target = os.path.join(logs, f"earlier-{max(earlier, default=0) + 1}")
  tf.io.gfile.makedirs(target)
  for name in current:
    tf.io.gfile.rename(os.path.join(logs, name), os.path.join(target, name))
  return target


def prepare(model_dir, options, *, is_chief=True):
  """Readies `model_dir` for a run with `options`; returns "new", "resume" or "new_head".

  Raises UserError when the dir holds another model (or unrelated files) and
  options.overwrite is off. Only the chief changes files; the other workers
  of a multi-worker run only check.
  """
  identity = run_identity(options)
  path = os.path.join(model_dir, RUN_OPTIONS_FILENAME)
  previous = None
  if tf.io.gfile.exists(path):
    try:
      previous = _current_names(fileio.read_json(path))
    except (ValueError, UnicodeDecodeError):
      previous = {}  # unreadable: treated as another model's
  outputs = _existing_outputs(model_dir)
  others = [name for name in (tf.io.gfile.listdir(model_dir) if tf.io.gfile.isdir(model_dir)
                              else [])
            if name.rstrip("/") not in OUTPUTS + (RECORDS_DIRNAME,) and not name.startswith(".")]

  changed = sorted(name for name in identity if (previous or {}).get(name) != identity[name])
  other_model = (previous is not None and any(name in _MODEL_IDENTITY for name in changed)
                 or previous is None and (outputs or others))
  if other_model:
    if previous is not None:
      what = ", ".join(f"{name} {previous.get(name)!r} -> {identity[name]!r}" for name in changed
                       if name in _MODEL_IDENTITY)
      reason = f"holds a model of other data or another backbone ({what})"
    else:
      shown = ", ".join(sorted(outputs + others)[:5])
      reason = f"is not empty and holds no tlframe run ({shown})"
    if not options.overwrite:
      raise UserError(f"model_dir={model_dir} {reason}: use another model_dir, or pass "
                      f"overwrite=True to replace {'its model' if outputs else 'it'} (removes "
                      f"{', '.join(outputs) if outputs else 'nothing of yours'})",
                      arguments=["model_dir", "overwrite"])
    if is_chief:
      logging.warning("--overwrite: removing %s from %s", ", ".join(outputs) or "nothing",
                      model_dir)
      _remove(model_dir, outputs)
    previous = None
  state = "new" if previous is None else ("resume" if not changed else "new_head")
  if state == "new_head" and is_chief:
    logging.info("Head settings changed since the last run in %s (%s): training a new head on "
                 "the same features", model_dir, ", ".join(changed))
    _remove(model_dir, [CHECKPOINT_DIRNAME])
    if tf.io.gfile.isdir(os.path.join(model_dir, LOGS_DIRNAME)):
      archived = _archive_logs(model_dir)
      if archived:
        logging.info("The earlier run's TensorBoard logs are now in %s", archived)
  if is_chief:
    tf.io.gfile.makedirs(model_dir)
    fileio.atomic_write_json(path, identity)
  return state


def finished_run(model_dir, options):
  """metrics.json of the finished run of these very settings in `model_dir`, else None.

  Finished: run_options.json and metrics.json (written last, holding the
  run's `run_identity`) both name these settings. Reads only; whether the
  export is still there is the caller's to check.
  """
  identity = run_identity(options)
  try:
    previous = fileio.read_json(os.path.join(model_dir, RUN_OPTIONS_FILENAME))
    metrics = fileio.read_json(os.path.join(model_dir, METRICS_FILENAME))
  except (tf.errors.NotFoundError, FileNotFoundError, ValueError, UnicodeDecodeError):
    return None
  if _current_names(previous) != identity or not isinstance(metrics, dict) or _current_names(
      metrics.get("run_identity")) != identity:
    return None
  return metrics
