"""Entry point: `python -m cnnjax.sweep --config=experiments/NAME.py --workdir=DIR [--mode=...]`.

Runs the trials of the experiment file's `sweep()` into `DIR/<trial>/`, then
writes `DIR/results.csv`, `DIR/results.md` and plots. `--config.a.b=value`
overrides apply to every trial (a trial's own override of the same key wins).
`--print_commands` prints one `cnnjax.main` command per trial instead of
running, for a cluster scheduler; `--summarize_only` rebuilds the tables from
whatever the trial directories hold. Every user error is one line on stderr
and exit status 2, before anything is written. A trial that fails does not
stop the others; the sweep then ends with exit status 1, naming the failed
trials (a rerun retries them). SIGTERM or SIGINT save the trials in training
and stop with exit status 128 + the signal.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from cnnjax import cli
from cnnjax.errors import one_line

cli.define_device_flags()
FLAGS = flags.FLAGS
EXIT_TRIALS_FAILED = 1  # the sweep ran, but some trials failed (exit status 2 is for bad input)
config_flags.DEFINE_config_file("config", None, "Experiment config file with a sweep() (experiments/NAME.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The sweep's directory: one subdirectory per trial, results.csv, results.md.")
flags.DEFINE_enum("mode", "auto", ["auto", "sequential", "partitioned", "vectorized"],
                  "sequential: one trial after another on all devices; partitioned: trials at once on disjoint "
                  "device groups; vectorized: one vmapped population; auto: vectorized when the trials differ "
                  "only in learning rate, weight decay, label smoothing or seed, else partitioned.")
flags.DEFINE_integer("devices_per_trial", 0, "partitioned: devices per group (0: split the devices evenly "
                     "over the trials).")
flags.DEFINE_integer("population_size", 0, "vectorized: most trials per population (0: all at once).")
flags.DEFINE_string("trials", None, "Only the trials whose name matches this regular expression.")
flags.DEFINE_enum("metric", "eval_accuracy", ["eval_accuracy", "eval_loss", "train_accuracy", "train_loss"],
                  "The metric that picks the best trial (losses: lowest).")
flags.DEFINE_bool("print_commands", False, "Print one `python -m cnnjax.main` command per trial and exit.")
flags.DEFINE_bool("summarize_only", False, "Write results.csv, results.md and plots from the trial directories "
                  "without training.")


def _selected_trials():
  from cnnjax.errors import ConfigError  # pylint: disable=import-outside-toplevel  (jax after flags)
  from cnnjax.sweep import load_trials  # pylint: disable=import-outside-toplevel
  trials = load_trials(config_flags.get_config_filename(FLAGS["config"]))
  if FLAGS.trials is None:
    return trials
  try:
    pattern = re.compile(FLAGS.trials)
  except re.error as e:
    raise ConfigError(f"--trials={FLAGS.trials!r} is not a regular expression ({e}); "
                      "pass part of a trial name, e.g. --trials=seed=0") from None
  chosen = [t for t in trials if pattern.search(t.name)]
  if not chosen:
    raise ConfigError(f"--trials={FLAGS.trials!r} matches none of the {len(trials)} trials (e.g. "
                      f"{trials[0].name!r}); use --print_commands to list them")
  return chosen


def _commands(trials) -> list[str]:
  """One cnnjax.main command per trial: the sweep's own overrides, then the trial's."""
  from cnnjax.sweep import apply_overrides, declare  # pylint: disable=import-outside-toplevel
  shared = config_flags.get_override_values(FLAGS["config"])
  commands = []
  for trial in trials:
    apply_overrides(FLAGS.config, trial)  # a bad override fails here, not on the cluster
    overrides = {**{k: v for k, v in shared.items() if k not in trial.overrides}, **trial.overrides}
    arguments = ["python", "-m", "cnnjax.main", f"--config={config_flags.get_config_filename(FLAGS['config'])}",
                 f"--workdir={FLAGS.workdir.rstrip('/')}/{trial.name}",
                 *declare.command_line_overrides(overrides),
                 *([] if FLAGS.deterministic else ["--nodeterministic"])]
    commands.append(declare.shell_join(arguments))
  return commands


def main(argv: list[str]) -> None:
  del argv
  cli.configure_logging()
  # Trials are spread over devices (vectorized members, partitioned groups).
  host = cli.configure_host_devices(FLAGS.simulate_devices, FLAGS.config, sweep=True,
                                    deterministic=FLAGS.deterministic)

  def go():
    trials = _selected_trials()
    if FLAGS.print_commands:
      print("\n".join(_commands(trials)))
      return
    from cnnjax.errors import ConfigError  # pylint: disable=import-outside-toplevel
    from cnnjax.sweep import results, run_sweep  # pylint: disable=import-outside-toplevel
    from cnnjax.train import Preemption  # pylint: disable=import-outside-toplevel
    from cnnjax.train.rundir import check_workdir  # pylint: disable=import-outside-toplevel
    check_workdir(FLAGS.workdir)
    if FLAGS.summarize_only and not os.path.isdir(FLAGS.workdir):
      raise ConfigError(f"--workdir={FLAGS.workdir} holds no sweep to summarize (it does not exist); give the "
                        "sweep's directory")
    if FLAGS.summarize_only:
      results.check_trial_dirs(FLAGS.config, trials, FLAGS.workdir)
    else:
      with Preemption().handling() as preemption:
        report = run_sweep(FLAGS.config, trials, FLAGS.workdir, mode=FLAGS.mode,
                           devices_per_trial=FLAGS.devices_per_trial, population_size=FLAGS.population_size,
                           record={"command": sys.argv}, preemption=preemption, host=host)
      print(f"sweep: {len(report.runs)} trials in {report.mode} mode, {len(report.trained)} trained now, "
            f"{report.wall_seconds:.1f} s")
    written = results.write_results(FLAGS.workdir, trials, FLAGS.metric)
    for row in results.read_rows(trials, FLAGS.workdir):
      value = (row.summary or {}).get(FLAGS.metric)
      if isinstance(value, float):
        shown = f"{FLAGS.metric}={value:.4f}"
      elif row.summary is not None:
        shown = f"{FLAGS.metric} {results.MISSING}"
      else:
        shown = row.status + (f" ({row.reason})" if row.reason else "")
      print(f"{'*' if row.trial.name == written['best'] else ' '} {row.trial.name}: {shown}")
    best = written["best"] or (f"none ({', '.join(written['missing'])} lack {FLAGS.metric})"
                               if written["missing"] else "none")
    print(f"results: {written['markdown']} {written['csv']} ({len(written['plots'])} plots); best: {best}")
    return written["failed"]

  failed = cli.run_reporting_errors(go)
  if failed:
    print("error: " + one_line(f"{len(failed)} trial(s) failed: "
                               + "; ".join(f"{row.trial.name} ({row.reason})" for row in failed)
                               + "; the other trials ran; rerun the same command to retry the failed ones"),
          file=sys.stderr)
    sys.exit(EXIT_TRIALS_FAILED)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.one_line_flags_parser)
