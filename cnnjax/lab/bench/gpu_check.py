"""The GPU check: what one GPU machine without network says about cnnjax, in one JSON file and a log.

`scripts/gpu_check.sh` installs the carried wheels and runs `scripts/gpu_check.py`,
which calls `run`. Within `budget_seconds` it measures, in this order:

1. environment: the GPU (nvidia-smi), Python and package versions, JAX's devices;
2. throughput on one GPU (`THROUGHPUT_CASES`): ResNet-50 at batch 256,
   224x224x3, bfloat16, and ResNet-20 at batch 512, 32x32x3, bfloat16: the
   cnnjax train step (strategy none; median of the timed steps after warm-up,
   compile time, peak device memory), with XLA's deterministic GPU kernels (what
   a run uses by default) and with the fastest (`--nodeterministic`), next to
   its PyTorch twin on the same GPU
   (`cnnjax.lab.bench.torch_models`: bf16 autocast, channels_last, SGD with
   momentum), eager and under torch.compile (where it works; its first step,
   compilation included, and peak memory), with the ratios and the issue's goals;
3. (after the full runs, item 4) the GPU subset of the tests on the GPU (`GPU_TESTS`: the lowerings,
   BatchNorm modes, bfloat16, the reliability core of SIGKILL and exact
   resume), with float32 matrix products at full precision so that the
   tests' float32 tolerances hold (no TF32); the parallel-equivalence matrix
   needs 8 devices, so it runs on 8 simulated CPU devices of the same host
   (`SIMULATED_TESTS`) and says so;
4. full runs (`full_run_cases`), as `cnnjax.main` runs them (data, loop and
   step, deterministic kernels) beside their own bare step: ResNet-20 on
   CIFAR-shaped uint8 arrays (the recipe's batch 128 in float32, and batch 512
   in bfloat16) and ResNet-50 in bfloat16 on the pipeline benchmark's synthetic
   JPEG ImageNet through the host path, each with `run / step` and a PyTorch
   `DataLoader` peer on the same data (`cnnjax.lab.bench.torch_loaders`);
5. the GPU decoder (`gpu_decode`, `data.decoder`): ResNet-50 in bfloat16 at
   batch 256 on the same synthetic JPEG ImageNet as `cnnjax.main` runs it, with
   the host decoder and with the GPU decoder (nvImageCodec) side by side, each
   against the bare step (measured once, in the host row: it does not depend on
   the decoder), with the host CPU ms per image of each run's feed
   (this process and its data workers, `cnnjax.lab.bench.pipeline.measure`) and
   the GPU decoder's pixels against the host decoder's on the same batch; the
   GPU row is skipped, saying why, without nvImageCodec or an NVIDIA GPU;
6. `bn_sync=global` against `local`: one GPU has no peers, so the two are the
   same computation there and nothing is measured; beside it the
   simulated-device measure (`scripts/bench_parallel.py`, strategy jit on 8
   CPU devices).

Every measurement runs in its own child process (its memory its own, the GPU
free again for the next one), with a timeout from what is left of the budget;
a section that does not fit is recorded as skipped with the reason, so the
JSON always has every field. The JSON is rewritten after each section, so an
interrupted check leaves what it had measured.

`dry_run` runs the same sections and writes the same fields at tiny sizes
(`DRY_RUN`) on whatever backend the host has, with a tiny test selection and
without torch.compile (its CPU compile alone takes minutes): what
`tests/test_gpu_check.py` runs on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from typing import Any

# The harness imports JAX and cnnjax only inside its functions: the parent process never starts JAX.
from cnnjax.lab.bench import harness

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# Under 8 minutes with the wheels' installation (scripts/gpu_check.sh): the device lease's per-command
# limit is 10.
DEFAULT_BUDGET_SECONDS = 540
# A section is started only with at least this much of the budget left (a child's start and JAX import).
MIN_SECTION_SECONDS = 20
# The goals on one H100.
GOAL_RESNET50_IMAGES_PER_SECOND = 3000.0
# A whole run's share of its bare step's speed that the full-run section holds ResNet-20 to.
GOAL_RUN_OVER_STEP = 0.9
GOAL_RATIO_VS_TORCH = 1.0
# The GPU decoder's host CPU per image at most 1 / this of the host decoder's (issue 23).
GOAL_DECODE_CPU_FACTOR = 5.0
# Packages whose versions the environment section records (distribution names).
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "flax", "optax",
            "orbax-checkpoint", "numpy", "ml-dtypes", "torch", "triton", "grain", "tensorflow-datasets",
            "array-record", "ml-collections", "protobuf", "pytest", "pytest-xdist")
# On the GPU: one device is enough for each of these (node ids or files under tests/).
GPU_TESTS = ("tests/test_lowering.py", "tests/test_norm.py", "tests/test_precision.py",
             "tests/test_reliability.py::test_sigkill_anywhere_then_resume_is_bit_identical",
             "tests/test_reliability.py::test_unreadable_latest_checkpoint_is_reported_skipped_and_kept",
             "tests/test_gpu_decode.py::test_nvimgcodec_on_the_gpu_decodes_as_its_cpu_backend")
# The GPU subset's -k filter: the SIGKILL test's pmap case needs several devices.
GPU_TESTS_FILTER = "not pmap"
# Eight devices: on one GPU host they can only be simulated CPU devices.
SIMULATED_TESTS = ("tests/test_parallel.py",)
SIMULATED_DEVICES = 8
TEST_WORKERS = 4  # pytest-xdist workers sharing the GPU (each allocates on demand)


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The sizes one check runs at: the real ones, or the dry run's tiny ones."""

  resnet50_batch: int = 256
  resnet50_image_size: int = 224
  resnet20_batch: int = 512
  resnet20_image_size: int = 32
  dtype: str = "bfloat16"
  warmup_steps: int = 3
  timed_steps: int = 20
  torch_compile: bool = True
  gpu_tests: tuple[str, ...] = GPU_TESTS
  gpu_tests_filter: str = GPU_TESTS_FILTER
  simulated_tests: tuple[str, ...] = SIMULATED_TESTS
  bn_model: str = "resnet20"
  bn_batch: int = 128
  bn_image_size: int = 32
  bn_devices: int = SIMULATED_DEVICES
  bn_warmup_steps: int = 3
  bn_timed_steps: int = 10
  test_workers: int = TEST_WORKERS
  # The full-run section: whole runs as `cnnjax.main` runs them, beside their bare steps and a PyTorch
  # DataLoader peer on the same data.
  full_runs: tuple[str, ...] = ("resnet20_float32", "resnet20_bfloat16", "resnet50_jpeg")
  run_resnet20_batch: int = 128  # the CIFAR recipe's own batch (the bfloat16 row uses resnet20_batch)
  run_resnet20_steps: int = 300
  run_cifar_examples: int = 8192
  run_imagenet_model: str = "resnet50"
  run_resnet50_steps: int = 30
  run_jpeg_examples: int = 1024
  loader_warmup_steps: int = 5
  loader_workers: int = 8
  # The gpu_decode section: batches of each run's feed timed for the host CPU per image (after warm-up; the
  # batches prefetched before the clock starts, at most data.prefetch_batches, are not counted).
  decode_feed_batches: int = 40


