"""`python -m cnnjax.main` with TFDS mocked by records shaped like the real segmentation and text datasets.

`tfds.testing.mock_data`'s random records do not keep what these datasets
promise: a pet image and its trimap share one size and the trimap holds only
1, 2 and 3; a review is words. This wrapper serves `tfds.data_source` records
that do, generated from a seed, so that the experiments on `oxford_iiit_pet`
and `imdb_reviews` run end to end offline.
"""

import os
import zlib

import numpy as np
import tensorflow_datasets as tfds
from absl import app

from cnnjax import cli
from cnnjax import main as cnnjax_main

NUM_EXAMPLES = int(os.environ.get("MOCK_NUM_EXAMPLES", "24"))
PET_SIZE_RANGE = (40, 90)  # varying image sizes, as in the real dataset
PET_BREEDS = 37
TRIMAP_PET, TRIMAP_BACKGROUND, TRIMAP_BORDER = 1, 2, 3
WORDS = ("the", "film", "was", "great", "awful", "plot", "acting", "i", "loved", "hated", "it", "not", "a")
REVIEW_LENGTH_RANGE = (5, 60)


def pet_record(rng: np.random.Generator) -> dict:
  height, width = rng.integers(*PET_SIZE_RANGE, 2)
  yy, xx = np.mgrid[0:height, 0:width]
  cy, cx, ry, rx = height / 2, width / 2, height / 3, width / 3
  distance = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
  trimap = np.where(distance <= 0.8, TRIMAP_PET, np.where(distance <= 1.0, TRIMAP_BORDER, TRIMAP_BACKGROUND))
  image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
  return {"image": image, "segmentation_mask": trimap[..., None].astype(np.uint8),
          "label": int(rng.integers(PET_BREEDS)), "species": int(rng.integers(2)), "file_name": "mock"}


def review_record(rng: np.random.Generator) -> dict:
  words = rng.choice(WORDS, rng.integers(*REVIEW_LENGTH_RANGE))
  return {"text": " ".join(words) + " <br /> the end", "label": int(rng.integers(2))}


RECORDS = {"oxford_iiit_pet": pet_record, "imdb_reviews": review_record}


def as_data_source(builder, split, *args, **kwargs):
  del args, kwargs
  if builder.name not in RECORDS:
    raise ValueError(f"{__file__} mocks {', '.join(RECORDS)}; use tests/mock_tfds_main.py for {builder.name}")
  rng = np.random.default_rng(zlib.crc32(f"{builder.name}/{split}".encode()))
  return [RECORDS[builder.name](rng) for _ in range(NUM_EXAMPLES)]


if __name__ == "__main__":
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE,
                              as_data_source_fn=as_data_source):
    app.run(cnnjax_main.main, flags_parser=cli.one_line_flags_parser)
