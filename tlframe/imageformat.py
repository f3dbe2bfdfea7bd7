"""The one image decoder, shared by every stage.

`records` decodes every image with it before writing (so whatever lands in a
record, the pipeline can read), `pipeline` decodes records with it, and
`export` puts the same decoder into the SavedModel, so that training and
prediction see the same pixels for the same bytes. The record's keys are
tlframe.records.example_format's.

The decoder turns JPEGs upright by their EXIF orientation (phones store most
photos sideways and say so in the EXIF), in TensorFlow ops, so every stage that
decodes bytes applies it identically. Before any pixel is decoded from an
untrusted file, `sniff` reads its header, so that a decompression bomb costs
nothing (`decode_checked`).
"""

import contextlib
import os
import re
import struct
import sys
import tempfile

import tensorflow as tf

DEFAULT_MAX_PIXELS = 100_000_000  # ~10000x10000: above any camera photo, far below a bomb

# JPEG markers: start of image, the frame headers that carry the size, start of
# scan, end of image, and APP1 (where EXIF lives).
_SOI = 0xD8
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SOS, _EOI, _APP1 = 0xDA, 0xD9, 0xE1
# EXIF sits in APP1 right after SOI (or after a JFIF APP0): the first 64 KiB
# hold it, long before the picture data.
_EXIF_SEARCH_BYTES = 1 << 16
_EXIF_ID = b"Exif\0\0"
_EXIF_MAX_IFD_ENTRIES = 64
_ORIENTATION_TAG = 0x0112
_TIFF_SHORT = 3
# What libjpeg prints (and nothing else tells) when it filled missing data with gray.
_LIBJPEG_PARTIAL_DECODE = ("Corrupt JPEG data", "Premature end of JPEG file")


class ImageError(ValueError):
  """Bytes that are not a usable image; the message says why, in a few words."""


def op_error_text(error):
  """The one line a user needs from a TensorFlow op error, eager or from a tf.function.

  Drops the node and op names ({{function_node ...}}, [[{{node ...}}]], [Op:...])
  and a tf.function's "Graph execution error" preamble with its stack.
  """
  message = getattr(error, "message", None) or str(error)
  message = re.sub(r"\{\{[^}]*\}\}|\[\[[^\]]*\]\]|\[Op:[^\]]*\]( name: \S*)?", "", message)
  for line in message.splitlines():
    line = line.strip()
    if line and not line.startswith(("Graph execution error", "Detected at node", "File ")):
      return line
  return type(error).__name__


# ---------------------------------------------------------------------------
# Headers: format and size without decoding a pixel.


