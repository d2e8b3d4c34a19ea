"""Applies the notes' fixed kernels (identity, two edge detectors, sharpen, box blur, 3x3 and 5x5 Gaussian
blur) to a real photo and saves the results side by side (cnnjax.lab.notes.filters).

Command:
  python scripts/filter_bank.py --workdir=/tmp/cnnjax/filter_bank
Writes filter_bank.png in the workdir.
Expected: sharpness (mean absolute Laplacian response) relative to the photo (scikit-learn's
china.jpg): the identity keeps it exactly; every blur lowers it, the 5x5 Gaussian most, below the
3x3 Gaussian; sharpening raises it several-fold; the edge maps themselves score well above the
photo, edge_8 above edge_4.
Result: docs/results/notes/filter_bank.json (each kernel's relative sharpness, the photo and its
shape, the script's wall-clock seconds, the command, commit and machine).
"""

import os
import time

from absl import app, flags

from cnnjax import cli

flags.DEFINE_string("workdir", "/tmp/cnnjax/filter_bank", "Where the PNG goes.")
flags.DEFINE_string("json", os.path.join("docs", "results", "notes", "filter_bank.json"),
                    "Where to write the results.")
flags.DEFINE_string("photo", "china.jpg", "scikit-learn sample photo: china.jpg or flower.jpg.")
FLAGS = flags.FLAGS
PHOTOS = ("china.jpg", "flower.jpg")


def main(argv):
  del argv
  start = time.monotonic()
  cli.configure_logging()
  from cnnjax.lab.bench import harness  # pylint: disable=import-outside-toplevel
  from cnnjax.lab.notes import filters  # pylint: disable=import-outside-toplevel
  if FLAGS.photo not in PHOTOS:
    cli.fail(f"--photo={FLAGS.photo!r} is not a scikit-learn sample photo; choose one of {', '.join(PHOTOS)}")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  image = filters.sample_photo(FLAGS.photo)
  filtered = filters.apply_bank(image)
  report = filters.filter_report(image, filtered)
  filters.plot_bank(image, filtered, report, os.path.join(FLAGS.workdir, "filter_bank.png"))
  for name, ratio in report.items():
    print(f"{name}: sharpness x{ratio:.3f}")
  print(f"wrote {os.path.join(FLAGS.workdir, 'filter_bank.png')}")
  harness.write_results(FLAGS.json, {**harness.provenance(), "photo": FLAGS.photo, "shape": list(image.shape),
                                     "relative_sharpness": report, "wall_seconds": time.monotonic() - start})


if __name__ == "__main__":
  app.run(main, flags_parser=cli.one_line_flags_parser)
