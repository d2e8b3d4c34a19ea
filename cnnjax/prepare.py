"""Entry point: `python -m cnnjax.prepare NAME [--data_dir=DIR] [--source_dir=DIR] [--manual_dir=DIR]`.

Prepares a dataset once into the TFDS data directory; see `cnnjax.data.prepare`.
"""

from __future__ import annotations

from absl import app, flags

from cnnjax import cli

flags.DEFINE_string("data_dir", "", "TFDS data directory ('' : $TFDS_DATA_DIR or ~/tensorflow_datasets).")
flags.DEFINE_string("source_dir", "", "Directory holding the dataset's original files (offline, no TensorFlow).")
flags.DEFINE_string("manual_dir", "", "TFDS manual download directory (ImageNet's tar files).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  from cnnjax.data import prepare as prepare_lib  # pylint: disable=import-outside-toplevel
  from cnnjax.data.sources import default_tfds_data_dir, open_dataset  # pylint: disable=import-outside-toplevel
  if len(argv) != 2:
    cli.fail(f"give one dataset name: python -m cnnjax.prepare NAME (one of {', '.join(prepare_lib.PREPARABLE)})")
  name = argv[1]
  data_dir = FLAGS.data_dir or default_tfds_data_dir()
  cli.configure_logging()

  def go():
    written = prepare_lib.prepare(name, data_dir=data_dir, source_dir=FLAGS.source_dir,
                                  manual_dir=FLAGS.manual_dir)
    dataset = open_dataset(name, tfds_data_dir=data_dir)
    print(f"prepared {name} in {written}: {len(dataset.train)} train / {len(dataset.eval)} eval examples, "
          f"{dataset.num_classes} classes, images {dataset.image_shape}")

  cli.run_reporting_errors(go)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.one_line_flags_parser)
