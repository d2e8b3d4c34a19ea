"""Data: random-access sources (TFDS ArrayRecord, embedded digits, npz), host preprocessing, grain pipelines."""

from cnnjax.data.pipeline import (HOST_ONLY_KEYS, ProcessSlice, eval_dataset, iterate,
                                  num_eval_batches, train_dataset)
from cnnjax.data.preprocess import Augment, Preprocess
from cnnjax.data.sources import DATASET_NAMES, TFDS_DATASETS, ArraySource, Dataset, is_dataset_name, open_dataset

__all__ = ["Augment", "ArraySource", "DATASET_NAMES", "Dataset", "HOST_ONLY_KEYS", "Preprocess",
           "ProcessSlice", "TFDS_DATASETS", "eval_dataset", "is_dataset_name", "iterate", "num_eval_batches",
           "open_dataset", "train_dataset"]
