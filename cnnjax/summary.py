"""Entry point: `python -m cnnjax.summary NAME --input_shape=H,W,C --num_classes=K [--json]`.

Prints a registered model's per-layer table (output shape, trainable
parameters, multiply-accumulates, receptive field size and jump) and totals,
or the same as JSON with `--json`. No parameter is materialized, so the largest
models print in about a second. Shapes exclude the batch axis: `H,W,C` for
images, `D,H,W,C` for volumes (unet3d), `L` for token sequences (text_cnn).
"""

from __future__ import annotations

from absl import app, flags

from cnnjax import cli

flags.DEFINE_string("input_shape", None, "Input shape without the batch axis, comma-separated: H,W,C (or L, D,H,W,C).")
flags.DEFINE_integer("num_classes", None, "Classifier size (segmentation: classes per pixel).")
flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
flags.DEFINE_string("norm", "", "Normalization: batch, group, layer, none; '' keeps the architecture's own.")
FLAGS = flags.FLAGS


def parse_shape(text: str) -> tuple[int, ...]:
  """'224,224,3' -> (224, 224, 3); raises ValueError with the expected form."""
  try:
    shape = tuple(int(part) for part in text.split(","))
  except ValueError:
    raise ValueError(f"--input_shape={text!r} is not comma-separated integers; write e.g. 224,224,3") from None
  if not shape or any(size <= 0 for size in shape):
    raise ValueError(f"--input_shape={text!r} needs positive sizes; write e.g. 224,224,3")
  return shape


def main(argv: list[str]) -> None:
  from cnnjax.analysis import profile_registered  # pylint: disable=import-outside-toplevel  (fast --help)
  from cnnjax.models import MODELS  # pylint: disable=import-outside-toplevel
  if len(argv) != 2:
    cli.fail(f"give one model name: python -m cnnjax.summary NAME --input_shape=H,W,C --num_classes=K "
             f"(models: {', '.join(sorted(MODELS))})")
  name = argv[1]
  if name not in MODELS:
    cli.fail(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}")
  if FLAGS.input_shape is None or FLAGS.num_classes is None:
    cli.fail("give --input_shape=H,W,C (without the batch axis) and --num_classes=K")
  if FLAGS.num_classes <= 0:
    cli.fail(f"--num_classes={FLAGS.num_classes} must be positive")
  try:
    shape = parse_shape(FLAGS.input_shape)
  except ValueError as e:
    cli.fail(str(e))
  try:
    profile = profile_registered(name, shape, FLAGS.num_classes, norm_kind=FLAGS.norm)
  except Exception as e:  # pylint: disable=broad-except  (a shape the architecture cannot take is user input)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    cli.fail(f"{name} cannot take input shape {shape}: {first}")
  print(profile.to_json() if FLAGS.json else profile.table())


if __name__ == "__main__":
  app.run(main, flags_parser=cli.one_line_flags_parser)
