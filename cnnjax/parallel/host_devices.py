"""How a process's XLA starts: its virtual CPU devices and GPU determinism, decided before JAX starts.

XLA runs one program per device. On a CPU host a single device leaves cores
idle in parts of a step made of small convolutions, while the same global batch
split over several virtual CPU devices (XLA's
`--xla_force_host_platform_device_count`) keeps them busy: smaller
independent programs run side by side. Wide convolutions already keep every
core busy, and splitting them only adds overhead. So the entry points
(`cnnjax.main`, `cnnjax.sweep`) start a CPU host with the count measured best
for the model (`AUTOMATIC_CPU_DEVICES`, one for models not measured) when the
run leaves the devices to cnnjax (`parallel.strategy=auto`,
`parallel.num_devices=0`); `--simulate_devices=N` asks for N explicitly. With
`bn_sync=global` the numbers are the same on any device count (up to float
rounding), and `local` keeps its meaning (see `cnnjax.nn.bn_sync`). A
count already in `XLA_FLAGS` always wins, and accelerator hosts are not
affected (the flag only adds CPU devices beside the accelerators).

On a GPU, XLA's autotuner may choose other convolution algorithms in another
process, and some kernels add with atomics, so two runs of one config (or a run
and its resume) can differ in the last bits. cnnjax promises that a resumed run
is bit-identical to an uninterrupted one, so the entry points ask for XLA's
deterministic GPU kernels (`--xla_gpu_deterministic_ops=true`) unless told
`--nodeterministic`; what that costs is measured by the GPU check
(`scripts/gpu_check.sh`, docs/results/gpu_check_h100.json). CPUs are deterministic
either way. A value already in `XLA_FLAGS` wins here too.

Both must be set before JAX initializes its backends (importing JAX does
not yet), so the entry points call `configure` before anything asks for devices.
"""

from __future__ import annotations

import dataclasses
import os
import sys

XLA_FLAGS = "XLA_FLAGS"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
DETERMINISTIC_GPU_FLAG = "--xla_gpu_deterministic_ops"
AUTO = -1  # --simulate_devices default: cnnjax chooses
# Virtual CPU devices a CPU host gets when cnnjax chooses, by model: the best count measured on a 2-core
# host (docs/results/cpu_devices.json, written by scripts/bench_cpu_devices.py; ResNet-18 measured best
# on one device). Every other model keeps one device.
AUTOMATIC_CPU_DEVICES = {"resnet20": 8, "lenet5": 2}
# A sweep on a CPU host spreads its trials (vectorized members, partitioned groups) over this many virtual
# devices: the sweep timings in docs/sweeps.md (scripts/bench_sweep.py) were measured on 8, where a vectorized
# population ran well ahead of the same trials one after another.
SWEEP_CPU_DEVICES = 8


@dataclasses.dataclass(frozen=True)
class HostDevices:
  """What the process's XLA started with: the CPU device count, whether cnnjax chose it (not the user),
  and whether GPU kernels are the deterministic ones."""

  count: int = 1
  automatic: bool = False
  deterministic_gpu: bool = False

  def describe(self, platform: str = "cpu") -> str:
    """What a start-up line says of it on `platform` ("" where there is nothing to say)."""
    if platform == "gpu":
      return ("deterministic kernels (--nodeterministic for the fastest)" if self.deterministic_gpu else
              "fastest kernels: reruns and resumes may differ in the last bits (--deterministic makes them exact)")
    if self.count <= 1:
      return ""
    chosen = ("chosen by cnnjax; --simulate_devices=N chooses" if self.automatic else "as asked")
    return f"{self.count} virtual CPU devices ({chosen})"


def _flag_value(flag: str) -> str | None:
  """The value XLA_FLAGS already gives `flag`, if any (the last one, as XLA reads them)."""
  value = None
  for part in os.environ.get(XLA_FLAGS, "").split():
    if part.startswith(flag + "="):
      value = part.split("=", 1)[1]
  return value


def _add_flag(flag: str, value: str) -> None:
  if "jax" in sys.modules and _backends_started():
    raise ValueError(f"XLA's {flag} must be set before JAX starts; call configure() first")
  os.environ[XLA_FLAGS] = f"{os.environ.get(XLA_FLAGS, '')} {flag}={value}".strip()


def requested_count() -> int | None:
  """The CPU device count that XLA_FLAGS already asks for, if any."""
  value = _flag_value(DEVICE_COUNT_FLAG)
  return None if value is None else int(value)


def configure(simulate_devices: int = AUTO, *, leaves_devices_to_cnnjax: bool = True,
              model: str = "", automatic_count: int | None = None, deterministic_gpu: bool = True) -> HostDevices:
  """Sets the CPU device count and GPU determinism in XLA_FLAGS before JAX starts, and says what they are.

  `simulate_devices`: N > 0 asks for N devices; AUTO lets cnnjax choose
  `AUTOMATIC_CPU_DEVICES[model]` (or `automatic_count`, a sweep's) when
  `leaves_devices_to_cnnjax` (else one). `deterministic_gpu` asks for XLA's
  deterministic GPU kernels. A value already in XLA_FLAGS wins over both.
  Raises ValueError when JAX has started already (a flag could no longer take effect).
  """
  if simulate_devices == 0 or simulate_devices < AUTO:
    raise ValueError(f"--simulate_devices={simulate_devices} must be a positive device count "
                     f"(or {AUTO}: let cnnjax choose)")
  given_determinism = _flag_value(DETERMINISTIC_GPU_FLAG)
  if given_determinism is None:
    if deterministic_gpu:
      _add_flag(DETERMINISTIC_GPU_FLAG, "true")
  else:
    deterministic_gpu = given_determinism.lower() in ("true", "1")
  existing = requested_count()
  if existing is not None:
    return HostDevices(existing, automatic=False, deterministic_gpu=deterministic_gpu)
  if simulate_devices == AUTO:
    chosen = automatic_count if automatic_count is not None else AUTOMATIC_CPU_DEVICES.get(model, 1)
    count = chosen if leaves_devices_to_cnnjax else 1
    automatic = count > 1
  else:
    count, automatic = simulate_devices, False
  if count > 1:
    _add_flag(DEVICE_COUNT_FLAG, str(count))
  return HostDevices(count, automatic, deterministic_gpu)


def _backends_started() -> bool:
  """Whether JAX has initialized its backends (after which XLA_FLAGS is read no more)."""
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  return bool(getattr(xla_bridge, "_backends", None))
