"""The flags of a conversion from photos to records, defined once for bin/make_tfrecords and
bin/train (which converts in the same process with --image_dir or --filelist).

Only bin/ imports it: `define()` declares the flags, `arguments()` turns their
values into `records.convert`'s keyword arguments. It imports no TensorFlow (bin/train
answers --help and flag errors before paying for it), so the defaults that live
in tlframe.records stay there: None here means records.convert's own.
"""

from absl import flags

from tlframe.cli import runner

FLAGS = flags.FLAGS
# The flags that name photos or lists that must exist.
_SOURCE_PATHS = ("image_dir", "filelist", "validation_filelist", "test_filelist", "test_dir")
NAMES = ("image_dir", "filelist", "labels", "validation_percentage", "test_percentage",
         "validation_filelist", "test_filelist", "test_dir", "shard_size", "max_side", "max_pixels")


def define(where=""):
  """Declares the conversion's flags; `where` ends the help of the two sources."""
  where = f" {where}" if where else ""
  flags.DEFINE_string("image_dir", None,
                      "Folder with one sub-folder per class; images may be nested deeper. "
                      f"Give this or --filelist.{where}")
  flags.DEFINE_string("filelist", None,
                      "CSV or TSV file of `path,label` lines (optional header); relative paths "
                      f"resolve against the list's folder. Give this or --image_dir.{where}")
  flags.DEFINE_string("labels", None,
                      "Class order: a comma-separated list or a file with one name per line. "
                      "Classes not in it are skipped. Default: the sorted class names.")
  flags.DEFINE_float("validation_percentage", 10.0,
                     "Percent of files (by a stable hash of their relative path) in validation.")
  flags.DEFINE_float("test_percentage", 10.0,
                     "Percent of files (by a stable hash of their relative path) in test.")
  flags.DEFINE_string("validation_filelist", None,
                      "Explicit validation files: `path` or `path,label` lines; replaces "
                      "--validation_percentage.")
  flags.DEFINE_string("test_filelist", None,
                      "Explicit test files: `path` or `path,label` lines; replaces "
                      "--test_percentage.")
  flags.DEFINE_string("test_dir", None,
                      "A folder of test photos, one sub-folder per class like --image_dir's: "
                      "all of them are the test split (bin/evaluate scores it); replaces "
                      "--test_percentage.")
  flags.DEFINE_integer("shard_size", None, "Images per shard, at most. Default: "
                       "tlframe.records.DEFAULT_SHARD_SIZE.")
  flags.DEFINE_integer("max_side", None,
                       "Downscale images whose longer side exceeds this many pixels (re-encodes "
                       "them). Default: keep the original size.")
  flags.DEFINE_integer("max_pixels", None,
                       "Skip images whose header declares more pixels than this, before "
                       "decoding (decompression bombs). Default: "
                       "tlframe.imageformat.DEFAULT_MAX_PIXELS.")


def arguments():
  """records.convert's keyword arguments (all but output_dir and num_workers) from the flags."""
  from tlframe import records  # pylint: disable=import-outside-toplevel  (TensorFlow)
  values = {name: FLAGS[name].value for name in NAMES}
  values["labels"] = records.labels_from_spec(values["labels"])
  return {name: value for name, value in values.items()
          if value is not None or name not in ("shard_size", "max_pixels")}


def given():
  """The names of the conversion flags set on the command line or in a flagfile."""
  return [name for name in NAMES if FLAGS[name].present]


def check_sources():
  """A UserError for a source (--image_dir, a file list, --test_dir) that does not exist,
  before TensorFlow loads."""
  for name in _SOURCE_PATHS:
    runner.check_exists(FLAGS[name].value, f"--{name}", "give the folder or list of your photos")
