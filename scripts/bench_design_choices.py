"""The measurements behind cnnjax's design choices, each choice against its alternative, in one run.

Command:
  python scripts/bench_design_choices.py [--json=docs/results/design_choices.json] [--rounds=5]
      [--compile_rounds=3] [--seconds_per_round=0.3] [--choices=batchnorm_relu,init_compile,...]
Expected: per choice of `cnnjax.lab.bench.design_choices` (BatchNorm as x * a + b, initializers compiled
without XLA's optimizations, max pooling's own derivative, small-map and 1x1 convolutions as matrix
products), the median milliseconds of cnnjax's computation and of its alternative (seconds of
compilation for the initializer), forward and backward, and the median per-round ratio of the
alternative over cnnjax; the rows docs/performance.md quotes ("Measurements behind design choices"),
printed for pasting.
Cost: about 2 minutes on 2 busy CPU cores (most of it compiling ResNet-20's initializer with XLA's
optimizations, and the select-and-scatter gradient at 112x112).

Both sides of every choice are first checked to compute the same outputs (the run stops there if
they do not), then alternated over rounds, so that a noisy neighbour slows both alike. The command,
the commit and the machine are recorded with the numbers.
"""

import os

from absl import app, flags

from cnnjax import cli

flags.DEFINE_string("json", os.path.join("docs", "results", "design_choices.json"), "Where to write the results.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds over the two sides of each run-time choice.")
flags.DEFINE_integer("compile_rounds", 3, "Interleaved rounds over the two sides of the compile-time choice.")
flags.DEFINE_float("seconds_per_round", 0.3, "Timed seconds per side and round (at least 3 calls, at most 50).")
flags.DEFINE_list("choices", [], "Choices to measure (default: all); the docs' rows need all of them.")
flags.DEFINE_bool("tiny", False, "Tiny shapes and a tiny model: checks that the run works, measures nothing useful.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.configure_logging()
  if FLAGS.rounds < 1 or FLAGS.compile_rounds < 1 or FLAGS.seconds_per_round <= 0:
    cli.fail(f"--rounds={FLAGS.rounds}, --compile_rounds={FLAGS.compile_rounds} and "
             f"--seconds_per_round={FLAGS.seconds_per_round} must be positive")
  if os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "").lower() in ("1", "true") and not FLAGS.tiny:
    cli.fail("JAX_DISABLE_MOST_OPTIMIZATIONS is set: both sides of every choice would compile unoptimized; "
             "unset it (or pass --tiny to check the run only)")
  from cnnjax.lab.bench import design_choices, harness  # pylint: disable=import-outside-toplevel
  unknown = sorted(set(FLAGS.choices) - set(design_choices.CHOICES))
  if unknown:
    cli.fail(f"--choices: unknown {','.join(unknown)}; choose from {','.join(design_choices.CHOICES)}")
  names = tuple(name for name in design_choices.CHOICES if not FLAGS.choices or name in FLAGS.choices)
  measured = design_choices.run(names, tiny=FLAGS.tiny, rounds=FLAGS.rounds, compile_rounds=FLAGS.compile_rounds,
                                seconds_per_round=FLAGS.seconds_per_round)
  # The allocator settings of the benchmark's children (harness.ALLOCATOR_ENV) change how large buffers are
  # freed, which the 112x112 pooling feels: record whether they were in effect.
  payload = {**harness.provenance(), "tiny": FLAGS.tiny,
             "allocator_env": {key: os.environ.get(key) for key in harness.ALLOCATOR_ENV}, **measured}
  harness.write_results(FLAGS.json, payload)
  if names == design_choices.CHOICES:
    print("\n".join(design_choices.markdown_rows(payload)))  # the rows docs/performance.md quotes


if __name__ == "__main__":
  app.run(main, flags_parser=cli.one_line_flags_parser)
