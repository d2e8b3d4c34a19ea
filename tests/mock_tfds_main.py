"""`python -m cnnjax.main`, but with TFDS mocked by `tfds.testing.mock_data`: end-to-end tests offline.

Used by tests/test_experiments.py for experiments whose data is a TFDS dataset
that cannot be downloaded here (CIFAR-10, ImageNet). The digits are unaffected
only if a test does not route them through here.
"""

import os

import tensorflow_datasets as tfds
from absl import app

from cnnjax import cli
from cnnjax import main as cnnjax_main

if __name__ == "__main__":
  with tfds.testing.mock_data(num_examples=int(os.environ.get("MOCK_NUM_EXAMPLES", "24")),
                              policy=tfds.testing.MockPolicy.USE_CODE):
    app.run(cnnjax_main.main, flags_parser=cli.one_line_flags_parser)
