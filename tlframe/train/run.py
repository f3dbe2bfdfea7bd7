"""A training run of the linear head: `train(TrainOptions)` is bin/train.

The run, top to bottom (`train`):
1. check the options and the records, take the model dir's lock, and decide
   whether the run resumes, trains a new head, or is refused (`model_dir`);
2. one backbone pass over the train and validation records (`extraction`), or
   its features from the shared cache (`feature_cache`): shared out over the
   replicas and workers of the strategy, kept in memory or, beyond
   --max_in_memory_features, streamed from the cache;
3. choose l2 by cross-validation on the cached features unless --l2 fixes it
   (`tuning`, on a subsample when streamed; also before augmented training);
4. train the head in-graph under the tf.distribute strategy (`trainer`), with
   checkpoints, TensorBoard summaries and early stopping;
5. fit the probability temperature (`calibration`), measure train,
   validation and test accuracy (the test split is only reported, never used
   for a choice), and write the model: head, labels, metrics.json, and the
   report with its labelled plots (`training_report`);
6. export a SavedModel on image bytes into model_dir/export/<N>/ (`export`),
   from the export template (tlframe/export/templates.py) that a thread traced for
   the model's shape during step 2.

With --fine_tune, the top blocks of the backbone then train with the head
(`finetune`) between 4 and 5, and step 5 evaluates and calibrates on the
features of the fine-tuned backbone.
"""

import concurrent.futures
import dataclasses
import os
import time

import tensorflow as tf
from absl import logging

from tlframe.backbone import loading as backbone_lib
from tlframe.train import backbone_choice
from tlframe.train import calibration as calibration_lib
from tlframe.train import data_checks
from tlframe.train import distribution
from tlframe.export import exporter as export_lib
from tlframe.train import feature_cache
from tlframe.train import features as features_lib
from tlframe.train import finetune
from tlframe.util import fileio
from tlframe.train import head as head_lib
from tlframe.util import locking
from tlframe.train import metrics as metrics_lib
from tlframe.train import layout as model_dir_layout
from tlframe.train import model_dir as model_dir_lib
from tlframe import options as options_lib
from tlframe import records
from tlframe.train import summaries
from tlframe.train import trainer as trainer_lib
from tlframe.train import training_report
from tlframe.train import tuned_blocks
from tlframe.train import tuning
from tlframe.errors import UserError
from tlframe.options import TrainOptions  # noqa: F401  # pylint: disable=unused-import  (the API's options)


def train(options):
  """Trains a head as `options` say; writes model_dir; returns the metrics dict."""
  options_lib.check(options)
  if not tf.io.gfile.isdir(options.records_dir):
    fileio.check_filesystem(options.records_dir, "records_dir")
    raise UserError(f"records_dir={options.records_dir} does not exist: run "
                    "bin/make_tfrecords first", arguments=["records_dir"])
  strategy = distribution.make_strategy(options.strategy)
  if not distribution.is_chief(strategy):
    return _run(options, strategy)
  with locking.DirectoryLock(options.model_dir, what="bin/train"):
    return _run(options, strategy)


