"""bench/get_data on local copies: an archive laid out as the original source serves it.

The archive is built from real photos (crops of scikit-image's), with the
source repository's layout (`<repo>-<commit>/lab3/flowers/<split>/<class>/`,
other folders beside), and served over HTTP on 127.0.0.1; where
../shared/data has oxford_flowers12, also from its exact bytes against the
committed manifest.
"""

import functools
import http.server
import io
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import threading

import pytest

from tlframe import benchmark_data
from tlframe import samples
from tlframe.errors import UserError

REPO = pathlib.Path(__file__).resolve().parent.parent
GET_DATA = REPO / "bench" / "get_data"
ROOT = "Some-Repo-0123abc/lab3/flowers"


def _laid_out(directory):
  """{relative path: bytes} of every file under `directory`."""
  return {str(path.relative_to(directory)): path.read_bytes()
          for path in sorted(pathlib.Path(directory).rglob("*")) if path.is_file()}


def _add(archive, name, data=b"", kind=tarfile.REGTYPE, linkname=""):
  info = tarfile.TarInfo(name)
  info.type, info.linkname, info.size = kind, linkname, len(data)
  archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _make_archive(path, manifest, dataset_dir, *, replace=None, extra=()):
  """A .tar.gz as the source serves it: the manifest's files under its root, with
  unrelated entries around them. replace: {path under root: bytes} to put instead;
  extra: (name, data, kind, linkname) entries appended."""
  replace = replace or {}
  with tarfile.open(path, "w:gz") as archive:
    _add(archive, f"{ROOT.split('/')[0]}/README.md", b"course material\n")
    _add(archive, f"{ROOT}/README.txt", b"a subset of the Oxford flowers\n")
    for source in manifest.files:
      data = (pathlib.Path(dataset_dir) / manifest.layout_path(source)).read_bytes()
      _add(archive, f"{ROOT}/{source}", replace.get(source, data))
    _add(archive, f"{ROOT}/train_augmented/x/0.jpg", b"not kept")
    for entry in extra:
      _add(archive, *entry)
  return str(path)


@pytest.fixture(scope="module")
def photo_set(tmp_path_factory, skimage_photos):
  """(manifest, laid-out folder): 4 classes x 6 real JPEG crops, every third one test."""
  tmp = tmp_path_factory.mktemp("photo_set")
  dataset_dir = tmp / "photos"
  samples.write_photo_crops(str(dataset_dir), skimage_photos, per_class=6, size=96)
  test_files = sorted(str(p.relative_to(dataset_dir)) for p in dataset_dir.glob("*/*.jpg"))[::3]
  (dataset_dir / benchmark_data.TEST_SPLIT_FILENAME).write_text("".join(f"{f}\n" for f in test_files))
  manifest_path = str(tmp / "photos.json")
  count = benchmark_data.write_manifest(manifest_path, "photos", "http://unused.invalid/a.tar.gz",
                                  ROOT, "test", str(dataset_dir))
  assert count == 24
  return benchmark_data.load_manifest(manifest_path), dataset_dir


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
  """(folder, base URL) of a local HTTP server on 127.0.0.1 serving that folder."""
  root = tmp_path_factory.mktemp("served")
  class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request lines in the test output
      pass

  handler = functools.partial(QuietHandler, directory=str(root))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield root, f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()
  server.server_close()


def _get_data(*args):
  return subprocess.run([sys.executable, str(GET_DATA), *args], capture_output=True, text=True,
                        timeout=120)


def test_downloads_verifies_and_lays_out_over_http(photo_set, http_root, tmp_path):
  manifest, dataset_dir = photo_set
  served, url = http_root
  _make_archive(served / "good.tar.gz", manifest, dataset_dir)
  data_dir = tmp_path / "data"
  result = _get_data(f"--manifest={manifest.path}", f"--data_dir={data_dir}",
                     f"--source={url}/good.tar.gz")
  assert result.returncode == 0, result.stderr
  assert re.search(r"photos: 24 files downloaded \([\d.]+ MB read\) and verified", result.stdout)
  # Exactly the class folders and TEST_SPLIT.txt, byte for byte; nothing else kept.
  assert _laid_out(data_dir / "photos") == _laid_out(dataset_dir)
  assert os.listdir(data_dir) == ["photos"]
  test_split = (data_dir / "photos" / "TEST_SPLIT.txt").read_text().split()
  assert len(test_split) == 8 and all(name.count("/") == 1 for name in test_split)

  # A rerun verifies what is there and downloads nothing (the URL is gone now).
  result = _get_data(f"--manifest={manifest.path}", f"--data_dir={data_dir}",
                     f"--source={url}/gone.tar.gz")
  assert result.returncode == 0 and "already there, verified" in result.stdout


