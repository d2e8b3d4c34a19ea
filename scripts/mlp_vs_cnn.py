"""MLP against CNNs on the same data: parameter counts, accuracy, and accuracy on shifted test images.

All three train on centred 32x32 digits with the same recipe and no
augmentation (cnnjax.lab.notes.shift_study): the notes' MLP (flatten, one hidden
layer of 128 units), simple_cnn (two conv + max-pool stages, flatten, dense),
and simple_cnn with global average pooling instead of flatten. The notes'
32x32x3 parameter scenario is printed too: one hidden layer of 128 units costs
(3072 + 1) x 128 = 393,344 parameters, 32 3x3 filters cost 32 (3x3x3 + 1) = 896.

Command:
  python scripts/mlp_vs_cnn.py --workdir=/tmp/cnnjax/shifted_digits
Writes mlp_vs_cnn.png in the workdir; the CNNs' runs that scripts/equivariance.py finished there are
reused, not trained again.
Expected: (seed 0, 600 steps) similar accuracy on centred digits (within a few test digits); the MLP
(132,490 parameters), which sees every pixel position as a separate input, loses its digits first as
they move; the CNN with max pooling and a flatten head (544,714) holds out a pixel or two longer; the
CNN with global average pooling (28,618, a fifth of the MLP's) stays accurate far out, odd shifts
aside (its stride-2 pooling aliases them).
Result: docs/results/notes/mlp_vs_cnn.json (the scenario's parameter counts; every model's parameters,
accuracy at each shift, stability and training seconds, whether trained now or reused; the script's
wall-clock seconds, short when the CNNs are reused; the command, commit and machine).
"""

import os
import time

from absl import app, flags

from cnnjax import cli

# Shared with scripts/equivariance.py: runs one script finished are reused by the other.
flags.DEFINE_string("workdir", "/tmp/cnnjax/shifted_digits", "Where the runs and the plot go.")
flags.DEFINE_string("json", os.path.join("docs", "results", "notes", "mlp_vs_cnn.json"),
                    "Where to write the results.")
flags.DEFINE_integer("steps", 600, "Training steps per model.")
flags.DEFINE_list("variants", [], "Labels of the models to run (default: all).")
FLAGS = flags.FLAGS

SCENARIO_PIXELS, SCENARIO_FILTERS, SCENARIO_KERNEL = 32 * 32 * 3, 32, 3
LABELS = ("MLP (128 hidden)", "max pooling + flatten", "max pooling + global average")


def main(argv):
  del argv
  start = time.monotonic()
  cli.configure_logging()
  from cnnjax.analysis import conv_params, dense_params
  from cnnjax.lab.bench import harness  # pylint: disable=import-outside-toplevel
  from cnnjax.lab.notes import shift_study  # pylint: disable=import-outside-toplevel
  chosen = cli.run_reporting_errors(lambda: shift_study.choose(LABELS, FLAGS.variants))
  scenario = {"mlp_hidden_layer": dense_params(SCENARIO_PIXELS, shift_study.MLP_HIDDEN),
              "conv_layer": conv_params(3, SCENARIO_FILTERS, SCENARIO_KERNEL)}
  print(f"notes' 32x32x3 scenario: hidden layer of {shift_study.MLP_HIDDEN} units {scenario['mlp_hidden_layer']:,} "
        f"parameters; {SCENARIO_FILTERS} {SCENARIO_KERNEL}x{SCENARIO_KERNEL} filters {scenario['conv_layer']:,}")
  results = cli.run_reporting_errors(lambda: shift_study.run_study(chosen, FLAGS.workdir, steps=FLAGS.steps))
  print(shift_study.report(results))
  fig, axes = shift_study.figure(2, "MLP vs CNN on centred digits, tested on shifted digits")
  shift_study.plot_shift_curves(results, axes[0], axes[1])
  shift_study.save(fig, os.path.join(FLAGS.workdir, "mlp_vs_cnn.png"))
  print(f"wrote {os.path.join(FLAGS.workdir, 'mlp_vs_cnn.png')}")
  harness.write_results(FLAGS.json, {**harness.provenance(), "steps": FLAGS.steps, "scenario": scenario,
                                     "models": results, "wall_seconds": time.monotonic() - start})


if __name__ == "__main__":
  app.run(main, flags_parser=cli.one_line_flags_parser)
