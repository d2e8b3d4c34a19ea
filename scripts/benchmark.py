"""The benchmark: cnnjax train steps next to PyTorch and the machine's matmul peak, in one run.

Command:
  python scripts/benchmark.py [--quick] --json=OUT.json [--no_torch] [--simulate_devices=8]
PyTorch (the reference) is an optional extra: pip install '.[torch]'.
Expected: one line per case (model x batch x strategy x dtype) with images per
second, step time, compile time, fraction of the float32 matmul peak, the input
pipeline's speed over the step's, and PyTorch's eager and channels_last images
per second for the same model and batch (float32, one process, all cores) with
the ratios; the same in the JSON
(`cases`, one object per case) with the command, commit and machine.
docs/performance.md quotes docs/results/benchmark.json, a full run
(`--json=docs/results/benchmark.json`), as `harness.markdown_table` prints it.
Cost: --quick a few minutes on 2 CPU cores, the full run (224x224 ResNet-18/50,
every strategy and dtype) tens of minutes (`wall_seconds` in the JSON).

Multi-device cases (pmap, shard_map, jit) run on `--simulate_devices` CPU
devices (default 8; each case's child process starts with them, no XLA_FLAGS
needed). On a GPU host (`pip install -e '.[cuda]'` and a CUDA build of PyTorch),
the same command writes the same JSON: single-device cases use the first GPU,
multi-device cases all local GPUs (simulated devices only exist on JAX's CPU
platform), the PyTorch reference runs on the first GPU, and each record names
its `backend` and `torch_device`.
"""

import sys
import time

from absl import app, flags

from cnnjax import cli
from cnnjax.lab.bench import harness

# Timed steps per case when --timed_steps is not given.
QUICK_TIMED_STEPS, FULL_TIMED_STEPS = 5, 10

flags.DEFINE_string("json", None, "Where to write the results.")
flags.DEFINE_bool("quick", False, "Small ImageNet inputs and fewer cases.")
flags.DEFINE_bool("no_torch", False, "Skip the PyTorch reference.")
flags.DEFINE_integer("warmup_steps", 2, "Untimed steps after compiling.")
flags.DEFINE_integer("timed_steps", 0, f"Timed steps per case (0: {QUICK_TIMED_STEPS} with --quick, "
                     f"{FULL_TIMED_STEPS} otherwise).")
flags.DEFINE_integer("simulate_devices", harness.SIMULATED_DEVICES,
                     "CPU devices of the multi-device cases (pmap, shard_map, jit); each batch must divide by it.")
flags.mark_flag_as_required("json")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected argument {argv[1]!r}; see --help")
  if FLAGS.warmup_steps < 0 or FLAGS.timed_steps < 0:
    cli.fail("--warmup_steps and --timed_steps must be >= 0")
  if FLAGS.simulate_devices < 1:
    cli.fail(f"--simulate_devices={FLAGS.simulate_devices} must be a positive device count")
  case_list = harness.cases(FLAGS.quick, devices=FLAGS.simulate_devices)
  indivisible = sorted({c.batch for c in case_list if c.strategy != "none" and c.batch % FLAGS.simulate_devices})
  if indivisible:
    cli.fail(f"--simulate_devices={FLAGS.simulate_devices} does not divide the batch of {indivisible[0]}; choose a "
             "count that divides every case's batch (1, 2, 4, 8, 16 or 32)")
  start = time.monotonic()
  timed = FLAGS.timed_steps or (QUICK_TIMED_STEPS if FLAGS.quick else FULL_TIMED_STEPS)
  payload = harness.benchmark(case_list, quick=FLAGS.quick, torch_reference=not FLAGS.no_torch,
                              warmup_steps=FLAGS.warmup_steps, timed_steps=timed,
                              progress=lambda line: print(line, flush=True))
  harness.write_results(FLAGS.json, {**harness.provenance(), **payload, "wall_seconds": time.monotonic() - start})
  failed = [c for c in payload["cases"] if "error" in c]
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.one_line_flags_parser)
