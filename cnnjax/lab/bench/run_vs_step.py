"""The training run against its bare step: how much of the step's speed a real run keeps.

For each case (a model with an experiment's recipe: batch, augmentation, data)
the same process measures, in interleaved rounds:

* the bare step: the run's own compiled train step called back to back on one
  batch already on the device, the clock read once the last step is done;
* the run: `cnnjax.train.run` of the same config for a fixed number of steps, as
  `python -m cnnjax.main` runs it (data pipeline or resident split, the loop,
  its logging and checks), at the throughput its summary reports (compilation,
  the first dispatch, evaluation and checkpoints excluded).

It reports the median of each, `run / step`, and the loop's cost per step in
microseconds: the run's time per step minus the bare step's.

Each round of each case runs in a child process (this file run as a script,
`--case`), so that a checkout given as `--checkout=DIR` (an older commit: the
child puts it first on `sys.path`) is measured by the same code, interleaved
with the current one: only public entry points are used (`train.build`,
`Experiment.train_step_fn`, `train_batches`, `train.run`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

# Cases: (name, experiment, overrides, steps of each run, whether only the current checkout has the keys
# it sets, the data it reads instead of the experiment's). The MLP's step costs almost nothing, so its run
# measures the loop itself. LeNet-5 with 4 steps per dispatch measures a device loop against the bare step
# on this backend.
CASES = (
    ("mlp_digits", "lenet5_digits", {"model.name": "mlp"}, 400, False, ""),
    ("lenet5_digits", "lenet5_digits", {}, 200, False, ""),
    ("lenet5_digits_4_steps_per_dispatch", "lenet5_digits",
     {"data.placement": "device", "parallel.steps_per_dispatch": 4}, 200, True, ""),
    ("resnet20_cifar_shaped", "resnet20_cifar10", {}, 12, False, "cifar_shaped"),
)
# Stand-ins for data a run would download: CIFAR-shaped uint8 32x32x3 images of 10 classes in npz files,
# and the pipeline benchmark's synthetic JPEG `imagenet2012` (cnnjax.lab.bench.datasets).
DATA_KINDS = ("", "cifar_shaped", "imagenet_jpeg")
CIFAR_SHAPED_EXAMPLES = 1024


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  experiment: str
  overrides: dict[str, Any]
  steps: int
  current_only: bool = False  # sets keys an earlier checkout may lack
  data: str = ""  # one of DATA_KINDS: the experiment's own data, or a stand-in
  data_examples: int = CIFAR_SHAPED_EXAMPLES  # training examples of a stand-in


def cases(names: list[str] | None = None) -> list[Case]:
  selected = [Case(*case) for case in CASES]
  return [case for case in selected if not names or case.name in names]


def write_cifar_shaped(directory: str, examples: int = CIFAR_SHAPED_EXAMPLES) -> dict[str, str]:
  """Random CIFAR-shaped train and eval npz files (the same for the same `examples`); the config overrides
  that read them."""
  rng = np.random.default_rng(0)
  paths = {}
  for split, count in (("train", examples), ("eval", max(1, examples // 4))):
    paths[split] = os.path.join(directory, f"{split}.npz")
    np.savez(paths[split], image=rng.integers(0, 256, (count, 32, 32, 3)).astype(np.uint8),
             label=rng.integers(0, 10, count))
  return {"data.name": "npz", "data.train_path": paths["train"], "data.eval_path": paths["eval"]}


def stand_in_data(case: Case, data_dir: str) -> dict[str, Any]:
  """Writes the case's stand-in data into `data_dir` (kept when there); the config overrides that read it."""
  if case.data == "cifar_shaped":
    return write_cifar_shaped(data_dir, case.data_examples)
  if case.data == "imagenet_jpeg":
    from cnnjax.lab.bench import datasets  # pylint: disable=import-outside-toplevel
    tfds_dir = os.path.join(data_dir, "tfds")
    datasets.prepare_imagenet_jpeg(tfds_dir, num_train=case.data_examples,
                                   num_eval=max(1, case.data_examples // datasets.JPEG_EVAL_FRACTION))
    return {"data.tfds_data_dir": tfds_dir}
  return {}


def case_config(case: Case, checkout: str, data_dir: str) -> Any:
  """The case's experiment config (from `checkout`'s experiments/) at its run length, logging and
  checkpointing once, no eval on the way."""
  from cnnjax import config as config_lib  # pylint: disable=import-outside-toplevel
  path = os.path.join(checkout, "experiments", f"{case.experiment}.py")
  spec = importlib.util.spec_from_file_location(case.experiment, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  overrides = {**case.overrides, "num_train_steps": case.steps, "log_every_steps": case.steps,
               "checkpoint_every_steps": case.steps, "eval_every_steps": 0, "progress_bar": False}
  overrides.update(stand_in_data(case, data_dir))
  for key, value in overrides.items():
    config_lib.set_value(config, key, value)
  return config


def bare_step_images_per_second(config: Any, steps: int) -> float:
  """The run's compiled train step, back to back on its first batch placed on the device."""
  import jax  # pylint: disable=import-outside-toplevel
  from cnnjax import parallel, train  # pylint: disable=import-outside-toplevel
  exp = train.build(config)
  batches = exp.train_batches()
  host_batch = {key: value for key, value in next(batches).items() if key != "index"}
  batches.close()
  state = exp.strategy.put_state(jax.device_get(exp.init_state()))
  batch = exp.strategy.put_batch(host_batch)
  step = exp.train_step_fn()
  state, metrics = step(state, batch)  # compiles
  jax.block_until_ready((state, metrics))
  one_at_a_time = parallel.waits_for_each_program(exp.strategy.layout.devices)  # as the run does
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
    if one_at_a_time:
      jax.block_until_ready(state)
  jax.block_until_ready((state, metrics))
  return steps * config.batch_size / (time.perf_counter() - start)


def run_images_per_second(config: Any, workdir: str) -> float:
  from cnnjax import train  # pylint: disable=import-outside-toplevel
  return float(train.run(config, workdir)["examples_per_second"])


def measure_round(case: Case, checkout: str, data_dir: str = "") -> dict[str, float]:
  """One round in this process: the bare step, then the run (stand-in data in `data_dir`, else a scratch
  directory)."""
  with tempfile.TemporaryDirectory() as scratch:
    config = case_config(case, checkout, data_dir or scratch)
    step_rate = bare_step_images_per_second(config, case.steps)
    run_rate = run_images_per_second(config, os.path.join(scratch, "run"))
  return {"step": step_rate, "run": run_rate, "batch": config.batch_size, "model": config.model.name,
          "dtype": config.model.dtype}


def round_in_child(case: Case, checkout: str) -> dict[str, float]:
  """`measure_round` in a child process that imports cnnjax from `checkout`."""
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}  # one device, every core
  result = subprocess.run([sys.executable, os.path.abspath(__file__), f"--case={case.name}",
                           f"--checkout={checkout}"], capture_output=True, text=True, env=env, check=False)
  lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
  if result.returncode or not lines:
    raise RuntimeError(f"{case.name} on {checkout} failed: {result.stderr.strip().splitlines()[-1:]}")
  return json.loads(lines[-1])


def measure(case: Case, checkouts: dict[str, str], *, rounds: int, progress: Any = print) -> dict[str, Any]:
  """Interleaved rounds of every checkout: per checkout the medians, `run / step` and the loop's cost per
  step in microseconds."""
  if case.current_only:
    checkouts = {label: path for label, path in checkouts.items() if label == "after"}
  samples: dict[str, list[dict[str, float]]] = {label: [] for label in checkouts}
  for round_index in range(rounds):
    for label, checkout in checkouts.items():
      samples[label].append(round_in_child(case, checkout))
      progress(f"{case.name} {label} round {round_index + 1}: step {samples[label][-1]['step']:,.0f} img/s, "
               f"run {samples[label][-1]['run']:,.0f} img/s")
  record: dict[str, Any] = {"case": case.name, "experiment": case.experiment, "overrides": case.overrides,
                            "steps_per_run": case.steps}
  for label, rounds_done in samples.items():
    step_rate = statistics.median(r["step"] for r in rounds_done)
    run_rate = statistics.median(r["run"] for r in rounds_done)
    batch = rounds_done[0]["batch"]
    record[label] = {"batch": batch, "model": rounds_done[0]["model"], "dtype": rounds_done[0]["dtype"],
                     "step_images_per_second": [r["step"] for r in rounds_done],
                     "run_images_per_second": [r["run"] for r in rounds_done],
                     "median_step_images_per_second": step_rate, "median_run_images_per_second": run_rate,
                     "run_over_step": run_rate / step_rate,
                     "loop_microseconds_per_step": (batch / run_rate - batch / step_rate) * 1e6}
  return record


def _child_main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--case", required=True)
  parser.add_argument("--checkout", required=True)
  args = parser.parse_args()
  sys.path.insert(0, os.path.abspath(args.checkout))
  import logging  # pylint: disable=import-outside-toplevel
  logging.getLogger("cnnjax").setLevel(logging.WARNING)
  print(json.dumps(measure_round(cases([args.case])[0], os.path.abspath(args.checkout))))


if __name__ == "__main__":
  _child_main()


def describe_checkout(path: str) -> dict[str, str]:
  """A measured checkout: its path and the commit it holds."""
  result = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
  return {"path": path, "commit": result.stdout.strip() or "unknown"}


def markdown_table(payload: dict[str, Any]) -> str:
  """The table docs/performance.md quotes: per case and checkout, the step, the run, their ratio and the
  loop's cost per step."""
  rows = ["| case | batch | checkout | bare step img/s | run img/s | run / step | loop us/step |",
          "|---|---|---|---|---|---|---|"]
  for record in payload["cases"]:
    for label in ("before", "after"):
      if label not in record:
        continue
      side = record[label]
      rows.append(f"| {record['case']} | {side['batch']} | {label} | {side['median_step_images_per_second']:,.0f} | "
                  f"{side['median_run_images_per_second']:,.0f} | {side['run_over_step']:.2f} | "
                  f"{side['loop_microseconds_per_step']:,.0f} |")
  return "\n".join(rows)
