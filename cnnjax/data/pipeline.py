"""The grain input pipeline: shuffled training batches and padded, masked eval batches.

Training reads one stream of example indices: stream positions [eN, (e+1)N)
hold a permutation of the dataset drawn for epoch e from (seed, e), so every
example is seen exactly once per epoch even when the batch size does not divide
N (a batch may straddle two epochs). Global batch k is positions [kB, (k+1)B);
each process keeps its own contiguous slice of every global batch (process p of
P holds rows [p B/P, (p+1) B/P)), so the processes together read each global
batch exactly once. Devices later split the process slice the same way,
contiguously. grain maps step k to its batch on `data.num_threads` threads,
prefetching; the iterator's state (the next step) is what a checkpoint keeps.

With `data.num_workers` = W > 0, the batches are prepared in W worker processes
(grain's `mp_prefetch`): worker w prepares steps k with k = w mod W, each on
`data.num_threads` threads, and the parent reads them back in step order. A
batch is a pure function of its step, so the batches, their order and the state
are the same with any number of workers or threads: a run may resume with a
different count. Threads cost the fewest CPU ms per image
(docs/results/pipeline_workers.json), but decoding and cropping JPEGs
(ImageNet) stops scaling in threads on hosts of many cores, where processes go
on: `data.num_workers=-1` chooses between them (`host_workers`).

Worker processes are started (spawned) when the first batch is asked for and
stopped when the iterator runs out or is closed (the training loop closes it
however it ends). They ignore SIGINT and SIGTERM (the parent handles them: it
saves a checkpoint, then stops its workers) and exit by themselves when the
parent dies without stopping them. Batches come back through shared memory
(/dev/shm), whose names are removed as each batch arrives.

The epoch permutations are NumPy permutations computed once per epoch, and the
positions of a batch are looked up in one vectorized step: grain's per-element
`index_shuffle` cost more than everything else a small image's preparation
costs (docs/performance.md, "Measurements behind design choices").

With the GPU decoder (`data.decoder`, `cnnjax.data.gpu_decode`), the
threads or workers prepare only each batch's plan (its examples' encoded bytes
and crop windows, labels and draws); the training process decodes it on the
devices as it takes it.

Evaluation walks the eval split in order in global batches; the last batch is
padded with copies of example 0 and carries `mask` = 0 on the padding, so every
eval example counts exactly once and none is dropped.

Batches are dicts of NumPy arrays, as the host stage of preprocessing leaves
them (`Preprocess.host_train` / `host_eval`; the train and eval steps finish
them on the devices with `Preprocess.finish`): `input` uint8 images of one size
(b, H, W, C), `label` int32 (b,), `draws` float32 (b, 4) when training augments
(each example's rotation, crop offsets and flip), `mask` float32 (b,), and
`index` int64 (b,) (the dataset index of each example, kept on the host for
data-integrity checks). Segmentation labels are per pixel, int32 (b, H, W) (or
(b, D, H, W) for volumes); text inputs are token ids, int32 (b, L).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import math
import multiprocessing
import os
import shutil
import signal
import threading
import weakref
from typing import Any

import grain
import numpy as np
from absl import flags

from cnnjax.data import gpu_decode
from cnnjax.data.preprocess import Preprocess
from cnnjax.data.sources import RandomAccessSource, read_for_preprocessing
from cnnjax.errors import DataError

# Epoch permutations kept at once: a batch straddles at most two epochs, and
# prefetching threads may run one batch ahead.
CACHED_EPOCHS = 4

HOST_ONLY_KEYS = ("index",)
# Batches each worker process keeps ready in its output queue, beyond those its threads prepare.
WORKER_QUEUE_BATCHES = 1
# Batches per worker in shared memory (/dev/shm) at a time, measured: its queue, the one it is
# putting, the parent's read-ahead and the one being handed over.
SHARED_BATCHES_PER_WORKER = 4
# How grain reports a worker process that died (killed, out of memory, a full /dev/shm).
_DEAD_WORKER_TEXT = "Worker process was terminated unexpectedly"
# grain 0.2 reads this absl flag when it starts worker processes, which fails where absl flags are never
# parsed (tests, notebooks, library use): google/grain#1355. Unparsed, it takes its default.
_GRAIN_WORKER_FLAGS = ("grain_enable_multiprocess_worker_profiling",)


@dataclasses.dataclass(frozen=True)
class ProcessSlice:
  """Which rows of every global batch this process reads."""

  global_batch: int
  process_index: int = 0
  process_count: int = 1

  @property
  def local_batch(self) -> int:
    return self.global_batch // self.process_count

  def rows(self) -> slice:
    start = self.process_index * self.local_batch
    return slice(start, start + self.local_batch)


class EpochOrder:
  """The example index at each position of the training stream: epoch e is a permutation from (seed, e)."""

  def __init__(self, num_examples: int, seed: int):
    self.num_examples, self.seed = num_examples, seed
    self._permutations: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._permutations:
        if len(self._permutations) >= CACHED_EPOCHS:
          del self._permutations[min(self._permutations)]
        self._permutations[epoch] = np.random.default_rng((self.seed, epoch)).permutation(self.num_examples)
      return self._permutations[epoch]

  def __getstate__(self) -> dict:
    # Worker processes receive the order pickled: the numbers, not the lock or the cached permutations.
    return {"num_examples": self.num_examples, "seed": self.seed}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["num_examples"], state["seed"])

  def indices(self, positions: np.ndarray) -> np.ndarray:
    epochs, offsets = np.divmod(positions, self.num_examples)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
      selected = epochs == epoch
      indices[selected] = self.permutation(int(epoch))[offsets[selected]]
    return indices


def _to_batch(prepared: dict[str, np.ndarray], indices: np.ndarray, mask: np.ndarray) -> dict:
  return {**prepared, "mask": mask.astype(np.float32), "index": indices.astype(np.int64)}


class TrainPlan:
  """The data plan of training: which examples each step reads, on this process.

  Step k reads stream positions [kB, (k+1)B) of the global batch B, this
  process its own rows of them; the positions also seed each example's random
  draws. The host path (`train_dataset`) and a split resident on the devices
  (`cnnjax.data.resident`) read their examples from this one plan.
  """

  def __init__(self, num_examples: int, seed: int, batch: ProcessSlice):
    self.order = EpochOrder(num_examples, seed)
    self.batch = batch
    self._rows = np.arange(batch.rows().start, batch.rows().stop, dtype=np.int64)

  def examples(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(stream positions, dataset indices) of this process's rows of step `step`."""
    positions = step * self.batch.global_batch + self._rows
    return positions, self.order.indices(positions)


