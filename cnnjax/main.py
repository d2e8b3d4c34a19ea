"""Entry point: `python -m cnnjax.main --config=experiments/NAME.py --workdir=DIR [--config.a.b=value]`.

Parses flags and hands over to the library. Multi-process runs add
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or nothing,
on a cluster JAX detects by itself). Every user error ends as one line on stderr
and exit status 2, before anything is written.
"""

from __future__ import annotations


from absl import app, flags
from ml_collections import config_flags

from cnnjax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/NAME.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the summary.")
flags.DEFINE_bool("fresh", False, "Start over: move an earlier run in --workdir aside (into replaced-<time>/) first.")
cli.define_distributed_flags()
cli.define_device_flags()


def main(argv: list[str]) -> None:
  del argv
  cli.run_training(FLAGS.config, FLAGS.workdir, cli.distributed_flags(FLAGS), fresh=FLAGS.fresh,
                   simulate_devices=FLAGS.simulate_devices, deterministic=FLAGS.deterministic)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.one_line_flags_parser)