FULL = Sizes()
DRY_RUN = Sizes(resnet50_batch=2, resnet50_image_size=32, resnet20_batch=4, warmup_steps=1, timed_steps=2,
                torch_compile=False,
                gpu_tests=("tests/test_lowering.py::test_auto_takes_the_cpu_rewrites_on_cpu_only",),
                gpu_tests_filter="",
                simulated_tests=("tests/test_parallel.py::test_each_device_and_step_draws_its_own_reproducible_key",),
                bn_batch=8, bn_image_size=8, bn_devices=2, bn_warmup_steps=0, bn_timed_steps=1,
                test_workers=0,  # one test each: pytest-xdist's workers would cost more than they save
                # One CIFAR-shaped row and the JPEG row, with a smaller ResNet: the plumbing, not the speed.
                full_runs=("resnet20_float32", "resnet50_jpeg"), run_resnet20_batch=4, run_resnet20_steps=2,
                run_cifar_examples=16, run_imagenet_model="resnet18", run_resnet50_steps=2, run_jpeg_examples=8,
                loader_warmup_steps=1, loader_workers=0, decode_feed_batches=2)

# (section name, cap in seconds) in the order they run; the budget cuts from the end.
SECTION_SECONDS = {"environment": 60, "jax_resnet50": 180, "jax_fastest_resnet50": 150, "torch_eager_resnet50": 90,
                   "jax_resnet20": 120, "jax_fastest_resnet20": 90, "torch_eager_resnet20": 60, "gpu_tests": 180,
                   "torch_compiled_resnet50": 240,
                   "torch_compiled_resnet20": 150, "bn_sync_simulated": 120, "simulated_tests": 240,
                   "full_run_resnet20_float32": 90, "full_run_resnet20_bfloat16": 90, "full_run_resnet50_jpeg": 150,
                   "torch_loader_resnet20_float32": 60, "torch_loader_resnet20_bfloat16": 60,
                   "torch_loader_resnet50_jpeg": 90, "gpu_decode_host": 200, "gpu_decode_gpu": 180}
# The parts a run can be limited to (--sections), in the order they run; the environment always comes first.
SECTIONS = ("throughput", "full_run", "gpu_decode", "gpu_tests", "torch_compiled", "bn_sync", "simulated_tests")
# The decoders the gpu_decode section sets side by side (`data.decoder`), and the batches of each run's feed
# not timed (worker start-up, the GPU decoder's first resize compiles).
DECODERS = ("host", "gpu")
DECODE_WARMUP_BATCHES = 2
NO_PEERS = ("one GPU has no peers: bn_sync=global and local normalize over the same examples with no collective, "
            "the same computation, so there is no cost to measure on this machine; the simulated-device measure "
            "is beside it")