def eval_examples(batch_index: int, num_examples: int, batch: ProcessSlice) -> tuple[np.ndarray, np.ndarray]:
  """(dataset indices, validity) of this process's rows of eval batch `batch_index`; the padding past the
  split's end reads example 0 and is invalid."""
  positions = batch_index * batch.global_batch + np.arange(batch.global_batch)[batch.rows()]
  valid = positions < num_examples
  return np.where(valid, positions, 0), valid


def train_dataset(source: RandomAccessSource, preprocess: Preprocess, *, seed: int,
                  batch: ProcessSlice, num_steps: int, plan_only: bool = False) -> grain.MapDataset:
  """A MapDataset whose element k is this process's part of training step k's batch; with `plan_only`, its
  plan for the GPU decoder (`gpu_decode.plan_train`: bytes and crop windows, nothing decoded)."""
  plan = TrainPlan(len(source), seed, batch)
  host_stage = functools.partial(gpu_decode.plan_train, preprocess) if plan_only else preprocess.host_train

  def load(step: int) -> dict:
    positions, indices = plan.examples(step)
    return _to_batch(host_stage(read_for_preprocessing(source, indices), positions), indices,
                     np.ones(len(indices)))

  return grain.MapDataset.range(num_steps).map(_errors_as_elements(load))


def eval_dataset(source: RandomAccessSource, preprocess: Preprocess, *,
                 batch: ProcessSlice, plan_only: bool = False) -> grain.MapDataset:
  """A MapDataset of this process's part of each eval batch, the last one padded and masked; with
  `plan_only`, its plan for the GPU decoder (`gpu_decode.plan_eval`)."""
  num_examples = len(source)
  host_stage = functools.partial(gpu_decode.plan_eval, preprocess) if plan_only else preprocess.host_eval

  def load(batch_index: int) -> dict:
    indices, valid = eval_examples(batch_index, num_examples, batch)
    return _to_batch(host_stage(read_for_preprocessing(source, indices)), indices, valid)

  return grain.MapDataset.range(num_eval_batches(num_examples, batch.global_batch)).map(_errors_as_elements(load))


