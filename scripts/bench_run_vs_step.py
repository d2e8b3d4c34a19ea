"""The training run against its bare step (`cnnjax.lab.bench.run_vs_step`), optionally beside an older checkout.

Command:
  python scripts/bench_run_vs_step.py [--json=docs/results/run_vs_step.json] [--rounds=3]
      [--cases=mlp_digits,lenet5_digits,resnet20_cifar_shaped] [--before=DIR]
Expected: per case (the MLP, LeNet-5 and ResNet-20 with their experiments' recipes), the median images per
second of the bare step and of the run, `run / step` and the loop's microseconds per step; with
`--before=DIR` (a checkout of an earlier commit, e.g. `git worktree add DIR COMMIT`) the same for it,
measured in the same rounds. The JSON adds the command, commit and machine.
Cost: a few minutes on 2 CPU cores (each round of each case is a child process: JAX start-up and compiles).
"""

import os

from absl import app, flags

from cnnjax import cli

flags.DEFINE_string("json", os.path.join("docs", "results", "run_vs_step.json"), "Where to write the results.")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds per case.")
flags.DEFINE_list("cases", [], "Cases to run (default: all).")
flags.DEFINE_string("before", "", "A checkout of an earlier commit to measure in the same rounds.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected argument {argv[1]!r}; see --help")
  from cnnjax.lab.bench import harness, run_vs_step  # pylint: disable=import-outside-toplevel
  known = [case.name for case in run_vs_step.cases()]
  unknown = sorted(set(FLAGS.cases) - set(known))
  if unknown:
    cli.fail(f"--cases: unknown case {unknown[0]!r}; choose from {', '.join(known)}")
  if FLAGS.rounds < 1:
    cli.fail(f"--rounds={FLAGS.rounds} must be at least 1")
  if FLAGS.before and not os.path.isdir(os.path.join(FLAGS.before, "cnnjax")):
    cli.fail(f"--before={FLAGS.before!r} is not a cnnjax checkout (no cnnjax/ in it); make one with "
             "git worktree add DIR COMMIT")
  checkouts = {"after": os.getcwd(), **({"before": os.path.abspath(FLAGS.before)} if FLAGS.before else {})}
  records = [run_vs_step.measure(case, checkouts, rounds=FLAGS.rounds) for case in run_vs_step.cases(FLAGS.cases)]
  payload = {**harness.provenance(), "checkouts": {label: run_vs_step.describe_checkout(path)
                                                  for label, path in checkouts.items()}, "cases": records}
  print(run_vs_step.markdown_table(payload))
  harness.write_results(FLAGS.json, payload)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.one_line_flags_parser)
