"""Runs the experiments that run on this machine with their documented commands and records the results.

Command:
  python scripts/run_experiments.py [--json=docs/results/experiments.json] [--experiments=lenet5_digits,...]
Expected: docs/results/experiments.json with, for every experiment of
`cnnjax.lab.bench.experiments.RECORDED` (the digits, shapes and shapes3d
experiments and the two digits sweeps), each seed's eval accuracy and loss,
steps, examples per second and the command's wall-clock seconds, or each sweep
trial's row of results.csv; with the command, commit and machine. Naming some
experiments reruns only those and keeps the others' earlier record. Every run
reaches the accuracy its docstring expects (`tests/test_experiments.py` checks
the file).
"""

from absl import app, flags

from cnnjax.lab.bench import experiments

flags.DEFINE_string("json", "docs/results/experiments.json", "Where to write the results.")
flags.DEFINE_list("experiments", list(experiments.BY_NAME), "Which experiments to run.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  unknown = sorted(set(FLAGS.experiments) - set(experiments.BY_NAME))
  if unknown:
    raise app.UsageError(f"--experiments: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(experiments.BY_NAME)}")
  experiments.run(FLAGS.json, tuple(FLAGS.experiments))


if __name__ == "__main__":
  app.run(main)