# The key of an element that stands for a batch that could not be read: its value is the DataError's message.
ERROR_KEY = "cnnjax_data_error"


def _errors_as_elements(load: Any) -> Any:
  """`load`, but a DataError it raises (a damaged record met in a thread or worker process) comes back as an
  element, `{ERROR_KEY: message}`, that `Batches` raises again in step order. An error raised in a worker
  would make grain stop the other workers with their batches still in shared memory, which Python then
  reports as leaked after the one-line error."""

  def load_or_error(index: int) -> dict:
    try:
      return load(index)
    except DataError as e:
      return {ERROR_KEY: str(e)}

  return load_or_error


def num_eval_batches(num_examples: int, global_batch: int) -> int:
  return math.ceil(num_examples / global_batch)


# `data.num_workers` when the count is left to cnnjax (`host_workers`).
AUTO_WORKERS = -1
# Threads of one process stop adding throughput to JPEG decoding and cropping somewhere past this many cores,
# where the GIL-holding parts of their work meet (issue 22 saw it on a 16-core GPU host; no results file of
# this project measures more than 2 cores), so past it a host's cores are used through worker processes.
THREAD_SCALING_CORES = 8


def usable_cores() -> int:
  """The cores this process may run on (its CPU affinity, which SLURM and taskset set)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def shared_memory_free() -> int | None:
  """Free bytes in /dev/shm, where worker processes hand their batches over (None where there is none)."""
  return shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else None


def host_workers(num_workers: int, num_threads: int, *, decodes: bool, cores: int, batch_bytes: int,
                 shared_memory: int | None) -> tuple[int, int, str]:
  """(worker processes, threads in each process, why) for the host path's batches.

  An explicit `num_workers` (>= 0) stands. `AUTO_WORKERS` prepares batches in `num_threads` threads of the
  training process, which cost fewer CPU ms per image than workers (docs/results/pipeline_workers.json),
  unless the host decodes records (`decodes`) on more than THREAD_SCALING_CORES cores: then one
  single-threaded worker process per core, as many as `shared_memory` bytes hold the batches of
  (`batch_bytes` each, SHARED_BATCHES_PER_WORKER per worker), and threads when that is fewer than two.
  """
  if num_workers != AUTO_WORKERS:
    return num_workers, num_threads, "as set"
  if not decodes or cores <= THREAD_SCALING_CORES:
    return 0, num_threads, f"auto: {cores} cores" + (" decode" if decodes else "")
  room = cores if shared_memory is None else shared_memory // (SHARED_BATCHES_PER_WORKER * max(batch_bytes, 1))
  workers = min(cores, room)
  if workers < 2:
    return 0, num_threads, (f"auto: {cores} cores decode, but /dev/shm has room for the batches of {room} worker "
                            "process(es); give a container --shm-size or --ipc=host")
  return workers, 1, (f"auto: {cores} cores decode; threads stop scaling past {THREAD_SCALING_CORES}" +
                      (f"; /dev/shm has room for {workers} workers' batches" if workers < cores else ""))


def iterate(dataset: grain.MapDataset, *, num_threads: int, prefetch: int, num_workers: int = 0) -> Batches:
  """An iterator over the dataset's elements, prepared `prefetch` ahead on `num_threads` threads, in
  `num_workers` worker processes when positive (see the module docstring).

  Its `get_state()` / `set_state()` round-trip the position, which is how a
  resumed run continues the exact data order.
  """
  return Batches(dataset, num_threads=num_threads, prefetch=prefetch, num_workers=num_workers)


class Batches:
  """Elements k, k+1, ... of a MapDataset, prepared ahead on threads or in worker processes.

  The state is `{'next_index': k}`, grain's own iterator state for threads,
  whatever prepares the elements: checkpoints written with threads resume with
  workers and the other way round. `set_state` restarts the preparation at k.
  The threads or workers start with the first `next()` and stop when `next()`
  finds no element left, on `close()` (which takes up to a second with
  workers), or when the iterator is collected or Python exits.
  """

  def __init__(self, dataset: grain.MapDataset, *, num_threads: int, prefetch: int, num_workers: int = 0):
    self._dataset = dataset
    self._num_threads, self._prefetch, self._num_workers = num_threads, prefetch, num_workers
    self._next_index = 0
    self._iterator: Any = None
    _OPEN.add(self)

  def __iter__(self) -> Batches:
    return self

  def __next__(self) -> Any:
    if self._next_index >= len(self._dataset):
      self.close()
      raise StopIteration
    if self._iterator is None:
      self._iterator = self._start()
    try:
      element = next(self._iterator)
    except RuntimeError as e:
      if _DEAD_WORKER_TEXT not in str(e):
        raise
      self.close()
      raise DataError(
          f"a data worker process died ({' '.join(str(e).split())[:120]}): out of memory, or of shared memory "
          f"(/dev/shm holds about {SHARED_BATCHES_PER_WORKER} batches per worker; give a container "
          "--shm-size or --ipc=host), or killed; lower data.num_workers, data.prefetch_batches or batch_size, "
          "and rerun to resume") from None
    if ERROR_KEY in element:
      self.close()
      raise DataError(element[ERROR_KEY])
    if self._num_workers:
      _unlink_shared_memory(element)
    self._next_index += 1
    return element

  def get_state(self) -> dict[str, int]:
    return {"next_index": self._next_index}

  def set_state(self, state: dict[str, Any]) -> None:
    self.close()
    self._next_index = int(state["next_index"])

  def close(self) -> None:
    """Stops the threads or worker processes (the iterator may go on: they restart where it is)."""
    if self._iterator is not None:
      iterator, self._iterator = self._iterator, None
      iterator.close()

  def __enter__(self) -> Batches:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()

  def _start(self) -> grain.DatasetIterator:
    remaining = self._dataset[self._next_index:]
    workers = min(self._num_workers, len(remaining))
    if not workers:
      # A buffer smaller than the threads would leave threads idle (grain warns): each keeps one ahead.
      return iter(remaining.to_iter_dataset(
          grain.ReadOptions(num_threads=self._num_threads,
                            prefetch_buffer_size=max(self._prefetch, self._num_threads))))
    _default_unparsed_grain_flags()
    # The prefetched batches are shared among the workers: each prepares every workers-th one, on no more
    # threads than it buffers batches (so the buffers hold `prefetch_batches` in all).
    buffered = math.ceil(self._prefetch / workers)
    per_worker = grain.ReadOptions(num_threads=min(self._num_threads, buffered), prefetch_buffer_size=buffered)
    processes = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=WORKER_QUEUE_BATCHES)
    return iter(remaining.to_iter_dataset(per_worker).mp_prefetch(processes, worker_init_fn=_init_worker))


# Iterators not closed by their users are closed when the interpreter exits, before its teardown: grain's
# own finalizers then run with half-unloaded modules and print a traceback for every buffered batch.
_OPEN: weakref.WeakSet[Batches] = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
  for batches in list(_OPEN):
    batches.close()


def _unlink_shared_memory(batch: dict[str, Any]) -> None:
  """Removes the names of a batch's shared-memory arrays (from the workers) as soon as it arrives.

  The arrays stay valid while mapped, and nothing is left to unlink when they
  are freed: not at exit (where JAX on CPU may still hold the last batches,
  which it shares without copying, and Python would warn that they "leaked"),
  nor after a crash.
  """
  for value in batch.values():
    if getattr(value, "_unlink_on_del", False):  # a grain SharedMemoryArray that unlinks when freed
      value.shm.unlink()
      value._unlink_on_del = False  # pylint: disable=protected-access  (grain has no public way to say so)


def _default_unparsed_grain_flags() -> None:
  if flags.FLAGS.is_parsed():
    return
  for name in _GRAIN_WORKER_FLAGS:
    if name in flags.FLAGS:
      flags.FLAGS[name].present = True  # readable before parsing, at its default value


def _init_worker(worker_index: int, worker_count: int) -> None:
  """Runs first in every worker process."""
  del worker_index, worker_count
  # Ctrl-C and schedulers signal the whole process group. The parent handles SIGINT and SIGTERM by
  # saving the step it is on, and it still needs its workers until then; it stops them afterwards.
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, signal.SIG_IGN)
  threading.Thread(target=_exit_with_parent, name="cnnjax-exit-with-parent", daemon=True).start()


def _exit_with_parent() -> None:
  """Ends the worker when its parent is gone (SIGKILL, os._exit) without having stopped it: no orphans."""
  parent = multiprocessing.parent_process()
  if parent is not None:
    parent.join()  # returns when the parent's end of the spawn pipe closes, i.e. when it exits
    os._exit(0)  # pylint: disable=protected-access  (nothing of the worker's is worth finishing)
