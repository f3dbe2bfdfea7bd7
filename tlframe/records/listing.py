"""The converter's inputs: listing image files and assigning them to splits.

Class folders or a CSV/TSV file list become `Source`s (path, key, label,
split), on local disks and TF filesystems (gs://, ...) alike. Every file goes
to the train, validation or test split by a stable hash of its key (the
relative path; `stable_split`), or by explicit lists, so that a rerun or an
added image moves no other file between splits.
"""

import collections
import csv
import hashlib
import os
import posixpath

from absl import logging
import tensorflow as tf

from tlframe import imageformat
from tlframe.errors import UserError
from tlframe.records.layout import check_class_name, is_remote, join_path, text_lines
from tlframe.util import fileio

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
_FILELIST_HEADER_NAMES = ("path", "filename", "file_name", "file", "filepath", "file_path",
                          "image", "image_path")
_NOT_IN_A_CLASS_FOLDER = "not inside a class sub-folder"
# How many ignored or skipped file names the log and the summary show.
_NAMES_SHOWN = 5


def _resolve(base_dir, path):
  """`path` as written in a list, resolved against the list's folder."""
  if is_remote(path):
    return path
  if is_remote(base_dir):
    return path if path.startswith("/") else join_path(base_dir, posixpath.normpath(path))
  return os.path.normpath(os.path.join(base_dir, path))


def _relative_key(root, path):
  """`path` relative to `root` ('/' separators) when inside it; else `path` itself."""
  prefix = root.rstrip("/") + "/"
  return path[len(prefix):] if path.startswith(prefix) else path


def _has_image_extension(name):
  return name.lower().endswith(IMAGE_EXTENSIONS)


# One input image: where to read it, its key (relative path: the split hash and
# the image/filename feature), its class name, and its split when a list fixes it.
Source = collections.namedtuple("Source", "path key label split")


def walk_files(root):
  """(files, [(directory, why not walked)]) under `root`, recursively.

  tf.io.gfile.walk follows a symlink to an ancestor forever, hence this walk,
  which does not enter a directory twice.
  """
  files, unreadable = [], []
  seen = set()
  pending = [root]
  while pending:
    directory = pending.pop()
    if not is_remote(directory):
      real = os.path.realpath(directory)
      if real in seen:
        unreadable.append((directory, "directory symlink loop: not followed"))
        continue
      seen.add(real)
    try:
      names = tf.io.gfile.listdir(directory)
    except tf.errors.OpError as e:
      unreadable.append((directory, f"unreadable directory: {imageformat.op_error_text(e)}"))
      continue
    for name in sorted(names):
      path = join_path(directory, name.rstrip("/"))
      if tf.io.gfile.isdir(path):
        pending.append(path)
      else:
        files.append(path)
  return sorted(files), sorted(unreadable)


def list_image_dir(image_dir, argument="image_dir"):
  """Sources of a class-per-sub-folder tree, plus (skipped, ignored) entries for the manifest.

  `argument` names the folder's argument in a message (test_dir for the test folder).
  """
  if not tf.io.gfile.isdir(image_dir):
    fileio.check_filesystem(image_dir, argument)
    raise UserError(f"{argument}={image_dir}: no such directory", arguments=[argument])
  files, unwalked = walk_files(image_dir)
  sources, ignored = [], []
  skipped = [{"path": _relative_key(image_dir, directory), "reason": reason}
             for directory, reason in unwalked]
  for path in files:
    key = _relative_key(image_dir, path)
    name = posixpath.basename(key)
    if name.startswith(".") or not _has_image_extension(name):
      ignored.append({"path": key, "reason": "not an image file name (extension or hidden file)"})
    elif "/" not in key:
      skipped.append({"path": key, "reason": _NOT_IN_A_CLASS_FOLDER})
    else:
      sources.append(Source(path, key, key.split("/", 1)[0], None))
  return sources, skipped, ignored


def _folder_of(path):
  """The folder a list file's relative paths resolve against."""
  return posixpath.dirname(path) if is_remote(path) else os.path.dirname(os.path.abspath(path))


