"""Step time of each parallel strategy, and the cost of synchronizing BatchNorm, on simulated devices.

Command:
  python scripts/bench_parallel.py --json=bench_parallel.json [--simulate_devices=8] [--model=resnet20]
      [--batch=128] [--strategies=none,pmap,shard_map,jit]
Expected: one line per (strategy, bn_sync) with the median train-step time and
images per second, and the ratio of synchronized (global) to unsynchronized
(local) BatchNorm per strategy; the same numbers in the JSON.
Cost: about a minute on 2 CPU cores with 8 simulated devices.

`--simulate_devices=N` starts the process with N CPU devices (XLA's
--xla_force_host_platform_device_count, set before JAX starts; a count already
in XLA_FLAGS wins): on a CPU host, 8 "devices" share its cores, so the numbers
measure the strategies' overheads, not a speed-up. Like scripts/benchmark.py,
it runs with glibc's allocator told to keep freed memory (re-executing itself
with `cnnjax.lab.bench.harness.ALLOCATOR_ENV` set).
"""

import os
import sys

from absl import app, flags

from cnnjax import cli
from cnnjax.lab.bench import harness
from cnnjax.lab.bench.harness import ALLOCATOR_ENV, SIMULATED_DEVICES, STRATEGIES

flags.DEFINE_string("json", None, "Where to write the results.")
flags.DEFINE_integer("simulate_devices", SIMULATED_DEVICES, "CPU devices to start with; must divide --batch.")
flags.DEFINE_string("model", "resnet20", "The model (a name of cnnjax.models).")
flags.DEFINE_integer("batch", 128, "Global batch.")
flags.DEFINE_integer("image_size", 32, "Inputs are the digits resized to this size.")
flags.DEFINE_integer("warmup_steps", 3, "Untimed steps after compiling.")
flags.DEFINE_integer("timed_steps", 10, "Timed steps (their median counts).")
flags.DEFINE_list("strategies", list(STRATEGIES), "Strategies to time, a subset of " + ",".join(STRATEGIES))
flags.mark_flag_as_required("json")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected argument {argv[1]!r}; see --help")
  strategies = FLAGS.strategies
  if FLAGS.simulate_devices < 1 or FLAGS.batch % FLAGS.simulate_devices:
    cli.fail(f"--simulate_devices={FLAGS.simulate_devices} must be a positive count dividing --batch={FLAGS.batch}")
  if FLAGS.warmup_steps < 0 or FLAGS.timed_steps < 1:
    cli.fail("--warmup_steps must be >= 0 and --timed_steps >= 1")
  if not strategies or any(s not in STRATEGIES for s in strategies):
    cli.fail(f"--strategies={','.join(strategies)}: choose from {','.join(STRATEGIES)}")
  if any(os.environ.get(key) != value for key, value in ALLOCATOR_ENV.items()):
    # glibc reads these when the process starts: run again with them.
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **ALLOCATOR_ENV})
  cli.configure_host_devices(FLAGS.simulate_devices, None)

  # pylint: disable=import-outside-toplevel  (JAX after XLA_FLAGS)
  from cnnjax import config as config_lib
  from cnnjax import train
  from cnnjax.lab.bench import timing

  results = []
  for strategy in strategies:
    for bn_sync in (("global",) if strategy == "none" else ("global", "local")):
      config = config_lib.base_config()
      config.model.name = FLAGS.model
      config.data.name = "digits"
      config.data.image_size = FLAGS.image_size
      config.batch_size = FLAGS.batch
      config.num_train_steps = 1
      config.parallel.strategy = strategy
      config.model.bn_sync = bn_sync
      exp = cli.run_reporting_errors(lambda config=config: train.build(config))  # a bad --model: one line
      record = {"strategy": strategy, "bn_sync": bn_sync, "devices": exp.strategy.layout.num_devices,
                "model": FLAGS.model, "batch": FLAGS.batch,
                **timing.time_train_step(exp, warmup_steps=FLAGS.warmup_steps, timed_steps=FLAGS.timed_steps)}
      results.append(record)
      print(f"{strategy:>9} {bn_sync:>6} on {record['devices']} devices: "
            f"{record['median_step_seconds'] * 1000:7.1f} ms/step  {record['images_per_second']:7.1f} img/s  "
            f"compile {record['compile_seconds']:.1f} s", flush=True)
  sync_cost = {}
  for strategy in (s for s in strategies if s != "none"):
    times = {r["bn_sync"]: r["median_step_seconds"] for r in results if r["strategy"] == strategy}
    sync_cost[strategy] = times["global"] / times["local"]
    print(f"{strategy:>9}: global / local BatchNorm step time = {sync_cost[strategy]:.3f}")
  harness.write_results(FLAGS.json, {**harness.provenance(), "simulated_devices": FLAGS.simulate_devices,
                                     "cases": results, "global_over_local_step_time": sync_cost})


if __name__ == "__main__":
  app.run(main, flags_parser=cli.one_line_flags_parser)