def _run(options, strategy):
  start = time.monotonic()
  chief = distribution.is_chief(strategy)
  options, choice = backbone_choice.resolve(options)   # --backbone=auto, before anything uses it
  # Counted with the load: auto may measure speeds and build the backbone it chooses.
  choice_seconds = time.monotonic() - start
  choice = choice.as_dict() if choice else None
  finished = None if options.force_export else _finished_run(options)
  if finished is not None:
    logging.info("%s is up to date: its last run had these settings and these records "
                 "(--force_export redoes it)", options.model_dir)
    return dict(finished, up_to_date=True, epochs_run_now=0)
  label_names = records.read_labels(options.records_dir)
  identity = model_dir_lib.run_identity(options)
  model_dir_lib.prepare(options.model_dir, options, is_chief=chief)
  out_dir = distribution.output_dir(options.model_dir, strategy)
  tf.io.gfile.makedirs(out_dir)

  # Outside strategy.scope(): see backbone.py's module docstring.
  load_start = time.monotonic()
  backbone = backbone_lib.load_backbone(options.backbone, features=options.features,
                                        input_size=options.input_size,
                                        precision=options.precision)
  backbone_load_seconds = choice_seconds + time.monotonic() - load_start
  if options.fine_tune:
    tuned_blocks.trainable_variables(backbone, options.fine_tune_blocks)  # refuses before any work
  _check_splits(options, backbone.output_dim)
  template = _keep_export_template(options, backbone, len(label_names)) if chief else None
  feature_sets = _feature_sets(options, strategy, backbone, len(label_names))
  train_set, val_set = feature_sets["train"], feature_sets["validation"]
  # With --flip_features the head trains on the mirrors too; l2 is cross-validated on the
  # originals only, so that no image's mirror sits in the folds that hold it out.
  # All the training features in memory, or a subsample when they are streamed.
  cv_set = None
  if options.l2 is None or val_set is None:
    cv_set = tuning.cross_validation_set(train_set, options, len(label_names))

  cv, out_of_fold = None, None
  if options.l2 is None:
    cv_start = time.monotonic()
    normalization, best_l2, rows, out_of_fold, widened = tuning.tune_head(
        strategy, options, cv_set.features, cv_set.labels, len(label_names),
        normalization_constants=train_set.normalization_constants)
    cv = dict(folds=options.cv_folds, rows=rows, best_l2=best_l2,
              best_normalization=normalization, examples=len(cv_set.labels),
              subsample=train_set.streamed, grid=sorted({row["l2"] for row in rows}),
              widened=widened, seconds=time.monotonic() - cv_start)
    options = dataclasses.replace(options, l2=best_l2, feature_normalization=normalization)
  elif options.feature_normalization == "auto":
    # A given l2 was chosen on some scale: the standardized one, bin/train's before auto.
    options = dataclasses.replace(options, feature_normalization="standardize")
  shift, scale = train_set.normalization_constants(options.feature_normalization)

  writers = summaries.Writers(os.path.join(out_dir, model_dir_layout.LOGS_DIRNAME))
  summaries.write_input_grids(writers.train, train_set.thumbnails, train_set.thumbnail_labels,
                              label_names)
  head_start = time.monotonic()
  trainer, global_batch, epochs_run = _fit_head(options, strategy, backbone, train_set, val_set,
                                                label_names, (shift, scale), writers, out_dir)
  head_seconds = time.monotonic() - head_start
  head, fine_tuned = trainer.head, None
  if options.fine_tune:
    fine_tuned = finetune.fine_tune(options, strategy, trainer.head, feature_sets, out_dir)
    head = fine_tuned.head
    feature_sets = {split: dataclasses.replace(feature_set, features=fine_tuned.features[split])
                    if feature_set else None for split, feature_set in feature_sets.items()}
    val_set = feature_sets["validation"]

  metrics = {split: _evaluate(head, feature_set, label_names)
             for split, feature_set in feature_sets.items()}
  if val_set is not None:
    scores, labels, fitted_on = _scores(head, val_set), val_set.labels, "validation"
  else:
    if cv is None:
      out_of_fold = tuning.out_of_fold_scores(strategy, options, cv_set.features,
                                              cv_set.labels, len(label_names),
                                              shift=shift, scale=scale)
    scores, labels, fitted_on = out_of_fold, cv_set.labels, "out_of_fold"
  # Suspected labels need the out-of-fold scores: none when --l2 is given with validation data.
  metrics["data_checks"] = data_checks.check(feature_sets, out_of_fold, cv_set, label_names)
  report_set = val_set if val_set is not None else cv_set
  calibration_start = time.monotonic()
  calibration = (calibration_lib.calibrate(scores, labels, fitted_on) if scores is not None
                 else None)
  calibration_seconds = time.monotonic() - calibration_start
  metrics.update(
      epochs_completed=trainer.epochs_done, epochs_run_now=epochs_run,
      stopped_early=bool(trainer.stopped.numpy()),
      best_epoch=(int(trainer.best_epoch.numpy()) if val_set is not None and not val_set.streamed
                  else None),
      l2=options.l2, cross_validation=cv, calibration=calibration,
      num_replicas=strategy.num_replicas_in_sync, global_batch_size=global_batch,
      backbone=dict(handle=options.backbone, input_size=backbone.input_size,
                    output_dim=backbone.output_dim, precision=backbone.precision),
      backbone_choice=choice,
      skipped_records={split: feature_set.skipped for split, feature_set in
                       feature_sets.items() if feature_set is not None},
      streamed_splits=[split for split, feature_set in feature_sets.items()
                       if feature_set is not None and feature_set.streamed],
      timings=dict(backbone_load_s=backbone_load_seconds,
                   backbone_pass_s=max(s.extract_seconds for s in feature_sets.values() if s),
                   backbone_pass_cached=all(s.from_cache for s in feature_sets.values() if s),
                   head_training_s=head_seconds, calibration_s=calibration_seconds,
                   cross_validation_s=cv["seconds"] if cv else 0.0),
      fine_tune=fine_tuned.metrics if fine_tuned else None,
      options=dataclasses.asdict(options), run_identity=identity, up_to_date=False)

  if val_set is not None:
    summaries.write_projector(os.path.join(out_dir, model_dir_layout.LOGS_DIRNAME, "validation"),
                              val_set.thumbnail_subset(), label_names)
  summaries.write_hparams(writers.train, _hparams(options, global_batch, cv), {
      "final/train_accuracy": metrics["train"]["accuracy"],
      "final/validation_accuracy": (metrics["validation"] or {}).get("accuracy", float("nan"))})
  writers.close()

  metrics["timings"]["total_s"] = time.monotonic() - start  # the export's time is apart
  if not chief:
    tf.io.gfile.rmtree(out_dir)
    return metrics
  _write_model(options.model_dir, head, options, backbone, label_names, calibration,
               fine_tuned, choice)
  if options.export:
    export_start = time.monotonic()
    error = template.exception() if template is not None else None
    if error is not None:
      logging.warning("Could not keep the export's graph ahead (%s: %s): the export traces it",
                      type(error).__name__, error)
    metrics["export_dir"] = export_lib.export_model(
        options.model_dir, precision=_export_precision(options), backbone=backbone)
    metrics["timings"]["export_s"] = time.monotonic() - export_start
  fileio.atomic_write_json(os.path.join(options.model_dir, model_dir_layout.METRICS_FILENAME),
                           metrics)
  if scores is not None:
    training_report.write(options.model_dir, options.records_dir, metrics, label_names,
                          scores=scores, labels=labels, filenames=report_set.filenames,
                          split=fitted_on,
                          log_dir=os.path.join(out_dir, model_dir_layout.LOGS_DIRNAME))
  return metrics