def read_filelist(path, argument, need_labels=True, line_numbers=None):
  """[(resolved path, label or None)] from a CSV or TSV of `path[,label]`; optional header.

  UTF-8, as `_text_lines` reads it (a spreadsheet's "CSV UTF-8": byte-order
  mark, CRLF). Blank lines and lines starting with '#' are skipped; a first
  line whose first field is a column name such as `path` or `filename` is a
  header. A dict `line_numbers` gets each resolved path's line number, for
  messages. `argument` names the list's argument in a message (filelist, test_filelist).
  """
  where = f"{argument}={path}"
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      data = f.read()
  except tf.errors.NotFoundError:
    raise UserError(f"{where}: no such file", arguments=[argument]) from None
  lines = [(number, line)
           for number, line in enumerate(text_lines(data, where, arguments=[argument]), 1)
           if line.strip() and not line.startswith("#")]
  delimiter = "\t" if lines and "\t" in lines[0][1] else ","
  base_dir = _folder_of(path)
  entries = []
  for number, line in lines:
    row = [field.strip() for field in next(csv.reader([line], delimiter=delimiter))]
    if number == lines[0][0] and row[0].lower().replace(" ", "_") in _FILELIST_HEADER_NAMES:
      continue
    if len(row) > 2 or not row[0] or (need_labels and (len(row) < 2 or not row[1])):
      expected = "path,label" if need_labels else "path or path,label"
      raise UserError(f"{where}: line {number} {line.strip()!r} is not {expected}",
                      arguments=[argument])
    entries.append((_resolve(base_dir, row[0]), row[1] if len(row) == 2 and row[1] else None))
    if line_numbers is not None:
      line_numbers.setdefault(entries[-1][0], number)
  if not entries:
    raise UserError(f"{where}: no entries", arguments=[argument])
  return entries


def _sources_from_filelist(filelist):
  root = _folder_of(filelist)
  return [Source(path, _relative_key(root, path), label, None)
          for path, label in read_filelist(filelist, "filelist")], root


def _apply_split_lists(sources, root, split_filelists, skipped):
  """`sources` with the explicit lists' splits set.

  A listed file that is not among `sources` is added when the list gives its label.
  """
  by_path = {source.path: i for i, source in enumerate(sources)}
  sources = list(sources)
  listed_in = {}
  for split, filelist in split_filelists.items():
    argument = f"{split}_filelist"
    for path, label in read_filelist(filelist, argument, need_labels=False):
      if path in listed_in:
        other = f"{listed_in[path]}_filelist"
        raise UserError(f"{argument}={filelist}: {path} is also listed in {other}; a file "
                        "belongs to one split", arguments=[argument, other])
      listed_in[path] = split
      index = by_path.get(path)
      if index is not None:
        source = sources[index]
        if label is not None and label != source.label:
          raise UserError(f"{argument}={filelist}: {path} is labelled {label!r} but its class "
                          f"is {source.label!r}; fix the list", arguments=[argument])
        sources[index] = source._replace(split=split)
      elif label is not None:
        by_path[path] = len(sources)
        sources.append(Source(path, _relative_key(root, path), label, split))
      else:
        reason = f"listed in --{argument} but not among the inputs and no label given"
        skipped.append({"path": _relative_key(root, path), "reason": reason})
  return sources


def stable_split(key, validation_percentage, test_percentage):
  """The split of a file by a hash of its key alone: adding or removing files moves no other."""
  bucket = int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % 10000 / 100.0
  if bucket < validation_percentage:
    return "validation"
  if bucket < validation_percentage + test_percentage:
    return "test"
  return "train"


def collect_sources(image_dir, filelist, split_filelists, test_dir=None):
  """(sources, skipped, ignored) from a class folder or a file list, with split lists applied."""
  if bool(image_dir) == bool(filelist):
    raise UserError("give exactly one of image_dir or filelist",
                    arguments=["image_dir", "filelist"])
  if image_dir:
    # Absolute, so that paths in the split lists (resolved against their own folder) match.
    root = _absolute(image_dir)
    sources, skipped, ignored = list_image_dir(root)
  else:
    (sources, root), skipped, ignored = _sources_from_filelist(filelist), [], []
  duplicates = [path for path, n in collections.Counter(s.path for s in sources).items() if n > 1]
  if duplicates:
    raise UserError(f"filelist={filelist}: {duplicates[0]} is listed more than once",
                    arguments=["filelist"])
  sources = _apply_split_lists(sources, root, split_filelists, skipped)
  if test_dir:
    sources = _with_test_dir(sources, root, _absolute(test_dir), skipped, ignored)
  return sources, skipped, ignored


