"""Backbone speed features: BatchNorm folding is exact, bfloat16 is close, `auto` falls back."""

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tlframe import backbone
from tlframe import pipeline
from tlframe.backbone import inverted_residual
from tlframe.backbone import runtime as backbone_runtime
from tlframe.backbone import torch_pth

# bfloat16 keeps 8 bits of mantissa; through 52 layers features move by up to
# ~6% of their range on the photos (measured), far from changing a prediction.
BF16_MAX_ABS_DIFF_OF_RANGE = 0.10
BF16_MIN_COSINE = 0.99


@pytest.fixture(scope="module")
def photos(skimage_photos):
  names = ("chelsea", "coffee", "rocket", "astronaut")
  return tf.stack([pipeline.imagenet_eval_crop(skimage_photos[n], 224) for n in names])


@pytest.fixture(scope="module")
def state_dict(builtin_backbone_dirs):
  data = torch_pth.find_weights(download_dir=os.path.join(backbone.cache_root(), "downloads"))
  return torch_pth.load_state_dict(data)


def test_folded_export_matches_unfolded_network(state_dict, photos):
  unfolded = inverted_residual.InvertedResidualNet(inverted_residual.MOBILENET_V2_100_224, state_dict,
                                              fold_batch_norm=False)
  folded = backbone.load_backbone()  # the exported, folded SavedModel
  reference = unfolded(photos).numpy()
  assert np.abs(folded(photos).numpy() - reference).max() < 1e-4
  assert reference.max() > 1.0  # real activations, not a degenerate comparison
  # The unfolded form really is different ops: BatchNorm variables are separate.
  assert len(unfolded.variables) == 5 * 52 and len(unfolded.trainable_variables) == 3 * 52


def test_fold_is_exact_algebra_per_layer(state_dict):
  blocks, _ = inverted_residual.mobilenet_v2_architecture(inverted_residual.MOBILENET_V2_100_224, state_dict)
  layer = blocks[1].convs[0]  # a depthwise conv with near-zero running variances
  assert layer.depthwise and layer.var.min() < 1e-3
  x = tf.random.stateless_uniform([1, 14, 14, layer.kernel.shape[2]], seed=[3, 4], maxval=2.0)
  unfolded = inverted_residual._ConvLayer(layer, fold_batch_norm=False)
  folded = inverted_residual._ConvLayer(layer, fold_batch_norm=True)
  np.testing.assert_allclose(folded(x, folded.read_weights(tf.float32)).numpy(),
                             unfolded(x, unfolded.read_weights(tf.float32)).numpy(), atol=1e-5)


def test_bfloat16_close_to_float32_same_predictions(builtin_backbone_dirs, photos):
  f32 = backbone.load_backbone()(photos).numpy()
  bf16_backbone = backbone.load_backbone(precision="bfloat16")
  assert bf16_backbone.precision == "bfloat16"
  bf16 = bf16_backbone(photos)
  assert bf16.dtype == tf.float32  # features are always float32
  bf16 = bf16.numpy()
  assert 0 < np.abs(bf16 - f32).max() <= BF16_MAX_ABS_DIFF_OF_RANGE * (f32.max() - f32.min())
  cosine = (bf16 * f32).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(f32, axis=1)
  assert (cosine >= BF16_MIN_COSINE).all()

  logits32 = backbone.load_backbone(features="logits")(photos).numpy()
  logits16 = backbone.load_backbone(features="logits", precision="bfloat16")(photos).numpy()
  assert list(logits16.argmax(1)) == list(logits32.argmax(1))


@pytest.mark.parametrize("precision, tolerance", [("float32", 1e-4), ("bfloat16", 0.05)])
def test_one_image_alone_equals_it_in_a_batch(builtin_backbone_dirs, photos, precision,
                                              tolerance):
  """A batch of one takes the MatMul path for 1x1 convolutions; the features must not change."""
  model = backbone.load_backbone(precision=precision)
  batched = model(photos).numpy()
  for i in range(len(photos)):
    alone = model(photos[i:i + 1]).numpy()[0]
    spread = batched.max() - batched.min()
    assert np.abs(alone - batched[i]).max() <= tolerance * spread, (precision, i)


