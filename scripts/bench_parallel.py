"""Step time of each parallel strategy, and the cost of synchronizing BatchNorm, on simulated devices.

Command:
  python scripts/bench_parallel.py --json=bench_parallel.json [--devices=8] [--model=resnet20] [--batch=128]
      [--strategies=none,pmap,shard_map,jit]
Expected: one line per (strategy, bn_sync) with the median train-step time and
images per second, and the ratio of synchronized (global) to unsynchronized
(local) BatchNorm per strategy; the same numbers in the JSON.
Cost: about a minute on 2 CPU cores with 8 simulated devices.

The devices are simulated with XLA_FLAGS=--xla_force_host_platform_device_count,
which this script sets before JAX starts: on a CPU host, 8 "devices" share its
cores, so the numbers measure the strategies' overheads, not a speed-up. Like
scripts/benchmark.py, it runs with glibc's allocator told to keep freed memory
(re-executing itself with `cnnjax.bench.harness.ALLOCATOR_ENV` set).
"""

import argparse
import json
import os
import platform
import sys

from cnnjax.bench.harness import ALLOCATOR_ENV, STRATEGIES


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", required=True, help="where to write the results")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--warmup_steps", type=int, default=3)
  parser.add_argument("--timed_steps", type=int, default=10)
  parser.add_argument("--strategies", default=",".join(STRATEGIES),
                      help="comma-separated subset of " + ",".join(STRATEGIES))
  args = parser.parse_args()
  strategies = args.strategies.split(",")
  if args.devices < 1 or args.batch % args.devices or args.warmup_steps < 0 or args.timed_steps < 1:
    parser.error("need --devices >= 1 dividing --batch, --warmup_steps >= 0 and --timed_steps >= 1")
  if not strategies or any(s not in STRATEGIES for s in strategies):
    parser.error(f"--strategies={args.strategies}: choose from {','.join(STRATEGIES)}")
  if any(os.environ.get(key) != value for key, value in ALLOCATOR_ENV.items()):
    # glibc reads these when the process starts: run again with them.
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **ALLOCATOR_ENV})
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}").strip()

  import jax  # pylint: disable=import-outside-toplevel  (after XLA_FLAGS)
  from cnnjax import config as config_lib, train
  from cnnjax.bench import timing  # pylint: disable=import-outside-toplevel

  results = []
  for strategy in strategies:
    for bn_sync in (("global",) if strategy == "none" else ("global", "local")):
      config = config_lib.base_config()
      config.model.name = args.model
      config.data.name = "digits"
      config.data.image_size = args.image_size
      config.batch_size = args.batch
      config.num_train_steps = 1
      config.parallel.strategy = strategy
      config.model.bn_sync = bn_sync
      exp = train.build(config)
      record = {"strategy": strategy, "bn_sync": bn_sync, "devices": exp.strategy.layout.num_devices,
                "model": args.model, "batch": args.batch,
                **timing.time_train_step(exp, warmup_steps=args.warmup_steps, timed_steps=args.timed_steps)}
      results.append(record)
      print(f"{strategy:>9} {bn_sync:>6} on {record['devices']} devices: "
            f"{record['median_step_seconds'] * 1000:7.1f} ms/step  {record['images_per_second']:7.1f} img/s  "
            f"compile {record['compile_seconds']:.1f} s", flush=True)
  sync_cost = {}
  for strategy in (s for s in strategies if s != "none"):
    times = {r["bn_sync"]: r["median_step_seconds"] for r in results if r["strategy"] == strategy}
    sync_cost[strategy] = times["global"] / times["local"]
    print(f"{strategy:>9}: global / local BatchNorm step time = {sync_cost[strategy]:.3f}")
  payload = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                         "backend": jax.default_backend(), "python": sys.version.split()[0],
                         "jax": jax.__version__},
             "cases": results, "global_over_local_step_time": sync_cost}
  with open(args.json, "w") as f:
    json.dump(payload, f, indent=2)


if __name__ == "__main__":
  main()
