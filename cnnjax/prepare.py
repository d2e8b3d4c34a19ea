"""Entry point: `python -m cnnjax.prepare NAME [--data_dir=DIR] [--source_dir=DIR] [--manual_dir=DIR]`.

Prepares a dataset once into the TFDS data directory; see `cnnjax.data.prepare`.
`--source_dir` holds either the original files of MNIST, Fashion-MNIST, CIFAR-10
or CIFAR-100, or (under any other NAME) images in torchvision's ImageFolder
layout, DIR/train/<class>/*.png|jpg. TFDS's progress bars are shown on a
terminal only, so that logs hold no bar debris. Ctrl-C (SIGINT) stops it with
one line and exit status 130: TFDS writes into a temporary directory that it
removes, so nothing half-written is left and a rerun prepares from the start.
"""

from __future__ import annotations

import signal
import sys

from absl import app, flags

from cnnjax import cli
from cnnjax.errors import EXIT_STATUS_BASE

flags.DEFINE_string("data_dir", "", "TFDS data directory ('' : $TFDS_DATA_DIR or ~/tensorflow_datasets).")
flags.DEFINE_string("source_dir", "", "Offline, no TensorFlow: the original files of mnist, fashion_mnist, cifar10 "
                    "or cifar100, or an image folder (DIR/train/<class>/*.png|jpg) for a dataset of another NAME.")
flags.DEFINE_string("manual_dir", "", "TFDS manual download directory (ImageNet's tar files).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  from cnnjax.data import prepare as prepare_lib  # pylint: disable=import-outside-toplevel
  from cnnjax.data.sources import default_tfds_data_dir, open_dataset  # pylint: disable=import-outside-toplevel
  if len(argv) != 2:
    cli.fail(f"give one dataset name: python -m cnnjax.prepare NAME (e.g. {', '.join(prepare_lib.PREPARABLE)}, "
             "or a name of your own with --source_dir=IMAGE_FOLDER)")
  name = argv[1]
  data_dir = FLAGS.data_dir or default_tfds_data_dir()
  cli.configure_logging()
  if not sys.stderr.isatty():
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    tfds.disable_progress_bar()

  def go():
    try:
      written = prepare_lib.prepare(name, data_dir=data_dir, source_dir=FLAGS.source_dir,
                                    manual_dir=FLAGS.manual_dir)
    except KeyboardInterrupt:
      print(f"stopped by SIGINT while preparing {name}; nothing half-written is kept, rerun the same command to "
            "prepare it", file=sys.stderr, flush=True)
      sys.exit(EXIT_STATUS_BASE + signal.SIGINT)
    dataset = open_dataset(name, tfds_data_dir=data_dir)
    print(f"prepared {name} in {written}: {len(dataset.train)} train / {len(dataset.eval)} eval examples, "
          f"{dataset.num_classes} classes, images {dataset.image_shape}")

  cli.run_reporting_errors(go)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.one_line_flags_parser)
