"""tlframe: image classifiers by transfer learning on a frozen ImageNet backbone.

Data flows one way, one module per stage:
files -> `records` (sharded TFRecords) -> `pipeline` (fixed-size tf.data batches)
-> `backbone` (frozen TF-Hub featurizer) -> `head` / `train` (linear hinge or
softmax head) -> export.
"""

__version__ = "0.1.0"
