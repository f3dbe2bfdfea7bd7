"""The records stage: image files -> sharded TFRecords, and what readers need of them.

- `layout`: shard names, labels.txt and manifest.json (what every reader needs);
- `example_format`: a record's tf.train.Example (TF-Slim's keys);
- `listing`: the inputs (class folders or file lists) and the stable split;
- `workers`: processes that decode, check and re-encode images;
- `shards`: one shard written resumably (temporary name, sidecar, rename);
- `converter`: the conversion (`convert`): plan, shards, resume, manifest;
- `integrity`: `check_shards`, a finished directory checked before training;
- `beam`: the same conversion on Apache Beam (the `beam` extra);
- `photos`: bin/train's conversion of --image_dir into the model dir.

The image decoder is tlframe.imageformat's.
"""

from tlframe import _lazy

__all__, __getattr__, __dir__ = _lazy.exports(__name__, {
    "layout": ("SPLITS", "LABELS_FILENAME", "MANIFEST_FILENAME", "MANIFEST_VERSION",
               "split_file_pattern", "shard_filename", "read_label_lines", "check_class_name",
               "labels_from_spec", "read_labels", "write_labels", "read_manifest",
               "count_examples"),
    "example_format": ("KEY_ENCODED", "KEY_FORMAT", "KEY_LABEL", "KEY_LABEL_TEXT", "KEY_FILENAME",
                       "KEY_HEIGHT", "KEY_WIDTH", "make_example", "parse_example",
                       "parse_filenames"),
    "listing": ("IMAGE_EXTENSIONS", "Source", "walk_files", "list_image_dir", "read_filelist",
                "stable_split"),
    "workers": ("convert_image",),
    "shards": ("PROGRESS_DIRNAME", "SHARDS_WRITTEN_FILENAME", "Shard", "progress_path",
               "sidecar_path", "read_sidecar", "write_shard"),
    "converter": ("DEFAULT_SHARD_SIZE", "convert", "Plan", "plan_conversion", "write_conversion",
                  "exact_duplicates", "summary_lines"),
    "integrity": ("check_shards",),
    "photos": ("records_for_training",),
})
