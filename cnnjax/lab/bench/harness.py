"""The benchmark harness behind `scripts/benchmark.py`: cases, the PyTorch reference, the input pipeline.

Each case (model x batch x strategy x dtype) runs in its own child process
(`python -m cnnjax.lab.bench.harness --case=...`), so that its peak memory is its
own, single-device cases get a plain one-device JAX (all host cores), and
multi-device cases get 8 simulated devices. In the child the cnnjax train step
is compiled and timed on a fixed batch (median of the timed steps after warm-up,
device synchronized before the clock is read) and its FLOPs counted by XLA.

The PyTorch twin of each model is timed once per (model, batch, input size), in
its own child, eager and channels_last, float32, on the first GPU where PyTorch
sees one, else with as many threads as the host has cores (XLA's CPU default);
every case of that model carries the ratio.

Children run with glibc's allocator told to keep freed memory
(`ALLOCATOR_ENV`): XLA's CPU runtime allocates its temporary buffers anew at
every step, and glibc otherwise returns them to the kernel and faults fresh
pages in again, which `perf` showed as a large share of a ResNet-20 step's CPU
time in kernel page faults (docs/performance.md).

The parent measures the machine's float32 matmul peak and the real input
pipeline (decode, augment, batch, on the host) for each input kind, and writes
one JSON with every case.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

SIMULATED_DEVICES = 8
STRATEGIES = ("none", "pmap", "shard_map", "jit")
DTYPES = ("float32", "bfloat16")
PIPELINE_EXAMPLES = 2048  # examples in each synthetic dataset the pipeline benchmark reads
PIPELINE_WARMUP_BATCHES = 2
# Batches are timed until both bounds are reached: small images take milliseconds per batch.
PIPELINE_MIN_TIMED_BATCHES = 10
PIPELINE_MIN_TIMED_SECONDS = 2.0
CASE_TIMEOUT_SECONDS = 1800
# glibc malloc: serve buffers up to 32 MiB from the heap and never trim it, so that freed step
# buffers are reused instead of unmapped and faulted in again.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2 ** 20), "MALLOC_TRIM_THRESHOLD_": str(2 ** 30),
                 "MALLOC_TOP_PAD_": str(256 * 2 ** 20)}


@dataclasses.dataclass(frozen=True)
class Case:
  model: str
  batch: int
  image_size: int
  channels: int
  num_classes: int
  strategy: str
  dtype: str
  input_kind: str
  num_devices: int = 0  # CPU devices the child starts with; 0: one for 'none', else SIMULATED_DEVICES

  @property
  def devices(self) -> int:
    return self.num_devices or (1 if self.strategy == "none" else SIMULATED_DEVICES)

  @property
  def input_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, self.channels)

  @property
  def reference_key(self) -> tuple[str, int, int, int, int]:
    """What the PyTorch reference of this case depends on."""
    return (self.model, self.batch, self.image_size, self.channels, self.num_classes)


def cases(quick: bool, devices: int = SIMULATED_DEVICES) -> list[Case]:
  """The benchmark's cases; --quick keeps ResNet-20 and LeNet-5 whole and the ImageNet nets small.
  Multi-device cases start their child with `devices` CPU devices (on an accelerator host they use every
  local accelerator instead)."""
  imagenet_size = 64 if quick else 224
  families = [("resnet20", 128, 32, 3, 10, "cifar"), ("lenet5", 256, 32, 1, 10, "mnist"),
              ("resnet18", 32, imagenet_size, 3, 1000, "imagenet"),
              ("resnet50", 32, imagenet_size, 3, 1000, "imagenet")]
  selected = []
  for model, batch, size, channels, classes, kind in families:
    for strategy in STRATEGIES:
      for dtype in DTYPES:
        if quick and model in ("resnet18", "resnet50") and (strategy, dtype) != ("none", "float32"):
          continue
        if quick and model == "lenet5" and dtype != "float32":
          continue
        selected.append(Case(model, batch, size, channels, classes, strategy, dtype, kind,
                             num_devices=1 if strategy == "none" else devices))
  return selected


def write_npz(path: str, num_examples: int, shape: tuple[int, int, int], num_classes: int, seed: int) -> str:
  rng = np.random.default_rng(seed)
  np.savez(path, image=rng.integers(0, 256, (num_examples,) + shape, dtype=np.uint8),
           label=rng.integers(0, num_classes, num_examples))
  return path


def case_config(case: Case, workdir: str) -> Any:
  """A config that trains the case's model on random arrays of its input shape (npz source)."""
  from cnnjax import config as config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.base_config()
  config.model.name = case.model
  config.model.dtype = case.dtype
  config.data.name = "npz"
  config.data.num_classes = case.num_classes
  for role in ("train", "eval"):
    config.data[f"{role}_path"] = write_npz(os.path.join(workdir, f"{role}.npz"), case.batch, case.input_shape,
                                            case.num_classes, seed=0 if role == "train" else 1)
  config.batch_size = case.batch
  config.num_train_steps = 1
  config.parallel.strategy = case.strategy
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  return config