class Check:
  """One run of the check: its budget, its log and the JSON it keeps rewriting."""

  def __init__(self, json_path: str, log_path: str, budget_seconds: float, dry_run: bool):
    self.json_path, self.log_path, self.dry_run = json_path, log_path, dry_run
    # Stand-in data the sections share (the synthetic JPEG ImageNet is written once); removed by `run`.
    self.data_dir = tempfile.mkdtemp(prefix="cnnjax-gpu-check-data-")
    self.start = time.monotonic()
    self.deadline = self.start + budget_seconds
    self.payload: dict[str, Any] = {"check": {
        "dry_run": dry_run, "budget_seconds": budget_seconds, "log": log_path,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "sizes": dataclasses.asdict(DRY_RUN if dry_run else FULL)}}
    with open(log_path, "w") as f:
      f.write(f"cnnjax GPU check, dry_run={dry_run}, budget {budget_seconds:.0f} s\n")

  def say(self, line: str) -> None:
    print(line, flush=True)
    with open(self.log_path, "a") as f:
      f.write(line + "\n")

  def log_output(self, title: str, text: str) -> None:
    with open(self.log_path, "a") as f:
      f.write(f"----- {title} -----\n{text.rstrip()}\n----- end of {title} -----\n")

  def timeout_for(self, section: str) -> float | None:
    """Seconds the section may take, or None when too little of the budget is left."""
    left = self.deadline - time.monotonic()
    if left < MIN_SECTION_SECONDS:
      return None
    return min(SECTION_SECONDS[section], left)

  def write(self) -> None:
    self.payload["check"]["wall_seconds"] = time.monotonic() - self.start
    with open(self.json_path + ".tmp", "w") as f:
      json.dump(self.payload, f, indent=2)
    os.replace(self.json_path + ".tmp", self.json_path)

  def run(self, title: str, command: list[str], timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Runs a child process in its own process group; its output goes to the log."""
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
      output, _ = process.communicate(timeout=timeout)
      timed_out = False
    except subprocess.TimeoutExpired:
      os.killpg(process.pid, signal.SIGKILL)  # the child and whatever it started (pytest workers)
      output, _ = process.communicate()
      timed_out = True
    self.log_output(title, output)
    return {"returncode": process.returncode, "timed_out": timed_out, "seconds": time.monotonic() - start,
            "output": output}


def _child_env(**extra: str) -> dict[str, str]:
  env = {**os.environ, **extra}
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _last_line(output: str) -> str:
  lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
  errors = [line for line in lines if "Error" in line or "error:" in line]
  return (errors or lines or ["no output"])[-1][:500]


def _child_record(check: Check, title: str, section: str, spec: dict[str, Any]) -> dict[str, Any]:
  """Runs `spec` in a child (`python -m cnnjax.lab.bench.gpu_check --child=...`) and returns its record."""
  timeout = check.timeout_for(section)
  if timeout is None:
    return {"status": "skipped: the budget ran out"}
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "record.json")
    env = _child_env(**(harness.ALLOCATOR_ENV if spec["what"] == "jax" else {}))
    if "deterministic" in spec:  # as a run sets it (cnnjax.parallel.host_devices), or the fastest kernels
      from cnnjax.parallel import host_devices  # pylint: disable=import-outside-toplevel
      env["XLA_FLAGS"] = " ".join(
          [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(host_devices.DETERMINISTIC_GPU_FLAG)] +
          [f"{host_devices.DETERMINISTIC_GPU_FLAG}={str(spec['deterministic']).lower()}"])
    result = check.run(title, [sys.executable, "-m", "cnnjax.lab.bench.gpu_check", f"--child={json.dumps(spec)}",
                               f"--out={out}"], timeout, env)
    if result["timed_out"]:
      return {"status": f"timed out after {timeout:.0f} s"}
    if result["returncode"] != 0 or not os.path.exists(out):
      return {"status": "failed", "error": _last_line(result["output"])}
    with open(out) as f:
      return {"status": "ok", **json.load(f)}


def environment_record() -> dict[str, Any]:
  """In a child: the machine, the packages, JAX's view of the devices."""
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  record: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "packages": versions}
  if shutil.which("nvidia-smi"):
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False)
    record["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
  else:
    record["nvidia_smi"] = None
  import jax  # pylint: disable=import-outside-toplevel
  record["jax_backend"] = jax.default_backend()
  record["jax_devices"] = [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()]
  for module in ("grain", "tensorflow_datasets", "ml_collections", "array_record"):
    try:
      __import__(module)
      record.setdefault("imports", {})[module] = "ok"
    except Exception as e:  # pylint: disable=broad-except  (recorded, the check goes on)
      record.setdefault("imports", {})[module] = f"{type(e).__name__}: {e}"[:300]
  return record


def throughput_cases(sizes: Sizes) -> list[dict[str, Any]]:
  """The two models of the throughput section at `sizes`."""
  return [dict(model="resnet50", batch=sizes.resnet50_batch, image_size=sizes.resnet50_image_size, channels=3,
               num_classes=1000, input_kind="imagenet"),
          dict(model="resnet20", batch=sizes.resnet20_batch, image_size=sizes.resnet20_image_size, channels=3,
               num_classes=10, input_kind="cifar")]


def jax_record(spec: dict[str, Any]) -> dict[str, Any]:
  """In a child: the cnnjax train step of a case on one device (`cnnjax.lab.bench.harness.run_case`)."""
  case = harness.Case(model=spec["model"], batch=spec["batch"], image_size=spec["image_size"],
                      channels=spec["channels"], num_classes=spec["num_classes"], strategy="none",
                      dtype=spec["dtype"], input_kind=spec["input_kind"])
  return harness.run_case(case, warmup_steps=spec["warmup_steps"], timed_steps=spec["timed_steps"])


def torch_record(spec: dict[str, Any]) -> dict[str, Any]:
  """In a child: the PyTorch twin's train step, bf16 autocast and channels_last, eager or compiled."""
  from cnnjax.lab.bench import torch_models  # pylint: disable=import-outside-toplevel
  return torch_models.time_train_step(
      spec["model"], batch=spec["batch"], input_shape=(spec["image_size"], spec["image_size"], spec["channels"]),
      num_classes=spec["num_classes"], channels_last=True, threads=os.cpu_count(),
      warmup_steps=spec["warmup_steps"], timed_steps=spec["timed_steps"], autocast_dtype=spec["dtype"],
      compiled=spec["compiled"])


def _ratio(jax_side: dict[str, Any], torch_side: dict[str, Any]) -> float | None:
  if jax_side.get("status") != "ok" or torch_side.get("status") != "ok":
    return None
  return jax_side["images_per_second"] / torch_side["images_per_second"]


def throughput_section(check: Check, sizes: Sizes, phase: str) -> None:
  """phase 'first': cnnjax (with deterministic GPU kernels, as a run has them by default, and with the
  fastest) and eager PyTorch; 'compiled': torch.compile, after the tests."""
  entries = check.payload.setdefault("throughput", [])
  for case in throughput_cases(sizes):
    if phase == "first":
      entry = {**case, "dtype": sizes.dtype, "strategy": "none"}
      entries.append(entry)
      spec = {**case, "dtype": sizes.dtype, "warmup_steps": sizes.warmup_steps, "timed_steps": sizes.timed_steps}
      entry["jax"] = _child_record(check, f"jax {case['model']}", f"jax_{case['model']}",
                                   {"what": "jax", "deterministic": True, **spec})
      check.say(_describe("cnnjax (deterministic kernels, the default)", case, entry["jax"]))
      check.write()
      entry["jax_fastest"] = _child_record(check, f"jax fastest {case['model']}", f"jax_fastest_{case['model']}",
                                           {"what": "jax", "deterministic": False, **spec})
      check.say(_describe("cnnjax --nodeterministic", case, entry["jax_fastest"]))
      entry["deterministic_over_fastest_step_time"] = (
          None if "median_step_seconds" not in entry["jax"] or "median_step_seconds" not in entry["jax_fastest"]
          else entry["jax"]["median_step_seconds"] / entry["jax_fastest"]["median_step_seconds"])
      check.write()
      entry["torch_eager"] = _child_record(check, f"torch eager {case['model']}", f"torch_eager_{case['model']}",
                                           {"what": "torch", "compiled": False, **spec})
      check.say(_describe("torch eager bf16 channels_last", case, entry["torch_eager"]))
      entry["ratio_vs_torch_eager"] = _ratio(entry["jax"], entry["torch_eager"])
      entry["fastest_ratio_vs_torch_eager"] = _ratio(entry["jax_fastest"], entry["torch_eager"])
      entry["torch_compiled"] = {"status": "not run yet"}
      entry["ratio_vs_torch_compiled"] = None
    else:
      entry = next(e for e in entries if e["model"] == case["model"])
      spec = {**case, "dtype": sizes.dtype, "warmup_steps": sizes.warmup_steps, "timed_steps": sizes.timed_steps}
      if sizes.torch_compile:
        entry["torch_compiled"] = _child_record(check, f"torch compiled {case['model']}",
                                                f"torch_compiled_{case['model']}",
                                                {"what": "torch", "compiled": True, **spec})
      else:
        entry["torch_compiled"] = {"status": "skipped: no torch.compile in a dry run (its CPU compile takes "
                                             "minutes)"}
      entry["ratio_vs_torch_compiled"] = _ratio(entry["jax"], entry["torch_compiled"])
      check.say(_describe("torch compiled bf16 channels_last", case, entry["torch_compiled"]))
    check.write()


def full_run_cases(sizes: Sizes) -> list[dict[str, Any]]:
  """The rows of the full-run section at `sizes`: ResNet-20 on CIFAR-shaped uint8 arrays (the recipe's batch
  in float32, and the throughput section's batch in bfloat16), ResNet-50 on the synthetic JPEG ImageNet."""
  resnet20 = dict(model="resnet20", experiment="resnet20_cifar10", data="cifar_shaped",
                  steps=sizes.run_resnet20_steps, examples=sizes.run_cifar_examples, num_classes=10,
                  image_size=sizes.resnet20_image_size)
  rows = {"resnet20_float32": dict(resnet20, batch=sizes.run_resnet20_batch, dtype="float32"),
          "resnet20_bfloat16": dict(resnet20, batch=sizes.resnet20_batch, dtype="bfloat16"),
          "resnet50_jpeg": dict(model=sizes.run_imagenet_model, experiment="resnet50_imagenet", data="imagenet_jpeg",
                                steps=sizes.run_resnet50_steps, examples=sizes.run_jpeg_examples, num_classes=1000,
                                image_size=sizes.resnet50_image_size,
                                batch=sizes.resnet50_batch, dtype=sizes.dtype)}
  return [{"name": name, **rows[name]} for name in sizes.full_runs]


def full_run_record(spec: dict[str, Any]) -> dict[str, Any]:
  """In a child: the run and its bare step (`cnnjax.lab.bench.run_vs_step.measure_round`)."""
  from cnnjax.lab.bench import run_vs_step  # pylint: disable=import-outside-toplevel
  case = spec["case"]
  overrides = {"model.name": case["model"], "batch_size": case["batch"], "model.dtype": case["dtype"],
               **spec.get("overrides", {})}
  if case["data"] == "imagenet_jpeg":
    overrides["data.image_size"] = case["image_size"]
  measured = run_vs_step.measure_round(
      run_vs_step.Case(case["name"], case["experiment"], overrides, case["steps"], current_only=True,
                       data=case["data"], data_examples=case["examples"]), REPO_ROOT, spec["data_dir"])
  return {"step_images_per_second": measured["step"], "run_images_per_second": measured["run"],
          "run_over_step": measured["run"] / measured["step"]}


def torch_loader_record(spec: dict[str, Any]) -> dict[str, Any]:
  """In a child: the PyTorch twin through a DataLoader on the same data as the cnnjax run."""
  from cnnjax.lab.bench import run_vs_step, torch_loaders  # pylint: disable=import-outside-toplevel
  case = spec["case"]
  if case["data"] == "cifar_shaped":
    dataset = torch_loaders.CifarArrays(run_vs_step.write_cifar_shaped(spec["data_dir"], case["examples"])
                                        ["data.train_path"])
    mean, std = torch_loaders.CIFAR_MEAN, torch_loaders.CIFAR_STD
  else:
    from cnnjax.lab.bench import torch_models  # pylint: disable=import-outside-toplevel
    overrides = run_vs_step.stand_in_data(run_vs_step.Case(case["name"], case["experiment"], {}, case["steps"],
                                                           data=case["data"], data_examples=case["examples"]),
                                          spec["data_dir"])
    dataset = torch_loaders.EncodedImages("imagenet2012", overrides["data.tfds_data_dir"], case["image_size"])
    mean, std = torch_models.IMAGENET_MEAN, torch_models.IMAGENET_STD
  return torch_loaders.time_loader_training(
      case["model"], dataset, num_classes=case["num_classes"], batch=case["batch"], steps=case["steps"],
      warmup_steps=spec["warmup_steps"], workers=spec["workers"], mean=mean, std=std,
      autocast_dtype=None if case["dtype"] == "float32" else case["dtype"])


def full_run_section(check: Check, sizes: Sizes) -> None:
  """Whole runs (data, loop, step) against their bare steps and a PyTorch DataLoader peer, on one device."""
  entries = check.payload.setdefault("full_run", [])
  data_dir = check.data_dir
  for case in full_run_cases(sizes):
    entry = {key: case[key] for key in ("name", "model", "batch", "dtype", "data", "steps")}
    entries.append(entry)
    # The JPEG row measures the host path: where the GPU decoder is installed, auto would choose it.
    decoder = {"data.decoder": "host"} if case["data"] == "imagenet_jpeg" else {}
    entry["run"] = _child_record(check, f"full run {case['name']}", f"full_run_{case['name']}",
                                 {"what": "full_run", "deterministic": True, "case": case, "data_dir": data_dir,
                                  "overrides": decoder})
    entry["run_over_step"] = entry["run"].get("run_over_step")
    check.write()
    entry["torch_loader"] = _child_record(
        check, f"torch loader {case['name']}", f"torch_loader_{case['name']}",
        {"what": "torch_loader", "case": case, "data_dir": data_dir, "warmup_steps": sizes.loader_warmup_steps,
         "workers": sizes.loader_workers})
    torch_rate = entry["torch_loader"].get("images_per_second")
    entry["run_over_torch_loader"] = (entry["run"]["run_images_per_second"] / torch_rate
                                      if entry["run"].get("status") == "ok" and torch_rate else None)
    run = entry["run"]
    check.say(f"full run {case['name']} b{case['batch']} {case['dtype']}: " + (
        f"run {run['run_images_per_second']:,.0f} img/s, bare step {run['step_images_per_second']:,.0f}, "
        f"run/step {run['run_over_step']:.2f}" if run.get("status") == "ok" else f"{run.get('status')} "
        f"{run.get('error', '')}") + "; PyTorch DataLoader " + (
        f"{torch_rate:,.0f} img/s" if torch_rate else f"{entry['torch_loader'].get('status')}"))
    check.write()


def gpu_decode_record(spec: dict[str, Any]) -> dict[str, Any]:
  """In a child: the JPEG run with one decoder (`spec['decoder']`) beside its bare step, its feed's host CPU
  per image, and for the GPU decoder its pixels against the host decoder's on the first batch."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from cnnjax import train  # pylint: disable=import-outside-toplevel
  from cnnjax.data import gpu_decode  # pylint: disable=import-outside-toplevel
  from cnnjax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from cnnjax.lab.bench import pipeline as pipeline_bench  # pylint: disable=import-outside-toplevel
  from cnnjax.lab.bench import run_vs_step  # pylint: disable=import-outside-toplevel
  decoder, case = spec["decoder"], spec["case"]
  device = jax.devices()[0]
  try:
    gpu_decode.choose(decoder, platform=device.platform, device_kind=device.device_kind, decodes=True)
  except ConfigError as e:
    return {"status": f"skipped: {e}"}

  def config(chosen: str, steps: int) -> Any:
    """The run's config with the `chosen` decoder and `steps` steps."""
    overrides = {"model.name": case["model"], "batch_size": case["batch"], "model.dtype": case["dtype"],
                 "data.image_size": case["image_size"], "data.decoder": chosen}
    return run_vs_step.case_config(
        run_vs_step.Case(case["name"], case["experiment"], overrides, steps, current_only=True, data=case["data"],
                         data_examples=case["examples"]), REPO_ROOT, spec["data_dir"])

  def build(chosen: str) -> Any:
    """The run's experiment with the `chosen` decoder, long enough to feed the timed batches."""
    return train.build(config(chosen, max(case["steps"], 1 + DECODE_WARMUP_BATCHES + spec["feed_batches"])))

  step_rate = spec.get("step_images_per_second")
  if step_rate:  # the bare step does not depend on the decoder: the host row's, measured once
    with tempfile.TemporaryDirectory() as scratch:
      run_rate = run_vs_step.run_images_per_second(config(decoder, case["steps"]), os.path.join(scratch, "run"))
    record = {"step_images_per_second": step_rate, "run_images_per_second": run_rate,
              "run_over_step": run_rate / step_rate, "bare_step": "the host decoder's row"}
  else:
    record = full_run_record({**spec, "overrides": {"data.decoder": decoder}})

  exp = build(decoder)
  record["decoder"] = list(exp.decoder)
  feed = pipeline_bench.measure(_Decoded(exp.train_batches()), case["batch"], warmup_batches=DECODE_WARMUP_BATCHES,
                                min_batches=spec["feed_batches"], min_seconds=0.0)
  record.update(host_cpu_ms_per_image=feed["cpu_seconds_per_image"] * 1e3,
                feed_images_per_second=feed["images_per_second"], feed_worker_processes=feed["worker_processes"])
  if decoder == gpu_decode.GPU:
    with build(gpu_decode.HOST).train_batches() as host_batches, exp.train_batches() as gpu_batches:
      host_pixels, gpu_pixels = (np.asarray(next(batches)["input"]).astype(np.float64)
                                 for batches in (host_batches, gpu_batches))
    difference = np.abs(gpu_pixels - host_pixels)
    record.update(pixels_vs_host_mean_abs=float(difference.mean()), pixels_vs_host_max_abs=float(difference.max()))
  return record


class _Decoded:
  """A feed whose batches are waited for (a GPU decode is asynchronous): what a step would wait for."""

  def __init__(self, batches: Any):
    self._batches = batches

  def __next__(self) -> Any:
    import jax  # pylint: disable=import-outside-toplevel
    return jax.block_until_ready(next(self._batches))

  def __enter__(self) -> _Decoded:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self._batches.close()


def gpu_decode_section(check: Check, sizes: Sizes) -> None:
  """ResNet-50 on the synthetic JPEG ImageNet with the host decoder and the GPU decoder, side by side."""
  case = full_run_cases(dataclasses.replace(sizes, full_runs=("resnet50_jpeg",)))[0]
  entries = check.payload.setdefault("gpu_decode", [])
  step_rate = None
  for decoder in DECODERS:
    entry = {"decoder": decoder, **{key: case[key] for key in ("model", "batch", "dtype", "data", "steps")}}
    entries.append(entry)
    entry["run"] = _child_record(check, f"gpu_decode {decoder}", f"gpu_decode_{decoder}",
                                 {"what": "gpu_decode", "deterministic": True, "case": case, "data_dir": check.data_dir,
                                  "decoder": decoder, "feed_batches": sizes.decode_feed_batches,
                                  "step_images_per_second": step_rate})
    step_rate = step_rate or entry["run"].get("step_images_per_second")
    run = entry["run"]
    entry["run_over_step"] = run.get("run_over_step")
    entry["host_cpu_ms_per_image"] = run.get("host_cpu_ms_per_image")
    check.say(f"gpu_decode {decoder} decoder, {case['model']} b{case['batch']} {case['dtype']}: " + (
        f"run {run['run_images_per_second']:,.0f} img/s, bare step {run['step_images_per_second']:,.0f}, "
        f"run/step {run['run_over_step']:.2f}, host CPU {run['host_cpu_ms_per_image']:.2f} ms per image"
        + (f", pixels vs host decoder mean |d| {run['pixels_vs_host_mean_abs']:.2f}" if "pixels_vs_host_mean_abs"
           in run else "") if run.get("status") == "ok" else f"{run.get('status')} {run.get('error', '')}"))
    check.write()


def _describe(who: str, case: dict[str, Any], record: dict[str, Any]) -> str:
  name = f"{case['model']} b{case['batch']} {case['image_size']}px {who}"
  if record.get("status") != "ok":
    return f"{name}: {record.get('status')} {record.get('error', '')}".rstrip()
  # cnnjax compiles ahead of the steps; PyTorch's first step holds torch.compile's compilation.
  start = (f"compile {record['compile_seconds']:.1f} s" if "compile_seconds" in record
           else f"first step {record['first_step_seconds'] or 0:.1f} s")
  memory = record.get("peak_device_memory_mb")
  return (f"{name}: {record['images_per_second']:.1f} img/s, {record['median_step_seconds'] * 1e3:.1f} ms/step, "
          f"{start}, peak device memory {'n/a' if memory is None else f'{memory:.0f} MiB'}")


def _junit_counts(path: str) -> dict[str, Any]:
  """passed / failed / errors / skipped and the failing test ids, from pytest's JUnit XML."""
  root = ElementTree.parse(path).getroot()
  counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
  failures = []
  for case in root.iter("testcase"):
    test_id = f"{case.get('classname')}::{case.get('name')}"
    outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
    if outcome is None:
      counts["passed"] += 1
    elif outcome.tag == "skipped":
      counts["skipped"] += 1
    else:
      counts["failed" if outcome.tag == "failure" else "errors"] += 1
      failures.append({"test": test_id, "message": (outcome.get("message") or "").splitlines()[0][:300]
                       if outcome.get("message") else ""})
  return {**counts, "failures": failures}


def tests_section(check: Check, sizes: Sizes, which: str) -> None:
  """Runs a test selection: 'gpu' on the GPU, 'simulated' on simulated CPU devices."""
  tests = check.payload.setdefault("tests", {})
  section = "gpu_tests" if which == "gpu" else "simulated_tests"
  selection = sizes.gpu_tests if which == "gpu" else sizes.simulated_tests
  if which == "gpu":
    # On the GPU (outside a dry run), with the CPU backend beside it for the tests that place work on the CPU
    # explicitly; float32 matrix products at full precision, as on CPU.
    env = _child_env(XLA_PYTHON_CLIENT_PREALLOCATE="false", JAX_DEFAULT_MATMUL_PRECISION="highest",
                     **({} if check.dry_run else {"JAX_PLATFORMS": "cuda,cpu"}))
    where = "the host's backend (dry run)" if check.dry_run else "the GPU (JAX_PLATFORMS=cuda,cpu)"
  else:
    env = _child_env(JAX_PLATFORMS="cpu",
                     XLA_FLAGS=f"--xla_force_host_platform_device_count={SIMULATED_DEVICES}")
    where = f"{SIMULATED_DEVICES} simulated CPU devices (one GPU cannot hold the 8-device matrix)"
  record: dict[str, Any] = {"selection": list(selection), "filter": sizes.gpu_tests_filter if which == "gpu" else "",
                            "where": where}
  timeout = check.timeout_for(section)
  if timeout is None:
    tests[which] = {**record, "status": "skipped: the budget ran out"}
    check.write()
    return
  with tempfile.TemporaryDirectory() as tmp:
    junit = os.path.join(tmp, "junit.xml")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               "-n", str(sizes.test_workers), *selection]
    if record["filter"]:
      command += ["-k", record["filter"]]
    result = check.run(f"tests ({which})", command, timeout, env)
    record.update(seconds=result["seconds"], returncode=result["returncode"])
    if result["timed_out"]:
      record["status"] = f"timed out after {timeout:.0f} s"
    elif os.path.exists(junit):
      record.update(_junit_counts(junit))
      record["status"] = "ok" if result["returncode"] == 0 else "failures"
    else:
      record.update(status="failed", error=_last_line(result["output"]))
  tests[which] = record
  check.say(f"tests on {where}: {record['status']}" +
            (f", {record['passed']} passed, {record['failed']} failed, {record['errors']} errors, "
             f"{record['skipped']} skipped" if "passed" in record else ""))
  check.write()


