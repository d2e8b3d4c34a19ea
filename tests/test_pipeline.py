"""The input pipeline's worker processes (`data.num_workers`): the same batches as threads, exactly once
per epoch, exact resume across worker counts, one-line errors, and no process left behind.

Worker processes are spawned Python interpreters (a few seconds each here), so
every test starts as few iterators as it can. Signals go only to processes
these tests start, by their ids, and every wait is bounded.
"""

import collections
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cnnjax import cli, data, train
from cnnjax.data import pipeline
from cnnjax.data import ArraySource, Augment, Preprocess, ProcessSlice, eval_dataset, iterate, train_dataset
from cnnjax.errors import DataError
from helpers import REPO_ROOT, SUBPROCESS_TIMEOUT, checkpoint_steps, experiment_config, read_jsonl, run_cli
from test_fault_matrix import finish, metrics_logged, start, summary, wait_until

FAULT_MAIN = os.path.join(os.path.dirname(__file__), "fault_main.py")
# The notes' CNN with BatchNorm, dropout and random rotations: every source of state and randomness.
RUN = ["--config=experiments/simple_cnn_digits.py", "--config.batch_size=32", "--config.num_train_steps=30",
       "--config.checkpoint_every_steps=10", "--config.log_every_steps=5", "--config.eval_every_steps=20",
       "--config.progress_bar=false", "--config.data.num_threads=2", "--config.data.placement=host"]
# How long a process may take to end after its parent stopped it or died.
EXIT_SECONDS = 30
POLL_SECONDS = 0.1


def numbered_source(n: int) -> ArraySource:
  """Image i is filled with i."""
  images = (np.arange(n)[:, None, None, None] * np.ones((1, 8, 8, 1))).astype(np.uint8)
  return ArraySource(images, np.arange(n) % 10)


class FailingSource:
  """A source whose example `failing_index` cannot be read (it is pickled into the workers)."""

  def __init__(self, n: int, failing_index: int):
    self.source, self.failing_index = numbered_source(n), failing_index

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    if index == self.failing_index:
      raise DataError(f"example {index} is damaged; prepare the dataset again")
    return self.source[index]


def augmenting() -> Preprocess:
  return Preprocess(image_size=0, mean=(0.0,), std=(1.0,), seed=3,
                    augment=Augment(crop_padding=2, flip=True, rotation_degrees=10.0))


def is_running(pid: int) -> bool:
  """Whether `pid` is a live process (a zombie waiting for its parent to read its status is not)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def workers_of(pid: int) -> list[int]:
  """The live worker processes that `pid` spawned (multiprocessing's resource tracker is not one)."""
  found = []
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        command = f.read()
    except (FileNotFoundError, ProcessLookupError):
      continue
    if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in command:
      found.append(int(entry))
  return found


def wait_gone(pids: list[int]) -> list[int]:
  """Waits up to EXIT_SECONDS for `pids` to end; returns those still running."""
  deadline = time.time() + EXIT_SECONDS
  while time.time() < deadline and any(is_running(pid) for pid in pids):
    time.sleep(POLL_SECONDS)
  return [pid for pid in pids if is_running(pid)]


pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads processes from /proc (Linux)")


@pytest.mark.slow
def test_workers_give_the_batches_of_threads_exactly_once_per_epoch_and_resume_across_counts():
  n, global_batch, steps = 23, 6, 12  # a batch straddles epochs; three epochs and more
  dataset = train_dataset(numbered_source(n), augmenting(), seed=5, batch=ProcessSlice(global_batch),
                          num_steps=steps)
  reference = [dataset[step] for step in range(steps)]
  # (workers before the checkpoint, workers after it): counts change across the resume, as a config may.
  for first, second in ((0, 2), (3, 1)):
    with iterate(dataset, num_threads=2, prefetch=4, num_workers=first) as before:
      batches = [next(before) for _ in range(5)]
      state = before.get_state()
    assert state == {"next_index": 5}
    with iterate(dataset, num_threads=1, prefetch=2, num_workers=second) as after:
      after.set_state(state)
      batches += list(after)
    assert len(batches) == steps
    for got, want in zip(batches, reference):
      assert set(got) == set(want)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    stream = np.concatenate([batch["index"] for batch in batches]).tolist()
    for epoch in range(len(stream) // n):
      assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))


