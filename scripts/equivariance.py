"""Translation equivariance of convolutions and translation invariance of classifiers, measured and plotted.

1. Convolution stacks (3 layers, random weights): relative error of
   f(shift(x)) against shift(f(x)) for circular and zero ('same') padding,
   stride 1 and 2, shifts of 1-4 pixels (cnnjax.lab.notes.equivariance).
2. Classifiers trained on centred 32x32 digits, tested on digits shifted by
   0-8 pixels: simple_cnn without pooling, with 2x2 max pooling, and with
   global average pooling (cnnjax.lab.notes.shift_study).

Command:
  python scripts/equivariance.py --workdir=/tmp/cnnjax/shifted_digits
Writes equivariance.png in the workdir, and there the classifiers' runs, which scripts/mlp_vs_cnn.py reuses.
Expected: (seed 0, 600 steps) conv stacks: circular padding at stride 1 is exactly equivariant at every
shift; zero padding breaks equivariance only near the border (exact away from it); stride 2 (circular
padding) is exact for even shifts and far off for odd ones, which have no output shift to match
(aliasing). Classifiers: every variant is about equally accurate on centred digits; with a flatten
head accuracy falls towards chance (10 classes) by a 4-pixel shift, max pooling buying robustness to
a pixel or two only; global average pooling keeps the classifier accurate far out, except that
stride-2 pooling aliases odd shifts, and the no-pooling global net only loses digits at the largest
shift, where they reach the zero-padded border. Parameters: no pooling + flatten 8,409,034, max pooling + flatten
544,714, either global average head 28,618.
Result: docs/results/notes/equivariance.json (every conv stack's error and interior error; every
classifier's parameters, accuracy at each shift, stability and training seconds; the script's
wall-clock seconds, the command, commit and machine).
"""

import os
import time

from absl import app, flags

from cnnjax import cli

# Shared with scripts/mlp_vs_cnn.py: runs one script finished are reused by the other.
flags.DEFINE_string("workdir", "/tmp/cnnjax/shifted_digits", "Where the runs and the plot go.")
flags.DEFINE_string("json", os.path.join("docs", "results", "notes", "equivariance.json"),
                    "Where to write the results.")
flags.DEFINE_integer("steps", 600, "Training steps per classifier.")
flags.DEFINE_list("variants", [], "Labels of the classifier variants to run (default: all).")
FLAGS = flags.FLAGS

LABELS = ("no pooling + flatten", "max pooling + flatten", "max pooling + global average",
          "no pooling + global average")


def main(argv):
  del argv
  start = time.monotonic()
  cli.configure_logging()
  from cnnjax.lab.bench import harness  # pylint: disable=import-outside-toplevel
  from cnnjax.lab.notes import equivariance, shift_study  # pylint: disable=import-outside-toplevel
  chosen = cli.run_reporting_errors(lambda: shift_study.choose(LABELS, FLAGS.variants))
  rows = equivariance.measure()
  print(equivariance.format_rows(rows))
  results = cli.run_reporting_errors(lambda: shift_study.run_study(chosen, FLAGS.workdir, steps=FLAGS.steps))
  print(shift_study.report(results))
  fig, axes = shift_study.figure(3, "Convolutions are shift-equivariant; global pooling makes a classifier "
                                    "shift-invariant, local max pooling only for small shifts")
  equivariance.plot_rows(rows, axes[0])
  shift_study.plot_shift_curves(results, axes[1], axes[2])
  shift_study.save(fig, os.path.join(FLAGS.workdir, "equivariance.png"))
  print(f"wrote {os.path.join(FLAGS.workdir, 'equivariance.png')}")
  harness.write_results(FLAGS.json, {**harness.provenance(), "steps": FLAGS.steps,
                                     "layers": [row.__dict__ for row in rows], "classifiers": results,
                                     "wall_seconds": time.monotonic() - start})


if __name__ == "__main__":
  app.run(main, flags_parser=cli.one_line_flags_parser)