def _with_test_dir(sources, root, test_root, skipped, ignored):
  """`sources` plus the class folders of `test_root`, all in the test split.

  Files under `test_root` found by the main listing too (a test folder inside
  --image_dir) are the test folder's only. Keys are relative to `root` where
  the test folder is inside it, else `<test folder name>/<class>/<file>`.
  """
  test_sources, test_skipped, test_ignored = list_image_dir(test_root, "test_dir")
  prefix = test_root.rstrip("/") + "/"
  inside = prefix.startswith(root.rstrip("/") + "/")
  rekey = (lambda key: _relative_key(root, join_path(test_root, key))) if inside else (
      lambda key: posixpath.join(posixpath.basename(test_root.rstrip("/")), key))
  kept = [source for source in sources if not source.path.startswith(prefix)]
  for entries, into in ((test_skipped, skipped), (test_ignored, ignored)):
    into[:] = [entry for entry in into if not join_path(root, entry["path"]).startswith(prefix)]
    into.extend(dict(entry, path=rekey(entry["path"])) for entry in entries)
  keys = {source.key for source in kept}
  for source in test_sources:
    key = rekey(source.key)
    if key in keys:
      raise UserError(f"test_dir={test_root}: {key} is also a training image's name; name "
                      "the test folder differently from the class folders",
                      arguments=["test_dir"])
    kept.append(source._replace(key=key, split="test"))
  return kept


def _without_missing_classes(sources, skipped):
  """`sources` less the classes none of whose files exists; their files are skipped.

  So a label that only names missing files (a stale list) does not become a
  class. One existing file settles a class: a check per class, not per file.
  """
  by_label = collections.defaultdict(list)
  for source in sources:
    by_label[source.label].append(source)
  kept = []
  for label, group in by_label.items():
    if any(tf.io.gfile.exists(source.path) for source in group):
      kept.extend(group)
      continue
    logging.warning("Class %r: none of its %d files exists (e.g. %s); it is not a class",
                    label, len(group), group[0].path)
    skipped.extend({"path": source.key, "reason": "unreadable: no such file"} for source in group)
  return kept


def choose_labels(sources, labels, skipped, image_dir):
  """(sources of the classes to convert, class names in label-index order)."""
  sources = _without_missing_classes(sources, skipped)
  present = sorted({source.label for source in sources})
  for label in present:
    source_argument = "image_dir" if image_dir else "filelist"
    check_class_name(label, source_argument, arguments=[source_argument])
  if labels:
    if len(set(labels)) != len(labels):
      duplicate = next(label for label in labels if labels.count(label) > 1)
      raise UserError(f"labels has a duplicate class name: {duplicate!r}; give each class once",
                      arguments=["labels"])
    for label in labels:
      check_class_name(label, "labels", arguments=["labels"])
    unknown = [s for s in sources if s.label not in set(labels)]
    for source in unknown:
      skipped.append({"path": source.key, "reason": f"class {source.label!r} is not in --labels"})
    sources = [s for s in sources if s.label in set(labels)]
    for label in labels:
      if label not in present:
        logging.warning("Class %r from --labels has no images", label)
  else:
    labels = present
  _check_two_classes({source.label for source in sources}, skipped, image_dir)
  return sources, list(labels)


def _check_two_classes(labels_with_images, skipped, image_dir):
  if len(labels_with_images) >= 2:
    return
  names = ", ".join(sorted(labels_with_images)) or "none"
  message = (f"found {len(labels_with_images)} class(es) with images ({names}); need at least "
             "2: one sub-folder (or list label) per class")
  loose = [entry["path"] for entry in skipped if entry["reason"] == _NOT_IN_A_CLASS_FOLDER]
  if loose:
    message += (f"; the {len(loose)} images directly in {image_dir} ({some_names(loose)}) were "
                "ignored: put each class's images in a sub-folder named for the class, "
                f"e.g. {join_path(image_dir, 'cat')}/{posixpath.basename(loose[0])}")
  raise UserError(message)


def some_names(names):
  """'a, b, c' or 'a, b, c and 4 more': the first few of a list of names, for one line."""
  shown = ", ".join(names[:_NAMES_SHOWN])
  return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


def _absolute(path):
  return path if is_remote(path) else os.path.abspath(path)