def test_corrupted_file_is_rejected_with_one_line(photo_set, http_root, tmp_path):
  manifest, dataset_dir = photo_set
  served, url = http_root
  victim = sorted(manifest.files)[5]
  data = bytearray((dataset_dir / manifest.layout_path(victim)).read_bytes())
  data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
  _make_archive(served / "corrupt.tar.gz", manifest, dataset_dir, replace={victim: bytes(data)})
  data_dir = tmp_path / "data"
  result = _get_data(f"--manifest={manifest.path}", f"--data_dir={data_dir}",
                     f"--source={url}/corrupt.tar.gz")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert f"{ROOT}/{victim} has sha256" in lines[0] and "corrupted" in lines[0]
  assert os.listdir(data_dir) == []  # nothing kept, no staging folder left


def test_truncated_or_missing_archive_is_one_error(photo_set, tmp_path):
  manifest, dataset_dir = photo_set
  good = pathlib.Path(_make_archive(tmp_path / "good.tar.gz", manifest, dataset_dir))
  truncated = tmp_path / "truncated.tar.gz"
  truncated.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
  with pytest.raises(UserError, match="is not a complete .tar.gz archive"):
    benchmark_data.fetch(manifest, str(tmp_path / "data"), source=str(truncated))
  with pytest.raises(UserError, match="cannot read source="):
    benchmark_data.fetch(manifest, str(tmp_path / "data"), source=str(tmp_path / "nowhere.tar.gz"))
  with pytest.raises(UserError, match="cannot download http://127.0.0.1:1/a.tar.gz: .*pass source=FILE"):
    benchmark_data.fetch(manifest, str(tmp_path / "data"), source="http://127.0.0.1:1/a.tar.gz")
  assert os.listdir(tmp_path / "data") == []


@pytest.mark.parametrize("entry", [
    ("../escaped.txt", b"outside"),
    (f"{ROOT}/../../../../escaped.txt", b"outside"),
    ("/tmp/escaped.txt", b"outside"),
    (f"{ROOT}/train/link", b"", tarfile.SYMTYPE, "../../../../../etc/passwd"),
], ids=["dotdot", "dotdot-inside", "absolute", "symlink-out"])
def test_entry_reaching_out_of_the_archive_is_refused(photo_set, tmp_path, entry):
  manifest, dataset_dir = photo_set
  archive = _make_archive(tmp_path / "evil.tar.gz", manifest, dataset_dir, extra=[entry])
  with pytest.raises(UserError, match="refused entry"):
    benchmark_data.fetch(manifest, str(tmp_path / "data"), source=archive)
  assert os.listdir(tmp_path / "data") == []
  assert not (tmp_path / "escaped.txt").exists()


def test_link_in_place_of_a_listed_file_is_refused(photo_set, tmp_path):
  manifest, dataset_dir = photo_set
  victim = sorted(manifest.files)[0]
  with tarfile.open(tmp_path / "links.tar.gz", "w:gz") as archive:
    _add(archive, f"{ROOT}/{victim}", kind=tarfile.SYMTYPE, linkname="other.jpg")
  with pytest.raises(UserError, match="is a link or special file"):
    benchmark_data.fetch(manifest, str(tmp_path / "data"), source=str(tmp_path / "links.tar.gz"))


def test_existing_folder_is_kept_unless_overwrite(photo_set, tmp_path):
  manifest, dataset_dir = photo_set
  archive = _make_archive(tmp_path / "good.tar.gz", manifest, dataset_dir)
  user_copy = tmp_path / "data" / "photos"
  user_copy.mkdir(parents=True)
  (user_copy / "mine.txt").write_text("a user's file")
  with pytest.raises(UserError, match="does not match .* pass overwrite=True"):
    benchmark_data.fetch(manifest, str(tmp_path / "data"), source=archive)
  assert (user_copy / "mine.txt").read_text() == "a user's file"
  benchmark_data.fetch(manifest, str(tmp_path / "data"), source=archive, overwrite=True)
  assert _laid_out(user_copy) == _laid_out(dataset_dir)
  assert sorted(os.listdir(tmp_path / "data")) == ["photos"]


def test_committed_manifest_matches_oxford_flowers12(flowers12_dir, tmp_path):
  """The manifest's sizes and sha256 are those of the source bytes, and an archive of
  them in the source repository's layout lays out exactly as ../shared/data has it."""
  manifest = benchmark_data.load_manifest(str(REPO / "bench" / "oxford_flowers12.json"))
  assert len(manifest.files) == 960 and len(manifest.test_split_text().split()) == 240
  assert manifest.url.startswith("https://codeload.github.com/daniele-gilio/")
  assert benchmark_data.verify_dir(manifest, str(flowers12_dir)) == []
  archive = tmp_path / "source.tar.gz"
  with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
    for source in manifest.files:
      tar.add(flowers12_dir / manifest.layout_path(source), f"{manifest.root}/{source}")
  benchmark_data.fetch(manifest, str(tmp_path / "data"), source=str(archive))
  assert _laid_out(tmp_path / "data" / "oxford_flowers12") == _laid_out(flowers12_dir)