def sniff(data):
  """(format, width, height, note) from the header alone; ImageError when it is none we read.

  note is 'cmyk' or '16bit' when the image must be re-encoded for other readers.
  """
  if not data:
    raise ImageError("empty file")
  if data[:3] == b"\xff\xd8\xff":
    width, height, components = _jpeg_frame(data)
    return "jpeg", width, height, "cmyk" if components == 4 else None
  if data[:8] == b"\x89PNG\r\n\x1a\n":
    if len(data) < 26 or data[12:16] != b"IHDR":
      raise ImageError("truncated PNG header")
    width, height, bit_depth = struct.unpack(">IIB", data[16:25])
    return "png", width, height, "16bit" if bit_depth == 16 else None
  if data[:6] in (b"GIF87a", b"GIF89a"):
    if len(data) < 10:
      raise ImageError("truncated GIF header")
    width, height = struct.unpack("<HH", data[6:10])
    return "gif", width, height, None
  if data[:2] == b"BM":
    if len(data) < 26:
      raise ImageError("truncated BMP header")
    if struct.unpack("<I", data[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER
      width, height = struct.unpack("<hh", data[18:22])
    else:
      width, height = struct.unpack("<ii", data[18:26])
    return "bmp", abs(width), abs(height), None
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return ("webp",) + _webp_size(data) + (None,)
  raise ImageError("not an image (unrecognized file format)")


def _jpeg_frame(data):
  """(width, height, components) from a JPEG's frame header, walking its marker segments.

  Read in Python rather than by tf.io.extract_jpeg_shape, which has libjpeg
  print "Improper call to JPEG library" for every truncated header.
  """
  pos = 2
  while pos + 4 <= len(data):
    if data[pos] != 0xFF:
      break
    marker = data[pos + 1]
    if marker == 0xFF:  # fill byte
      pos += 1
      continue
    if marker in (_SOS, _EOI):
      break
    length = int.from_bytes(data[pos + 2:pos + 4], "big")
    if marker in _SOF_MARKERS and length >= 8 and pos + 10 <= len(data):
      height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
      return width, height, data[pos + 9]
    if length < 2:
      break
    pos += 2 + length
  raise ImageError("corrupt or truncated JPEG header")


def _webp_size(data):
  chunk = data[12:16]
  try:
    if chunk == b"VP8 ":
      width, height = struct.unpack("<HH", data[26:30])
      return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
      bits = struct.unpack("<I", data[21:25])[0]
      return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
      return (int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1)
  except struct.error:
    pass
  raise ImageError("truncated or unknown WebP header")


# ---------------------------------------------------------------------------
# Decoding.


@tf.function(input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
def decode_image(image_bytes):
  """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> upright uint8 [H, W, 3] (GIF: first frame).

  Grayscale and RGBA become RGB, CMYK JPEGs are converted by libjpeg, 16-bit
  PNGs are scaled to 8 bits, and a JPEG is turned upright by its EXIF
  orientation. Pure TensorFlow ops, so it runs inside tf.data and inside an
  exported SavedModel. Raises InvalidArgumentError for bytes that are not a
  decodable image.
  """
  image = tf.io.decode_image(image_bytes, channels=3, dtype=tf.uint8, expand_animations=False)
  image = orient(image, exif_orientation(image_bytes))
  image.set_shape([None, None, 3])
  return image


def exif_orientation(image_bytes):
  """The EXIF Orientation (1-8, int32 scalar tensor) of JPEG bytes; 1 when absent or invalid.

  Finds the APP1 "Exif" segment in the first 64 KiB (it follows SOI, or a JFIF
  APP0), then reads tag 0x0112 of IFD0 in the TIFF header's byte order ("II"
  little-endian or "MM" big-endian): a few dozen small ops per image, no loop.
  Reads are clamped to the bytes and zero-padded, so malformed offsets read
  zeros instead of failing.
  """
  total = tf.cast(tf.strings.length(image_bytes), tf.int64)

  def read(pos, num_bytes):
    """int64 [num_bytes]: the bytes at `pos`, zeros past the end."""
    pos = tf.cast(tf.clip_by_value(tf.cast(pos, tf.int64), 0, total), tf.int32)
    raw = tf.io.decode_raw(tf.strings.substr(image_bytes, pos, num_bytes), tf.uint8)
    return tf.cast(tf.pad(raw, [[0, num_bytes - tf.size(raw)]]), tf.int64)

  def uint(raw, start, num_bytes, little_endian):
    values = [raw[..., start + i] for i in range(num_bytes)]
    big = sum(value * 256**(num_bytes - 1 - i) for i, value in enumerate(values))
    little = sum(value * 256**i for i, value in enumerate(values))
    return tf.where(little_endian, little, big)

  # The text before the first "Exif\0\0" ends with the APP1 marker and length.
  before_exif = tf.strings.split(tf.strings.substr(image_bytes, 0, _EXIF_SEARCH_BYTES),
                                 sep=_EXIF_ID, maxsplit=1)
  exif_at = tf.cast(tf.strings.length(before_exif[0]), tf.int64)
  start, marker = read(0, 2), read(exif_at - 4, 2)
  found = ((tf.size(before_exif) == 2) & (start[0] == 0xFF) & (start[1] == _SOI)
           & (marker[0] == 0xFF) & (marker[1] == _APP1))
  tiff = tf.where(found, exif_at + len(_EXIF_ID), -1)
  header = read(tiff, 8)  # byte order, 42, offset of IFD0
  little_endian = (header[0] == ord("I")) & (header[1] == ord("I"))
  byte_order_ok = little_endian | ((header[0] == ord("M")) & (header[1] == ord("M")))
  ifd = read(tiff + uint(header, 4, 4, little_endian), 2 + 12 * _EXIF_MAX_IFD_ENTRIES)
  entries = tf.reshape(ifd[2:], [_EXIF_MAX_IFD_ENTRIES, 12])
  is_orientation = (
      (tf.range(_EXIF_MAX_IFD_ENTRIES, dtype=tf.int64) < uint(ifd, 0, 2, little_endian))
      & (uint(entries, 0, 2, little_endian) == _ORIENTATION_TAG)
      & (uint(entries, 2, 2, little_endian) == _TIFF_SHORT))
  # A SHORT value sits in the first two bytes of the entry's value field.
  orientation = tf.reduce_max(tf.where(is_orientation, uint(entries, 8, 2, little_endian), 0))
  valid = found & byte_order_ok & (orientation >= 1) & (orientation <= 8)
  return tf.cast(tf.where(valid, orientation, 1), tf.int32)


def orient(image, orientation):
  """`image` [H, W, C] turned upright for an EXIF `orientation` 1-8 (as PIL's exif_transpose).

  5-8 are stored on their side: transposed first; then each orientation is a
  flip of rows and/or columns (none for 1 and 5).
  """
  image = tf.cond(orientation >= 5, lambda: tf.transpose(image, [1, 0, 2]), lambda: image)
  image = tf.cond(tf.reduce_any(orientation == [3, 4, 7, 8]),
                  lambda: tf.reverse(image, [0]), lambda: image)
  return tf.cond(tf.reduce_any(orientation == [2, 3, 6, 7]),
                 lambda: tf.reverse(image, [1]), lambda: image)


def check_header(data, max_pixels=DEFAULT_MAX_PIXELS, limit_name="the limit of"):
  """`sniff(data)`, or ImageError for a header of no pixels or of more than `max_pixels`.

  The check before any decode of untrusted bytes: a decompression bomb (a small
  file declaring 20000x20000 pixels) is refused at its header.
  """
  image_format, width, height, note = sniff(data)
  if width * height > max_pixels:
    raise ImageError(f"{width}x{height} = {width * height} pixels is over {limit_name} "
                     f"{max_pixels} (a decompression bomb?)")
  if width == 0 or height == 0:
    raise ImageError(f"{width}x{height}: empty image")
  return image_format, width, height, note


def decode_within(image_bytes, max_pixels):
  """`decode_image` of untrusted bytes in tf.data, after `check_header`: no bomb is decoded.

  A header that fails the check raises InvalidArgumentError, as undecodable bytes do.
  """
  def header_passes(data):
    try:
      # bytes in a graph (tf.data); a 0-d object array when run eagerly.
      check_header(data if isinstance(data, bytes) else data.item(), max_pixels)
    except ImageError:
      return False
    return True

  passes = tf.numpy_function(header_passes, [image_bytes], tf.bool, stateful=False)
  with tf.control_dependencies([tf.debugging.Assert(passes, ["image header check failed"])]):
    return decode_image(tf.identity(image_bytes))


def decode_checked(data, max_pixels=DEFAULT_MAX_PIXELS, limit_name="the limit of"):
  """Untrusted file bytes -> (upright uint8 [H, W, 3] tensor, format, note), or ImageError.

  Eager. The header is read first (`sniff`), so a file declaring more than
  `max_pixels` pixels is refused before decoding (the message says "over
  {limit_name} {max_pixels}"). A JPEG that libjpeg decodes
  only partially, filling what is missing with gray (a truncated file, or a
  header claiming more pixels than the file holds), is refused too: libjpeg
  says so only on stderr, so that is captured around the decode.
  """
  image_format, _, _, note = check_header(data, max_pixels, limit_name)
  with _stderr_lines() as messages:
    try:
      image = decode_image(data)
    except tf.errors.OpError as e:
      raise ImageError(f"does not decode: {op_error_text(e)}") from None
  partial = [line for line in messages if line.startswith(_LIBJPEG_PARTIAL_DECODE)]
  if partial:
    raise ImageError(f"decodes only partially ({partial[0].strip()}): a truncated file, or a "
                     f"header claiming more than its {len(data)} bytes hold")
  return image, image_format, note


@contextlib.contextmanager
def _stderr_lines():
  """Captures what is written to file descriptor 2 meanwhile; the list fills on exit.

  Lines that are not libjpeg's partial-decode warnings are written back to stderr.
  """
  lines = []
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield lines
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines.extend(captured.read().decode("utf-8", "replace").splitlines(keepends=True))
      others = "".join(line for line in lines if not line.startswith(_LIBJPEG_PARTIAL_DECODE))
      if others:
        os.write(2, others.encode("utf-8"))

