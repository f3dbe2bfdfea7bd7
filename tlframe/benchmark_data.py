"""Public benchmark data sets: download from the original source, verify, lay out.

A manifest (JSON, e.g. bench/oxford_flowers12.json) describes one data set:
`url`, the .tar.gz archive its original source serves (for oxford_flowers12,
GitHub's archive of a repository at a fixed commit); `root`, the folder inside
the archive that holds `<split>/<class>/<file>`; `test_split`, the split whose
files are listed in TEST_SPLIT.txt; and `files`, `[path under root, bytes,
sha256]` for every file to keep.

`fetch` streams the archive once (progress through tlframe.util.progress), keeps
only the files the manifest lists, checks each one's size before and sha256
after writing it, and lays them out as the benches and tests read them:
`<data_dir>/<name>/<class>/<file>` plus `TEST_SPLIT.txt` (`<class>/<file>`
lines). The archive is untrusted: an entry with an absolute path or `..`, a
link pointing out of the archive, and a link or device in place of a listed
file stop the run. Files are written only to the paths the manifest gives,
inside a staging folder that becomes the data set folder once every file is
verified. An existing data set folder is verified and kept, never
replaced unless asked.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import posixpath
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib

from tlframe.errors import UserError
from tlframe.util.progress import Progress

DATA_DIR_ENV = "TLFRAME_DATA_DIR"
TEST_SPLIT_FILENAME = "TEST_SPLIT.txt"
_CHUNK = 1 << 20
_TIMEOUT_S = 60


def benchmark_data_dir():
  """`$TLFRAME_DATA_DIR`, else `../shared/data` beside this checkout; it may not exist."""
  checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.environ.get(DATA_DIR_ENV) or os.path.join(os.path.dirname(checkout), "shared", "data")


@dataclasses.dataclass(frozen=True)
class Manifest:
  """One data set's manifest (see the module doc), as load_manifest reads it."""
  name: str
  url: str
  root: str
  test_split: str
  files: dict  # path under root -> (bytes, sha256)
  path: str  # the manifest file, for messages

  def layout_path(self, source_path):
    """`<split>/<class>/<file>` -> `<class>/<file>`."""
    return source_path.split("/", 1)[1]

  def test_split_text(self):
    """TEST_SPLIT.txt: the test split's `<class>/<file>`, sorted, one a line."""
    return "".join(f"{self.layout_path(path)}\n" for path in sorted(self.files)
                   if path.split("/", 1)[0] == self.test_split)