def bn_sync_section(check: Check, sizes: Sizes) -> None:
  """`bn_sync` global against local: nothing to measure on one GPU; the simulated-device measure beside it."""
  record: dict[str, Any] = {"gpu": {"devices": 1, "measured": False, "note": NO_PEERS}}
  timeout = check.timeout_for("bn_sync_simulated")
  simulated: dict[str, Any] = {"devices": sizes.bn_devices, "strategy": "jit", "model": sizes.bn_model,
                               "batch": sizes.bn_batch, "image_size": sizes.bn_image_size,
                               "where": f"{sizes.bn_devices} simulated CPU devices on this host's CPU"}
  if timeout is None:
    simulated["status"] = "skipped: the budget ran out"
  else:
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "bn.json")
      command = [sys.executable, os.path.join(REPO_ROOT, "scripts", "bench_parallel.py"), f"--json={out}",
                 "--strategies=jit", f"--simulate_devices={sizes.bn_devices}", f"--model={sizes.bn_model}",
                 f"--batch={sizes.bn_batch}", f"--image_size={sizes.bn_image_size}",
                 f"--warmup_steps={sizes.bn_warmup_steps}", f"--timed_steps={sizes.bn_timed_steps}"]
      # bench_parallel.py adds its own device count to XLA_FLAGS: drop any count already there.
      flags = " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split()
                       if not flag.startswith("--xla_force_host_platform_device_count"))
      result = check.run("bn_sync on simulated devices", command, timeout,
                         _child_env(JAX_PLATFORMS="cpu", XLA_FLAGS=flags))
      if result["timed_out"]:
        simulated["status"] = f"timed out after {timeout:.0f} s"
      elif result["returncode"] != 0 or not os.path.exists(out):
        simulated.update(status="failed", error=_last_line(result["output"]))
      else:
        with open(out) as f:
          measured = json.load(f)
        times = {c["bn_sync"]: c["median_step_seconds"] for c in measured["cases"]}
        simulated.update(status="ok", global_step_seconds=times["global"], local_step_seconds=times["local"],
                         global_over_local=measured["global_over_local_step_time"]["jit"])
  record["simulated_devices"] = simulated
  check.payload["bn_sync"] = record
  check.say(f"bn_sync: {NO_PEERS.split(':')[0]}; simulated: " + (
      f"global / local step time {simulated['global_over_local']:.3f} on {sizes.bn_devices} CPU devices"
      if simulated.get("status") == "ok" else simulated["status"]))
  check.write()


