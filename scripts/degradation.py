"""The degradation problem: training loss of plain-20/56 against ResNet-20/56 at small scale, plotted.

Four runs of `cnnjax.train.run` with one recipe (cnnjax.lab.notes.depth_study):
the plain networks are ResNet-20/56 without their shortcuts, so any gap between
plain and residual at equal depth is the shortcuts' doing.

Command:
  python scripts/degradation.py --workdir=/tmp/cnnjax/degradation
Writes degradation.png and degradation.json in the workdir.
Expected: after 500 steps (seed 0; training loss averaged over the last 50 steps): plain-20 0.0042,
plain-56 1.88, ResNet-20 0.0011, ResNet-56 0.0142; test accuracy 99.2%, 27.5%, 99.2%, 97.5%. The
deeper plain network degrades, as in He et al. 2015; with shortcuts the 56-layer network trains
(here still a little behind ResNet-20 at this budget).
Cost: 9 s (plain-20), 21 s (plain-56), 10 s (ResNet-20), 28 s (ResNet-56) of training; 78 s
in all on 2 CPU cores with compilation and evaluation.
"""

import json
import os

from absl import app, flags

from cnnjax import cli

flags.DEFINE_string("workdir", "/tmp/cnnjax/degradation", "Where the runs, the plot and the JSON go.")
flags.DEFINE_integer("steps", 500, "Training steps per network.")
flags.DEFINE_list("models", ["plain20", "plain56", "resnet20", "resnet56"], "Registry names to train.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.configure_logging()
  from cnnjax.lab.notes import depth_study, shift_study  # pylint: disable=import-outside-toplevel
  results = cli.run_reporting_errors(
      lambda: depth_study.run_study(FLAGS.workdir, models=FLAGS.models, steps=FLAGS.steps))
  for model, result in results.items():
    print(f"{model}: {result['params']:,} params, final train loss {result['final_train_loss']:.4f}, "
          f"eval accuracy {result['eval_accuracy']:.4f}, {result['wall_seconds']:.0f} s")
  fig, (axis,) = shift_study.figure(1, "Plain vs residual networks at depth 20 and 56 (8x8 digits)")
  depth_study.plot_curves(results, axis)
  shift_study.save(fig, os.path.join(FLAGS.workdir, "degradation.png"))
  with open(os.path.join(FLAGS.workdir, "degradation.json"), "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {os.path.join(FLAGS.workdir, 'degradation.png')}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.one_line_flags_parser)