def test_eval_with_workers_covers_every_example_once_even_with_fewer_batches_than_workers():
  n = 10
  counts = collections.Counter()
  batches = list(iterate(eval_dataset(numbered_source(n), augmenting(), batch=ProcessSlice(4)),
                         num_threads=1, prefetch=2, num_workers=4))  # 3 batches: 3 workers start
  for batch in batches:
    counts.update(batch["index"][batch["mask"] > 0].tolist())
  assert counts == collections.Counter(range(n))
  assert [batch["input"].shape[0] for batch in batches] == [4, 4, 4]


def test_an_error_in_a_worker_is_the_same_one_line_error_and_no_worker_is_left(capsys):
  dataset = train_dataset(FailingSource(12, failing_index=7), augmenting(), seed=0, batch=ProcessSlice(4),
                          num_steps=3)  # one epoch: example 7 is read at some step
  iterator = iterate(dataset, num_threads=1, prefetch=2, num_workers=2)
  workers: list[int] = []

  def consume() -> None:
    try:
      for _ in iterator:
        pass
    finally:
      workers.extend(workers_of(os.getpid()))

  with pytest.raises(SystemExit) as exit_info:
    cli.run_reporting_errors(consume)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.strip().splitlines() == ["error: example 7 is damaged; prepare the dataset again"], err
  iterator.close()
  assert not wait_gone(workers)


def test_a_dead_worker_is_a_one_line_data_error_naming_shared_memory():
  dataset = train_dataset(numbered_source(40), augmenting(), seed=0, batch=ProcessSlice(4), num_steps=200)
  with iterate(dataset, num_threads=1, prefetch=2, num_workers=2) as iterator:
    next(iterator)
    workers = workers_of(os.getpid())
    assert workers
    for pid in workers:
      os.kill(pid, signal.SIGKILL)
    with pytest.raises(DataError, match=r"a data worker process died .*/dev/shm.*data.num_workers"):
      for _ in range(200):
        next(iterator)


# A parent that starts two workers, prints their ids, and dies by SIGKILL without stopping them.
ORPHAN_SCRIPT = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_pipeline import augmenting, numbered_source, workers_of
from cnnjax.data import ProcessSlice, iterate, train_dataset
if __name__ == "__main__":
  dataset = train_dataset(numbered_source(40), augmenting(), seed=0, batch=ProcessSlice(4), num_steps=100)
  iterator = iterate(dataset, num_threads=1, prefetch=2, num_workers=2)
  next(iterator)
  print(" ".join(str(pid) for pid in workers_of(os.getpid())), flush=True)
  os.kill(os.getpid(), signal.SIGKILL)