def goals(payload: dict[str, Any]) -> dict[str, Any]:
  """The issue's goals on one H100, read off the throughput section (None where not measured)."""
  by_model = {e["model"]: e for e in payload.get("throughput", [])}

  def at_least(value: float | None, goal: float) -> bool | None:
    return None if value is None else value >= goal

  r50_rate = by_model.get("resnet50", {}).get("jax", {}).get("images_per_second")
  runs = {entry["name"]: entry for entry in payload.get("full_run", [])}
  if payload["check"]["dry_run"]:  # tiny sizes on any backend: nothing to hold against the goals
    return {"resnet50_images_per_second": r50_rate, "resnet50_at_least_3000_images_per_second": None,
            "resnet50_at_least_torch": None, "resnet20_at_least_torch": None, "ratio_vs_faster_torch": {},
            "resnet20_runs_at_least_0_9_of_step": None, "resnet50_jpeg_run_at_least_3000_images_per_second": None,
            "gpu_decode_run_over_step": None, "gpu_decode_run_at_least_0_9_of_step": None,
            "gpu_decode_host_cpu_per_image_over_host_decoder": None, "gpu_decode_host_cpu_at_least_5x_lower": None,
            "note": "a dry run measures nothing comparable with the goals (one H100)"}
  resnet20_runs = [runs[name].get("run_over_step") for name in ("resnet20_float32", "resnet20_bfloat16")
                   if name in runs]
  jpeg_rate = runs.get("resnet50_jpeg", {}).get("run", {}).get("run_images_per_second")
  worst_ratio = {model: min((r for r in (e.get("ratio_vs_torch_eager"), e.get("ratio_vs_torch_compiled"))
                             if r is not None), default=None) for model, e in by_model.items()}
  return {"resnet50_images_per_second": r50_rate,
          "resnet50_at_least_3000_images_per_second": at_least(r50_rate, GOAL_RESNET50_IMAGES_PER_SECOND),
          # Against the faster PyTorch variant (eager or compiled): the smaller ratio.
          "resnet50_at_least_torch": at_least(worst_ratio.get("resnet50"), GOAL_RATIO_VS_TORCH),
          "resnet20_at_least_torch": at_least(worst_ratio.get("resnet20"), GOAL_RATIO_VS_TORCH),
          "ratio_vs_faster_torch": worst_ratio,
          "resnet20_runs_at_least_0_9_of_step": (None if not resnet20_runs or None in resnet20_runs else
                                                 min(resnet20_runs) >= GOAL_RUN_OVER_STEP),
          "resnet50_jpeg_run_at_least_3000_images_per_second": at_least(jpeg_rate, GOAL_RESNET50_IMAGES_PER_SECOND),
          **gpu_decode_goals(payload),
          "note": "the goals are for one H100: read them against environment.nvidia_smi"}


