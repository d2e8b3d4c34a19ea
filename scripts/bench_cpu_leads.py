"""Issue 18's three leads against the ResNet-20 CPU train step, next to the current step and PyTorch, in one run.

Command:
  python scripts/bench_cpu_leads.py [--json=docs/results/cpu_leads.json] [--rounds=7]
Expected: per variant of the ResNet-20 train step (batch 128, 32x32, float32, one CPU device,
SGD with momentum), the median images per second over interleaved rounds and the CPU
core-seconds per step (the work), each variant's ratios to the current `cpu_tuned` step
(medians of the per-round ratios) and its speed's ratio to PyTorch eager and
channels_last timed in the same rounds (round by round, and of the medians); the largest
parameter difference after one step from the same state against `cpu_tuned` (the candidates
must compute the same step).
Variants: `plain` and `cpu_tuned` (cnnjax.nn.lowering), and the leads of
`cnnjax.lab.bench.cpu_leads`: `weight_grad_matmul`, `patch_layout`, `ynn_eltwise`.
Cost: about 10 minutes on 2 busy CPU cores with 7 rounds (compiling five steps, then a PyTorch
child per round).

Every variant is compiled in this process and timed round by round in a rotating order, so
that a noisy neighbour slows all of them alike; PyTorch runs in a child of the benchmark
harness each round (its own process, as in `scripts/benchmark.py`). The process re-executes
itself with the harness's allocator settings (`cnnjax.lab.bench.harness.ALLOCATOR_ENV`), which
the benchmark's children use too.
"""

import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

from cnnjax import cli

BASELINE = "cpu_tuned"
CASE = {"model": "resnet20", "batch": 128, "image_size": 32, "channels": 3, "num_classes": 10,
        "strategy": "none", "dtype": "float32", "input_kind": "cifar"}

flags.DEFINE_string("json", os.path.join("docs", "results", "cpu_leads.json"), "Where to write the results.")
flags.DEFINE_integer("rounds", 7, "Interleaved rounds over every variant and PyTorch.")
flags.DEFINE_integer("warmup_steps", 2, "Untimed steps before each variant's timed steps in a round.")
flags.DEFINE_integer("timed_steps", 5, "Timed steps per variant and round (their median counts).")
flags.DEFINE_list("variants", ["plain", BASELINE, "weight_grad_matmul", "patch_layout", "ynn_eltwise"],
                  "Step variants to time: plain, cpu_tuned and the leads of cnnjax.lab.bench.cpu_leads.")
flags.DEFINE_bool("torch", True, "Time the PyTorch twin in the same rounds.")
FLAGS = flags.FLAGS


def compile_variant(variant: str, workdir: str):
  """The variant's compiled step, its initial state and the fixed batch."""
  import jax  # pylint: disable=import-outside-toplevel

  from cnnjax import train  # pylint: disable=import-outside-toplevel
  from cnnjax.lab.bench import cpu_leads, harness, timing  # pylint: disable=import-outside-toplevel
  from cnnjax.nn import lowering  # pylint: disable=import-outside-toplevel
  config = harness.case_config(harness.Case(**CASE), workdir)
  config.model.lowering = variant if variant in (lowering.PLAIN, lowering.CPU_TUNED) else lowering.CPU_TUNED
  lead = variant if variant in cpu_leads.LEADS else None
  exp = train.build(config)
  state = exp.strategy.put_state(jax.device_get(exp.init_state()))
  batch = exp.strategy.put_batch(timing.synthetic_batch(exp))
  # The swap acts when the step is traced: no trace cached for an earlier variant may be reused.
  jax.clear_caches()
  with cpu_leads.convolutions_of(lead):
    lowered = exp.train_step_fn().lower(state, batch)
  return lowered.compile(compiler_options=cpu_leads.compiler_options(lead)), state, batch


