"""Image files -> sharded TFRecords: the library behind bin/make_tfrecords.

Input is a folder with one sub-folder per class, or a CSV/TSV list of
`path,label`. Every file goes to the train, validation or test split by a
stable hash of its relative path (or by explicit lists), is decoded once with
`imageformat.decode_image` (so whatever lands in a record, the pipeline can read),
and is written as a TF-Slim style tf.train.Example into
`<split>-00000-of-0000N.tfrecord` shards, with `labels.txt` and `manifest.json`
beside them.

Guarantees:
- Deterministic: files are assigned to shards by sorted order before any
  decoding, and worker processes only decode, check and re-encode, so the
  output bytes are the same for any --num_workers.
- Streaming: images pass through one at a time (a small window in flight per
  worker); memory does not grow with the dataset.
- Resumable: a shard is written under a temporary name, its sidecar (record
  count, sha256, per-file results) is written next, and only then is the shard
  renamed into place. A rerun verifies finished shards against their sidecars,
  skips them, and rewrites the rest, producing byte-identical output.
- Bad files (truncated, empty, not an image, unreadable, decompression bombs,
  JPEGs that decode only partially) are skipped with a reason in the manifest;
  the rest still converts. Classes are counted after decoding.
- One run at a time per output directory (`locking.DirectoryLock`); a write
  that fails (disk full, read-only) is one UserError, with temp files removed
  and finished shards kept for the rerun.
- `check_shards` (tlframe.records.integrity) verifies a finished directory's
  shards before training.

A conversion is a plan (`plan_conversion`: every file's split, shard and
position, before any decoding), shards written from it (`write_shard`, here by
`convert`, or on Apache Beam by tlframe.records.beam), and a finish common to both
(`write_conversion`): so both write the same bytes.
"""

import collections
import fnmatch
import hashlib
import json
import posixpath

from absl import logging
import tensorflow as tf

from tlframe.util import fileio
from tlframe import imageformat
from tlframe.util import locking
from tlframe.errors import UserError
from tlframe.records.layout import (LABELS_FILENAME, MANIFEST_FILENAME, MANIFEST_VERSION, SPLITS,
                                    join_path, shard_filename, write_labels)
from tlframe.records.listing import choose_labels, collect_sources, some_names, stable_split
from tlframe.records.shards import (PROGRESS_DIRNAME, Shard, finished_shard, remove_stale_outputs,
                                    remove_temp_files, sidecar_path, write_error, write_shard)
from tlframe.records.workers import ordered_results
from tlframe.util.progress import Progress

DEFAULT_SHARD_SIZE = 1000


# ---------------------------------------------------------------------------
# Shards and resume.

