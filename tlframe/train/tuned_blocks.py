"""Which backbone variables fine-tuning trains, and the trained values kept in a model dir.

Apart from the fine-tuning loop (tlframe.train.finetune) so that the export,
which puts a model's fine-tuned blocks back into a freshly loaded backbone,
loads no trainer.

The top K blocks (`blocks_of`): the module's `trainable_variables` (TF-Hub's
reusable SavedModel convention; a module without them cannot be fine-tuned)
grouped bottom to top:
- built-in backbones (tlframe.backbone.inverted_residual): their `blocks`, i.e. the stem,
  each inverted residual block and the final 1x1 convolution (19 for
  MobileNetV2, 18 for EfficientNet-Lite0), then the classifier for
  `--features=classification`;
- any other module: consecutive variables of `trainable_variables` (in their
  order, which for TF-Hub modules is the network's, bottom to top) that share
  the first name scope below the scope common to all of them:
  `MobilenetV2/expanded_conv_16/project/weights` is in block `expanded_conv_16`.
  A variable with no scope of its own is a block alone;
- a concatenation `a,b`: the top K blocks of each part.
Every other variable, and every non-trainable one (BatchNorm's moving
statistics), is only read. The module is always called in inference mode, so
BatchNorm uses its moving statistics and never updates them; in the built-ins'
default BatchNorm-folded export the folded convolutions' kernels and biases
are what train.

The only lasting change of fine-tuning is in the model dir: `save_backbone_variables` writes
the trained variables to model_dir/fine_tuned_backbone/, and the export loads
the backbone from its handle and `restore_backbone_variables` puts them in
(the cached built-in SavedModel and the shared feature cache are never
written).
"""

import os

import tensorflow as tf

from tlframe.backbone import loading as backbone_lib
from tlframe.train import layout as model_dir_layout
from tlframe import options as options_lib
from tlframe.errors import UserError


def blocks_of(module):
  """The module's trainable variables as blocks bottom to top (the rule in the module doc)."""
  variables = list(getattr(module, "trainable_variables", None) or ())
  if not variables:
    return []
  built_in_blocks = getattr(module, "blocks", None)
  if built_in_blocks is not None:
    block_of = {variable.ref(): index for index, block in enumerate(built_in_blocks)
                for layer in block for variable in layer.trainable}
    keys = [block_of.get(variable.ref(), len(built_in_blocks)) for variable in variables]
  else:
    scopes = [variable.name.split(":")[0].split("/")[:-1] for variable in variables]
    common = len(os.path.commonprefix(scopes))
    keys = [tuple(scope[common:common + 1]) or index
            for index, scope in enumerate(scopes)]
  blocks = []
  for key, variable in zip(keys, variables):
    if blocks and blocks[-1][0] == key:
      blocks[-1][1].append(variable)
    else:
      blocks.append((key, [variable]))
  return [block for _, block in blocks]


def trainable_variables(backbone, blocks):
  """The variables of the top `blocks` blocks of `backbone` (of each part of a concatenation).

  Raises UserError naming fine_tune when a module exposes no trainable
  variables, and fine_tune_blocks when it has fewer blocks.
  """
  count = options_lib.fine_tune_blocks(blocks)
  module = backbone.module
  parts = (list(zip(backbone.handle.split(backbone_lib.CONCATENATION_SEPARATOR), module.parts))
           if isinstance(module, backbone_lib.ConcatenatedModule) else [(backbone.handle, module)])
  chosen = []
  for handle, part in parts:
    part_blocks = blocks_of(part)
    if not part_blocks:
      raise UserError(f"fine_tune: {handle.strip()} exposes no trainable_variables (TF-Hub's "
                      "reusable SavedModel convention), so it cannot be fine-tuned: drop "
                      "fine_tune or use a module that exposes them", arguments=["fine_tune"])
    if count != options_lib.ALL_BLOCKS and count > len(part_blocks):
      raise UserError(f"fine_tune_blocks={count} but {handle.strip()} has "
                      f"{len(part_blocks)} blocks: use at most {len(part_blocks)}, or "
                      f"{options_lib.ALL_BLOCKS}", arguments=["fine_tune_blocks"])
    top = part_blocks if count == options_lib.ALL_BLOCKS else part_blocks[-count:]
    chosen.extend(variable for block in top for variable in block)
  return chosen


def save_backbone_variables(variables, model_dir):
  """Writes the fine-tuned variables' values to model_dir/fine_tuned_backbone/ (plain copies)."""
  copies = [tf.Variable(variable.numpy(), name=f"variable_{index}")
            for index, variable in enumerate(variables)]
  prefix = os.path.join(model_dir, model_dir_layout.FINE_TUNED_BACKBONE_CHECKPOINT)
  return tf.train.Checkpoint(variables=copies).write(prefix)


def restore_backbone_variables(backbone, model_dir, blocks):
  """Puts the variables `save_backbone_variables` wrote into a freshly loaded `backbone`.

  Only this in-memory copy changes, never the module's files.
  """
  variables = trainable_variables(backbone, blocks)
  prefix = os.path.join(model_dir, model_dir_layout.FINE_TUNED_BACKBONE_CHECKPOINT)
  try:
    tf.train.Checkpoint(variables=variables).read(prefix).assert_consumed()
  except (AssertionError, ValueError, tf.errors.OpError) as e:
    raise UserError(f"{prefix} does not fit {backbone.handle} with fine_tune_blocks={blocks} "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]}): the backbone "
                    "changed since training; retrain", arguments=["fine_tune_blocks"]) from None
  return variables