def run_case(case: Case, *, warmup_steps: int, timed_steps: int) -> dict[str, Any]:
  """Times one case in this process (a child of the harness)."""
  import jax  # pylint: disable=import-outside-toplevel

  from cnnjax import train  # pylint: disable=import-outside-toplevel
  from cnnjax.lab.bench import timing  # pylint: disable=import-outside-toplevel
  from cnnjax.train.state import count_params  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as workdir:
    exp = train.build(case_config(case, workdir))
    record = dataclasses.asdict(case)
    record["devices"] = exp.strategy.layout.num_devices
    record["params"] = count_params(exp.init_state().params)
    record.update(timing.time_train_step(exp, warmup_steps=warmup_steps, timed_steps=timed_steps))
    record["flops_per_step"] = timing.step_flops(exp)
    record["peak_host_memory_mb"] = timing.peak_rss_megabytes()
    record["peak_device_memory_mb"] = timing.peak_device_megabytes(exp.strategy.layout.local_devices)
    record["backend"] = jax.default_backend()
    record["device_kind"] = exp.strategy.layout.devices[0].device_kind
  return record


def run_torch_reference(case: Case, *, warmup_steps: int, timed_steps: int) -> dict[str, Any]:
  """Times the case's PyTorch twin in this process (a child of the harness), eager and channels_last."""
  try:
    from cnnjax.lab.bench import torch_models  # pylint: disable=import-outside-toplevel
  except ImportError:
    return {"torch_reference": "not installed (pip install '.[torch]')"}
  results = {}
  for layout, key in ((False, "torch_eager"), (True, "torch_channels_last")):
    timed = torch_models.time_train_step(case.model, batch=case.batch, input_shape=case.input_shape,
                                         num_classes=case.num_classes, channels_last=layout,
                                         threads=os.cpu_count(), warmup_steps=warmup_steps,
                                         timed_steps=timed_steps)
    results[f"{key}_images_per_second"] = timed["images_per_second"]
    results["torch_version"] = timed["torch_version"]
    results["torch_device"] = timed["device"]
    results["torch_params"] = timed["params"]
  return results


def run_in_child(case: Case, *, what: str, warmup_steps: int, timed_steps: int) -> dict[str, Any]:
  """Runs `case` ('jax' step or 'torch' reference) in a fresh Python process; returns its record."""
  from cnnjax.parallel import host_devices  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "case.json")
    # As a run starts (cnnjax.parallel.host_devices): on a GPU, the deterministic kernels it has by default.
    env = {**os.environ, **ALLOCATOR_ENV,
           "XLA_FLAGS": f"{host_devices.DEVICE_COUNT_FLAG}={case.devices} {host_devices.DETERMINISTIC_GPU_FLAG}=true"}
    command = [sys.executable, "-m", "cnnjax.lab.bench.harness", f"--case={json.dumps(dataclasses.asdict(case))}",
               f"--what={what}", f"--out={out}", f"--warmup_steps={warmup_steps}", f"--timed_steps={timed_steps}"]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True,
                            timeout=CASE_TIMEOUT_SECONDS)
    if result.returncode != 0:
      return {**dataclasses.asdict(case), "error": _last_error(result.stderr)}
    with open(out) as f:
      return json.load(f)


def _last_error(stderr: str) -> str:
  """The exception line of a child's traceback (or its last line)."""
  lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
  errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
  return (errors or lines or ["failed without output"])[-1][:500]


def pipeline_throughput(kind: str, batch: int, image_size: int, data_root: str) -> float:
  """Images per second of the real host pipeline (decode, augment, batch) for an input kind."""
  from cnnjax import train  # pylint: disable=import-outside-toplevel
  from cnnjax.lab.bench import pipeline  # pylint: disable=import-outside-toplevel
  from cnnjax.lab.bench.datasets import pipeline_config  # pylint: disable=import-outside-toplevel
  config = pipeline_config(kind, batch=batch, image_size=image_size, root=data_root,
                           num_examples=PIPELINE_EXAMPLES)
  record = pipeline.measure(train.build(config).train_batches(), batch, warmup_batches=PIPELINE_WARMUP_BATCHES,
                            min_batches=PIPELINE_MIN_TIMED_BATCHES, min_seconds=PIPELINE_MIN_TIMED_SECONDS)
  return record["images_per_second"]


