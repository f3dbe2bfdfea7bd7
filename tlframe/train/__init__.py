"""The training stage: features of the frozen backbone -> a trained head in a model dir.

- `run`: `train(options)`, the run's outline (bin/train's library);
- `features`: `FeatureSet`, a split's features as training reads them;
- `extraction`: the backbone pass over a split's records;
- `feature_cache`: that pass kept on disk, shared by every model dir;
- `head`: the linear head, its losses, save and load;
- `fit_loop`: `FitLoop`, the loop both trainers share (early stopping, best weights);
- `trainer`: `HeadTrainer` (the head on cached or augmented features);
- `finetune`: fine-tuning the backbone's top blocks;
- `tuned_blocks`: which blocks train, their values kept for the export;
- `tuning`: the L2 penalty by cross-validation;
- `calibration`: the softmax temperature and reliability;
- `metrics`, `summaries` (TensorBoard), `distribution` (tf.distribute);
- `layout`: the name of every file and folder in a model dir (what readers need);
- `model_dir`: whether a run may resume, retrain or must refuse; --overwrite;
- `backbone_choice`: `--backbone=auto`;
- `data_checks`, `training_report`: near duplicates, suspect labels, report.html.
"""

from tlframe import _lazy

__all__, __getattr__, __dir__ = _lazy.exports(__name__, {
    "run": ("train",),
    "tlframe.options": ("TrainOptions",),
})