def load_manifest(path):
  """The Manifest in the JSON file `path`; UserError naming the file if it is malformed."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    files = {}
    for source, size, sha256 in data["files"]:
      if _unsafe(source) or source.count("/") != 2:
        raise ValueError(f"file entry {source!r} is not <split>/<class>/<file>")
      files[source] = (int(size), str(sha256).lower())
    return Manifest(name=data["name"], url=data["url"], root=data["root"].strip("/"),
                    test_split=data["test_split"], files=files, path=path)
  except OSError as e:
    raise UserError(f"cannot read the manifest {path}: {e.strerror}") from None
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f"{path} is not a data set manifest ({e}); restore it from the "
                    "repository") from None


def write_manifest(path, name, url, root, test_split, dataset_dir):
  """Writes the manifest of a laid-out `dataset_dir` (as fetch makes it) to `path`.

  Each file's source path is rebuilt from the layout: `<test_split>/<class>/<file>`
  for the files in TEST_SPLIT.txt, `train/<class>/<file>` for the others.
  """
  with open(os.path.join(dataset_dir, TEST_SPLIT_FILENAME), encoding="utf-8") as f:
    test_files = set(f.read().split())
  entries = []
  for class_name in sorted(os.listdir(dataset_dir)):
    class_dir = os.path.join(dataset_dir, class_name)
    if not os.path.isdir(class_dir):
      continue
    for file_name in sorted(os.listdir(class_dir)):
      relative = f"{class_name}/{file_name}"
      split = test_split if relative in test_files else "train"
      size, sha256 = _size_and_sha256(os.path.join(class_dir, file_name))
      entries.append([f"{split}/{relative}", size, sha256])
  header = json.dumps(dict(name=name, url=url, root=root, test_split=test_split), indent=1)
  lines = ",\n".join("  " + json.dumps(entry) for entry in entries)
  with open(path, "w", encoding="utf-8") as f:
    f.write(header[:-2] + ',\n "files": [\n' + lines + "\n ]\n}\n")
  return len(entries)


def verify_dir(manifest, dataset_dir):
  """Problems of a laid-out data set vs the manifest, as lines (empty: it matches)."""
  problems = []
  for source, (size, sha256) in sorted(manifest.files.items()):
    path = os.path.join(dataset_dir, manifest.layout_path(source))
    if not os.path.isfile(path):
      problems.append(f"{path} is missing")
    elif _size_and_sha256(path) != (size, sha256):
      problems.append(f"{path} differs from the manifest")
  test_split = os.path.join(dataset_dir, TEST_SPLIT_FILENAME)
  try:
    with open(test_split, encoding="utf-8") as f:
      if f.read() != manifest.test_split_text():
        problems.append(f"{test_split} differs from the manifest")
  except OSError:
    problems.append(f"{test_split} is missing")
  return problems


def fetch(manifest, data_dir, *, source=None, overwrite=False):
  """Downloads, verifies and lays out the data set into `data_dir/<name>`.

  source: the archive's URL (http, https, file) or a local path; default the
  manifest's URL. Returns a dict: dataset_dir, files, downloaded (False when a
  verified copy was already there) and, when downloaded, bytes_read.
  """
  dataset_dir = os.path.join(data_dir, manifest.name)
  if os.path.exists(dataset_dir) and not overwrite:
    problems = verify_dir(manifest, dataset_dir)
    if not problems:
      return dict(dataset_dir=dataset_dir, files=len(manifest.files), downloaded=False)
    raise UserError(f"{dataset_dir} exists but does not match {manifest.path} "
                    f"({len(problems)} problems, e.g. {problems[0]}); move it away or pass "
                    "overwrite=True to replace it", arguments=["overwrite"])
  os.makedirs(data_dir, exist_ok=True)
  staging = os.path.join(data_dir, f".{manifest.name}.partial-{os.getpid()}")
  shutil.rmtree(staging, ignore_errors=True)
  try:
    source = source or manifest.url
    with _open_archive(source) as stream:
      _extract(manifest, stream, staging, source)
      bytes_read = stream.bytes_read
    with open(os.path.join(staging, TEST_SPLIT_FILENAME), "w", encoding="utf-8") as f:
      f.write(manifest.test_split_text())
    if os.path.exists(dataset_dir):  # --overwrite: the old copy goes only once the new one is whole
      old = f"{staging}-old"
      os.rename(dataset_dir, old)
      os.rename(staging, dataset_dir)
      shutil.rmtree(old)
    else:
      os.rename(staging, dataset_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return dict(dataset_dir=dataset_dir, files=len(manifest.files), downloaded=True,
              bytes_read=bytes_read)


@contextlib.contextmanager
def _open_archive(source):
  """Yields a _ProgressReader over a URL or local path; closes it after."""
  try:
    if "://" not in source:
      stream, total_bytes = open(source, "rb"), os.path.getsize(source)
    else:
      request = urllib.request.Request(source, headers={"User-Agent": "tlframe-get-data"})
      stream = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
      length = stream.headers.get("Content-Length")
      total_bytes = int(length) if length and length.isdigit() else None
  except (urllib.error.URLError, OSError, ValueError) as e:
    if "://" not in source:
      raise UserError(f"cannot read source={source}: {_reason(e)}",
                      arguments=["source"]) from None
    raise UserError(f"cannot download {source}: {_reason(e)}; check the network, or download "
                    "the archive yourself and pass source=FILE", arguments=["source"]) from None
  with stream:
    yield _ProgressReader(stream, total_bytes, source)


def _reason(error):
  return getattr(error, "reason", None) or getattr(error, "strerror", None) or error


class _ProgressReader:
  """A binary stream that logs MB read (tlframe.util.progress) as tarfile pulls from it."""

  def __init__(self, stream, total_bytes, source):
    self.stream = stream
    self.source = source
    self.progress = Progress(total_bytes // _CHUNK if total_bytes else 0, what="MB")
    self.bytes_read = 0

  def read(self, size=-1):
    try:
      data = self.stream.read(size)
    except OSError as e:  # the connection broke or timed out
      raise UserError(f"the download of {self.source} broke off after {self.bytes_read} bytes "
                      f"({_reason(e)}); rerun (nothing was kept)") from None
    before = self.bytes_read // _CHUNK
    self.bytes_read += len(data)
    if self.bytes_read // _CHUNK > before:
      self.progress.update(self.bytes_read // _CHUNK - before)
    return data


def _unsafe(name):
  parts = name.replace("\\", "/").split("/")
  return name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0])


def _extract(manifest, stream, staging, source):
  """Writes the manifest's files from the tar.gz `stream` into `staging`, verified."""
  remaining = dict(manifest.files)
  try:
    with tarfile.open(fileobj=stream, mode="r|gz") as archive:
      for member in archive:
        if _unsafe(member.name) or (member.islnk() or member.issym()) and _unsafe(member.linkname):
          raise UserError(f"{source}: refused entry {member.name!r} (an absolute path or '..' "
                          "reaching out of the archive); the archive is not the data set's, "
                          "check source", arguments=["source"])
        name = posixpath.normpath(member.name)
        prefix = manifest.root + "/"
        if not name.startswith(prefix) or name[len(prefix):] not in remaining:
          continue
        path_in_root = name[len(prefix):]
        size, sha256 = remaining.pop(path_in_root)
        if not member.isreg():
          raise UserError(f"{source}: {member.name} is a link or special file, not the "
                          f"image the manifest {manifest.path} lists; refused")
        if member.size != size:
          raise UserError(f"{source}: {member.name} has {member.size} bytes, {manifest.path} "
                          f"expects {size}: the download is corrupted or not the data set; "
                          "rerun (nothing was kept)")
        target = os.path.join(staging, manifest.layout_path(path_in_root))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        digest = _copy_hashing(archive.extractfile(member), target)
        if digest != sha256:
          raise UserError(f"{source}: {member.name} has sha256 {digest}, {manifest.path} "
                          f"expects {sha256}: the download is corrupted or not the data set; "
                          "rerun (nothing was kept)")
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    if isinstance(e, OSError) and e.errno is not None:
      raise  # writing failed (disk full, read-only): tlframe.cli reports it in one line
    raise UserError(f"{source} is not a complete .tar.gz archive ({e}); rerun to download it "
                    "again (nothing was kept)") from None
  if remaining:
    missing = sorted(remaining)
    raise UserError(f"{source} lacks {len(missing)} of the {len(manifest.files)} files of "
                    f"{manifest.path}, e.g. {manifest.root}/{missing[0]}; check source",
                    arguments=["source"])


def _copy_hashing(reader, target):
  """Copies `reader` to the new file `target`; returns the bytes' sha256 (hex)."""
  digest = hashlib.sha256()
  with open(target, "xb") as out:
    while chunk := reader.read(_CHUNK):
      digest.update(chunk)
      out.write(chunk)
  return digest.hexdigest()


def _size_and_sha256(path):
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return os.path.getsize(path), digest.hexdigest()