def _export_precision(options):
  # "auto" resolves on the machine that serves the export, not on this one: the
  # export is float32, which runs everywhere, unless bfloat16 was asked for.
  return "float32" if options.precision == "auto" else options.precision


def _keep_export_template(options, backbone, num_classes):
  """The Future of keeping the export's template (exporter.keep_template) in a thread, or None.

  Tracing an export's graph is most of a first export (~1.5 s of a pair's
  1.7 s on 2 cores), and needs only the model's shape, known from here on.
  Traced while the pass runs (in TensorFlow's kernels, which leave the
  interpreter free), it slowed that pass by ~0.5-0.8 s on 2 cores, and the
  export is written from the template. None where the export is traced
  anyway (fine-tuning) or there is none.
  """
  if not options.export or options.fine_tune:
    return None
  # On two cores only long work pays in a thread: drawing the CV's plot (0.5 s) while
  # the head trained slowed the head by as much.
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="export-template")
  template = pool.submit(export_lib.keep_template, backbone,
                         precision=_export_precision(options), num_classes=num_classes,
                         feature_normalization=options.feature_normalization,
                         resize_mode=options.resize_mode, flip_features=options.flip_features)
  pool.shutdown(wait=False)   # its thread ends with the work
  return template


def _finished_run(options):
  """The metrics of the finished run of these settings in the model dir (with its export
  when one is asked for), else None: a rerun then has nothing to do."""
  metrics = model_dir_lib.finished_run(options.model_dir, options)
  if metrics is None:
    return None
  if options.export and not (metrics.get("export_dir") and tf.io.gfile.exists(
      os.path.join(metrics["export_dir"], export_lib.SAVED_MODEL_FILENAME))):
    return None
  return metrics


