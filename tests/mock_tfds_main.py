"""`python -m cnnjax.main`, but with TFDS mocked by `tfds.testing.mock_data`: end-to-end tests offline.

Used by tests/test_experiments.py for experiments whose data is a TFDS dataset
that cannot be downloaded here (CIFAR-10, ImageNet). The digits are unaffected
only if a test does not route them through here.

The mock makes its examples as arrays; a source read undecoded (ImageNet's
`EncodedImageSource`) asks TFDS to encode them, which TFDS does with TensorFlow.
Here PIL encodes them instead, so the encoded path runs end to end without it.
"""

import os

import numpy as np
import tensorflow_datasets as tfds
from absl import app
from PIL import Image
from tensorflow_datasets.core.features import image_feature

from cnnjax import cli
from cnnjax import main as cnnjax_main


def _encode_with_pil(encoder, np_image: np.ndarray) -> bytes:
  """TFDS's array-to-bytes step for images, through PIL instead of TensorFlow."""
  pixels = np_image[..., 0] if np_image.ndim == 3 and np_image.shape[-1] == 1 else np_image
  return encoder._encode_pil_image(Image.fromarray(pixels))  # pylint: disable=protected-access


if __name__ == "__main__":
  image_feature._ImageEncoder._encode_image = _encode_with_pil  # pylint: disable=protected-access
  with tfds.testing.mock_data(num_examples=int(os.environ.get("MOCK_NUM_EXAMPLES", "24")),
                              policy=tfds.testing.MockPolicy.USE_CODE):
    app.run(cnnjax_main.main, flags_parser=cli.one_line_flags_parser)