def provenance() -> dict[str, Any]:
  """What every results file records beside its numbers: the command, the git commit and the machine."""
  result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
  return {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
          "commit": result.stdout.strip() or "unknown", "machine": machine()}


def write_results(path: str, payload: dict[str, Any]) -> None:
  """Writes a benchmark's JSON results file (its directory made if needed) and says where."""
  from cnnjax import metrics  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  metrics.write_json(path, payload)
  print(f"wrote {path}")


def machine() -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  cpu = platform.processor() or platform.machine()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
          "backend": jax.default_backend(), "devices": [str(d) for d in jax.local_devices()],
          "jax": jax.__version__, "python": sys.version.split()[0]}


def benchmark(case_list: list[Case], *, quick: bool, torch_reference: bool, warmup_steps: int, timed_steps: int,
              progress: Any = print) -> dict[str, Any]:
  """Runs the cases (see `cases`), their PyTorch references and input pipelines; returns the JSON payload."""
  from cnnjax.lab.bench import timing  # pylint: disable=import-outside-toplevel
  peak = timing.peak_matmul_flops_per_second()
  progress(f"float32 matmul peak: {peak / 1e9:.0f} GFLOP/s")
  records, pipelines, references = [], {}, {}
  with tempfile.TemporaryDirectory() as data_root:
    for case in case_list:
      key = (case.input_kind, case.batch, case.image_size)
      if key not in pipelines:
        pipelines[key] = pipeline_throughput(case.input_kind, case.batch, case.image_size, data_root)
      if torch_reference and case.reference_key not in references:
        references[case.reference_key] = run_in_child(case, what="torch", warmup_steps=warmup_steps,
                                                      timed_steps=timed_steps)
      record = run_in_child(case, what="jax", warmup_steps=warmup_steps, timed_steps=timed_steps)
      if "error" not in record:
        record["fraction_of_peak"] = (None if record["flops_per_step"] is None else
                                      record["flops_per_step"] / record["median_step_seconds"] / peak)
        record["pipeline_images_per_second"] = pipelines[key]
        record["pipeline_over_step"] = pipelines[key] / record["images_per_second"]
        reference = references.get(case.reference_key, {})
        for field in ("torch_eager_images_per_second", "torch_channels_last_images_per_second", "torch_version",
                      "torch_device", "torch_params", "torch_reference"):
          if field in reference:
            record[field] = reference[field]
        if "torch_params" in record:
          # The twin must be the same architecture, or the ratio compares different work.
          record["torch_params_match"] = record["torch_params"] == record["params"]
        if "torch_eager_images_per_second" in record:
          record["ratio_vs_torch_eager"] = record["images_per_second"] / record["torch_eager_images_per_second"]
          record["ratio_vs_torch_channels_last"] = (record["images_per_second"] /
                                                     record["torch_channels_last_images_per_second"])
      records.append(record)
      progress(describe(record))
  return {"machine": machine(), "peak_matmul_flops_per_second": peak, "quick": quick,
          "warmup_steps": warmup_steps, "timed_steps": timed_steps, "allocator_env": ALLOCATOR_ENV,
          "cases": records,
          "pipelines": [{"input_kind": k[0], "batch": k[1], "image_size": k[2], "images_per_second": v}
                        for k, v in pipelines.items()]}


