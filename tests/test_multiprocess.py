"""Multi-process runs for real: two JAX processes on 127.0.0.1 (gloo CPU collectives), 2 devices each.

Every wait is bounded, and tests only ever signal the processes they started.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import (REPO_ROOT, SUBPROCESS_TIMEOUT, checkpoint_steps, experiment_config, final_state, read_jsonl,
                     run_cli)

DEVICES_PER_PROCESS = 2
PROCESSES = 2
# The notes' CNN (BatchNorm and dropout) on the digits: quick to compile, and exercises both.
COMMON = ["--config=experiments/simple_cnn_digits.py", "--config.batch_size=32", "--config.log_every_steps=2",
          "--config.checkpoint_every_steps=3", "--config.progress_bar=false", "--config.data.num_threads=2"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(args, process_id, port, devices=DEVICES_PER_PROCESS, fault=None):
  """Starts one process of a run; with `fault`, through tests/fault_main.py (which kills itself)."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  entry = [os.path.join(os.path.dirname(__file__), "fault_main.py")] if fault else ["-m", "cnnjax.main"]
  if fault:
    env["CNNJAX_FAULT"] = fault
  return subprocess.Popen(
      [sys.executable, *entry, *args, f"--coordinator_address=127.0.0.1:{port}",
       f"--num_processes={PROCESSES}", f"--process_id={process_id}"],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_pair(args, faults=(None, None)):
  """Starts process 0 and process 1 of one run, meeting at a free local port."""
  port = free_port()
  return [start(args, process_id, port, fault=fault) for process_id, fault in enumerate(faults)]


def finish(processes, timeout):
  """Waits for every process (bounded); kills the ones still running; returns (rc, stdout, stderr) each."""
  deadline = time.time() + timeout
  results = []
  for process in processes:
    try:
      out, err = process.communicate(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      process.kill()
      out, err = process.communicate(timeout=30)
    results.append((process.returncode, out, err))
  return results


def final_params(workdir, config):
  return final_state(workdir, config).params


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["pmap", "shard_map", "jit"])
def test_two_processes_equal_one_process_with_four_devices(tmp_path, tfds_data_dir, strategy):
  args = COMMON + ["--config.num_train_steps=6", f"--config.parallel.strategy={strategy}"]
  multi = tmp_path / "two_processes"
  results = finish(start_pair(args + [f"--workdir={multi}"]), SUBPROCESS_TIMEOUT)
  for rc, _, err in results:
    assert rc == 0, err[-3000:]
  # Only process 0 reports and writes the summary.
  assert "eval_accuracy=" in results[0][1] and "eval_accuracy=" not in results[1][1]

  single = tmp_path / "one_process"
  single_run = run_cli("cnnjax.main", *args, f"--workdir={single}", "--config.parallel.num_devices=4")
  assert single_run.returncode == 0, single_run.stderr[-3000:]

  multi_summary = json.load(open(multi / "summary.json"))
  single_summary = json.load(open(single / "summary.json"))
  assert multi_summary["num_processes"] == 2 and multi_summary["num_devices"] == 4
  np.testing.assert_allclose(multi_summary["eval_loss"], single_summary["eval_loss"], rtol=1e-5)
  config = experiment_config("simple_cnn_digits", batch_size=32, num_train_steps=6)
  for a, b in zip(jax.tree.leaves(final_params(multi, config)), jax.tree.leaves(final_params(single, config))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert "data on the device" in results[0][2]
  if strategy == "jit":  # the split on the devices (auto) against the same split fed from each process's host
    from_hosts = tmp_path / "two_processes_host_batches"
    for rc, _, err in finish(start_pair(args + [f"--workdir={from_hosts}", "--config.data.placement=host"]),
                             SUBPROCESS_TIMEOUT):
      assert rc == 0, err[-3000:]
    for a, b in zip(jax.tree.leaves(final_params(multi, config)), jax.tree.leaves(final_params(from_hosts, config))):
      np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_dead_peer_stops_the_others_within_a_bounded_time(tmp_path, tfds_data_dir):
  workdir = tmp_path / "run"
  peer_timeout = 10
  args = COMMON + ["--config.num_train_steps=100000", "--config.parallel.strategy=pmap",
                   f"--workdir={workdir}", f"--peer_timeout_seconds={peer_timeout}"]
  processes = start_pair(args)
  try:
    deadline = time.time() + 240
    metrics = workdir / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
      assert all(p.poll() is None for p in processes), "a process ended before training started"
      time.sleep(0.5)
    assert metrics.exists(), "training never started"
    processes[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    rc, _, err = finish(processes[:1], timeout=6 * peer_timeout)[0]
    elapsed = time.time() - killed_at
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)
  assert rc != 0 and elapsed < 6 * peer_timeout
  assert ("lost a peer process" in err or "another task died" in err), err[-3000:]


@pytest.mark.slow
def test_a_save_interrupted_on_one_process_leaves_only_complete_checkpoints(tmp_path, tfds_data_dir):
  workdir = tmp_path / "run"
  args = COMMON + ["--config.num_train_steps=9", "--config.parallel.strategy=jit", f"--workdir={workdir}",
                   "--peer_timeout_seconds=10"]
  # Process 0, which commits checkpoints, dies with checkpoint 6 fully written but not yet renamed into
  # place; process 1 must give up, and checkpoint 6 must not count.
  results = finish(start_pair(args, faults=("save_commit:6", None)), SUBPROCESS_TIMEOUT)
  assert results[0][0] == -signal.SIGKILL and results[1][0] != 0
  assert checkpoint_steps(workdir) == [3]
  resumed = finish(start_pair(args), SUBPROCESS_TIMEOUT)
  for rc, _, err in resumed:
    assert rc == 0, err[-3000:]
  assert "resuming from step 3" in resumed[0][2]
  assert json.load(open(workdir / "summary.json"))["step"] == 9
  steps = [r["step"] for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == "train"]
  assert steps == [2, 4, 6, 8, 9]


def test_partial_multiprocess_flags_are_one_line_errors(tmp_path):
  result = run_cli("cnnjax.main", "--config=experiments/lenet5_digits.py", f"--workdir={tmp_path / 'run'}",
                   "--num_processes=2", timeout=120)
  assert result.returncode == 2
  assert "needs all of --coordinator_address, --num_processes and --process_id" in result.stderr.splitlines()[-1]
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("env,expected", [({}, False), ({"SLURM_NTASKS": "1"}, False),
                                          ({"SLURM_NTASKS": "4"}, True), ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
                                          ({"TPU_WORKER_HOSTNAMES": "a,b"}, True)])
def test_cluster_detection(monkeypatch, env, expected):
  from cnnjax.parallel import distributed  # pylint: disable=import-outside-toplevel
  for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(key, raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  assert distributed.cluster_detected() == expected
