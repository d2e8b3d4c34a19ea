"""Per-class IoU of a finished segmentation run: `python scripts/segmentation_scores.py --config=FILE --workdir=DIR`.

`python -m cnnjax.main` reports pixel accuracy, which the background class
dominates, and the mean IoU; this reloads the run's last checkpoint and prints
pixel accuracy, the intersection over union of every class and their mean as JSON.

Command (after training experiments/unet_shapes.py into the same workdir):
  python scripts/segmentation_scores.py --config=experiments/unet_shapes.py --workdir=/tmp/cnnjax/unet_shapes
Expected: per-class IoU, their mean and the pixel accuracy of the finished run; the pixel accuracy
and mean IoU equal the run's summary (eval_accuracy, eval_mean_iou).
"""

import json

from absl import app, flags
from ml_collections import config_flags

from cnnjax import cli

config_flags.DEFINE_config_file("config", None, "The experiment config the run was trained with.", lock_config=True)
flags.DEFINE_string("workdir", None, "The run's workdir (holds checkpoints/).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.configure_logging()
  from cnnjax.lab.notes.trained import restore_run, segmentation_scores  # pylint: disable=import-outside-toplevel
  scores = cli.run_reporting_errors(lambda: segmentation_scores(*restore_run(FLAGS.config, FLAGS.workdir)))
  print(json.dumps(scores, indent=2))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.one_line_flags_parser)