def markdown_table(payload: dict[str, Any]) -> str:
  """The table docs/performance.md quotes from a `scripts/benchmark.py` JSON: one row per case."""
  rows = ["| model | batch | input | strategy | dtype | img/s | ms/step | compile s | peak host GiB | of matmul peak | "
          "pipeline / step | torch eager / channels_last img/s | vs torch eager |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for record in payload["cases"]:
    shape = "x".join(str(d) for d in (record["image_size"], record["image_size"], record["channels"]))
    start = f"| {record['model']} | {record['batch']} | {shape} | {record['strategy']} | {record['dtype']} |"
    if "error" in record:
      rows.append(f"{start} failed: {record['error'][:80]} |||||||| ")
      continue
    peak = record.get("fraction_of_peak")
    torch = ("n/a" if "torch_eager_images_per_second" not in record else
             f"{record['torch_eager_images_per_second']:,.1f} / {record['torch_channels_last_images_per_second']:,.1f}")
    ratio = f"x{record['ratio_vs_torch_eager']:.2f}" if "ratio_vs_torch_eager" in record else "n/a"
    rows.append(f"{start} {record['images_per_second']:,.1f} | {record['median_step_seconds'] * 1e3:,.0f} | "
                f"{record['compile_seconds']:.1f} | {record['peak_host_memory_mb'] / 1024:.1f} | "
                f"{'n/a' if peak is None else f'{peak:.0%}'} | x{record['pipeline_over_step']:.0f} | {torch} | "
                f"{ratio} |")
  return "\n".join(rows)


def default_against_one_device_table(payload: dict[str, Any], model: str, default_strategy: str) -> str:
  """The table of a model's step on one device against cnnjax's default on a CPU host (`default_strategy` on the
  benchmark's simulated devices), each dtype with PyTorch eager and channels_last timed in the same run."""
  rows = ["| dtype | one device img/s | default img/s | PyTorch eager / channels_last img/s | one device / eager | "
          "default / eager | default / channels_last |", "|---|---|---|---|---|---|---|"]
  by_case = {(r["strategy"], r["dtype"]): r for r in payload["cases"] if r["model"] == model and "error" not in r}
  for dtype in sorted({dtype for _, dtype in by_case}, key=lambda d: d != "float32"):
    one, default = by_case.get(("none", dtype)), by_case.get((default_strategy, dtype))
    if one is None or default is None or "torch_eager_images_per_second" not in one:
      continue
    eager, channels_last = one["torch_eager_images_per_second"], one["torch_channels_last_images_per_second"]
    rows.append(f"| {dtype} | {one['images_per_second']:,.1f} | {default['images_per_second']:,.1f} | "
                f"{eager:,.1f} / {channels_last:,.1f} | x{one['images_per_second'] / eager:.2f} | "
                f"x{default['images_per_second'] / eager:.2f} | x{default['images_per_second'] / channels_last:.2f} |")
  return "\n".join(rows)


def sweep_modes_table(payload: dict[str, Any]) -> str:
  """The table docs/sweeps.md quotes from a `scripts/bench_sweep.py` JSON: one row per mode."""
  devices = payload["simulated_devices"]
  where = {("sequential", "jit"): f"`jit` over all {devices} devices, one trial at a time",
           ("sequential", "none"): "`none` (one device), one trial at a time",
           ("partitioned", "jit"): f"{devices} groups of 1 device, {devices} trials at once",
           ("vectorized", "jit"): f"one population of {devices}, one member per device"}
  rows = ["| mode | trials run on | wall | examples/s (all trials) | vs sequential |", "|---|---|---|---|---|"]
  for case in payload["cases"]:
    rows.append(f"| {case['mode']} | {where[(case['mode'], case['strategy'])]} | {case['wall_seconds']:.1f} s | "
                f"{case['examples_per_second']:,.0f} | {case['speedup_over_sequential_jit']:.2f}x |")
  return "\n".join(rows)


def describe(record: dict[str, Any]) -> str:
  name = (f"{record['model']:>9} b{record['batch']:<3} {record['image_size']:>3}px {record['strategy']:>9} "
          f"{record['dtype']:>8}")
  if "error" in record:
    return f"{name}: failed: {record['error']}"
  peak = record["fraction_of_peak"]
  line = (f"{name}: {record['images_per_second']:7.1f} img/s  {record['median_step_seconds'] * 1e3:8.1f} ms/step  "
          f"compile {record['compile_seconds']:5.1f} s  {'n/a' if peak is None else f'{peak * 100:4.1f}%'} of peak  "
          f"pipeline x{record['pipeline_over_step']:.1f}")
  if "ratio_vs_torch_eager" in record:
    line += (f"  vs torch eager {record['torch_eager_images_per_second']:.1f} img/s: "
             f"x{record['ratio_vs_torch_eager']:.2f}"
             f", channels_last {record['torch_channels_last_images_per_second']:.1f}: "
             f"x{record['ratio_vs_torch_channels_last']:.2f}")
  return line


def _child_main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--case", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--warmup_steps", type=int, required=True)
  parser.add_argument("--timed_steps", type=int, required=True)
  parser.add_argument("--what", choices=("jax", "torch"), required=True)
  args = parser.parse_args()
  run = run_case if args.what == "jax" else run_torch_reference
  record = run(Case(**json.loads(args.case)), warmup_steps=args.warmup_steps, timed_steps=args.timed_steps)
  with open(args.out, "w") as f:
    json.dump(record, f)


if __name__ == "__main__":
  _child_main()