def time_steps(step, state, batch, warmup: int, timed: int):
  """Runs warm-up then timed steps; returns (median seconds, core-seconds per step, the state after them).

  Core-seconds (this process's user + system CPU time) count the step's work, which a busy
  neighbour disturbs less than the wall clock.
  """
  import jax  # pylint: disable=import-outside-toplevel
  for _ in range(warmup):
    state, _ = step(state, batch)
    jax.block_until_ready(state)  # untimed: one program at a time (see parallel.waits_for_each_program)
  durations = []
  cpu_start = os.times()
  for _ in range(timed):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    durations.append(time.perf_counter() - start)
  cpu_end = os.times()
  core_seconds = (cpu_end.user - cpu_start.user + cpu_end.system - cpu_start.system) / timed
  return statistics.median(durations), core_seconds, state


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from cnnjax.lab.bench import harness  # pylint: disable=import-outside-toplevel
  if BASELINE not in FLAGS.variants:
    raise app.UsageError(f"--variants must include the baseline {BASELINE}")
  batch_size = CASE["batch"]
  steps, states, first_params = {}, {}, {}
  with tempfile.TemporaryDirectory() as workdir:
    for variant in FLAGS.variants:
      start = time.perf_counter()
      step, state, batch = compile_variant(variant, workdir)
      print(f"compiled {variant} in {time.perf_counter() - start:.1f} s", flush=True)
      # One step from the shared initial state (the state is donated: copy it first).
      state, _ = step(state, batch)
      first_params[variant] = jax.device_get(state.params)
      steps[variant], states[variant] = (step, batch), state
  differences = {v: max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p),
                                                                       jax.tree.leaves(first_params[BASELINE])))
                 for v, p in first_params.items()}
  seconds = {v: [] for v in FLAGS.variants}
  core_seconds = {v: [] for v in FLAGS.variants}
  torch_rounds = {"torch_eager": [], "torch_channels_last": []}
  case = harness.Case(**CASE)
  for round_index in range(FLAGS.rounds):
    order = FLAGS.variants[round_index % len(FLAGS.variants):] + FLAGS.variants[:round_index % len(FLAGS.variants)]
    for variant in order:
      step, batch = steps[variant]
      median, cores, states[variant] = time_steps(step, states[variant], batch, FLAGS.warmup_steps,
                                                  FLAGS.timed_steps)
      seconds[variant].append(median)
      core_seconds[variant].append(cores)
    if FLAGS.torch:
      reference = harness.run_in_child(case, what="torch", warmup_steps=FLAGS.warmup_steps,
                                       timed_steps=FLAGS.timed_steps)
      for key, values in torch_rounds.items():
        if f"{key}_images_per_second" in reference:
          values.append(reference[f"{key}_images_per_second"])
    print(f"round {round_index + 1}: " + ", ".join(f"{v} {batch_size / s[-1]:.0f}" for v, s in seconds.items())
          + "".join(f", {k} {r[-1]:.0f}" for k, r in torch_rounds.items() if r) + " img/s", flush=True)
  torch_medians = {k: statistics.median(r) for k, r in torch_rounds.items() if r}
  summary = {}
  for variant, values in seconds.items():
    images = [batch_size / s for s in values]
    per_round = [b / s for s, b in zip(values, seconds[BASELINE])]
    work_per_round = [c / b for c, b in zip(core_seconds[variant], core_seconds[BASELINE])]
    summary[variant] = {
        "images_per_second": images, "median_images_per_second": statistics.median(images),
        "speed_over_cpu_tuned_per_round": per_round, "median_speed_over_cpu_tuned": statistics.median(per_round),
        "core_seconds_per_step": core_seconds[variant],
        "median_core_seconds_per_step": statistics.median(core_seconds[variant]),
        "core_seconds_over_cpu_tuned_per_round": work_per_round,
        "median_core_seconds_over_cpu_tuned": statistics.median(work_per_round),
        "max_param_difference_after_one_step": differences[variant],
        **{f"ratio_vs_{k}": statistics.median(images) / m for k, m in torch_medians.items()},
        # The same round's PyTorch speed: a neighbour that slows one round slows both sides of its ratio.
        **{f"ratio_vs_{k}_per_round": [i / t for i, t in zip(images, r)] for k, r in torch_rounds.items() if r},
        **{f"median_ratio_vs_{k}_per_round": statistics.median(i / t for i, t in zip(images, r))
           for k, r in torch_rounds.items() if r}}
    print(f"{variant:>18}: {summary[variant]['median_images_per_second']:7.1f} img/s, "
          f"x{summary[variant]['median_speed_over_cpu_tuned']:.3f} of cpu_tuned's speed, "
          f"{summary[variant]['median_core_seconds_per_step']:.2f} core-s/step "
          f"(x{summary[variant]['median_core_seconds_over_cpu_tuned']:.3f} of cpu_tuned's)"
          + "".join(f", {summary[variant][f'median_ratio_vs_{k}_per_round']:.2f} of {k} (same round)"
                    for k in torch_medians)
          + f"; max |param - cpu_tuned| after one step {differences[variant]:.1e}")
  payload = {**harness.provenance(),
             "case": CASE, "rounds": FLAGS.rounds,
             "warmup_steps": FLAGS.warmup_steps, "timed_steps": FLAGS.timed_steps,
             "speed_over_cpu_tuned": "median over rounds of (cpu_tuned step seconds / variant step seconds)",
             "core_seconds_over_cpu_tuned": "median over rounds of (variant core-seconds / cpu_tuned core-seconds)",
             "variants": summary, "torch": {"images_per_second": torch_rounds,
                                            "median_images_per_second": torch_medians}}
  harness.write_results(FLAGS.json, payload)


def with_allocator_env() -> None:
  """Re-executes this script with the harness's glibc settings unless they are already set."""
  from cnnjax.lab.bench.harness import ALLOCATOR_ENV  # pylint: disable=import-outside-toplevel
  if any(os.environ.get(key) != value for key, value in ALLOCATOR_ENV.items()):
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **ALLOCATOR_ENV})


if __name__ == "__main__":
  with_allocator_env()
  app.run(main, flags_parser=cli.one_line_flags_parser)
