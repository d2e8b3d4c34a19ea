"""The grain input pipeline: shuffled training batches and padded, masked eval batches.

Training reads one stream of example indices: stream positions [eN, (e+1)N)
hold a permutation of the dataset drawn for epoch e from (seed, e), so every
example is seen exactly once per epoch even when the batch size does not divide
N (a batch may straddle two epochs). Global batch k is positions [kB, (k+1)B);
each process keeps its own contiguous slice of every global batch (process p of
P holds rows [p B/P, (p+1) B/P)), so the processes together read each global
batch exactly once. Devices later split the process slice the same way,
contiguously. grain maps step k to its batch on `data.num_threads` threads,
prefetching, and its iterator state (the next step) is what a checkpoint keeps.

The epoch permutations are NumPy permutations computed once per epoch, and the
positions of a batch are looked up in one vectorized step: grain's per-element
`index_shuffle` cost about 47 us per example here, more than everything else a
small image's preparation costs.

Evaluation walks the eval split in order in global batches; the last batch is
padded with copies of example 0 and carries `mask` = 0 on the padding, so every
eval example counts exactly once and none is dropped.

Batches are dicts of NumPy arrays: `input` float32 (b, H, W, C), `label` int32
(b,), `mask` float32 (b,), and `index` int64 (b,) (the dataset index of each
example, kept on the host for data-integrity checks). Segmentation labels are
per pixel, int32 (b, H, W) (or (b, D, H, W) for volumes); text inputs are
token ids, int32 (b, L). `Preprocess.train_batch` / `eval_batch` decide.
"""

from __future__ import annotations

import dataclasses
import math
import threading

import grain
import numpy as np

from cnnjax.data.preprocess import Preprocess
from cnnjax.data.sources import RandomAccessSource, read_columns

# Epoch permutations kept at once: a batch straddles at most two epochs, and
# prefetching threads may run one batch ahead.
CACHED_EPOCHS = 4

HOST_ONLY_KEYS = ("index",)


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

  def indices(self, positions: np.ndarray) -> np.ndarray:
    epochs, offsets = np.divmod(positions, self.num_examples)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
      selected = epochs == epoch
      indices[selected] = self.permutation(int(epoch))[offsets[selected]]
    return indices


def _to_batch(inputs: np.ndarray, labels: np.ndarray, indices: np.ndarray, mask: np.ndarray) -> dict:
  return {"input": inputs,
          "label": labels,
          "mask": mask.astype(np.float32),
          "index": indices.astype(np.int64)}


def train_dataset(source: RandomAccessSource, preprocess: Preprocess, *, seed: int,
                  batch: ProcessSlice, num_steps: int) -> grain.MapDataset:
  """A MapDataset whose element k is this process's part of training step k's batch."""
  order = EpochOrder(len(source), seed)
  local = np.arange(batch.rows().start, batch.rows().stop, dtype=np.int64)

  def load(step: int) -> dict:
    positions = step * batch.global_batch + local
    indices = order.indices(positions)
    inputs, labels = preprocess.train_batch(read_columns(source, indices), positions)
    return _to_batch(inputs, labels, indices, np.ones(len(indices)))

  return grain.MapDataset.range(num_steps).map(load)


def eval_dataset(source: RandomAccessSource, preprocess: Preprocess, *,
                 batch: ProcessSlice) -> grain.MapDataset:
  """A MapDataset of this process's part of each eval batch, the last one padded and masked."""
  num_examples = len(source)
  rows = batch.rows()

  def load(batch_index: int) -> dict:
    positions = batch_index * batch.global_batch + np.arange(batch.global_batch)[rows]
    valid = positions < num_examples
    indices = np.where(valid, positions, 0)
    inputs, labels = preprocess.eval_batch(read_columns(source, indices))
    return _to_batch(inputs, labels, indices, valid)

  return grain.MapDataset.range(num_eval_batches(num_examples, batch.global_batch)).map(load)


def num_eval_batches(num_examples: int, global_batch: int) -> int:
  return math.ceil(num_examples / global_batch)


def iterate(dataset: grain.MapDataset, *, num_threads: int, prefetch: int) -> grain.DatasetIterator:
  """An iterator that prepares batches on `num_threads` threads, `prefetch` batches ahead.

  Its `get_state()` / `set_state()` round-trip the position, which is how a
  resumed run continues the exact data order.
  """
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(dataset.to_iter_dataset(options))
