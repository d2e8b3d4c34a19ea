"""Entry point: `python -m cnnjax.export --workdir=DIR --to=torchvision|stablehlo --output=FILE
[--step=N | --checkpoint=best] [--overwrite] [--config.a.b=value]`.

Writes one checkpoint of a trained run (the newest, `--step=N`, or the best
kept with `--checkpoint=best`) for use outside cnnjax: `--to=torchvision` as a `.safetensors` state dict in
torchvision's layout (ResNet, VGG, AlexNet, GoogLeNet), `--to=stablehlo` as
the eval-mode forward pass serialized by `jax.export`. An existing output is
refused unless `--overwrite`, which replaces it in one rename. The library
does the work (`cnnjax.train.export`); docs/export.md says how to load each
file. The run's config comes from its `config.json`; `--config.a.b=value`
overrides what does not define the model (where its data lives:
`--config.data.tfds_data_dir=...`). Every user error is one line on stderr and
exit status 2, and nothing is written.
"""

from __future__ import annotations

from absl import app, flags

from cnnjax import cli

FORMATS = ("torchvision", "stablehlo")  # cnnjax.train.export.FORMATS, without importing JAX for --help

FLAGS = flags.FLAGS
cli.define_run_reading_flags()
flags.DEFINE_enum("to", None, FORMATS, "torchvision: a .safetensors state dict in torchvision's layout; "
                  "stablehlo: the eval-mode forward pass serialized by jax.export.")
flags.DEFINE_string("output", None, "The file to write (FILE.safetensors for --to=torchvision); its directory "
                    "must exist.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --output (in one rename) instead of refusing.")
flags.DEFINE_list("platforms", ["cpu", "cuda", "tpu"], "--to=stablehlo: the platforms the program is lowered "
                  "for (any of cpu, cuda, rocm, tpu).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected argument {argv[1]!r}; python -m cnnjax.export takes flags only "
             "(--workdir=DIR --to=torchvision|stablehlo --output=FILE)")
  cli.check_checkpoint_flags(FLAGS)
  cli.configure_logging()

  def go():
    from cnnjax.train import export  # pylint: disable=import-outside-toplevel  (JAX after the flags)
    return export.export(FLAGS.workdir, FLAGS.to, FLAGS.output, config=FLAGS.config, step=FLAGS.step,
                         checkpoint=FLAGS.checkpoint, overwrite=FLAGS.overwrite, platforms=tuple(FLAGS.platforms))

  print(cli.run_reporting_errors(go).describe())


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "to", "output"])
  app.run(main, flags_parser=cli.run_config_flags_parser)