def gpu_decode_goals(payload: dict[str, Any]) -> dict[str, Any]:
  """The GPU decoder's goals (issue 23): its run at >= GOAL_RUN_OVER_STEP of the bare step, and host CPU per
  image GOAL_DECODE_CPU_FACTOR times lower than the host decoder's."""
  rows = {entry["decoder"]: entry for entry in payload.get("gpu_decode", [])}
  over_step = rows.get("gpu", {}).get("run_over_step")
  host_cpu, gpu_cpu = (rows.get(name, {}).get("host_cpu_ms_per_image") for name in DECODERS)
  cpu_ratio = gpu_cpu / host_cpu if host_cpu and gpu_cpu else None
  return {"gpu_decode_run_over_step": over_step,
          "gpu_decode_run_at_least_0_9_of_step": None if over_step is None else over_step >= GOAL_RUN_OVER_STEP,
          "gpu_decode_host_cpu_per_image_over_host_decoder": cpu_ratio,
          "gpu_decode_host_cpu_at_least_5x_lower": None if cpu_ratio is None else
          cpu_ratio <= 1.0 / GOAL_DECODE_CPU_FACTOR}


def markdown_table(payload: dict[str, Any]) -> str:
  """The table docs/performance.md quotes from a check's throughput section."""
  rows = ["| model | cnnjax img/s (deterministic, the default) | cnnjax img/s (`--nodeterministic`) | "
          "PyTorch eager img/s | x PyTorch (default / fastest) | compile s (default / fastest) | "
          "peak MiB (default / fastest / PyTorch) |", "|---|---|---|---|---|---|---|"]

  def number(record: dict[str, Any], field: str, digits: int = 0) -> str:
    value = record.get(field)
    return "n/a" if value is None else f"{value:,.{digits}f}"

  for entry in payload["throughput"]:
    default, fastest, torch = entry["jax"], entry["jax_fastest"], entry["torch_eager"]
    ratios = " / ".join("n/a" if r is None else f"{r:.2f}"
                        for r in (entry["ratio_vs_torch_eager"], entry["fastest_ratio_vs_torch_eager"]))
    rows.append(f"| {entry['model']} b{entry['batch']} {entry['image_size']}px {entry['dtype']} | "
                f"{number(default, 'images_per_second')} | {number(fastest, 'images_per_second')} | "
                f"{number(torch, 'images_per_second')} | {ratios} | "
                f"{number(default, 'compile_seconds', 1)} / {number(fastest, 'compile_seconds', 1)} | "
                f"{number(default, 'peak_device_memory_mb')} / {number(fastest, 'peak_device_memory_mb')} / "
                f"{number(torch, 'peak_device_memory_mb')} |")
  return "\n".join(rows)


