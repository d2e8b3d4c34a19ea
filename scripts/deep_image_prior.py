"""Deep image prior denoising of a real sample photo: a random U-Net fitted to the noisy photo.

PSNR of the network's output against the clean photo (never seen by the fit)
over the iterations, against the noisy photo's own PSNR (cnnjax.lab.notes.image_prior).

Command:
  python scripts/deep_image_prior.py --workdir=/tmp/cnnjax/deep_image_prior
Writes deep_image_prior.png (photos and PSNR curves) in the workdir.
Expected: (scikit-learn's flower.jpg, 128x128, sigma 25/255, seed 0) the output's PSNR against the
clean photo rises above the noisy photo's own, peaks part-way through the fit, then falls back
towards it as the network starts to reproduce the noise, while its PSNR against the noisy target
goes on rising on the whole.
Result: docs/results/notes/deep_image_prior.json (the noisy photo's PSNR, the best output's and the
final one's, both PSNR curves, the settings, the script's wall-clock seconds, the command, commit
and machine).
"""

import os
import time

from absl import app, flags

from cnnjax import cli

flags.DEFINE_string("workdir", "/tmp/cnnjax/deep_image_prior", "Where the plot goes.")
flags.DEFINE_string("json", os.path.join("docs", "results", "notes", "deep_image_prior.json"),
                    "Where to write the results.")
flags.DEFINE_integer("size", 128, "Side of the square photo crop, in pixels (divisible by 2^(levels - 1)).")
flags.DEFINE_list("features", ["8", "16", "32", "64"], "U-Net widths, one per level.")
flags.DEFINE_integer("steps", 1000, "Adam iterations.")
flags.DEFINE_integer("log_every", 20, "Iterations between PSNR measurements.")
flags.DEFINE_integer("seed", 0, "Seed of the noise, the random input and the initialization.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  start = time.monotonic()
  cli.configure_logging()
  from cnnjax.lab.bench import harness  # pylint: disable=import-outside-toplevel
  from cnnjax.lab.notes import image_prior  # pylint: disable=import-outside-toplevel
  features = tuple(int(width) for width in FLAGS.features)
  factor = 2 ** (len(features) - 1)
  if FLAGS.size % factor:
    cli.fail(f"--size={FLAGS.size} must be a multiple of {factor} (the U-Net halves it {len(features) - 1} times)")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  result = image_prior.fit(image_prior.sample_photo(FLAGS.size), steps=FLAGS.steps, features=features,
                           log_every=FLAGS.log_every, seed=FLAGS.seed)
  image_prior.plot_fit(result, os.path.join(FLAGS.workdir, "deep_image_prior.png"))
  summary = {**result.summary(), "photo": image_prior.DEFAULT_PHOTO, "size": FLAGS.size, "steps": FLAGS.steps,
             "features": list(features), "noise_std": image_prior.NOISE_STD, "seed": FLAGS.seed}
  print(f"noisy photo {summary['noisy_psnr']:.2f} dB; best output {summary['best_psnr']:.2f} dB at iteration "
        f"{summary['best_iteration']}; final {summary['final_psnr']:.2f} dB (vs the noisy target "
        f"{summary['final_psnr_to_noisy']:.2f} dB)")
  print(f"wrote {os.path.join(FLAGS.workdir, 'deep_image_prior.png')}")
  harness.write_results(FLAGS.json, {**harness.provenance(), **summary, "wall_seconds": time.monotonic() - start})


if __name__ == "__main__":
  app.run(main, flags_parser=cli.one_line_flags_parser)