def test_auto_falls_back_to_float32_without_bf16(builtin_backbone_dirs, monkeypatch):
  monkeypatch.setenv(backbone.DISABLE_BF16_ENV, "1")
  assert not backbone.bfloat16_supported()
  assert backbone.load_backbone(precision="auto").precision == "float32"
  monkeypatch.delenv(backbone.DISABLE_BF16_ENV)
  expected = "bfloat16" if backbone.bfloat16_supported() else "float32"
  assert backbone.load_backbone(precision="auto").precision == expected


def test_module_without_bf16_entry_runs_float32(tmp_path):
  module = tf.Module()
  module.kernel = tf.Variable(tf.random.stateless_normal([1, 1, 3, 4], seed=[5, 6]))
  module.__call__ = tf.function(
      lambda images: tf.reduce_mean(tf.nn.conv2d(images, module.kernel, 1, "VALID"), [1, 2]),
      input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
  tf.saved_model.save(module, str(tmp_path))
  loaded = backbone.load_backbone(str(tmp_path), precision="bfloat16")
  assert loaded.precision == "float32" and loaded.cache_key.endswith("float32")
  out = loaded(tf.random.uniform([2, 32, 32, 3]))
  assert out.shape == (2, 4) and out.dtype == tf.float32


def _onednn_in_subprocess(code, env_value=None):
  env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
  if env_value is not None:
    env["TF_ENABLE_ONEDNN_OPTS"] = env_value
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout.split()[-1], result.stderr


@pytest.fixture(scope="module")
def tensorflow_default_onednn():
  """Whether TensorFlow alone turns oneDNN on on this CPU ('True'/'False').

  It does on CPUs with AVX512-VNNI, AVX512-BF16, AVX-VNNI or AMX (its RFC 400)
  and not on others (e.g. AVX2-only): measured here, not assumed, so the test
  below holds on whichever CPU runs it.
  """
  default, _ = _onednn_in_subprocess(
      "import tensorflow\nfrom tensorflow.python.util import _pywrap_util_port\n"
      "print(_pywrap_util_port.IsMklEnabled())")
  cpu_flags = backbone_runtime._cpu_flags()  # pylint: disable=protected-access
  if cpu_flags & {"avx512_bf16", "amx_bf16", "avx512_vnni"}:
    assert default == "True", f"TensorFlow left oneDNN off on a CPU with {sorted(cpu_flags)}"
  return default


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="oneDNN is TensorFlow's x86 CPU backend")
@pytest.mark.parametrize("imports, env_value", [
    ("import tlframe, tensorflow", None),   # tlframe first: on, whatever the CPU
    ("import tlframe, tensorflow", "0"),    # the user's explicit choice wins
    ("import tensorflow, tlframe", None),   # too late: TensorFlow's default; warn if that is off
])
def test_importing_tlframe_first_turns_onednn_on(imports, env_value, tensorflow_default_onednn):
  code = (f"{imports}\nfrom tlframe.backbone import runtime\nprint(runtime.onednn_enabled())\n"
          "runtime.warn_if_onednn_off(); runtime.warn_if_onednn_off()")
  enabled, stderr = _onednn_in_subprocess(code, env_value)
  if env_value == "0":
    expected = "False"
  elif imports.startswith("import tlframe"):
    expected = "True"
  else:
    expected = tensorflow_default_onednn
  assert enabled == expected
  expected_warning = imports.startswith("import tensorflow") and expected == "False"
  assert stderr.count("oneDNN is off") == (1 if expected_warning else 0)


@pytest.mark.parametrize("single_image", [True, False])
def test_pointwise_layer_as_matmul_equals_a_plain_convolution(state_dict, single_image):
  """The MatMul form of 1x1 convolutions (used for a batch of one) is the same convolution."""
  spec = inverted_residual.ConvSpec(state_dict, "features.2.conv.0.0", "features.2.conv.0.1", stride=1,
                               depthwise=False, relu6=True, epsilon=1e-5, torch_padding=True)
  layer = inverted_residual._ConvLayer(spec, fold_batch_norm=True)  # pylint: disable=protected-access
  assert layer.pointwise
  x = tf.random.stateless_uniform([1, 112, 112, 16], seed=[3, 4])
  kernel, bias = spec.folded()
  expected = tf.nn.relu6(tf.nn.conv2d(x, kernel, 1, "VALID") + bias)
  actual = layer(x, layer.read_weights(tf.float32), single_image)
  np.testing.assert_allclose(actual.numpy(), expected.numpy(), atol=1e-5)