"""


def test_workers_end_when_their_parent_is_killed():
  script = ORPHAN_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT, check=False)
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  workers = [int(pid) for pid in result.stdout.split()]
  assert len(workers) == 2, result.stdout
  assert not wait_gone(workers)


@pytest.mark.slow
def test_a_run_with_workers_is_bit_identical_and_resumes_exactly_after_sigkill_with_another_count(
    tmp_path, tfds_data_dir):
  reference = tmp_path / "threads"
  done = run_cli("cnnjax.main", *RUN, f"--workdir={reference}")
  assert done.returncode == 0, done.stderr[-3000:]

  with_workers = tmp_path / "workers"
  done = run_cli("cnnjax.main", *RUN, "--config.data.num_workers=2", f"--workdir={with_workers}")
  assert done.returncode == 0, done.stderr[:3000] + "\n...\n" + done.stderr[-3000:]
  assert "Traceback" not in done.stderr and "leaked" not in done.stderr, done.stderr[-3000:]
  assert summary(with_workers)["param_checksum"] == summary(reference)["param_checksum"]
  assert summary(with_workers)["eval_accuracy"] == summary(reference)["eval_accuracy"]

  killed = tmp_path / "killed"
  result = run_cli("", *RUN, "--config.data.num_workers=2", f"--workdir={killed}", wrapper=FAULT_MAIN,
                   env={"CNNJAX_FAULT": "during_step:15"})
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  assert checkpoint_steps(killed) == [10]
  resumed = run_cli("cnnjax.main", *RUN, "--config.data.num_workers=1", f"--workdir={killed}")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming from step 10" in resumed.stderr
  assert summary(killed)["param_checksum"] == summary(reference)["param_checksum"]
  points = [(r["split"], r["step"], r.get("loss")) for r in read_jsonl(killed / "metrics.jsonl")]
  assert points == [(r["split"], r["step"], r.get("loss")) for r in read_jsonl(reference / "metrics.jsonl")]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "error"])
def test_a_run_stopped_by_sigterm_or_an_error_leaves_no_worker(tmp_path, tfds_data_dir, how):
  workdir = tmp_path / how
  args = RUN + ["--config.num_train_steps=100000", "--config.checkpoint_every_steps=100000",
                "--config.log_every_steps=1", "--config.data.num_workers=2", f"--workdir={workdir}"]
  if how == "error":  # diverges within a few steps: a one-line error, exit status 2
    args += ["--config.optimizer.learning_rate=1e30", "--config.optimizer.schedule=constant",
             "--config.optimizer.warmup_steps=0"]
  process = start(args)
  seen: set[int] = set()

  def reached() -> bool:
    seen.update(workers_of(process.pid))
    return process.poll() is not None or (how == "sigterm" and metrics_logged(workdir) and len(seen) >= 2)

  wait_until(reached, process, "the first log line with the workers running")
  if how == "sigterm":
    process.send_signal(signal.SIGTERM)
  rc, _, err = finish(process, timeout=120)
  if how == "sigterm":
    assert rc == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM: saved a checkpoint at step" in err, err[-3000:]
  else:
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1 and "non-finite" in errors[0], err[-3000:]
  assert "Traceback" not in err and "leaked" not in err, err[-3000:]
  assert len(seen) >= 2, seen
  assert not wait_gone(sorted(seen))


def test_more_threads_than_prefetched_batches_start_without_grain_warning(caplog):
  source = ArraySource(np.zeros((16, 4, 4, 1), np.uint8), np.zeros(16, np.int64))
  preprocess = Preprocess(image_size=0, mean=(0.0,), std=(1.0,))
  dataset = train_dataset(source, preprocess, seed=0, batch=ProcessSlice(4), num_steps=3)
  with caplog.at_level("WARNING"), iterate(dataset, num_threads=4, prefetch=2) as batches:
    assert len(list(batches)) == 3
  assert not [r for r in caplog.records if "smaller than" in r.getMessage()]


def test_worker_processes_are_chosen_from_the_cores_where_the_host_decodes():
  auto, limit = data.AUTO_WORKERS, pipeline.THREAD_SCALING_CORES
  batch = 256 * 224 * 224 * 3
  plenty = 64 * pipeline.SHARED_BATCHES_PER_WORKER * batch

  def choice(workers, threads, **host):
    return data.host_workers(workers, threads, **{"decodes": True, "cores": 64, "batch_bytes": batch,
                                                  "shared_memory": plenty, **host})

  assert choice(3, 2)[:2] == (3, 2) and choice(0, 16)[:2] == (0, 16)  # as set, whatever the host
  assert choice(auto, 16, cores=limit)[:2] == (0, 16)  # threads while they scale
  assert choice(auto, 16, cores=limit + 1)[:2] == (limit + 1, 1)  # then a process per core
  assert choice(auto, 4, decodes=False)[:2] == (0, 4)  # arrays in memory: threads
  # As many workers as /dev/shm holds the batches of (a container's default 64 MB holds none of ImageNet's).
  assert choice(auto, 16, shared_memory=5 * pipeline.SHARED_BATCHES_PER_WORKER * batch)[:2] == (5, 1)
  few = choice(auto, 16, shared_memory=64 * 2 ** 20)
  assert few[:2] == (0, 16) and "--shm-size" in few[2]
  assert choice(auto, 16, shared_memory=None)[:2] == (64, 1)  # no /dev/shm to measure
  with open(os.path.join(REPO_ROOT, "docs", "data.md")) as f:
    assert f"decodes records on more than {limit} cores" in " ".join(f.read().split())


def test_the_start_line_names_who_prepares_host_batches(tfds_data_dir):
  config = experiment_config("lenet5_digits")
  config.data.placement = "host"
  line = train.build(config).describe()
  assert f"host batches in {config.data.num_threads} thread(s) (auto: {data.usable_cores()} cores)" in line
  config.data.num_workers = 2
  assert "host batches in 2 worker process(es) x" in train.build(config).describe()
