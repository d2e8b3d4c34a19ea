"""Entry point: `python -m cnnjax.predict --workdir=DIR PATH... [--top_k=5] [--json] [--step=N | --checkpoint=best]`.

Classifies image files, and the image files in folders, with a trained run:
each is converted as the run's training images were and passed through the
run's eval preprocessing and model (`cnnjax.train.prediction`). Prints each
file's top-k classes with their names and probabilities, or JSON with `--json`.
Needs neither the dataset nor the network: the run recorded its classes and
normalization in `DIR/dataset.json` when it started (a run that did not is
answered with class indices). A file that is not an image gets one line on
stderr naming it, and the others are still predicted. Exit status: 0 when every
file was predicted, 2 when any was not or the input was bad; nothing is
written.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from cnnjax import cli
from cnnjax.errors import EXIT_USER_ERROR, one_line

FLAGS = flags.FLAGS
cli.define_run_reading_flags()
flags.DEFINE_integer("top_k", 5, "Classes to print per image, best first (at most the run's classes).")
flags.DEFINE_bool("json", False, "Print one JSON object: the predictions, and the files that failed.")


def main(argv: list[str]) -> None:
  paths = argv[1:]
  if not paths:
    cli.fail("give the image files or folders to classify: python -m cnnjax.predict --workdir=DIR PATH...")
  if FLAGS.top_k < 1:
    cli.fail(f"--top_k={FLAGS.top_k} must be at least 1")
  cli.check_checkpoint_flags(FLAGS)
  cli.configure_logging()

  def go():
    from cnnjax.train import prediction, restore  # pylint: disable=import-outside-toplevel  (jax after flags)

    def report(path: str, error: str) -> None:
      print(f"error: {one_line(path)}: {one_line(error)}", file=sys.stderr, flush=True)

    files = prediction.image_files(paths)
    run = restore.restore_for_inference(FLAGS.workdir, step=FLAGS.step, checkpoint=FLAGS.checkpoint)
    return (run, *prediction.classify(run, files, top_k=FLAGS.top_k, on_failure=report))

  run, predictions, failed = cli.run_reporting_errors(go)
  named = bool(run.dataset.class_names)
  if FLAGS.json:
    print(json.dumps({"workdir": run.workdir, "step": run.step, "class_names_recorded": named,
                      "predictions": [p.as_json() for p in predictions], "failed": failed}, indent=2))
  else:
    if not named:
      print(f"note: the run in {run.workdir} recorded no class names; classes are given by index", file=sys.stderr)
    for p in predictions:
      print(f"{one_line(p.path)}: " + ", ".join(f"{name if name is not None else index} {probability:.4f}"
                                      for index, name, probability in p.top))
  if failed:
    sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main, flags_parser=cli.one_line_flags_parser)
