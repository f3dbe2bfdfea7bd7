"""The export: same scores as training, bytes == pixels, JPEG == PNG, TFLite, a bare TF process."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tlframe.backbone import loading as backbone_lib
from tlframe.train import calibration
from tlframe import export
from tlframe.export import exporter
from tlframe.train import head as head_lib
from tlframe import imageformat
from tlframe.records import example_format
from tlframe import pipeline
from tlframe import records
from tlframe import train
from production_fixtures import CLASSES
from production_fixtures import trained_model  # pylint: disable=unused-import  (a fixture)


def _split_records(records_dir, split):
  """[(encoded bytes, label, filename)] of a split, in record order."""
  pattern = records.split_file_pattern(records_dir, split)
  dataset = tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern)))
  return [tuple(value.numpy() for value in example_format.parse_example(serialized))
          for serialized in dataset]


def _assert_same_validation_scores(export_dir, saved_model, records_dir):
  """The export in `export_dir` scores the validation records as `saved_model` does."""
  encoded = tf.constant([encoded for encoded, _, _ in _split_records(records_dir, "validation")])
  scores = tf.saved_model.load(export_dir).signatures["serving_default"](
      image_bytes=encoded)["scores"].numpy()
  np.testing.assert_allclose(
      scores, saved_model.signatures["serving_default"](image_bytes=encoded)["scores"].numpy(),
      atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def saved_model(trained_model):
  return tf.saved_model.load(trained_model.export_dir)


def test_export_dir_holds_the_contract(trained_model):
  export_dir = trained_model.export_dir
  assert os.path.dirname(export_dir) == os.path.join(trained_model.model_dir, "export")
  assert os.path.basename(export_dir).isdigit()
  for name in ("saved_model.pb", "variables", os.path.join("assets", "labels.txt")):
    assert os.path.exists(os.path.join(export_dir, name)), name
  assert open(os.path.join(export_dir, "assets", "labels.txt")).read().split() == list(CLASSES)
  info = json.load(open(os.path.join(export_dir, export.EXPORT_INFO_FILENAME)))
  assert info["format_version"] == 1 and info["labels"] == list(CLASSES)
  assert info["num_classes"] == 4 and info["top_k"] == 4 and info["image_size"] == 224
  assert info["backbone"] == backbone_lib.DEFAULT_HANDLE and info["loss"] == "hinge"
  assert info["resize_mode"] == "center_crop" and info["precision"] == "float32"
  assert set(info["signatures"]) == {"serving_default", "serving_keyed", "predict_images"}
  expected = calibration.read_calibration(trained_model.model_dir)
  assert info["calibration"]["method"] == expected["method"]
  assert info["calibration"]["temperature"] == pytest.approx(expected["temperature"])


def _saved_graph(export_dir):
  """The MetaGraphDef of the export's saved_model.pb."""
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top
  saved = saved_model_pb2.SavedModel()
  with open(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
    saved.ParseFromString(f.read())
  return saved.meta_graphs[0]


def _bfloat16_functions(graph):
  from tensorflow.core.framework import types_pb2  # pylint: disable=g-import-not-at-top
  return [function.signature.name for function in graph.graph_def.library.function
          if any(arg.type == types_pb2.DT_BFLOAT16 for arg in function.signature.input_arg)]


def test_the_signatures_share_one_trace_of_the_backbone_and_head(trained_model):
  """saved_model.pb holds the three signatures' functions and the one function they all
  classify through, each traced once; not the backbone module's own functions (its
  bfloat16 entry point in a float32 export), which only made the export slower."""
  graph = _saved_graph(trained_model.export_dir)
  functions = {node.function.concrete_functions[0].split("_")[-2]: node.function
               for node in graph.object_graph_def.nodes if node.WhichOneof("kind") == "function"}
  assert sorted(functions) == ["bytes", "images", "keyed", "outputs"]
  assert all(len(function.concrete_functions) == 1 for function in functions.values())
  assert not _bfloat16_functions(graph)


def test_a_bfloat16_runs_backbone_exports_float32_without_loading_again(trained_model,
                                                                         saved_model, tmp_path,
                                                                         monkeypatch):
  """bin/train hands its loaded backbone to the export: a bfloat16 pass's module (it holds
  both entry points) gives the float32 export, the same as a fresh float32 load's."""
  _, config = head_lib.load_head(trained_model.model_dir)
  loaded = backbone_lib.load_backbone(config.backbone, input_size=config.image_size,
                                      precision="bfloat16")
  assert loaded.precision == "bfloat16"

  def load_again(*unused_args, **unused_kwargs):
    raise AssertionError("the export loaded the backbone again")

  monkeypatch.setattr(backbone_lib, "load_backbone", load_again)
  export_dir = export.export_model(trained_model.model_dir, export_base=str(tmp_path),
                                   backbone=loaded)
  info = json.load(open(os.path.join(export_dir, export.EXPORT_INFO_FILENAME)))
  assert info["precision"] == "float32"
  assert not _bfloat16_functions(_saved_graph(export_dir))
  _assert_same_validation_scores(export_dir, saved_model, trained_model.records_dir)


def test_a_backbone_built_in_this_process_is_used_as_built(trained_model, saved_model, tmp_path,
                                                          monkeypatch, skimage_photos):
  """A first run on a machine builds the built-in, then takes it as built instead of loading
  back what it wrote: the same features as the saved module's, and the same export."""
  cache = tmp_path / "cache"   # empty but for the weights: the first load builds
  shutil.copytree(os.path.join(backbone_lib.cache_root(), "downloads"), cache / "downloads")
  monkeypatch.setenv("TLFRAME_CACHE_DIR", str(cache))
  _, config = head_lib.load_head(trained_model.model_dir)

  def load_back(*unused_args, **unused_kwargs):
    raise AssertionError("the module just built was loaded back from disk")

  with monkeypatch.context() as patches:
    patches.setattr(tf.saved_model, "load", load_back)
    built = backbone_lib.load_backbone(config.backbone, precision="float32")
  from_disk = backbone_lib.load_backbone(config.backbone, precision="float32")
  assert built.module is not from_disk.module and built.cache_key == from_disk.cache_key
  # What readers of a module use (fine-tuning's blocks, TF-Hub's lists), as restored.
  for name in ("variables", "trainable_variables", "regularization_losses"):
    assert ([v.name for v in getattr(built.module, name)]
            == [v.name for v in getattr(from_disk.module, name)]), name
  assert len(built.module.blocks) == len(from_disk.module.blocks)
  assert ([f.structured_input_signature for f in built.module.__call__.concrete_functions]
          == [f.structured_input_signature for f in from_disk.module.__call__.concrete_functions])
  images = tf.stack([tf.image.resize(photo, [224, 224]) / 255.0
                     for photo in skimage_photos.values()])
  np.testing.assert_array_equal(built(images).numpy(), from_disk(images).numpy())

  export_dir = export.export_model(trained_model.model_dir, export_base=str(tmp_path / "export"),
                                   backbone=built)
  _assert_same_validation_scores(export_dir, saved_model, trained_model.records_dir)


def _another_model(trained_model, model_dir):
  """A copy of the trained model with other head weights, labels and temperature: a model
  of the same export graph."""
  shutil.copytree(trained_model.model_dir, model_dir, ignore=shutil.ignore_patterns("export"))
  head, config = head_lib.load_head(str(model_dir))
  rng = np.random.default_rng(0)
  head.kernel.assign(head.kernel.numpy()[..., ::-1] + rng.normal(
      scale=0.01, size=head.kernel.shape).astype(np.float32))
  head.bias.assign(head.bias.numpy()[..., ::-1])
  head_lib.save_head(head, str(model_dir))
  config.labels = [f"other {name}" for name in config.labels]
  config.write(str(model_dir))
  calibration_path = model_dir / "calibration.json"
  calibration_json = json.loads(calibration_path.read_text())
  calibration_json["temperature"] = 0.5
  calibration_path.write_text(json.dumps(calibration_json))
  return str(model_dir)


def _classify_records(export_dir, records_dir):
  """Every signature's outputs on the validation records (also run through a TF1 session,
  whose variables come from the saver's restore op, as TF Serving's C++ loader restores
  them)."""
  encoded = [encoded for encoded, _, _ in _split_records(records_dir, "validation")]
  loaded = tf.saved_model.load(export_dir)
  images = tf.stack([pipeline.preprocess(imageformat.decode_image(data), 224, "center_crop")
                     for data in encoded])
  outputs = {
      "serving_default": loaded.signatures["serving_default"](image_bytes=tf.constant(encoded)),
      "serving_keyed": loaded.signatures["serving_keyed"](
          image_bytes=tf.constant(encoded), key=tf.constant([str(i) for i in range(len(encoded))])),
      "predict_images": loaded.signatures["predict_images"](images=images)}
  outputs = {name: {key: value.numpy() for key, value in result.items()}
             for name, result in outputs.items()}
  with tf.Graph().as_default(), tf.compat.v1.Session() as session:
    signature = tf.compat.v1.saved_model.loader.load(
        session, ["serve"], export_dir).signature_def["serving_default"]
    outputs["tf1_session"] = session.run(
        {key: value.name for key, value in signature.outputs.items()},
        {signature.inputs["image_bytes"].name: encoded})
  return outputs


def _assert_same_outputs(actual, expected):
  """`_classify_records` outputs equal: floats within 1e-6, the rest exactly."""
  for signature, outputs in expected.items():
    for name, value in outputs.items():
      if value.dtype.kind == "f":
        np.testing.assert_allclose(actual[signature][name], value, atol=1e-6, err_msg=name)
      else:
        np.testing.assert_array_equal(actual[signature][name], value, err_msg=name)


def test_an_export_of_a_known_graph_is_written_from_its_template(trained_model, tmp_path,
                                                                 monkeypatch):
  """A second model of the same graph (other weights, labels and temperature) is exported
  from the first's template: its outputs through every signature, and through TF Serving's
  way of restoring variables, are a traced export's; a template that does not read is
  replaced by a traced export."""
  monkeypatch.setattr(export.templates, "templates_dir", lambda: str(tmp_path / "templates"))
  first = export.export_model(trained_model.model_dir, export_base=str(tmp_path / "first"))
  assert len(os.listdir(tmp_path / "templates")) == 1   # the first export's graph, kept
  other = _another_model(trained_model, tmp_path / "other")
  from_template = export.export_model(other, export_base=str(tmp_path / "from_template"))
  with open(os.path.join(first, "saved_model.pb"), "rb") as f:
    first_graph = f.read()
  with open(os.path.join(from_template, "saved_model.pb"), "rb") as f:
    assert f.read() == first_graph   # not traced: the template's graph
  monkeypatch.setattr(export.templates, "templates_dir", lambda: str(tmp_path / "none"))
  traced = export.export_model(other, export_base=str(tmp_path / "traced"))
  expected = _classify_records(traced, trained_model.records_dir)
  actual = _classify_records(from_template, trained_model.records_dir)
  assert expected["serving_default"]["labels"][0].decode().startswith("other ")
  _assert_same_outputs(actual, expected)
  with open(os.path.join(from_template, "assets", "labels.txt")) as f:
    assert f.read().split("\n")[0] == f"other {CLASSES[0]}"
  # A template whose variables do not read: the export is traced, and still right.
  monkeypatch.setattr(export.templates, "templates_dir", lambda: str(tmp_path / "templates"))
  template, = (tmp_path / "templates").iterdir()
  data, = (template / "variables").glob("variables.data-*")
  data.write_bytes(data.read_bytes()[:1000])
  again = export.export_model(other, export_base=str(tmp_path / "again"))
  with open(os.path.join(again, "saved_model.pb"), "rb") as f:
    assert f.read() != first_graph
  (replaced,) = (tmp_path / "templates").iterdir()   # the traced export, kept in its place
  assert replaced.name == template.name and len(data.read_bytes()) > 1000
  np.testing.assert_allclose(_classify_records(again, trained_model.records_dir)[
      "serving_default"]["probabilities"], expected["serving_default"]["probabilities"],
                             atol=1e-6)


def test_a_template_kept_before_training_serves_the_trained_model(trained_model, tmp_path,
                                                                 monkeypatch):
  """bin/train keeps the export's template while it trains (exporter.keep_template), from
  the model's shape alone: the trained model's export is then written from it, with a
  traced export's outputs. Before the CV picks it, the normalization is "auto": none and
  standardize are one graph (a shift and scale), l2 another."""
  monkeypatch.setattr(export.templates, "templates_dir", lambda: str(tmp_path / "templates"))
  _, config = head_lib.load_head(trained_model.model_dir)
  assert config.feature_normalization != "l2"
  backbone = backbone_lib.load_backbone(config.backbone, features=config.features,
                                        input_size=config.image_size)
  shape = dict(num_classes=config.num_classes, resize_mode=config.resize_mode,
               flip_features=config.flip_features)
  key = exporter.keep_template(backbone, precision="float32", feature_normalization="auto",
                               **shape)
  assert os.listdir(tmp_path / "templates") == [key]
  keys = {normalization: export.templates.graph_key(
      backbone, feature_normalization=normalization, traced_modules=exporter._TRACED_MODULES,  # pylint: disable=protected-access
      **shape) for normalization in ("auto", "none", "standardize", "l2")}
  assert keys["none"] == keys["standardize"] == keys["auto"] == key != keys["l2"]
  with open(tmp_path / "templates" / key / "saved_model.pb", "rb") as f:
    template_graph = f.read()

  from_template = export.export_model(trained_model.model_dir,
                                      export_base=str(tmp_path / "from_template"))
  with open(os.path.join(from_template, "saved_model.pb"), "rb") as f:
    assert f.read() == template_graph
  monkeypatch.setattr(export.templates, "templates_dir", lambda: str(tmp_path / "none"))
  traced = export.export_model(trained_model.model_dir, export_base=str(tmp_path / "traced"))
  expected = _classify_records(traced, trained_model.records_dir)
  actual = _classify_records(from_template, trained_model.records_dir)
  assert set(expected["serving_default"]["labels"]) <= {name.encode() for name in CLASSES}
  _assert_same_outputs(actual, expected)


def test_a_run_whose_template_could_not_be_kept_traces_its_export(trained_model, tmp_path,
                                                                  monkeypatch, caplog):
  """When keeping the template ahead fails (its thread raises), the run says so and traces
  its export, which classifies as the same model's export does."""
  monkeypatch.setattr(export.templates, "templates_dir", lambda: str(tmp_path / "templates"))

  def fail(*args, **kwargs):
    raise OSError("no space left on device")

  monkeypatch.setattr(exporter, "keep_template", fail)
  caplog.set_level(logging.WARNING, logger="absl")
  metrics = train.train(train.TrainOptions(
      records_dir=trained_model.records_dir, model_dir=str(tmp_path / "model"),
      backbone=backbone_lib.DEFAULT_HANDLE, loss="hinge"))
  assert ("Could not keep the export's graph ahead (OSError: no space left on device): the "
          "export traces it") in caplog.text
  assert len(os.listdir(tmp_path / "templates")) == 1   # the traced export, kept
  expected = _classify_records(trained_model.export_dir, trained_model.records_dir)
  actual = _classify_records(metrics["export_dir"], trained_model.records_dir)
  np.testing.assert_array_equal(actual["serving_default"]["labels"],
                                expected["serving_default"]["labels"])
  np.testing.assert_allclose(actual["serving_default"]["probabilities"],
                             expected["serving_default"]["probabilities"], atol=1e-5)


def test_scores_equal_the_training_evaluation(trained_model, saved_model):
  """serving_default on the validation records' bytes == training's pipeline + backbone + head."""
  examples = _split_records(trained_model.records_dir, "validation")
  assert len(examples) >= 8
  outputs = saved_model.signatures["serving_default"](
      image_bytes=tf.constant([encoded for encoded, _, _ in examples]))
  # What training computes for these records: its pipeline, the backbone, the saved head.
  head, config = head_lib.load_head(trained_model.model_dir)
  backbone = backbone_lib.load_backbone(config.backbone, input_size=config.image_size)
  dataset = pipeline.make_dataset(records.split_file_pattern(trained_model.records_dir,
                                                             "validation"),
                                  64, image_size=config.image_size,
                                  resize_mode=config.resize_mode)
  expected = np.concatenate([head(backbone(images)).numpy() for images, _ in dataset])
  scores = outputs["scores"].numpy()
  np.testing.assert_allclose(scores, expected, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(np.argmax(scores, 1), np.argmax(expected, 1))
  labels = np.array([label for _, label, _ in examples])
  accuracy = np.mean(outputs["classes"].numpy() == labels)
  assert accuracy == pytest.approx(trained_model.metrics["validation"]["accuracy"])
  assert accuracy >= 0.9
  # The other outputs follow from the scores.
  temperature = calibration.read_calibration(trained_model.model_dir)["temperature"]
  np.testing.assert_allclose(outputs["probabilities"].numpy(),
                             calibration.softmax(expected, temperature), atol=1e-4)
  names = np.array(CLASSES)
  assert [s.decode() for s in outputs["labels"].numpy()] == list(names[np.argmax(scores, 1)])
  top = outputs["top_k_probabilities"].numpy()
  assert np.all(np.diff(top, axis=1) <= 0) and top.shape == (len(examples), 4)


def test_bytes_signature_equals_predict_images_on_decoded_pixels(trained_model, saved_model):
  examples = _split_records(trained_model.records_dir, "validation")[:6]
  encoded = [e for e, _, _ in examples]
  from_bytes = saved_model.signatures["serving_default"](image_bytes=tf.constant(encoded))
  pixels = tf.stack([tf.image.convert_image_dtype(imageformat.decode_image(e), tf.float32)
                     for e in encoded])
  assert pixels.shape[1:3] == (160, 160)  # resized inside the signature
  from_pixels = saved_model.signatures["predict_images"](images=pixels)
  # Already at the model's size (no per-image resize inside): still the same.
  resized = tf.stack([pipeline.preprocess(imageformat.decode_image(e), 224) for e in encoded])
  from_resized = saved_model.signatures["predict_images"](images=resized)
  for other in (from_pixels, from_resized):
    np.testing.assert_allclose(other["scores"].numpy(), from_bytes["scores"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(other["classes"].numpy(), from_bytes["classes"].numpy())
  keyed = saved_model.signatures["serving_keyed"](
      image_bytes=tf.constant(encoded), key=tf.constant([f"k{i}" for i in range(len(encoded))]))
  assert [k.decode() for k in keyed["key"].numpy()] == [f"k{i}" for i in range(len(encoded))]
  np.testing.assert_allclose(keyed["scores"].numpy(), from_bytes["scores"].numpy(), atol=1e-6)


def test_jpeg_and_png_of_the_same_picture_get_the_same_class(trained_model, saved_model):
  for name, photo in trained_model.photos.items():
    jpeg = tf.io.encode_jpeg(photo, quality=85).numpy()
    png = tf.io.encode_png(photo).numpy()
    outputs = saved_model.signatures["serving_default"](image_bytes=tf.constant([jpeg, png]))
    assert [label.decode() for label in outputs["labels"].numpy()] == [name, name]


@pytest.mark.slow
def test_a_process_with_only_tensorflow_loads_the_export_and_classifies_bytes(trained_model,
                                                                              tmp_path):
  paths = []
  for name, photo in trained_model.photos.items():
    path = tmp_path / f"{name}.jpg"
    path.write_bytes(tf.io.encode_jpeg(photo).numpy())
    paths.append(str(path))
  script = textwrap.dedent("""
      import json, sys
      import tensorflow as tf
      model = tf.saved_model.load(sys.argv[1])
      data = [open(path, "rb").read() for path in sys.argv[2:]]
      outputs = model.signatures["serving_default"](image_bytes=tf.constant(data))
      print(json.dumps({
          "labels": [label.decode() for label in outputs["labels"].numpy()],
          "modules": [name for name in sys.modules
                      if name.split(".")[0] in ("tlframe", "tensorflow_hub")]}))
  """)
  result = subprocess.run([sys.executable, "-c", script, trained_model.export_dir, *paths],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  answer = json.loads(result.stdout.strip().splitlines()[-1])
  assert answer["labels"] == list(trained_model.photos)
  assert answer["modules"] == []


@pytest.mark.slow
def test_tflite_agrees_with_the_saved_model_and_versions_increment(trained_model):
  previous = int(os.path.basename(trained_model.export_dir))
  export_dir = export.export_model(trained_model.model_dir, tflite=True)
  assert int(os.path.basename(export_dir)) > previous
  assert export.latest_version(os.path.join(trained_model.model_dir, "export")) == export_dir
  info = json.load(open(os.path.join(export_dir, export.EXPORT_INFO_FILENAME)))
  assert info["tflite"] == "tflite/model.tflite"
  assert open(os.path.join(export_dir, "tflite", "labels.txt")).read().split() == list(CLASSES)
  model = open(os.path.join(export_dir, info["tflite"]), "rb").read()
  encoded = [tf.io.encode_jpeg(photo).numpy() for photo in trained_model.photos.values()]
  saved = tf.saved_model.load(export_dir).signatures["serving_default"](
      image_bytes=tf.constant(encoded))["probabilities"].numpy()
  images = np.stack([pipeline.preprocess(imageformat.decode_image(e), 224).numpy()
                     for e in encoded])
  lite = export.tflite_classify(model, images)
  np.testing.assert_array_equal(np.argmax(lite, 1), np.argmax(saved, 1))
  np.testing.assert_allclose(lite, saved, atol=1e-3)
  assert list(np.array(CLASSES)[np.argmax(lite, 1)]) == list(trained_model.photos)