def _plan_shards(sources_by_split, labels, options, shard_size):
  shards = []
  for split in SPLITS:
    sources = sources_by_split[split]
    if not sources:
      continue
    num_shards = -(-len(sources) // shard_size)
    for index in range(num_shards):
      # Contiguous runs of the sorted list: shard contents depend on nothing else.
      chunk = sources[index * len(sources) // num_shards:(index + 1) * len(sources) // num_shards]
      name = shard_filename(split, index, num_shards)
      plan = json.dumps([MANIFEST_VERSION, name, labels, options,
                         [(s.path, s.key, s.label) for s in chunk]])
      shards.append(Shard(split, name, chunk, hashlib.sha256(plan.encode("utf-8")).hexdigest()))
  return shards


# ---------------------------------------------------------------------------
# The conversion.


def convert(output_dir, *, image_dir=None, filelist=None, validation_filelist=None,
            test_filelist=None, test_dir=None, labels=None, validation_percentage=10.0, test_percentage=10.0,
            shard_size=DEFAULT_SHARD_SIZE, max_side=None, max_pixels=imageformat.DEFAULT_MAX_PIXELS,
            num_workers=1, overwrite=False):
  """Converts images to sharded TFRecords in `output_dir`; returns the manifest (also written).

  Exactly one of `image_dir` (one sub-folder per class) or `filelist` (CSV/TSV
  `path,label`). `validation_filelist` / `test_filelist` fix those splits
  explicitly and replace their percentage, as does `test_dir` (a folder of
  one sub-folder per class, all test images); everything else is split by a hash
  of its relative path. `labels` fixes the class order (else sorted names).
  `max_side` downscales larger images; `max_pixels` rejects bigger headers
  before decoding. `num_workers` never changes the output. `overwrite`: convert
  into a folder that holds other files (see `write_conversion`).
  """
  if num_workers < 1:
    raise UserError(f"num_workers={num_workers} must be positive", arguments=["num_workers"])
  plan = plan_conversion(
      image_dir=image_dir, filelist=filelist, validation_filelist=validation_filelist,
      test_filelist=test_filelist, test_dir=test_dir, labels=labels,
      validation_percentage=validation_percentage, test_percentage=test_percentage,
      shard_size=shard_size, max_side=max_side, max_pixels=max_pixels)
  return write_conversion(output_dir, plan, lambda todo: _write_shards_locally(
      output_dir, todo, plan.labels, num_workers, max_pixels, max_side), overwrite=overwrite)


# What a conversion will write, decided before any image is decoded: the
# manifest's options, the class names, whether --labels gave them, the shards
# (each with its sources in order), and the files already skipped or ignored.
Plan = collections.namedtuple("Plan", "options labels labels_given shards skipped ignored")


def plan_conversion(*, image_dir=None, filelist=None, validation_filelist=None,
                    test_filelist=None, test_dir=None, labels=None, validation_percentage=10.0,
                    test_percentage=10.0, shard_size=DEFAULT_SHARD_SIZE, max_side=None,
                    max_pixels=imageformat.DEFAULT_MAX_PIXELS):
  """The `Plan` of a conversion (arguments as `convert`'s): lists, labels, splits and shards."""
  if test_dir and test_filelist:
    raise UserError("give one of test_dir or test_filelist: each is the whole test split",
                    arguments=["test_dir", "test_filelist"])
  split_filelists = {split: path for split, path in
                     (("validation", validation_filelist), ("test", test_filelist)) if path}
  for split in split_filelists:
    logging.info("The %s split comes from --%s_filelist; --%s_percentage is not used",
                 split, split, split)
  validation_percentage = 0.0 if validation_filelist else validation_percentage
  if test_dir:
    logging.info("The test split is --test_dir %s; --test_percentage is not used", test_dir)
  test_percentage = 0.0 if test_filelist or test_dir else test_percentage
  if not (0 <= validation_percentage and 0 <= test_percentage and
          validation_percentage + test_percentage <= 100):
    raise UserError("validation_percentage and test_percentage must be >= 0 and sum to "
                    f"at most 100 (got {validation_percentage} and {test_percentage})",
                    arguments=["validation_percentage", "test_percentage"])
  if shard_size < 1 or max_pixels < 1 or (max_side is not None and max_side < 1):
    raise UserError("shard_size, max_pixels and max_side must be positive",
                    arguments=["shard_size", "max_pixels", "max_side"])

  sources, skipped, ignored = collect_sources(image_dir, filelist, split_filelists, test_dir)
  if ignored:
    logging.warning("Ignored %d files that are not named like images: %s (all are listed in "
                    "the manifest)", len(ignored), some_names([entry["path"] for entry in ignored]))
  labels_given = bool(labels)
  sources, labels = choose_labels(sources, labels, skipped, image_dir)
  sources_by_split = {split: [] for split in SPLITS}
  for source in sorted(sources, key=lambda s: s.key):
    split = source.split or stable_split(source.key, validation_percentage, test_percentage)
    sources_by_split[split].append(source)

  options = {"image_dir": image_dir, "filelist": filelist,
             "validation_filelist": validation_filelist, "test_filelist": test_filelist,
             **({"test_dir": test_dir} if test_dir else {}),
             "labels": labels, "validation_percentage": validation_percentage,
             "test_percentage": test_percentage, "shard_size": shard_size,
             "max_side": max_side, "max_pixels": max_pixels}
  # Decoding options only: the sources and labels are in the fingerprint already.
  shards = _plan_shards(sources_by_split, labels, {"max_side": max_side, "max_pixels": max_pixels},
                        shard_size)
  return Plan(options, labels, labels_given, shards, skipped, ignored)


def write_conversion(output_dir, plan, write_shards, overwrite=False):
  """Carries out `plan` in `output_dir`; returns the manifest (also written).

  `write_shards(todo)` writes the shards that no previous run finished (each
  with `write_shard`, in this process or on other machines) and returns their
  sidecars by shard name. The rest is the same however the shards are
  written: the lock, resuming, the checks after decoding, labels.txt, the
  manifest, and the one error for a failed write.

  `output_dir` must be new, empty (hidden files aside) or an earlier
  conversion's; a folder holding other files is a UserError unless
  `overwrite`, which replaces the files there named like this conversion's
  outputs and keeps the rest. A conversion removes only files a conversion
  wrote: shards its sidecars or manifest list, its own temp files.
  """
  with locking.DirectoryLock(output_dir, what="make_tfrecords"):
    try:
      _check_output_dir(output_dir, overwrite)
      sidecars, todo = _finished_and_todo(output_dir, plan.shards)
      sidecars.update(write_shards(todo))
      _check_classes_after_decoding(output_dir, plan.labels, plan.labels_given, sidecars)
      _check_listed_splits(output_dir, plan, sidecars)
      manifest = _manifest(plan, sidecars)
      write_labels(output_dir, plan.labels)
      fileio.atomic_write_json(join_path(output_dir, MANIFEST_FILENAME), manifest)
    except (tf.errors.OpError, OSError) as e:
      remove_temp_files(output_dir)
      num_finished = len(tf.io.gfile.glob(join_path(output_dir, "*-of-*.tfrecord")))
      raise UserError(write_error(e, output_dir, num_finished),
                      arguments=["output_dir"]) from None
  return manifest


def _check_output_dir(output_dir, overwrite):
  """UserError for a folder that holds files and no earlier conversion, unless `overwrite`.

  An earlier conversion is known by its folder of sidecars (PROGRESS_DIRNAME),
  made before its first shard. With `overwrite`, the files named like a
  conversion's outputs (labels.txt, manifest.json, shards) are removed here:
  the user asked for that; all else stays.
  """
  if tf.io.gfile.isdir(join_path(output_dir, PROGRESS_DIRNAME)):
    return
  names = sorted(name.rstrip("/") for name in tf.io.gfile.listdir(output_dir)
                 if not name.startswith("."))
  if not names:
    return
  like_ours = [name for name in names if name in (LABELS_FILENAME, MANIFEST_FILENAME)
               or any(fnmatch.fnmatchcase(name, f"{split}-*-of-*.tfrecord") for split in SPLITS)]
  if not overwrite:
    replaced = f"replaces {some_names(like_ours)}" if like_ours else "removes none of its files"
    raise UserError(f"output_dir={output_dir} is not empty and holds no make_tfrecords "
                    f"output ({some_names(names)}): give a new or empty folder, or pass "
                    f"overwrite=True to convert into it ({replaced})",
                    arguments=["output_dir", "overwrite"])
  for name in like_ours:
    logging.warning("--overwrite: removing %s", join_path(output_dir, name))
    tf.io.gfile.remove(join_path(output_dir, name))


def _finished_and_todo(output_dir, shards):
  """(the sidecars of shards a previous run finished, by name; the other shards).

  Clears the way first: outputs this plan does not write, temp files, and the
  stale sidecars of the shards still to write (so that a sidecar there means
  its shard is done).
  """
  tf.io.gfile.makedirs(join_path(output_dir, PROGRESS_DIRNAME))
  remove_stale_outputs(output_dir, shards)
  sidecars, todo = {}, []
  for shard in shards:
    sidecar = finished_shard(output_dir, shard)
    if sidecar is not None:
      sidecars[shard.name] = sidecar
      continue
    todo.append(shard)
    if tf.io.gfile.exists(sidecar_path(output_dir, shard.name)):
      tf.io.gfile.remove(sidecar_path(output_dir, shard.name))
  if sidecars:
    logging.info("Resuming: %d of %d shards are already complete", len(sidecars), len(shards))
  return sidecars, todo


def _write_shards_locally(output_dir, todo, labels, num_workers, max_pixels, max_side):
  """Writes `todo` here, decoding in `num_workers` processes; returns their sidecars by name."""
  progress = Progress(sum(len(shard.sources) for shard in todo), what="files")
  results = _counted(ordered_results((s.path for shard in todo for s in shard.sources),
                                      num_workers, max_pixels, max_side), progress)
  return {shard.name: write_shard(output_dir, shard, results, labels) for shard in todo}


def _counted(results, progress):
  for result in results:
    progress.update(1)
    yield result


def _check_classes_after_decoding(output_dir, labels, labels_given, sidecars):
  """At least 2 classes with a converted image, and no class without one unless --labels named it.

  Counted after decoding: a class whose files were all skipped is no class.
  On failure, the sidecars of shards holding that class's skipped files are
  removed, so that the rerun after fixing the files decodes them again.
  """
  converted = collections.Counter(
      entry["label"] for sidecar in sidecars.values() for entry in sidecar["files"])
  skipped = [entry for sidecar in sidecars.values() for entry in sidecar["skipped"]]
  if not converted:
    first = skipped[0]
    raise UserError(f"no usable images: all {len(skipped)} files were skipped (e.g. "
                    f"{first['path']}: {first['reason']}); each file and why is logged above")
  empty = [label for label in labels if not converted[label]]
  for label in empty:
    logging.warning("Class %r has no readable image", label)
  if len(converted) >= 2 and (labels_given or not empty):
    return
  for name, sidecar in sidecars.items():
    if any(entry["label"] in empty for entry in sidecar["skipped"]):
      tf.io.gfile.remove(sidecar_path(output_dir, name))
  if len(converted) < 2:
    raise UserError(f"found {len(converted)} class(es) with readable images "
                    f"({', '.join(sorted(converted))}); need at least 2. No readable image in: "
                    f"{some_names(empty)}; fix or replace their files (each skip and why is logged "
                    "above), then rerun")
  files = [entry for entry in skipped if entry["label"] == empty[0]]
  raise UserError(f"class {empty[0]!r} has no readable image: its {len(files)} files were all "
                  f"skipped (e.g. {files[0]['path']}: {files[0]['reason']}); fix or remove them, "
                  "or leave the class out with labels, then rerun", arguments=["labels"])


def _check_listed_splits(output_dir, plan, sidecars):
  """A split that a list fixes (validation_filelist, test_filelist) keeps at least one image.

  A list none of whose files became a record (its relative paths read from
  the wrong folder, say) would leave the split empty, and a training run
  without the validation it was given. As after a class's files all failed,
  that split's sidecars are removed, so the rerun after the fix decodes again.
  """
  for split in ("validation", "test"):
    filelist = plan.options.get(f"{split}_filelist")
    shards = [shard for shard in plan.shards if shard.split == split]
    if not filelist or any(sidecars[shard.name]["files"] for shard in shards):
      continue
    for shard in shards:
      tf.io.gfile.remove(sidecar_path(output_dir, shard.name))
    why = [entry for shard in shards for entry in sidecars[shard.name]["skipped"]] + [
        entry for entry in plan.skipped if f"--{split}_filelist" in entry["reason"]]
    example = f" (e.g. {why[0]['path']}: {why[0]['reason']})" if why else ""
    folder = posixpath.dirname(filelist) or "."
    raise UserError(f"{split}_filelist={filelist}: none of its files became a record{example}; "
                    f"a relative path in a list is read from the list's own folder ({folder})",
                    arguments=[f"{split}_filelist"])


def _manifest(plan, sidecars):
  splits = {split: {"examples": 0, "shards": [], "per_class": {label: 0 for label in plan.labels}}
            for split in SPLITS}
  files = []
  skipped = list(plan.skipped)
  for shard in plan.shards:
    sidecar = sidecars[shard.name]
    split = splits[shard.split]
    split["examples"] += sidecar["records"]
    split["shards"].append({"name": shard.name, "records": sidecar["records"],
                            "sha256": sidecar["sha256"]})
    for entry in sidecar["files"]:
      split["per_class"][entry["label"]] += 1
      files.append(dict(entry, split=shard.split, shard=shard.name))
    skipped.extend(dict(entry, split=shard.split) for entry in sidecar["skipped"])
  return {
      "format_version": MANIFEST_VERSION,
      "options": plan.options,
      "labels": plan.labels,
      "num_examples": sum(split["examples"] for split in splits.values()),
      "splits": splits,
      "skipped": skipped,
      "ignored": plan.ignored,
      "files": files,
      "exact_duplicates": exact_duplicates(files),
  }


def exact_duplicates(files):
  """Groups of converted files with the same bytes (the manifest's sha256), reported, not removed.

  `files`: the manifest's entries (path, label, split, sha256). Each group lists
  its files (path order) and its `problems`: "across_classes" (one photo, two
  labels: one is wrong), "across_splits" (a photo both trained on and held out:
  the held-out accuracy is inflated), "within_class" (a photo counted twice in a
  class: it weighs double). Groups are in the order of their first path.
  """
  by_sha256 = collections.defaultdict(list)
  for entry in files:
    by_sha256[entry["sha256"]].append(entry)
  groups = []
  for sha256, entries in by_sha256.items():
    if len(entries) < 2:
      continue
    labels = [entry["label"] for entry in entries]
    problems = []
    if len(set(labels)) > 1:
      problems.append("across_classes")
    if len({entry["split"] for entry in entries}) > 1:
      problems.append("across_splits")
    if len(set(labels)) < len(labels):
      problems.append("within_class")
    groups.append({"sha256": sha256, "problems": problems,
                   "files": [{"path": entry["path"], "label": entry["label"],
                              "split": entry["split"]}
                             for entry in sorted(entries, key=lambda entry: entry["path"])]})
  return sorted(groups, key=lambda group: group["files"][0]["path"])


def _duplicate_lines(groups, max_lines):
  """The summary's lines on exact duplicates: counts by problem, then the groups."""
  if not groups:
    return []
  counts = collections.Counter(problem for group in groups for problem in group["problems"])
  meaning = (("across_classes", "across classes (one photo, two labels)"),
             ("across_splits", "across splits (held-out accuracy inflated)"),
             ("within_class", "within a class (weighs double)"))
  lines = [f"Exact duplicates (identical bytes): {len(groups)} groups of "
           f"{sum(len(group['files']) for group in groups)} files, kept as they are: "
           + ", ".join(f"{counts[problem]} {text}" for problem, text in meaning if counts[problem])]
  for group in groups[:max_lines]:
    problems = ", ".join(problem.replace("_", " ") for problem in group["problems"])
    lines.append(f"  {problems}: " + " = ".join(f"{entry['path']} ({entry['split']})"
                                                for entry in group["files"]))
  if len(groups) > max_lines:
    lines.append(f"  ... and {len(groups) - max_lines} more (manifest.json: exact_duplicates)")
  return lines


def summary_lines(manifest, output_dir, max_lines=20):
  """What a user wants to see after a conversion: counts, skipped files, where things are."""
  splits = manifest["splits"]
  counts = ", ".join(f"{split} {splits[split]['examples']}" for split in SPLITS)
  num_shards = sum(len(splits[split]["shards"]) for split in SPLITS)
  lines = [f"Wrote {manifest['num_examples']} examples ({counts}) of "
           f"{len(manifest['labels'])} classes in {num_shards} shards to {output_dir}"]
  skipped = manifest["skipped"]
  if skipped:
    lines.append(f"Skipped {len(skipped)} files:")
    lines.extend(f"  {entry['path']}: {entry['reason']}" for entry in skipped[:max_lines])
    if len(skipped) > max_lines:
      lines.append(f"  ... and {len(skipped) - max_lines} more")
  ignored = [entry["path"] for entry in manifest["ignored"]]
  if ignored:
    lines.append(f"Ignored {len(ignored)} files that are not named like images: {some_names(ignored)}")
  empty = [label for label in manifest["labels"]
           if not sum(splits[split]["per_class"][label] for split in SPLITS)]
  if empty:
    lines.append(f"Classes from --labels with no images: {some_names(empty)}")
  lines.extend(_duplicate_lines(manifest["exact_duplicates"], max_lines))
  lines.append(f"Labels: {join_path(output_dir, LABELS_FILENAME)}")
  lines.append(f"Manifest: {join_path(output_dir, MANIFEST_FILENAME)}")
  return lines
