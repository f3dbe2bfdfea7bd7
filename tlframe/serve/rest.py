"""TensorFlow Serving's REST JSON for predict: requests -> model inputs -> answers.

Row (`instances`) and columnar (`inputs`) requests, `{"b64": ...}` bytes, the
signature's input specs, and answers with floats printed as TF Serving prints
them (tensorflow_serving/util/json_tensor.cc). Errors are `RequestError`s with
TF Serving's status codes.
"""

import base64
import binascii
import json

import numpy as np
import tensorflow as tf

from tlframe import export

DEFAULT_SIGNATURE = export.SERVING_DEFAULT
KEYED_SIGNATURE = export.SERVING_KEYED
IMAGE_BYTES_INPUT = "image_bytes"
KEY_INPUT = "key"
# Doubles hold the powers of ten 1e0 .. 1e22 exactly.
_EXACT_POWERS_OF_TEN = 22


class RequestError(Exception):
  """A request the server refuses: becomes `{"error": message}` with `status`."""

  def __init__(self, status, message):
    super().__init__(message)
    self.status = status
    self.message = message


def _is_b64(value):
  return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _is_named_object(value):
  return isinstance(value, dict) and not _is_b64(value)


def _short_json(value, limit=200):
  text = json.dumps(value)
  return text if len(text) <= limit else text[:limit] + "..."


def _string_value(value, index):
  if _is_b64(value):
    text = value["b64"]
    try:
      return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
      raise RequestError(400, f"instance {index}: Unable to base64 decode its \"b64\" "
                         "value") from None
  if isinstance(value, str):
    return value.encode("utf-8")
  raise RequestError(400, f"instance {index}: JSON Value: {_short_json(value)} is not of "
                     'expected type: string (bytes go as {"b64": "<base64>"})')


def _to_array(values, name, spec):
  """A list of per-instance JSON values -> one array for input `name` of `spec`."""
  if spec.dtype == tf.string:
    if spec.shape.rank != 1:
      raise RequestError(400, f"input {name!r} of rank {spec.shape.rank} is not supported")
    return np.array([_string_value(value, index) for index, value in enumerate(values)],
                    dtype=object)
  try:
    with np.errstate(over="ignore"):  # a value beyond float32's range becomes inf: refused below
      array = np.asarray(values, dtype=spec.dtype.as_numpy_dtype)
  except (TypeError, ValueError) as e:
    raise RequestError(400, f"input {name!r}: the values are not a dense numeric "
                       f"{spec.dtype.name} tensor: {e}") from None
  if not spec.shape.is_compatible_with(array.shape):
    raise RequestError(400, f"input {name!r}: expecting shape {_shape_text(spec.shape)} but got "
                       f"{list(array.shape)}")
  if spec.dtype.is_floating and array.size:
    # Python's JSON reads NaN and Infinity; a model would answer them with confident nonsense.
    rows = np.atleast_1d(array)
    finite = np.isfinite(rows).reshape(len(rows), -1).all(axis=1)
    if not finite.all():
      index = int(np.argmin(finite))
      raise RequestError(400, f"instance {index}: input {name!r} holds NaN or infinite values "
                         "(or values beyond float32's range); send finite numbers (pixels are "
                         "floats in [0, 1])")
  return array


def _shape_text(shape):
  return "[" + ",".join("-1" if d is None else str(d) for d in shape.as_list()) + "]"


def _row_inputs(instances, specs):
  """The row format (`instances`): one value or one object of named inputs per instance."""
  if not isinstance(instances, list):
    raise RequestError(400, "Excepting 'instances' to be an list/array")
  if not instances:
    raise RequestError(400, "No values in 'instances' array")
  names = sorted(specs)
  objects = _is_named_object(instances[0])
  if not objects and len(names) > 1:
    raise RequestError(400, "instances is a plain list, but expecting list of objects as "
                       f"multiple input tensors required as per tensorinfo_map ({','.join(names)})")
  columns = {name: [] for name in names}
  for index, instance in enumerate(instances):
    if objects:
      if not _is_named_object(instance):
        raise RequestError(400, f"Expecting object but got list at item {index} of input list")
      if sorted(instance) != names:
        raise RequestError(400, f"Failed to process element: {index} of 'instances' list. "
                           f"JSON object: {_short_json(instance)} keys must be equal to: "
                           f"{','.join(names)}")
      for name in names:
        columns[name].append(instance[name])
    else:
      if _is_named_object(instance):
        raise RequestError(400, f"Expecting value/list but got object at item {index} of "
                           "input list")
      columns[names[0]].append(instance)
  return {name: _to_array(values, name, specs[name]) for name, values in columns.items()}


