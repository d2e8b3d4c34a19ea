"""Data: random-access sources (TFDS ArrayRecord, embedded digits, npz, synthetic shapes, text), host
preprocessing and augmentation per task, the grain pipelines that cut each process's slice of a global
batch, and offline preparation of original files into TFDS datasets."""

from cnnjax.data import gpu_decode
from cnnjax.data.pipeline import (AUTO_WORKERS, HOST_ONLY_KEYS, ProcessSlice, eval_dataset, host_workers, iterate,
                                  num_eval_batches, shared_memory_free, train_dataset, usable_cores)
from cnnjax.data.preprocess import Augment, Preprocess
from cnnjax.data.sources import (DATASET_NAMES, TFDS_DATASETS, ArraySource, Dataset, decodes_per_read, is_dataset_name,
                                 open_dataset)

__all__ = ["AUTO_WORKERS", "gpu_decode", "Augment", "ArraySource", "DATASET_NAMES", "Dataset", "HOST_ONLY_KEYS", "Preprocess",
           "ProcessSlice", "TFDS_DATASETS", "eval_dataset", "host_workers", "is_dataset_name", "iterate", "num_eval_batches",
           "decodes_per_read", "open_dataset", "shared_memory_free", "train_dataset", "usable_cores"]