def _feature_sets(options, strategy, backbone, num_classes):
  """{split: FeatureSet or None} for train, validation and test, counted from what was read."""
  splits = [split for split in records.SPLITS
            if records.count_examples(options.records_dir, split)]
  feature_sets = feature_cache.cached_feature_sets(
      backbone, options.records_dir, splits, batch_size=options.extract_batch_size,
      image_size=backbone.input_size, resize_mode=options.resize_mode,
      num_classes=num_classes, num_thumbnails_per_class=options.num_thumbnails_per_class,
      flip=options.flip_features, feature_cache_dir=options.feature_cache_dir,
      storage=options.feature_storage, max_in_memory_features=options.max_in_memory_features,
      strategy=distribution.extraction_strategy(strategy),
      worker=distribution.worker_index_and_count(strategy))
  for split in records.SPLITS:
    if split not in feature_sets or not len(feature_sets[split].labels):
      feature_sets[split] = None  # no records, or every one failed to decode (logged)
  if feature_sets["train"] is None:
    raise UserError(f"{options.records_dir} has no readable training examples: rebuild the "
                    "records with a smaller validation_percentage/test_percentage",
                    arguments=["validation_percentage", "test_percentage"])
  if feature_sets["validation"] is None:
    _check_validation_needs(options, has_validation=False)
  return feature_sets


def _check_splits(options, output_dim):
  """Refuses, before the backbone pass, what the records' manifest already rules out."""
  splits = [split for split in records.SPLITS
            if records.count_examples(options.records_dir, split)]
  _check_validation_needs(options, has_validation="validation" in splits)
  streamed = [split for split in splits
              if feature_cache.will_stream(options.records_dir, split, output_dim,
                                           options.flip_features, options.max_in_memory_features)]
  if options.patience and "validation" in streamed:
    raise UserError("patience checks the validation features after every epoch, in memory: "
                    f"raise max_in_memory_features (now {options.max_in_memory_features}) "
                    "above the validation split's, or set patience=0",
                    arguments=["patience", "max_in_memory_features"])
  if options.fine_tune and streamed:
    raise UserError("fine_tune recomputes the features in memory after fine-tuning: raise "
                    f"max_in_memory_features (now {options.max_in_memory_features}) above the "
                    f"{' and '.join(streamed)} split's, or drop fine_tune",
                    arguments=["fine_tune", "max_in_memory_features"])


def _check_validation_needs(options, has_validation):
  """patience and fine_tune need validation records (none, or none readable)."""
  if has_validation:
    return
  if options.patience:
    raise UserError("patience needs validation records: rebuild the records with "
                    "validation_percentage > 0, or set patience=0",
                    arguments=["patience", "validation_percentage"])
  if options.fine_tune:
    raise UserError("fine_tune needs validation records (its early stopping and the "
                    "calibration use the fine-tuned backbone's validation scores): rebuild the "
                    "records with validation_percentage > 0",
                    arguments=["fine_tune", "validation_percentage"])


