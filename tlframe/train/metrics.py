"""Classification metrics of scores against labels, as plain JSON-ready data."""

import numpy as np


def classification_metrics(scores, labels, label_names):
  """Accuracy, confusion matrix and per-class precision/recall of [N, C] scores."""
  num_classes = len(label_names)
  predictions = np.argmax(scores, axis=-1)
  confusion = np.zeros([num_classes, num_classes], np.int64)
  np.add.at(confusion, (labels, predictions), 1)
  true_counts = confusion.sum(axis=1)
  predicted_counts = confusion.sum(axis=0)
  diagonal = np.diag(confusion)
  recall = np.where(true_counts > 0, diagonal / np.maximum(true_counts, 1), 0.0)
  precision = np.where(predicted_counts > 0, diagonal / np.maximum(predicted_counts, 1), 0.0)
  return dict(
      accuracy=float(diagonal.sum() / max(1, len(labels))),
      num_examples=int(len(labels)),
      confusion_matrix=confusion.tolist(),
      per_class={name: dict(precision=float(precision[i]), recall=float(recall[i]),
                            count=int(true_counts[i]))
                 for i, name in enumerate(label_names)})
