"""The degradation problem: training loss of plain-20/56 against ResNet-20/56 at small scale, plotted.

Four runs of `cnnjax.train.run` with one recipe (cnnjax.lab.notes.depth_study):
the plain networks are ResNet-20/56 without their shortcuts, so any gap between
plain and residual at equal depth is the shortcuts' doing.

Command:
  python scripts/degradation.py --workdir=/tmp/cnnjax/degradation
Writes degradation.png in the workdir, and there the four runs (finished ones are reused).
Expected: after 500 steps (seed 0; training loss averaged over the last tenth of training) plain-20
and ResNet-20 fit the training set almost perfectly; plain-56 does not (its training loss stays
orders of magnitude higher and its test accuracy far lower): the deeper plain network degrades, as
in He et al. 2015. With shortcuts the 56-layer network trains, here still a little behind ResNet-20
at this budget.
Result: docs/results/notes/degradation.json (each network's parameters, training-loss curve, final
training loss, test accuracy and training seconds; the script's wall-clock seconds, the command,
commit and machine).
"""

import os
import time

from absl import app, flags

from cnnjax import cli

flags.DEFINE_string("workdir", "/tmp/cnnjax/degradation", "Where the runs and the plot go.")
flags.DEFINE_string("json", os.path.join("docs", "results", "notes", "degradation.json"),
                    "Where to write the results.")
flags.DEFINE_integer("steps", 500, "Training steps per network.")
flags.DEFINE_list("models", ["plain20", "plain56", "resnet20", "resnet56"], "Registry names to train.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  start = time.monotonic()
  cli.configure_logging()
  from cnnjax.lab.bench import harness  # pylint: disable=import-outside-toplevel
  from cnnjax.lab.notes import depth_study, shift_study  # pylint: disable=import-outside-toplevel
  results = cli.run_reporting_errors(
      lambda: depth_study.run_study(FLAGS.workdir, models=FLAGS.models, steps=FLAGS.steps))
  for model, result in results.items():
    print(f"{model}: {result['params']:,} params, final train loss {result['final_train_loss']:.4f}, "
          f"eval accuracy {result['eval_accuracy']:.4f}, {result['wall_seconds']:.0f} s")
  fig, (axis,) = shift_study.figure(1, "Plain vs residual networks at depth 20 and 56 (8x8 digits)")
  depth_study.plot_curves(results, axis)
  shift_study.save(fig, os.path.join(FLAGS.workdir, "degradation.png"))
  print(f"wrote {os.path.join(FLAGS.workdir, 'degradation.png')}")
  harness.write_results(FLAGS.json, {**harness.provenance(), "steps": FLAGS.steps, "models": results,
                                     "wall_seconds": time.monotonic() - start})


if __name__ == "__main__":
  app.run(main, flags_parser=cli.one_line_flags_parser)
