"""Applies the notes' fixed kernels (identity, two edge detectors, sharpen, box blur, 3x3 and 5x5 Gaussian
blur) to a real photo and saves the results side by side (cnnjax.lab.notes.filters).

Command:
  python scripts/filter_bank.py --workdir=/tmp/cnnjax/filter_bank
Writes filter_bank.png and filter_bank.json (sharpness of each result relative to the photo).
Expected: sharpness (mean absolute Laplacian response) relative to the photo (scikit-learn's
china.jpg, 427x640): identity x1.000, box blur x0.199, 3x3 Gaussian x0.250, 5x5 Gaussian x0.134,
sharpen x5.730; the edge maps themselves x4.778 (edge_4) and x8.955 (edge_8).
Cost: about 2 s on 2 CPU cores.
"""

import json
import os
import time

from absl import app, flags

from cnnjax import cli

flags.DEFINE_string("workdir", "/tmp/cnnjax/filter_bank", "Where the PNG and the JSON go.")
flags.DEFINE_string("photo", "china.jpg", "scikit-learn sample photo: china.jpg or flower.jpg.")
FLAGS = flags.FLAGS
PHOTOS = ("china.jpg", "flower.jpg")


def main(argv):
  del argv
  cli.configure_logging()
  from cnnjax.lab.notes import filters  # pylint: disable=import-outside-toplevel
  if FLAGS.photo not in PHOTOS:
    cli.fail(f"--photo={FLAGS.photo!r} is not a scikit-learn sample photo; choose one of {', '.join(PHOTOS)}")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  start = time.time()
  image = filters.sample_photo(FLAGS.photo)
  filtered = filters.apply_bank(image)
  report = filters.filter_report(image, filtered)
  filters.plot_bank(image, filtered, report, os.path.join(FLAGS.workdir, "filter_bank.png"))
  with open(os.path.join(FLAGS.workdir, "filter_bank.json"), "w") as f:
    json.dump({"photo": FLAGS.photo, "shape": list(image.shape), "relative_sharpness": report}, f, indent=2)
  for name, ratio in report.items():
    print(f"{name}: sharpness x{ratio:.3f}")
  print(f"wrote {os.path.join(FLAGS.workdir, 'filter_bank.png')} in {time.time() - start:.1f} s")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.one_line_flags_parser)
