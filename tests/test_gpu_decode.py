"""The GPU decoder's plan and work (cnnjax.data.gpu_decode) on the CPU: the plan hands the decoder the host
path's examples, windows, labels and draws (a CPU decoder in the GPU's place gives the host path's batches bit
for bit); the canvas path's pixels are within the stated tolerance of the host decoder's; data.decoder's choice
and its one-line errors; a corrupt JPEG is the host path's DataError. nvImageCodec's CPU backend is tested
where the package is installed (`pip install 'cnnjax[cuda]'`), else the test is skipped saying so."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from cnnjax.data import Augment, Preprocess, ProcessSlice, eval_dataset, gpu_decode, iterate, train_dataset
from cnnjax.data.sources import EncodedImageSource
from cnnjax.errors import ConfigError, DataError
from cnnjax import parallel
from cnnjax.train.experiment import build as experiment_build
from helpers import experiment_config, tiny
from test_decode import jpeg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
SIZES = [(48, 64), (64, 40), (90, 120), (37, 53), (120, 80), (64, 64), (33, 97), (100, 75)]
# Mean absolute difference, in uint8 levels, allowed between the canvas path (region decoded at full scale,
# resampled within it) and the host decoder (DCT-scaled decode, resampled within the whole image).
CANVAS_LEVELS = 3.0


def encoded_source(images):
  records = [{"image": data, "label": i % 3} for i, data in enumerate(images)]
  return EncodedImageSource(decoded=records, encoded=records, channels=3)


@pytest.fixture(scope="module")
def source():
  return encoded_source([jpeg(h, w, seed) for seed, (h, w) in enumerate(SIZES)])


def preprocess(random_resized_crop=True):
  return Preprocess(image_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3, seed=5,
                    random_resized_crop=random_resized_crop, augment=Augment(flip=True, crop_padding=2))


def device_decoder(decode, devices=2):
  return gpu_decode.DeviceDecoder(jax.local_devices()[:devices], SIZE, 3, decode)


def batches(source, prep, plan_only, steps=3, rows=4):
  train = train_dataset(source, prep, seed=5, batch=ProcessSlice(rows), num_steps=steps, plan_only=plan_only)
  evaluation = eval_dataset(source, prep, batch=ProcessSlice(rows), plan_only=plan_only)
  return [train[k] for k in range(steps)] + [evaluation[k] for k in range(len(evaluation))]


@pytest.mark.parametrize("random_resized_crop", [True, False])
def test_the_plan_hands_the_decoder_the_host_paths_examples_and_windows(source, random_resized_crop):
  prep = preprocess(random_resized_crop)
  host = batches(source, prep, plan_only=False)
  plans = batches(source, prep, plan_only=True)
  decode = device_decoder(gpu_decode.host_windows)
  for reference, plan in zip(host, plans):
    assert "input" not in plan and set(gpu_decode.PLAN_KEYS) <= set(plan)
    batch = decode(plan)
    assert set(batch) == set(reference)
    assert isinstance(batch["input"], jax.Array) and len(batch["input"].sharding.device_set) == 2
    for key, value in reference.items():
      np.testing.assert_array_equal(np.asarray(batch[key]), value, err_msg=key)
  # The device stage finishes a decoded batch as it finishes a host batch.
  finished = prep.finish({k: np.asarray(v) for k, v in decode(plans[0]).items()})
  np.testing.assert_array_equal(finished[0], prep.finish(host[0])[0])


def test_decoded_batches_keep_the_plans_state_and_resume_where_they_say(source):
  prep = preprocess()
  dataset = train_dataset(source, prep, seed=5, batch=ProcessSlice(4), num_steps=4, plan_only=True)
  decoded = gpu_decode.DecodedBatches(iterate(dataset, num_threads=2, prefetch=2), device_decoder(gpu_decode.host_windows))
  with decoded:
    first = [np.asarray(next(decoded)["input"]) for _ in range(3)]
    assert decoded.get_state() == {"next_index": 3}
    decoded.set_state({"next_index": 1})
    np.testing.assert_array_equal(np.asarray(next(decoded)["input"]), first[1])


def test_the_canvas_path_is_within_the_stated_tolerance_of_the_host_decoder(source):
  prep = preprocess()
  host = batches(source, prep, plan_only=False)
  decode = device_decoder(gpu_decode.canvas_windows(gpu_decode.pil_regions))
  worst = 0.0
  for reference, plan in zip(host, batches(source, prep, plan_only=True)):
    got = np.asarray(decode(plan)["input"]).astype(float)
    worst = max(worst, float(np.abs(got - reference["input"]).mean()))
  print(f"canvas path vs host decoder: mean |difference| {worst:.2f} uint8 levels (worst batch)")
  assert worst < CANVAS_LEVELS


def test_a_window_resampled_on_the_canvas_equals_the_host_resize_of_the_same_pixels():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
  window = (3.5, 7.25, 30.0, 36.5)  # fractional, as shorter_side_window gives
  box, within = gpu_decode.regions(np.asarray([window]), np.asarray([[40, 50]]))
  top, left, bottom, right = box[0]
  canvas = np.zeros((1, 64, 64, 3), np.uint8)
  canvas[0, :bottom - top, :right - left] = pixels[top:bottom, left:right]
  extents = np.asarray([[bottom - top, right - left]], np.float32)
  got = np.asarray(gpu_decode.resize_windows(canvas, within, extents, size=SIZE))[0].astype(float)
  pil_box = (window[1], window[0], window[1] + window[3], window[0] + window[2])
  expected = np.asarray(Image.fromarray(pixels).resize((SIZE, SIZE), Image.BILINEAR, box=pil_box)).astype(float)
  # Inside the region the two resamplers agree to rounding; PIL may reach past the region's edge.
  assert np.abs(got - expected)[2:-2, 2:-2].max() <= 1.0
  assert np.abs(got - expected).mean() < 1.0


def test_a_region_ends_within_its_image():
  # A window computed in floating point may end a hair past its image's edge.
  box, _ = gpu_decode.regions(np.asarray([[0.0, 10.5, 64.00000000001, 20.0]]), np.asarray([[64, 40]]))
  assert box.tolist() == [[0, 10, 64, 31]]


def test_canvas_sides_take_few_values():
  sides = {gpu_decode.canvas_side(n) for n in range(1, 2049)}
  assert sides == {64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048}
  assert all(gpu_decode.canvas_side(n) >= n for n in range(1, 2049))


def corrupt_source():
  good = jpeg(64, 64)
  return encoded_source([good, good[:len(good) // 3], good, good])


@pytest.mark.parametrize("decode", [gpu_decode.host_windows, gpu_decode.canvas_windows(gpu_decode.pil_regions)],
                         ids=["host_windows", "canvas"])
def test_a_corrupt_jpeg_is_the_host_paths_data_error(decode):
  prep = preprocess()

  def first(dataset, decoder=None):
    # Through the threaded pipeline, as a run reads it: the error in the training process, not a crash in a thread.
    batches = iterate(dataset, num_threads=2, prefetch=2)
    with batches if decoder is None else gpu_decode.DecodedBatches(batches, decoder) as it:
      return next(it)

  options = dict(seed=5, batch=ProcessSlice(4), num_steps=2)
  with pytest.raises(DataError, match="cannot be decoded") as host_error:
    first(train_dataset(corrupt_source(), prep, **options))
  with pytest.raises(DataError, match="cannot be decoded") as gpu_error:
    first(train_dataset(corrupt_source(), prep, plan_only=True, **options), device_decoder(decode))
  assert str(host_error.value).startswith("an image of the dataset cannot be decoded (")
  assert str(gpu_error.value).startswith("an image of the dataset cannot be decoded (")
  # A header that does not parse is found by the plan, on the host, as on the host path.
  with pytest.raises(DataError, match="cannot be decoded"):
    first(train_dataset(encoded_source([b"not a jpeg"] * 4), prep, plan_only=True, **options))


def nvimgcodec_or_skip():
  if not gpu_decode.package_available():
    pytest.skip(f"nvImageCodec is not installed ({gpu_decode.INSTALL}; CI does not install it)")


def test_nvimgcodec_cpu_backend_decodes_the_planned_regions(source):
  nvimgcodec_or_skip()
  prep = preprocess()
  host = batches(source, prep, plan_only=False)
  reference = device_decoder(gpu_decode.canvas_windows(gpu_decode.pil_regions))
  decode = device_decoder(gpu_decode.canvas_windows(gpu_decode.NvImageCodecRegions(cpu=True)))
  for expected, plan in zip(host, batches(source, prep, plan_only=True)):
    got = np.asarray(decode(plan)["input"])
    # libjpeg-turbo in both: the regions are PIL's pixels, so the canvas path's output exactly.
    np.testing.assert_array_equal(got, np.asarray(reference(plan)["input"]))
    assert np.abs(got.astype(float) - expected["input"]).mean() < CANVAS_LEVELS
  with pytest.raises(DataError, match="cannot be decoded"):
    decode(batches(corrupt_source(), prep, plan_only=True, steps=1)[0])
  # A version that decodes only into buffers of its own: its images are copied into the canvas.
  regions = gpu_decode.NvImageCodecRegions(cpu=True)
  own = regions._decoder(jax.local_devices()[0])  # pylint: disable=protected-access

  class OwnBuffersOnly:
    def decode(self, streams, images=None, **options):
      if images is not None:
        raise RuntimeError("no external buffers")
      return own.decode(streams, **options)

  regions._decoders[jax.local_devices()[0]] = OwnBuffersOnly()  # pylint: disable=protected-access
  copied = device_decoder(gpu_decode.canvas_windows(regions), devices=1)
  plan = batches(source, prep, plan_only=True)[0]
  np.testing.assert_array_equal(np.asarray(copied(plan)["input"]), np.asarray(reference(plan)["input"]))


# Mean absolute difference, in uint8 levels, allowed between nvJPEG on the GPU and libjpeg-turbo (nvImageCodec's
# CPU backend) decoding the same regions: two IDCT implementations and chroma upsamplings.
NVJPEG_LEVELS = 2.0


def test_nvimgcodec_on_the_gpu_decodes_as_its_cpu_backend(source):
  """Runs on an NVIDIA GPU only (the GPU check's GPU tests)."""
  nvimgcodec_or_skip()
  gpus = [device for device in jax.devices() if device.platform == "gpu"]
  if not gpus:
    pytest.skip("no GPU here: this test runs in the GPU check (scripts/gpu_check.sh)")
  prep = preprocess()
  on_gpu = gpu_decode.DeviceDecoder(gpus[:1], SIZE, 3, gpu_decode.gpu_windows())
  on_cpu = gpu_decode.DeviceDecoder(gpus[:1], SIZE, 3, gpu_decode.canvas_windows(
      gpu_decode.NvImageCodecRegions(cpu=True)))
  for plan in batches(source, prep, plan_only=True):
    got = on_gpu(plan)["input"]
    assert got.devices() == {gpus[0]} and got.dtype == np.uint8
    difference = np.abs(np.asarray(got).astype(float) - np.asarray(on_cpu(plan)["input"]))
    print(f"nvJPEG vs libjpeg-turbo: mean |difference| {difference.mean():.2f}, max {difference.max():.0f} levels")
    assert difference.mean() < NVJPEG_LEVELS
  with pytest.raises(DataError, match="cannot be decoded"):
    on_gpu(batches(corrupt_source(), prep, plan_only=True, steps=1)[0])


def test_the_decoder_choice():
  choose = gpu_decode.choose
  assert choose("host", platform="gpu", device_kind="NVIDIA H200", decodes=True) == ("host", "as set")
  assert choose("auto", platform="cpu", device_kind="cpu", decodes=True) == ("host", "auto: no NVIDIA GPU")
  assert choose("auto", platform="gpu", device_kind="NVIDIA H200", decodes=False)[0] == "host"
  with pytest.raises(ConfigError, match="decodes on an NVIDIA GPU|pip install 'cnnjax\\[cuda\\]'"):
    choose("gpu", platform="cpu", device_kind="cpu", decodes=True)


def test_the_decoder_choice_with_the_package(monkeypatch):
  monkeypatch.setattr(gpu_decode, "package_available", lambda: True)
  choose = gpu_decode.choose
  assert choose("auto", platform="gpu", device_kind="NVIDIA H200", decodes=True) == (
      "gpu", "auto: NVIDIA GPU and nvImageCodec")
  assert choose("auto", platform="gpu", device_kind="AMD Instinct MI300X", decodes=True)[0] == "host"
  with pytest.raises(ConfigError, match="this run's devices are cpu"):
    choose("gpu", platform="cpu", device_kind="cpu", decodes=True)
  with pytest.raises(ConfigError, match="held decoded"):
    choose("gpu", platform="gpu", device_kind="NVIDIA H200", decodes=False)


def test_the_decoder_choice_without_the_package(monkeypatch):
  monkeypatch.setattr(gpu_decode, "package_available", lambda: False)
  assert gpu_decode.choose("auto", platform="gpu", device_kind="NVIDIA H200", decodes=True) == (
      "host", "auto: nvImageCodec not installed (pip install 'cnnjax[cuda]')")
  with pytest.raises(ConfigError, match="not installed; run pip install 'cnnjax\\[cuda\\]'"):
    gpu_decode.choose("gpu", platform="gpu", device_kind="NVIDIA H200", decodes=True)


@pytest.mark.parametrize("package", [False, True], ids=["no_package", "no_gpu"])
def test_decoder_gpu_here_is_a_one_line_error_exit_2_and_nothing_written(tmp_path, package):
  env = dict(os.environ)
  if package:  # an importable stand-in for nvImageCodec: what remains missing is the GPU
    os.makedirs(tmp_path / "fake" / "nvidia" / "nvimgcodec")
    (tmp_path / "fake" / "nvidia" / "nvimgcodec" / "__init__.py").write_text("")
    env["PYTHONPATH"] = str(tmp_path / "fake") + os.pathsep + env.get("PYTHONPATH", "")
  elif gpu_decode.package_available():
    pytest.skip("nvImageCodec is installed here, so its absence cannot be shown")
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "cnnjax.main", "--config=experiments/lenet5_digits.py", f"--workdir={workdir}",
       "--config.data.decoder=gpu", "--config.num_train_steps=1"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and "data.decoder=gpu" in lines[0], result.stderr
  expected = "this run's devices are cpu" if package else "pip install 'cnnjax[cuda]'"
  assert expected in lines[0] and "Traceback" not in result.stderr
  assert not workdir.exists()


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
  from cnnjax.lab.bench import datasets  # pylint: disable=import-outside-toplevel
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  datasets.prepare_imagenet_jpeg(data_dir, num_train=32, num_eval=8)
  return data_dir


def imagenet_config(data_dir, **overrides):
  return tiny(experiment_config("resnet50_imagenet"), **{
      "model.name": "simple_cnn", "data.tfds_data_dir": data_dir, "data.image_size": SIZE, "batch_size": 16,
      "num_train_steps": 2, "eval_every_steps": 0, "parallel.strategy": "jit", **overrides})


def test_a_run_feeds_the_gpu_decoders_batches_as_the_host_decoders(imagenet_dir, monkeypatch):
  host = experiment_build(imagenet_config(imagenet_dir))
  assert host.decoder == ("host", "auto: no NVIDIA GPU")
  assert "images decoded on the host (auto: no NVIDIA GPU)" in host.describe()
  # The GPU path (plan in grain's threads, decode in the training process, a jax.Array on the 8 devices) with
  # the host decoder in nvImageCodec's place: the same batches, the same model inputs.
  monkeypatch.setattr(gpu_decode, "choose", lambda *a, **k: ("gpu", "a CPU decoder in the GPU's place"))
  monkeypatch.setattr(gpu_decode, "gpu_windows", lambda: gpu_decode.host_windows)
  gpu = experiment_build(imagenet_config(imagenet_dir))
  assert "images decoded on the gpu (a CPU decoder in the GPU's place)" in gpu.describe()
  assert "decoding" not in gpu.host_workers()[2]  # the host only plans: no worker processes for decoding
  for feeds in ((host.train_batches(), gpu.train_batches()), (host.eval_batches(), gpu.eval_batches())):
    with feeds[0], feeds[1]:
      for expected, got in zip(*feeds):
        assert isinstance(got["input"], jax.Array)
        for key, value in expected.items():
          np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=key)
  np.testing.assert_array_equal(np.asarray(gpu.model_inputs(got)), np.asarray(host.model_inputs(expected)))
  # The loop places a decoded batch as it places a host batch (jit: as it is; pmap: a device axis added).
  for strategy in ("jit", "pmap"):
    host = experiment_build(imagenet_config(imagenet_dir, **{"parallel.strategy": strategy}))
    gpu = experiment_build(imagenet_config(imagenet_dir, **{"parallel.strategy": strategy}))
    with host.train_batches() as host_feed, gpu.train_batches() as gpu_feed:
      expected, got = (feed.strategy.put_batch(parallel.device_part(next(batches)))
                       for feed, batches in ((host, host_feed), (gpu, gpu_feed)))
    assert got["input"].sharding.is_equivalent_to(expected["input"].sharding, got["input"].ndim), strategy
    np.testing.assert_array_equal(np.asarray(got["input"]), np.asarray(expected["input"]))


def test_a_run_may_resume_with_the_other_decoder():
  from cnnjax import config as config_lib  # pylint: disable=import-outside-toplevel
  saved, resumed = experiment_config("resnet50_imagenet"), experiment_config("resnet50_imagenet", **{
      "data.decoder": "gpu"})
  assert config_lib.fingerprint(saved) == config_lib.fingerprint(resumed)
  assert config_lib.resume_differences(config_lib.as_json(saved), resumed) == []
  with pytest.raises(ConfigError, match="data.decoder"):
    config_lib.validate(experiment_config("resnet50_imagenet", **{"data.decoder": "nvjpeg"}))
