"""Wall time and throughput of one sweep run sequentially, partitioned and vectorized, on simulated devices.

Command:
  python scripts/bench_sweep.py --json=bench_sweep.json [--simulate_devices=8] [--steps=100]
Expected: one line per mode with the sweep's wall time (build, compile, train,
evaluate, checkpoint; Python start-up excluded) and the examples per second of
all trials together, then each mode's speed-up over sequential; the same
numbers in the JSON. The sweep is experiments/lr_sweep_digits.py (8 trials:
4 learning rates x 2 seeds) cut to `--steps` steps.
Cost: about 4 minutes on 2 CPU cores with 8 simulated devices (steps=100).

Each mode runs in a fresh process (nothing compiled is shared between modes)
into a fresh workdir. Sequential runs twice: with the experiment's own
`parallel.strategy=jit` (each trial on all 8 devices, as the mode is defined)
and with `none` (each trial on one device), the faster way on simulated
devices that share two cores. `--simulate_devices=N` starts each mode's
process with N CPU devices (XLA's --xla_force_host_platform_device_count, set
before JAX starts; a count already in XLA_FLAGS wins): they share the host's
cores, so the numbers measure how well each mode keeps the cores busy, not a
speed-up from more hardware.
"""

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

from cnnjax import cli
from cnnjax.lab.bench import harness

# (mode, parallel.strategy of each trial): the cases, in the order they are run and shown.
CASES = (("sequential", "jit"), ("sequential", "none"), ("partitioned", "jit"), ("vectorized", "jit"))
EXPERIMENT = "lr_sweep_digits"

flags.DEFINE_string("json", None, "Where to write the results.")
flags.DEFINE_integer("simulate_devices", 8, "CPU devices each mode's process starts with.")
flags.DEFINE_integer("steps", 100, "Train steps of every trial.")
# Set by this script for its child processes (one per mode).
flags.DEFINE_string("case", "", "Internal: MODE:STRATEGY, run one case in this process.")
flags.DEFINE_string("workdir", "", "Internal: the sweep directory of --case.")
flags.mark_flag_as_required("json")
FLAGS = flags.FLAGS


def run_case(mode: str, strategy: str, steps: int, workdir: str) -> dict:
  """Runs one sweep in this process (a child of main) and returns its timing."""
  import jax  # pylint: disable=import-outside-toplevel  (after XLA_FLAGS)

  from cnnjax.sweep import declare, run_sweep  # pylint: disable=import-outside-toplevel

  cli.configure_logging()
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", f"{EXPERIMENT}.py")
  trials = declare.load_trials(path)
  config = declare.load_experiment_file(path).get_config()
  config.num_train_steps = steps
  config.log_every_steps = steps
  config.parallel.strategy = strategy
  config.lock()
  report = run_sweep(config, trials, workdir, mode=mode)
  examples = sum(run.summary["step"] * run.summary["global_batch"] for run in report.runs)
  return {"mode": mode, "strategy": strategy, "trials": len(report.runs), "steps": steps,
          "devices": len(jax.local_devices()), "wall_seconds": report.wall_seconds,
          "examples": examples, "examples_per_second": examples / report.wall_seconds,
          # A population compiles once and each member's summary reports that one compilation.
          "compile_seconds_total": (max if mode == "vectorized" else sum)(
              run.summary["compile_seconds"] for run in report.runs),
          "eval_accuracy": {run.trial.name: run.summary["eval_accuracy"] for run in report.runs}}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected argument {argv[1]!r}; see --help")
  if FLAGS.steps < 1:
    cli.fail(f"--steps={FLAGS.steps} must be positive")
  if FLAGS.case and (FLAGS.case.count(":") != 1 or not FLAGS.workdir):
    cli.fail(f"--case={FLAGS.case} is internal (MODE:STRATEGY with --workdir); leave it out")
  cli.configure_host_devices(FLAGS.simulate_devices, None)
  if FLAGS.case:
    mode, strategy = FLAGS.case.split(":")
    with open(FLAGS.json, "w") as f:
      json.dump(cli.run_reporting_errors(lambda: run_case(mode, strategy, FLAGS.steps, FLAGS.workdir)), f)
    return

  results = []
  with tempfile.TemporaryDirectory(prefix="bench-sweep-") as scratch:
    for mode, strategy in CASES:
      part = os.path.join(scratch, f"{mode}-{strategy}.json")
      subprocess.run([sys.executable, __file__, f"--json={part}", f"--simulate_devices={FLAGS.simulate_devices}",
                      f"--steps={FLAGS.steps}", f"--case={mode}:{strategy}",
                      f"--workdir={os.path.join(scratch, f'{mode}-{strategy}')}"], check=True)
      with open(part) as f:
        record = json.load(f)
      results.append(record)
      print(f"{mode:>11} (trials on strategy {strategy:>4}): {record['wall_seconds']:6.1f} s  "
            f"{record['examples_per_second']:7.0f} examples/s  (compilation {record['compile_seconds_total']:.1f} s, "
            "summed over compilations)", flush=True)
  baseline = results[0]["wall_seconds"]
  for record in results:
    record["speedup_over_sequential_jit"] = baseline / record["wall_seconds"]
    print(f"{record['mode']:>11} ({record['strategy']:>4}): {record['speedup_over_sequential_jit']:.2f}x "
          "the sequential (jit) sweep")
  harness.write_results(FLAGS.json, {**harness.provenance(), "simulated_devices": FLAGS.simulate_devices,
                                     "experiment": EXPERIMENT, "steps": FLAGS.steps, "cases": results})


if __name__ == "__main__":
  app.run(main, flags_parser=cli.one_line_flags_parser)
