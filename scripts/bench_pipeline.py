"""The ImageNet-style host pipeline against the number of data worker processes, and its rate per core.

Command:
  python scripts/bench_pipeline.py [--json=docs/results/pipeline_workers.json] [--repeats=3]
      [--settings=0x1,0x2,0x4,1x1,2x1,3x1,4x1,2x2] [--batch=64] [--seconds=10]
Expected: for each setting WxT (W worker processes, T threads in each; W=0: T threads in the training
process, no workers), the median images per second of `resnet50_imagenet`'s host data recipe (TFDS JPEG
read, decode at the crop's DCT scale, random_resized_crop to 224 in uint8, batching; flip and normalization
run on the devices) and the CPU seconds it spends per
image (the training process and its workers); then the rate of one core (images per CPU second) and,
derived from it, the cores that ResNet-50's 3,000 images/s on one H100 would need.
Cost: about 8 minutes on 2 CPU cores (every setting 3 times, each starting its workers afresh).

The data is a synthetic `imagenet2012` written as a real TFDS ArrayRecord dataset of ImageNet-sized
JPEGs (`cnnjax.lab.bench.datasets.prepare_imagenet_jpeg`); what it holds is in the JSON. Settings are measured
in interleaved rounds, so that a noisy neighbour slows all of them alike; every round, the load of the
machine while it ran, the command, the commit and the machine are recorded.
"""

import copy
import dataclasses
import os
import statistics
import tempfile

from absl import app, flags

from cnnjax import cli

# ResNet-50 training on one H100 (bfloat16, batch 256): the throughput the host pipeline must sustain.
TARGET_IMAGES_PER_SECOND = 3000
WARMUP_BATCHES = 3
MIN_TIMED_BATCHES = 10

# What the host does to each image, as the results file records it.
RECIPE = ("resnet50_imagenet's host stage: TFDS JPEG read, PIL decode at the coarsest DCT scale the crop allows, "
          "random_resized_crop to 224, uint8 batches (flip and normalization run on the devices)")

flags.DEFINE_string("json", os.path.join("docs", "results", "pipeline_workers.json"), "Where to write the results.")
flags.DEFINE_list("settings", ["0x1", "0x2", "0x4", "1x1", "2x1", "3x1", "4x1", "2x2"],
                  "WxT: W worker processes (0: none) with T threads each (in the training process when W=0).")
flags.DEFINE_integer("repeats", 3, "Interleaved rounds over every setting.")
flags.DEFINE_integer("batch", 64, "Images per batch.")
flags.DEFINE_float("seconds", 10.0, "Timed seconds per measurement (at least).")
flags.DEFINE_integer("examples", 1024, "Synthetic JPEGs in the training split (they repeat, reshuffled).")
flags.DEFINE_string("data_dir", "", "Where to write (or find) the synthetic dataset; '' : a temporary directory.")
FLAGS = flags.FLAGS


def parse_setting(text: str) -> tuple[int, int]:
  try:
    workers, threads = (int(part) for part in text.lower().split("x"))
  except ValueError:
    cli.fail(f"--settings entry {text!r} is not WxT (worker processes x threads), e.g. 2x1")
  if workers < 0 or threads < 1:
    cli.fail(f"--settings entry {text!r}: workers must be >= 0 and threads >= 1")
  return workers, threads


