"""How many virtual CPU devices keep a CPU host busiest: the train step on 1, 2, 4, 8 and 16 of them.

Command:
  python scripts/bench_cpu_devices.py [--json=docs/results/cpu_devices.json] [--repeats=3]
Expected: per model, the median images per second of each device count (1: strategy none; more:
jit with the batch split over them, bn_sync=global, which computes the same on any count), and
the count that `cnnjax.parallel.host_devices.AUTOMATIC_CPU_DEVICES` should be.
Cost: about 10 minutes on 2 CPU cores (every count of every model in its own process, repeated).

Each measurement is a child process of the benchmark harness (`cnnjax.lab.bench.harness`), with
glibc's allocator kept warm, started with `--xla_force_host_platform_device_count=N`. The
counts are measured in interleaved rounds, so that a noisy neighbour slows all of them alike;
the JSON records every round, the command, the commit and the machine.
"""

import os
import statistics
import sys

from absl import app, flags

from cnnjax import cli

# (model, batch, image size, channels, classes, input kind): the benchmark's ResNet-20 and LeNet-5, and
# ResNet-18 at 64x64.
MODELS = (("resnet20", 128, 32, 3, 10, "cifar"), ("lenet5", 256, 32, 1, 10, "mnist"),
          ("resnet18", 32, 64, 3, 1000, "imagenet"))
DEVICE_COUNTS = (1, 2, 4, 8, 16)

flags.DEFINE_string("json", os.path.join("docs", "results", "cpu_devices.json"), "Where to write the results.")
flags.DEFINE_integer("repeats", 3, "Interleaved rounds over every (model, device count).")
flags.DEFINE_integer("warmup_steps", 3, "Untimed steps after compiling.")
flags.DEFINE_integer("timed_steps", 10, "Timed steps per measurement (their median counts).")
flags.DEFINE_list("models", [m[0] for m in MODELS], "Models to measure.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from cnnjax.lab.bench import harness  # pylint: disable=import-outside-toplevel
  chosen = [m for m in MODELS if m[0] in FLAGS.models]
  rounds: dict[str, dict[int, list[float]]] = {m[0]: {n: [] for n in DEVICE_COUNTS} for m in chosen}
  for repeat in range(FLAGS.repeats):
    for model, batch, size, channels, classes, kind in chosen:
      for count in DEVICE_COUNTS:
        case = harness.Case(model, batch, size, channels, classes, "none" if count == 1 else "jit", "float32",
                            kind, num_devices=count)
        record = harness.run_in_child(case, what="jax", warmup_steps=FLAGS.warmup_steps,
                                      timed_steps=FLAGS.timed_steps)
        if "error" in record:
          print(f"{model} on {count} devices failed: {record['error']}", file=sys.stderr)
          continue
        rounds[model][count].append(record["images_per_second"])
        print(f"round {repeat + 1}: {model:>9} on {count:>2} CPU devices: {record['images_per_second']:8.1f} img/s",
              flush=True)
  summary = {}
  for model, counts in rounds.items():
    medians = {n: statistics.median(v) for n, v in counts.items() if v}
    best = max(medians, key=medians.get)
    summary[model] = {"images_per_second": {str(n): v for n, v in counts.items()},
                      "median_images_per_second": {str(n): m for n, m in medians.items()},
                      "over_one_device": {str(n): m / medians[1] for n, m in medians.items()},
                      "best_device_count": best}
    print(f"{model}: " + ", ".join(f"{n} devices x{m / medians[1]:.2f}" for n, m in medians.items())
          + f"; best {best}")
  payload = {**harness.provenance(),
             "warmup_steps": FLAGS.warmup_steps, "timed_steps": FLAGS.timed_steps,
             "repeats": FLAGS.repeats, "strategy": "none on 1 device, jit on more; bn_sync=global; float32",
             "models": summary}
  harness.write_results(FLAGS.json, payload)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.one_line_flags_parser)
