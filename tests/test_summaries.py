"""tlframe's eager image and histogram summaries write TensorBoard's own records."""

import numpy as np
import tensorflow as tf

from tlframe.train import summaries


def _records(log_dir):
  """{tag: (step, value, metadata)} of the summaries written under `log_dir`."""
  records = {}
  for record in tf.data.TFRecordDataset(tf.io.gfile.glob(f"{log_dir}/events.out.tfevents.*")):
    event = tf.compat.v1.Event.FromString(record.numpy())
    for value in event.summary.value:
      records[value.tag] = (event.step, tf.make_ndarray(value.tensor), value.metadata)
  return records


def test_image_and_histogram_records_are_tensorboards(tmp_path):
  rng = np.random.default_rng(0)
  picture = rng.integers(0, 256, (60, 84, 3), dtype=np.uint8)
  scores = rng.normal(size=(35, 4)).astype(np.float32)
  writer = tf.summary.create_file_writer(str(tmp_path))
  with writer.as_default(step=3):
    tf.summary.image("theirs/image", picture[None], description="a grid")
    summaries.image("ours/image", picture, description="a grid")
    tf.summary.histogram("theirs/histogram", scores)
    summaries.histogram("ours/histogram", scores)
  writer.close()
  records = _records(tmp_path)
  for kind in ("image", "histogram"):
    (step, theirs, their_metadata), (our_step, ours, our_metadata) = (
        records[f"theirs/{kind}"], records[f"ours/{kind}"])
    assert our_step == step == 3
    assert our_metadata == their_metadata, kind
    assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), kind
  # The image record decodes to the picture: width, height, then the PNG.
  _, ours, _ = records["ours/image"]
  assert [int(ours[0]), int(ours[1])] == [84, 60]
  np.testing.assert_array_equal(tf.io.decode_png(ours[2]).numpy(), picture)
