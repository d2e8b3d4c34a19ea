"""The BatchNorm study: how BatchNorm behaves under pmap, shard_map, jit and vmap, as runs and a report.

Command:
  python scripts/bn_study.py --workdir=/tmp/cnnjax/bn_study [--scale=small|full|tiny] [--only=KEY,...]
  [--report_only] [--readme=docs/bn_study.md] [--publish=docs/results/bn_study]
Writes DIR/report.md (a section per experiment: question, table, plot, reading),
DIR/results.json (every number), DIR/summary.md (the study's summary; `--readme=docs/bn_study.md`
writes it into that page between its markers) and DIR/*.png; `--publish=DIR2` copies
those (not the runs) to DIR2, where the repository keeps the measured study. Each experiment's runs train
into DIR/<experiment>/<trial>/ with results.csv/results.md as `python -m
cnnjax.sweep` writes them. Rerunning resumes: finished runs and measurements are
not redone. `--report_only` rewrites the report from what DIR holds. SIGTERM or
SIGINT save the run in training and stop (exit status 128 + the signal); a rerun
goes on from there.
Expected: the numbers of docs/bn_study.md (the measured study is in docs/results/bn_study).
Cost: `small` (the default; the digits and the MNIST sample on CPU with 8
simulated devices, every configuration over 3-5 seeds): 101 runs and
measurements, 826 s from scratch on 2 CPU cores that other jobs shared (61% of
them); `tiny` (3 steps, 1-2 trials per experiment, 2 seeds: a smoke test) 80 s;
`full` (ResNet-20 on CIFAR-10, 3 seeds) is for a host with 8 accelerators, about
180 million training images in all, not measured on an accelerator yet (see
docs/bn_study.md).

On a CPU host this script simulates 8 devices (`--simulate_devices`, default
8 here) before JAX starts, so the multi-device experiments run; an
accelerator host uses its own devices.
"""

import os

from absl import app, flags

from cnnjax import cli

# The most devices any experiment spreads a batch over (bn_sync_vs_devices: 1, 2, 4, 8).
SIMULATED_DEVICES = 8
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string("workdir", None, "The study's directory: runs, measurements, report.md, results.json, plots.")
flags.DEFINE_enum("scale", "small", ["small", "full", "tiny"],
                  "small: digits and an MNIST sample on CPU (docs/bn_study.md's numbers); full: CIFAR-10 and "
                  "ResNet-20 on 8 accelerators; tiny: a few steps of a few trials, to check the pipeline.")
flags.DEFINE_list("only", [], "Run only these experiments (the report still covers all): sync_vs_devices, "
                  "per_device_batch, vmap_leakage, ensemble, train_vs_eval, ghost_batch.")
flags.DEFINE_bool("report_only", False, "Write the report from what the workdir holds; train nothing.")
flags.DEFINE_string("experiments_dir", os.path.join(REPO_ROOT, "experiments"), "Where the bn_*.py files are.")
flags.DEFINE_string("readme", None, "Also rewrite this Markdown file's generated summary of the study (between "
                    "its bn_study summary markers) from DIR/summary.md; the repository's is docs/bn_study.md.")
flags.DEFINE_string("publish", None, "Also copy report.md, results.json, summary.md and the plots to this "
                    "directory (the repository keeps them in docs/results/bn_study).")
cli.define_device_flags()
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.configure_logging()
  # Its experiments spread batches over up to 8 devices: asked for explicitly, so bn_sync=local means each
  # of them.
  cli.configure_host_devices(SIMULATED_DEVICES if FLAGS.simulate_devices == -1 else FLAGS.simulate_devices, None,
                             deterministic=FLAGS.deterministic)
  from cnnjax.lab import bn_study as study  # pylint: disable=import-outside-toplevel  (JAX after XLA_FLAGS)

  def go():
    if FLAGS.readme:
      study.report.read_readme(FLAGS.readme)  # before training: a README it cannot write is an error now
    if FLAGS.report_only:
      results = study.write_study_report(study.Context(os.path.abspath(FLAGS.workdir),
                                                       study.SCALES[FLAGS.scale], FLAGS.experiments_dir))
    else:
      from cnnjax.train import Preemption  # pylint: disable=import-outside-toplevel
      with Preemption().handling() as preemption:
        results = study.run_study(FLAGS.workdir, FLAGS.scale, experiments_dir=FLAGS.experiments_dir,
                                  only=FLAGS.only, preemption=preemption)
    if FLAGS.readme:
      study.report.update_readme(FLAGS.readme, FLAGS.workdir)
    if FLAGS.publish:
      study.publish_report(FLAGS.workdir, FLAGS.publish)
    missing = study.report.missing_runs(results)
    print(f"report: {os.path.join(FLAGS.workdir, 'report.md')} (numbers in results.json); "
          + (f"{len(missing)} runs or measurements missing" if missing else "nothing missing"))

  cli.run_reporting_errors(go)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main, flags_parser=cli.one_line_flags_parser)
