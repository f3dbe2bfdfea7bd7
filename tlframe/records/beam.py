"""make_tfrecords as an Apache Beam pipeline: the same conversion on Dataflow, Flink or Spark.

Only the shards are written by the pipeline; everything before and after them
is the local converter's own code, run in the launching process: the plan
(`records.plan_conversion`: listing, labels, splits, which file goes where)
and the finish (`records.write_conversion`: resuming, the checks after
decoding, labels.txt, manifest.json). The pipeline is

  plan file -> one element per file (its shard and position) -> reshuffle
  -> records.convert_image -> group by shard -> sort by position
  -> records.write_shard

so every shard holds the files the local converter puts there, in its order,
with the same bytes per record: the shards, labels.txt and manifest.json are
byte-identical to the local converter's (tests/test_records_beam.py).

A worker writes a shard from its group in memory: at most --shard_size
encoded images. Work that a runner retries or runs twice writes the same bytes
under the same name (temp file, sidecar, rename), so it is harmless, and the
sidecars let a rerun, with either converter, skip the finished shards.

Workers reach the output directory and the images by tf.io.gfile: both must
be on a filesystem every worker sees (gs:// on Dataflow), and the workers
need tlframe installed (docs/data.md).
"""

import functools
import json
import posixpath
import threading

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from absl import logging
import tensorflow as tf

from tlframe.util import fileio
from tlframe import records
from tlframe.errors import UserError
from tlframe.util.progress import Progress

# The shards the pipeline writes, one JSON line each, beside the sidecars. A
# file, not beam.Create: a big data set's list would not fit in a job graph.
_PLAN_FILENAME = "beam_plan.jsonl"
_PROGRESS_POLL_SECONDS = 10.0
# Beam's DirectRunner first tries Prism, a binary it downloads at run time,
# which ignores --direct_num_workers and --direct_running_mode; the FnApiRunner
# is the DirectRunner's own batch engine, which honours them, offline too.
_BEAM_RUNNER_NAMES = {"DirectRunner": "FnApiRunner"}


def convert(output_dir, runner, pipeline_args=(), overwrite=False, **conversion):
  """`records.convert` with the shards written by a Beam pipeline on `runner`.

  `pipeline_args` are Beam pipeline options (`--project=...`,
  `--direct_num_workers=2`, ...); `conversion` takes `records.convert`'s
  keyword arguments but `num_workers` (the runner decides the parallelism).
  Returns the manifest, equal to the local converter's.
  """
  plan = records.plan_conversion(**conversion)
  options = PipelineOptions([f"--runner={_BEAM_RUNNER_NAMES.get(runner, runner)}",
                             *pipeline_args])
  decoding = {"max_pixels": plan.options["max_pixels"], "max_side": plan.options["max_side"]}
  return records.write_conversion(output_dir, plan, functools.partial(
      _write_shards, output_dir, runner, options, plan.labels, decoding), overwrite=overwrite)


def _write_shards(output_dir, runner, options, labels, decoding, todo):
  """Runs the pipeline that writes `todo`; returns their sidecars by shard name."""
  if not todo:
    return {}
  plan_path = records.progress_path(output_dir, _PLAN_FILENAME)
  fileio.atomic_write_text(plan_path, "".join(
      json.dumps([shard.split, shard.name, shard.fingerprint, [list(s) for s in shard.sources]])
      + "\n" for shard in todo))
  logging.info("Writing %d shards (%d files) with the %s", len(todo),
               sum(len(shard.sources) for shard in todo), runner)
  pipeline = beam.Pipeline(options=options)
  _ = (pipeline
       | "Plan" >> beam.Create([plan_path])
       | "Files" >> beam.FlatMap(_files_of_plan)
       | "Spread" >> beam.Reshuffle()
       | "Convert" >> beam.Map(_convert, **decoding)
       | "GroupByShard" >> beam.GroupByKey()
       | "Write" >> beam.Map(_write, output_dir=output_dir, labels=labels))
  try:
    with _ProgressLog(output_dir, todo):
      pipeline.run().wait_until_finish()
  except Exception as e:  # pylint: disable=broad-except  (each runner fails in its own type)
    # The runner has logged the worker's error and traceback; a rerun cleans up.
    tf.io.gfile.remove(plan_path)
    cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise UserError(f"the {runner} pipeline failed: {cause}; fix that and rerun the same "
                    "command (the finished shards are kept)") from None
  # Not on Ctrl-C: a job on a service (Dataflow) goes on without this process.
  tf.io.gfile.remove(plan_path)
  sidecars = {shard.name: records.read_sidecar(output_dir, shard) for shard in todo}
  missing = [name for name, sidecar in sidecars.items() if sidecar is None]
  if missing:
    raise RuntimeError(f"the pipeline ended but did not write {missing[0]} "
                       f"({len(missing)} of {len(todo)} shards missing)")
  return sidecars


def _files_of_plan(plan_path):
  """(shard, (position, source)) per file of the plan; a shard is (split, name, fingerprint)."""
  with tf.io.gfile.GFile(plan_path, "r") as f:
    for line in f:
      split, name, fingerprint, sources = json.loads(line)
      for position, source in enumerate(sources):
        yield (split, name, fingerprint), (position, records.Source(*source))


def _convert(shard_and_file, max_pixels, max_side):
  shard, (position, source) = shard_and_file
  return shard, (position, source, records.convert_image(source.path, max_pixels, max_side))


def _write(shard_and_files, output_dir, labels):
  """Writes one shard from its converted files (any order: sorted here by position)."""
  (split, name, fingerprint), files = shard_and_files
  files = sorted(files, key=lambda file: file[0])
  shard = records.Shard(split, name, [source for _, source, _ in files], fingerprint)
  sidecar = records.write_shard(output_dir, shard, (result for _, _, result in files), labels)
  logging.info("Wrote %s: %d records, %d files skipped", name, sidecar["records"],
               len(sidecar["skipped"]))
  return name


class _ProgressLog:
  """Logs shards done/total while a pipeline runs, on any runner: it counts the sidecars."""

  def __init__(self, output_dir, todo):
    self._pattern = records.sidecar_path(output_dir, "*")
    self._names = {posixpath.basename(records.sidecar_path(output_dir, shard.name))
                   for shard in todo}
    self._progress = Progress(len(todo), what="shards")
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, name="beam-progress", daemon=True)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, exc_type, unused_exc, unused_traceback):
    self._stop.set()
    self._thread.join()
    if exc_type is None:
      self._count()  # the last line: all done, with the rate

  def _watch(self):
    while not self._stop.wait(_PROGRESS_POLL_SECONDS):
      self._count()

  def _count(self):
    try:
      done = sum(1 for path in tf.io.gfile.glob(self._pattern)
                 if posixpath.basename(path) in self._names)
    except tf.errors.OpError:
      return  # a listing that failed now may work next time; progress is only a log
    if done > self._progress.done:
      self._progress.update(done - self._progress.done)
