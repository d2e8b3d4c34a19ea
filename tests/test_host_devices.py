"""Devices by default: `parallel.strategy=auto`, virtual CPU devices chosen before JAX starts, and the
start-up line that says what runs where."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cnnjax import parallel, train
from cnnjax.parallel import host_devices
from helpers import REPO_ROOT, experiment_config, run_cli, tiny


class FakeDevice:
  platform = "cpu"

  def __init__(self, device_id, process_index=0):
    self.id, self.process_index = device_id, process_index


@pytest.mark.parametrize("devices,batches,strategy,count", [
    (1, (32,), "none", 1),
    (8, (32, 12), "jit", 4),  # the train and the eval batch must both divide
    (8, (32,), "jit", 8),
    (8, (12,), "jit", 6),  # the most devices the batch divides evenly over
    (8, (11,), "none", 1),  # no device count up to 8 divides 11
])
def test_auto_is_none_on_one_device_else_jit_on_as_many_devices_as_the_batches_divide_over(devices, batches,
                                                                                          strategy, count):
  resolved = parallel.resolve("auto", 0, batches, [FakeDevice(i) for i in range(devices)])
  assert (resolved.strategy, len(resolved.devices), resolved.automatic) == (strategy, count, True)


def test_auto_across_processes_takes_the_same_number_from_each():
  devices = [FakeDevice(i, i // 4) for i in range(8)]  # two processes with four devices each
  resolved = parallel.resolve("auto", 0, (6,), devices)
  assert resolved.strategy == "jit" and [d.id for d in resolved.devices] == [0, 1, 2, 4, 5, 6]
  assert parallel.resolve("pmap", 0, (6,), devices).automatic is False


def started_with(env_flags: str, code: str) -> str:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if env_flags:
    env["XLA_FLAGS"] = env_flags
  return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=120, check=True).stdout.strip()


@pytest.mark.slow
def test_cnnjax_chooses_virtual_cpu_devices_only_when_the_run_leaves_them_to_it():
  code = ("from cnnjax.parallel import host_devices as h; import sys; "
          "host = h.configure({arg}, leaves_devices_to_cnnjax={leaves}, model='{model}'); import jax; "
          "print(host.count, host.automatic, jax.device_count())")
  chosen = host_devices.AUTOMATIC_CPU_DEVICES["resnet20"]
  assert started_with("", code.format(arg=-1, leaves=True, model="resnet20")) == f"{chosen} True {chosen}"
  assert started_with("", code.format(arg=-1, leaves=True, model="resnet18")) == "1 False 1"  # measured best
  assert started_with("", code.format(arg=-1, leaves=False, model="resnet20")) == "1 False 1"
  assert started_with("", code.format(arg=3, leaves=True, model="resnet20")) == "3 False 3"
  # A count the user put in XLA_FLAGS wins.
  assert started_with("--xla_force_host_platform_device_count=2",
                      code.format(arg=-1, leaves=True, model="resnet20")) == "2 False 2"


def test_gpu_determinism_is_asked_for_unless_declined_and_a_value_in_xla_flags_wins():
  code = ("from cnnjax.parallel import host_devices as h; import os; host = h.configure(1, deterministic_gpu={d}); "
          "print(host.deterministic_gpu, os.environ.get('XLA_FLAGS', ''))")
  assert started_with("", code.format(d=True)) == "True --xla_gpu_deterministic_ops=true"
  assert started_with("", code.format(d=False)) == "False"
  assert started_with("--xla_gpu_deterministic_ops=false", code.format(d=True)) == \
      "False --xla_gpu_deterministic_ops=false"
  assert started_with("--xla_gpu_deterministic_ops=true", code.format(d=False)) == \
      "True --xla_gpu_deterministic_ops=true"
  # The start-up line says which kernels a GPU run has; a CPU run says nothing of it.
  assert host_devices.HostDevices(deterministic_gpu=True).describe("gpu").startswith("deterministic kernels")
  assert "may differ in the last bits" in host_devices.HostDevices(deterministic_gpu=False).describe("gpu")
  assert host_devices.HostDevices(deterministic_gpu=True).describe("cpu") == ""


def test_a_device_count_set_after_jax_started_is_refused(monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel
  jax.devices()  # started with the session's flags: starting it without them would change later tests' devices
  monkeypatch.setenv("XLA_FLAGS", "")
  with pytest.raises(ValueError, match="before JAX starts"):
    host_devices.configure(4)
  with pytest.raises(ValueError, match="before JAX starts"):
    host_devices.configure(1, deterministic_gpu=True)
  with pytest.raises(ValueError, match="--simulate_devices=0 must be a positive device count"):
    host_devices.configure(0)


@pytest.mark.slow
def test_the_start_up_line_says_what_runs_where(tmp_path, tfds_data_dir):
  result = run_cli("cnnjax.main", "--config=experiments/lenet5_digits.py", f"--workdir={tmp_path / 'run'}",
                   "--config.num_train_steps=2", "--config.batch_size=32", "--config.progress_bar=false",
                   env={"XLA_FLAGS": ""}, timeout=180)
  assert result.returncode == 0, result.stderr[-3000:]
  line = next(line for line in result.stderr.splitlines() if " run: " in line)
  chosen = host_devices.AUTOMATIC_CPU_DEVICES["lenet5"]
  assert (f"run: cpu (cpu; {chosen} virtual CPU devices (chosen by cnnjax; --simulate_devices=N chooses)): "
          f"{chosen} of {chosen} devices, 1 process(es) | strategy jit (auto) | bn_sync global (the whole batch) | "
          f"batch 32 global, {32 // chosen} per device | 1437 train / 360 eval examples | 2 steps") in line
  again = run_cli("cnnjax.main", "--config=experiments/lenet5_digits.py", f"--workdir={tmp_path / 'run'}",
                  "--config.num_train_steps=2", "--config.batch_size=32", "--config.progress_bar=false",
                  env={"XLA_FLAGS": ""}, timeout=180)
  assert again.returncode == 0 and "already finished at step 2" in again.stderr, again.stderr[-3000:]


@pytest.mark.parametrize("bn_sync", ["global", "local"])
@pytest.mark.slow
def test_automatic_virtual_devices_compute_what_one_device_computes(tmp_path, tfds_data_dir, bn_sync):
  """Global BatchNorm is the full batch on any device count; local means each process's batch when cnnjax,
  not the user, chose the virtual devices."""
  config = tiny(experiment_config("simple_cnn_digits"), **{"batch_size": 32, "num_train_steps": 3,
                                                           "model.bn_sync": bn_sync})
  split = train.run(config, str(tmp_path / "split"), host=host_devices.HostDevices(8, automatic=True))
  assert split["strategy"] == "jit" and split["num_devices"] == 8
  one = tiny(experiment_config("simple_cnn_digits"), **{"batch_size": 32, "num_train_steps": 3,
                                                        "model.bn_sync": bn_sync, "parallel.strategy": "none"})
  alone = train.run(one, str(tmp_path / "one"))
  np.testing.assert_allclose(split["train_loss"], alone["train_loss"], rtol=1e-5)
  np.testing.assert_allclose(split["param_l2"], alone["param_l2"], rtol=1e-5)
  with open(tmp_path / "split" / "summary.json") as f:
    assert json.load(f)["bn_sync"] == bn_sync
