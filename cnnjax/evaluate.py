"""Entry point: `python -m cnnjax.evaluate --workdir=DIR [--step=N | --checkpoint=best] [--config.a.b=value]`.

Scores one checkpoint of a run (the newest by default) with the run's own
config, preprocessing and strategy on all local devices, through the
computation of the run's own eval (`cnnjax.train.scoring`): loss, top-1 and
top-5 accuracy, per-class accuracy and the confusion matrix; segmentation adds
per-class IoU and mean IoU. Overrides such as `--config.data.eval_split=train`
or `--config.data.name=...` score other data the model fits. Writes
`DIR/eval/<dataset>-<split>-<step>.json` with `.csv` and `.png` beside it and
touches nothing else in DIR. Every user error is one line on stderr and exit
status 2.
"""

from __future__ import annotations

import json

from absl import app, flags

from cnnjax import cli

FLAGS = flags.FLAGS
cli.define_run_reading_flags()
flags.DEFINE_bool("json", False, "Print the whole report as JSON instead of a summary line.")
cli.define_device_flags()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected argument {argv[1]!r}; python -m cnnjax.evaluate takes flags only (--workdir=DIR)")
  cli.check_checkpoint_flags(FLAGS)
  cli.configure_logging()

  def go():
    from cnnjax.train import restore, scoring  # pylint: disable=import-outside-toplevel  (jax after flags)
    run_config = restore.load_config(FLAGS.workdir)
    scoring.check_report_directory(FLAGS.workdir)
    host = cli.configure_host_devices(FLAGS.simulate_devices, FLAGS.config, deterministic=FLAGS.deterministic)
    restored = restore.restore(FLAGS.workdir, FLAGS.config, run_config=run_config, step=FLAGS.step,
                               checkpoint=FLAGS.checkpoint, host=host)
    return scoring.evaluate(restored)

  result, path = cli.run_reporting_errors(go)
  if FLAGS.json:
    print(json.dumps(result, indent=2))
    return
  top = result["top5_accuracy"]
  print(f"step={result['step']} dataset={result['dataset']} split={result['split']} examples={result['examples']} "
        f"loss={result['loss']:.4f} accuracy={result['accuracy']:.4f} "
        f"top5_accuracy={'n/a' if top is None else f'{top:.4f}'}"
        + (f" mean_iou={result['mean_iou']:.4f}" if "mean_iou" in result else "") + f" report={path}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main, flags_parser=cli.run_config_flags_parser)