def check_sections(sections: tuple[str, ...]) -> None:
  """Raises ValueError naming the sections that `SECTIONS` lacks."""
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    raise ValueError(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")


def run(json_path: str, log_path: str, *, dry_run: bool = False, budget_seconds: float = DEFAULT_BUDGET_SECONDS,
        sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
  """Runs the check (see the module docstring), or only `sections` of it, and returns what it wrote to
  `json_path`."""
  check_sections(sections)
  sizes = DRY_RUN if dry_run else FULL
  check = Check(json_path, log_path, budget_seconds, dry_run)
  check.payload["check"]["sections"] = list(sections)
  check.payload["environment"] = _child_record(check, "environment", "environment", {"what": "environment"})
  environment = check.payload["environment"]
  check.say(f"environment: {environment.get('nvidia_smi') or 'no nvidia-smi'}; JAX {environment.get('jax_backend')} "
            f"{environment.get('jax_devices')}; {environment.get('status')}")
  check.write()
  if "throughput" in sections:
    throughput_section(check, sizes, "first")
  if "full_run" in sections:
    full_run_section(check, sizes)
  if "gpu_decode" in sections:
    gpu_decode_section(check, sizes)
  if "gpu_tests" in sections:
    tests_section(check, sizes, "gpu")
  if "throughput" in sections and "torch_compiled" in sections:
    throughput_section(check, sizes, "compiled")
  if "bn_sync" in sections:
    bn_sync_section(check, sizes)
  if "simulated_tests" in sections:
    tests_section(check, sizes, "simulated")
  shutil.rmtree(check.data_dir, ignore_errors=True)
  check.payload["goals"] = goals(check.payload)
  check.write()
  check.say(f"wrote {json_path} and {log_path} in {check.payload['check']['wall_seconds']:.0f} s")
  return check.payload


CHILDREN = {"environment": lambda spec: environment_record(), "jax": jax_record, "torch": torch_record,
            "full_run": full_run_record, "torch_loader": torch_loader_record, "gpu_decode": gpu_decode_record}


def _child_main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--child", required=True, help="a JSON spec with 'what' in " + ", ".join(CHILDREN))
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  spec = json.loads(args.child)
  record = CHILDREN[spec["what"]](spec)
  with open(args.out, "w") as f:
    json.dump(record, f)


if __name__ == "__main__":
  _child_main()