def _fit_head(options, strategy, backbone, train_set, val_set, label_names, normalization,
              writers, out_dir):
  """Trains (or resumes) the head; returns (trainer, global batch size, epochs run now)."""
  num_train = train_set.num_training_examples
  # Mirrors double every class's count alike: the same weights.
  weights_by_class = trainer_lib.class_weights(train_set.labels, len(label_names),
                                               options.class_weight)
  global_batch = trainer_lib.effective_batch_size(options, num_train,
                                                  strategy.num_replicas_in_sync)
  trainer = trainer_lib.HeadTrainer(
      strategy, options, num_features=backbone.output_dim, num_classes=len(label_names),
      steps_per_epoch=num_train // global_batch, global_batch_size=global_batch,
      normalization=normalization, backbone=backbone if options.augment else None,
      normalize_inputs=train_set.streamed,
      validation=((val_set.features, val_set.labels)
                  if val_set is not None and not val_set.streamed else None),
      writers=writers)

  if options.augment:
    records.check_shards(options.records_dir, "train")  # read again at every epoch

    def make_iterator(first_epoch):
      return trainer_lib.augmented_batches(
          strategy, records.split_file_pattern(options.records_dir, "train"), global_batch,
          weights_by_class, image_size=backbone.input_size, resize_mode=options.resize_mode,
          seed=options.seed * 100003 + first_epoch)
  elif train_set.streamed:
    # The shuffle buffer holds as many rows as memory may: the features' budget.
    buffer_rows = min(num_train, max(1, options.max_in_memory_features // backbone.output_dim))

    def make_iterator(first_epoch):
      return trainer_lib.streamed_feature_batches(
          strategy, train_set.stream, weights_by_class, global_batch, options.seed, first_epoch,
          options.epochs, shuffle_buffer_size=buffer_rows)
  else:
    train_x, train_y = train_set.training_examples()
    example_weights = weights_by_class[train_y][None, :]
    normalized = trainer.normalize(train_x)

    def make_iterator(first_epoch):
      return trainer_lib.feature_batches(strategy, normalized, train_y, example_weights,
                                         global_batch, options.seed, first_epoch, options.epochs)

  def on_checkpoint(epoch):
    if val_set is not None:
      scores = _scores(trainer.head, val_set)
      summaries.write_evaluation(
          writers.validation, scores, val_set.labels,
          metrics_lib.classification_metrics(scores, val_set.labels, label_names), epoch)

  checkpoints = model_dir_layout.CHECKPOINT_DIRNAME
  manager = tf.train.CheckpointManager(trainer.checkpoint, os.path.join(out_dir, checkpoints),
                                       max_to_keep=3)
  # Every worker resumes from the chief's checkpoints (the others' are temporary).
  resume_from = tf.train.latest_checkpoint(os.path.join(options.model_dir, checkpoints))
  epochs_run = trainer.fit(make_iterator, resume_from=resume_from, manager=manager,
                           on_checkpoint=on_checkpoint)
  trainer.use_best_weights()
  return trainer, global_batch, epochs_run


def _scores(head, feature_set):
  """[N, C] scores of the trained head on a FeatureSet (averaged with the mirrors' if any)."""
  return features_lib.average_flip_scores(
      lambda features: head(tf.constant(features)).numpy(), feature_set)


def _evaluate(head, feature_set, label_names):
  if feature_set is None:
    return None
  return metrics_lib.classification_metrics(_scores(head, feature_set), feature_set.labels,
                                            label_names)


def _write_model(model_dir, trained_head, options, backbone, label_names, calibration,
                 fine_tuned, choice):
  """head_config.json, head/ (a one-model LinearHead checkpoint), labels.txt, calibration.json,
  and fine_tuned_backbone/ after fine-tuning (an earlier run's is removed otherwise)."""
  fine_tuned_dir = os.path.join(model_dir, model_dir_layout.FINE_TUNED_BACKBONE_DIRNAME)
  if tf.io.gfile.isdir(fine_tuned_dir):
    tf.io.gfile.rmtree(fine_tuned_dir)
  if fine_tuned:
    tuned_blocks.save_backbone_variables(fine_tuned.variables, model_dir)
  head_lib.HeadConfig(
      loss=options.loss, feature_normalization=options.feature_normalization,
      num_features=backbone.output_dim, num_classes=len(label_names), labels=label_names,
      backbone=options.backbone, features=options.features, image_size=backbone.input_size,
      resize_mode=options.resize_mode, label_smoothing=options.label_smoothing,
      flip_features=options.flip_features,
      fine_tune=dict(blocks=fine_tuned.metrics["blocks"],
                     directory=model_dir_layout.FINE_TUNED_BACKBONE_DIRNAME) if fine_tuned else None,
      backbone_choice=choice,
  ).write(model_dir)
  # A plain (unmirrored) copy, so the export loads it without a strategy.
  final_head = head_lib.LinearHead(backbone.output_dim, len(label_names),
                                   feature_normalization=options.feature_normalization)
  final_head.assign(trained_head)
  head_lib.save_head(final_head, model_dir)
  records.write_labels(model_dir, label_names)
  if calibration is not None:
    calibration_lib.write_calibration(model_dir, calibration)
  else:
    logging.warning("Too few training examples to fit a probability temperature: the exported "
                    "probabilities are the head's plain softmax")


def _hparams(options, global_batch_size, cv):
  """The flags that shape the model, as hparams plugin values (str, float, int, bool).

  With l2 cross-validated, `l2` is the choice and `l2_grid` the values tried.
  """
  names = ("backbone", "features", "loss", "l2", "label_smoothing", "class_weight",
           "feature_normalization", "optimizer", "learning_rate", "lr_schedule",
           "warmup_epochs", "epochs", "patience", "augment", "strategy", "seed",
           "resize_mode", "precision", "fine_tune", "fine_tune_blocks", "fine_tune_epochs",
           "fine_tune_learning_rate", "fine_tune_weight_decay")
  hparams = dict({name: getattr(options, name) for name in names}, batch_size=global_batch_size,
                 l2_grid=",".join(f"{l2:.3g}" for l2 in cv["grid"]) if cv else "")
  # The hparams plugin takes no None: unset means the backbone's rate.
  hparams["fine_tune_head_learning_rate"] = (options.fine_tune_head_learning_rate or
                                             options.fine_tune_learning_rate)
  return hparams