def _columnar_inputs(inputs, specs):
  """The columnar format (`inputs`): one list, or an object of named lists."""
  names = sorted(specs)
  if not _is_named_object(inputs):
    if len(names) > 1:
      raise RequestError(400, "inputs is a plain value/list, but expecting an object as multiple "
                         f"input tensors required as per tensorinfo_map ({','.join(names)})")
    inputs = {names[0]: inputs}
  arrays = {}
  for name in names:
    if name not in inputs:
      raise RequestError(400, f"Missing named input: {name} in 'inputs' object.")
    if not isinstance(inputs[name], list):
      raise RequestError(400, f"input {name!r}: expecting a list with one item per image")
    arrays[name] = _to_array(inputs[name], name, specs[name])
  sizes = {len(array) for array in arrays.values()}
  if len(sizes) > 1:
    raise RequestError(400, f"the named inputs have different batch sizes: {sorted(sizes)}")
  if sizes == {0}:
    raise RequestError(400, "No values in 'inputs'")
  return arrays


def _choose_signature(body, servable):
  """`signature_name`, else serving_keyed for keyed instances, else serving_default."""
  if "signature_name" in body:
    name = body["signature_name"]
    if not isinstance(name, str):
      raise RequestError(400, "'signature_name' key must be a string value.")
    name = name or DEFAULT_SIGNATURE
    if name not in servable.signatures:
      raise RequestError(400, f'Serving signature name: "{name}" not found in signature def')
    return name
  first = body.get("instances", [None])
  first = first[0] if isinstance(first, list) and first else None
  columns = body.get("inputs")
  keyed = ((_is_named_object(first) and KEY_INPUT in first)
           or (_is_named_object(columns) and KEY_INPUT in columns))
  return KEYED_SIGNATURE if keyed and KEYED_SIGNATURE in servable.signatures else DEFAULT_SIGNATURE


def parse_predict_request(body_bytes, servable):
  """A predict body -> (signature name, {input: array}, row format?). Raises RequestError."""
  try:
    body = json.loads(body_bytes)
  except UnicodeDecodeError:
    raise RequestError(400, "JSON Parse error: the body is not UTF-8") from None
  except json.JSONDecodeError as e:
    raise RequestError(400, f"JSON Parse error: {e.msg} at offset: {e.pos}") from None
  except RecursionError:
    raise RequestError(400, "JSON Parse error: nested too deeply") from None
  if not isinstance(body, dict):
    raise RequestError(400, f"JSON Value: {_short_json(body)} Is not object")
  if "instances" in body and "inputs" in body:
    raise RequestError(400, "Not formatted correctly expecting only one of 'inputs' or "
                       "'instances' keys to exist")
  if "instances" not in body and "inputs" not in body:
    raise RequestError(400, "Missing 'inputs' or 'instances' key")
  signature = _choose_signature(body, servable)
  specs = servable.input_specs[signature]
  if "instances" in body:
    return signature, _row_inputs(body["instances"], specs), True
  return signature, _columnar_inputs(body["inputs"], specs), False


def _tf_serving_floats(array):
  """float32 values as the numbers TF Serving writes for them (json_tensor.cc's WriteDecimal).

  That is printf's %g (six significant digits) where it reads back as the same
  float32, else nine digits. Rounded in numpy, so that a 1000-class output
  costs no Python loop; only values beyond 1e-14 .. 1e27, where a power of ten
  is no exact double, are formatted one by one.
  """
  wide = array.astype(np.float64)
  finite = np.isfinite(wide) & (wide != 0)
  exponent = np.floor(np.log10(np.abs(np.where(finite, wide, 1.0))))

  def rounded(digits):
    power = np.clip(digits - 1 - exponent, -_EXACT_POWERS_OF_TEN, _EXACT_POWERS_OF_TEN)
    return np.where(power >= 0, np.round(wide * 10.0**power) / 10.0**power,
                    np.round(wide / 10.0**-power) * 10.0**-power)

  six = rounded(6)
  values = np.where(finite, np.where(six.astype(np.float32) == array, six, rounded(9)), wide)
  inexact = finite & ((exponent < 8 - _EXACT_POWERS_OF_TEN) | (exponent > 5 + _EXACT_POWERS_OF_TEN))
  for index in zip(*np.nonzero(inexact)):
    value = float(wide[index])
    text = f"{value:g}"
    values[index] = float(text if np.float32(text) == array[index] else f"{value:.9g}")
  return values


def _json_values(array):
  """An output array as JSON lists, numbers as TF Serving writes them."""
  if array.dtype == np.float32:
    return _tf_serving_floats(array).tolist()
  if array.dtype == object:
    return np.array([value.decode("utf-8", "replace") for value in array.ravel()],
                    dtype=object).reshape(array.shape).tolist()
  return array.tolist()


def format_predict_response(outputs, row_format):
  """{"predictions": [...]} (row) or {"outputs": {...}} (columnar), TF Serving's shapes."""
  names = sorted(outputs)
  columns = {name: _json_values(outputs[name]) for name in names}
  if not row_format:
    return {"outputs": columns if len(names) > 1 else columns[names[0]]}
  if len(names) == 1:
    return {"predictions": columns[names[0]]}
  size = len(columns[names[0]])
  return {"predictions": [{name: columns[name][i] for name in names} for i in range(size)]}