def measure_all(root: str) -> dict:
  from cnnjax import config as config_lib  # pylint: disable=import-outside-toplevel
  from cnnjax import train  # pylint: disable=import-outside-toplevel
  from cnnjax.lab.bench import datasets, harness, pipeline  # pylint: disable=import-outside-toplevel
  settings = [parse_setting(text) for text in FLAGS.settings]
  config = datasets.pipeline_config("imagenet_jpeg", batch=FLAGS.batch, image_size=config_lib.IMAGENET_IMAGE_SIZE,
                                    root=root, num_examples=FLAGS.examples)
  data = datasets.jpeg_dataset_stats(config.data.tfds_data_dir)
  print(f"{data['examples']} synthetic JPEGs, {data['mean_jpeg_bytes'] / 1e3:.0f} KB and "
        f"{data['mean_pixels'] / 1e3:.0f}k pixels on average", flush=True)
  exp = train.build(config)
  rounds: dict[str, list[dict]] = {f"{w}x{t}": [] for w, t in settings}
  for repeat in range(FLAGS.repeats):
    for workers, threads in settings:
      setting = copy.deepcopy(config)
      setting.data.num_workers, setting.data.num_threads = workers, threads
      record = pipeline.measure(dataclasses.replace(exp, config=setting).train_batches(), FLAGS.batch,
                                warmup_batches=WARMUP_BATCHES, min_batches=MIN_TIMED_BATCHES,
                                min_seconds=FLAGS.seconds)
      rounds[f"{workers}x{threads}"].append(record)
      print(f"round {repeat + 1}: {workers} workers x {threads} threads: {record['images_per_second']:6.1f} img/s, "
            f"{record['cpu_seconds_per_image'] * 1e3:5.2f} CPU ms/img, {record['busy_cores']:.2f} cores busy "
            f"(others {record['other_busy_cores']:.2f}, load {record['load_average_before']:.1f})", flush=True)
  summary = {}
  for name, records in rounds.items():
    summary[name] = {key: statistics.median(r[key] for r in records)
                     for key in ("images_per_second", "cpu_seconds_per_image", "busy_cores", "other_busy_cores",
                                 "shared_memory_peak_bytes", "first_batch_seconds")}
  baseline = summary["0x1"]["images_per_second"] if "0x1" in summary else None
  with_workers = [name for name in summary if not name.startswith("0x")]
  # The pipeline's cost per image with workers (their transfers included): the median over those settings.
  per_image = statistics.median(summary[name]["cpu_seconds_per_image"] for name in with_workers) if with_workers \
      else summary[min(summary)]["cpu_seconds_per_image"]
  per_core = 1.0 / per_image
  derived = {"images_per_second_per_core": per_core,
             "cores_for_target": TARGET_IMAGES_PER_SECOND / per_core,
             "target_images_per_second": TARGET_IMAGES_PER_SECOND,
             "how": "per-core rate = 1 / median CPU seconds per image over the settings with workers (training "
                    "process + workers); cores = target / per-core rate. Derived, not measured on a GPU host."}
  for values in summary.values():
    if baseline:
      values["over_one_thread"] = values["images_per_second"] / baseline
  return {**harness.provenance(),
          "load_average_at_end": os.getloadavg(), "data": data,
          "pipeline": {"recipe": RECIPE, "batch": FLAGS.batch,
                       "prefetch_batches": config.data.prefetch_batches, "seconds_per_measurement": FLAGS.seconds,
                       "warmup_batches": WARMUP_BATCHES, "repeats": FLAGS.repeats},
          "settings": summary, "rounds": rounds, "derived": derived}


def main(argv):
  del argv
  cli.configure_logging()
  if FLAGS.repeats < 1 or FLAGS.batch < 1 or FLAGS.seconds <= 0 or FLAGS.examples < 1:
    cli.fail("--repeats, --batch, --examples and --seconds must be positive")
  if FLAGS.data_dir:
    payload = measure_all(FLAGS.data_dir)
  else:
    with tempfile.TemporaryDirectory(prefix="cnnjax-pipeline-") as root:
      payload = measure_all(root)
  from cnnjax.lab.bench import harness, pipeline  # pylint: disable=import-outside-toplevel
  print(pipeline.markdown_table(dict(sorted(payload["settings"].items()))))  # the table docs/performance.md quotes
  derived = payload["derived"]
  print(f"one core: {derived['images_per_second_per_core']:.0f} img/s; derived: {derived['cores_for_target']:.1f} "
        f"cores for {TARGET_IMAGES_PER_SECOND} img/s")
  harness.write_results(FLAGS.json, payload)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.one_line_flags_parser)
