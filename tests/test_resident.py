"""Feeding the devices: splits resident on the devices, the device stage of preprocessing, and a loop that
reads the devices only where it logs, evaluates or checkpoints (cnnjax.data.resident, cnnjax.train.loop)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import parallel, train
from cnnjax.data import Augment, Preprocess, ProcessSlice, train_dataset
from cnnjax.data import resident
from cnnjax.data.sources import ArraySource
from cnnjax.errors import ConfigError, NonFiniteError, Preempted
from cnnjax.data import shapes
from cnnjax.train import loop as loop_lib
from cnnjax.train import step as step_lib
from cnnjax.train.experiment import build as experiment_build
from cnnjax.train.population import run_population
from cnnjax.train.preemption import Preemption
from helpers import checkpoint_steps, experiment_config, read_jsonl, run_cli, tiny

STRATEGIES = ("none", "pmap", "shard_map", "jit")


def augmented_config(**overrides):
  """LeNet-5 on the digits with every device-stage operation: resize 8 -> 32, rotation, crop and flip."""
  return tiny(experiment_config("lenet5_digits"), **{"batch_size": 32, "data.crop_padding": 2, "data.flip": True,
                                                     **overrides})


def finished(preprocess, batch, *, on_device):
  """Model inputs and labels of a host-stage batch, finished in NumPy or on the device."""
  if not on_device:
    return preprocess.finish(batch)
  fn = jax.jit(lambda b: preprocess.finish(b, xp=jnp, per_example=resident.per_example))
  return jax.tree.map(np.asarray, fn({k: v for k, v in batch.items() if k != "index"}))


def test_the_device_stage_equals_the_host_stage():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (24, 8, 8, 3)).astype(np.uint8)
  source = ArraySource(images, rng.integers(0, 10, 24))
  stats = dict(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
  exact = Preprocess(image_size=0, augment=Augment(crop_padding=2, flip=True), seed=1, **stats)
  batch = train_dataset(source, exact, seed=1, batch=ProcessSlice(24), num_steps=1)[0]
  host, device = finished(exact, batch, on_device=False), finished(exact, batch, on_device=True)
  np.testing.assert_array_equal(host[0], device[0])  # crop and flip move pixels: bit-identical
  np.testing.assert_array_equal(host[1], device[1])
  blended = Preprocess(image_size=32, augment=Augment(crop_padding=2, flip=True, rotation_degrees=15), seed=1,
                       **stats)
  batch = train_dataset(source, blended, seed=1, batch=ProcessSlice(24), num_steps=1)[0]
  host, device = finished(blended, batch, on_device=False), finished(blended, batch, on_device=True)
  assert host[0].shape == (24, 32, 32, 3)
  # Resizing and rotation blend pixels in float32: NumPy and XLA may round differently.
  np.testing.assert_allclose(host[0], device[0], atol=1e-4)

  _, masks = shapes.generate_shapes(8, seed=1)
  segments = shapes.SegmentationArraySource(np.repeat((masks * 60)[..., None], 3, -1).astype(np.uint8), masks)
  rotated = Preprocess(image_size=0, mean=(0.0,), std=(1 / 255.0,), task="segmentation",
                       augment=Augment(crop_padding=4, flip=True, rotation_degrees=30))
  batch = train_dataset(segments, rotated, seed=0, batch=ProcessSlice(8), num_steps=1)[0]
  host, device = finished(rotated, batch, on_device=False), finished(rotated, batch, on_device=True)
  # Nearest-neighbour masks: a point on a pixel boundary may round either way.
  assert np.mean(host[1] == device[1]) > 0.999


def test_host_and_device_placement_train_identically_on_every_strategy(tmp_path, tfds_data_dir):
  for strategy in STRATEGIES:
    summaries = {}
    for placement in ("host", "device"):
      config = augmented_config(**{"parallel.strategy": strategy, "data.placement": placement})
      summaries[placement] = train.run(config, str(tmp_path / f"{strategy}-{placement}"))
    assert summaries["host"]["param_checksum"] == summaries["device"]["param_checksum"], strategy
    assert summaries["host"]["train_loss"] == summaries["device"]["train_loss"], strategy
    assert summaries["host"]["eval_loss"] == summaries["device"]["eval_loss"], strategy


def test_a_population_trains_the_same_with_its_data_on_the_devices(tmp_path, tfds_data_dir):
  outcomes = {}
  for placement in ("host", "device"):
    configs = [augmented_config(**{"seed": seed, "data.placement": placement}) for seed in (0, 1)]
    workdirs = [str(tmp_path / placement / str(seed)) for seed in (0, 1)]
    outcomes[placement] = [summary["param_checksum"] for summary in run_population(configs, workdirs)]
  assert outcomes["host"] == outcomes["device"] and len(set(outcomes["host"])) == 2


def test_auto_places_what_fits_and_a_forced_placement_that_cannot_be_honoured_is_one_line(tmp_path, tfds_data_dir):
  exp = train.build(augmented_config())
  assert exp.data_placement.train_on_device and exp.data_placement.eval_on_device
  assert "data on the device (train and eval)" in exp.describe()
  over = train.build(augmented_config(**{"data.device_megabytes": 0}))
  assert not over.data_placement.train_on_device and "exceeds data.device_megabytes=0" in over.describe()
  with pytest.raises(ConfigError, match=r"data.placement=device, but .* takes 0\.\d MB on every device memory "
                                        r"\(8 devices sharing one memory\), over data.device_megabytes=0"):
    train.build(augmented_config(**{"data.device_megabytes": 0, "data.placement": "device"}))
  with pytest.raises(ConfigError, match="random_resized_crop crops each decoded image on the host"):
    train.build(augmented_config(**{"data.random_resized_crop": True, "data.image_size": 32,
                                    "data.placement": "device"}))
  workdir = tmp_path / "run"
  result = run_cli("cnnjax.main", "--config=experiments/lenet5_digits.py", f"--workdir={workdir}",
                   "--config.data.placement=device", "--config.data.device_megabytes=0",
)
  assert result.returncode == 2 and result.stderr.strip().startswith("error: data.placement=device"), result.stderr
  assert len(result.stderr.strip().splitlines()) == 1 and not (workdir.exists() and any(workdir.iterdir()))


def poisoned_build(bad_step):
  """`train.build` whose train step reports step `bad_step` (counted from 1) as non-finite."""
  def build(config, **kwargs):
    exp = experiment_build(config, **kwargs)

    def step(state, batch, data=None, **options):
      new_state, metrics = exp.train_step(state, batch, data, **options)
      bad = state.step == bad_step - 1
      return new_state, {**metrics, "loss": jnp.where(bad, jnp.nan, metrics["loss"]),
                         "finite": jnp.where(bad, 0.0, metrics["finite"])}
    return dataclasses.replace(exp, train_step=step)
  return build


@pytest.mark.parametrize("placement, per_dispatch", [("host", 0), ("device", 4)])
def test_a_non_finite_step_is_reported_as_its_own_step(tmp_path, tfds_data_dir, monkeypatch, placement,
                                                        per_dispatch):
  config = augmented_config(**{"num_train_steps": 20, "log_every_steps": 10, "checkpoint_every_steps": 5,
                               "parallel.strategy": "none", "data.placement": placement,
                               "parallel.steps_per_dispatch": per_dispatch})
  monkeypatch.setattr(loop_lib, "build", poisoned_build(7))
  with pytest.raises(NonFiniteError, match=r"non-finite at step 7 \(loss=nan.*the last good checkpoint is kept"):
    train.run(config, str(tmp_path / "late"))
  assert checkpoint_steps(tmp_path / "late") == [5]
  monkeypatch.setattr(loop_lib, "build", poisoned_build(3))
  with pytest.raises(NonFiniteError, match=r"non-finite at step 3 .*no checkpoint was written before it"):
    train.run(config, str(tmp_path / "early"))
  assert checkpoint_steps(tmp_path / "early") == []


class StopAt(Preemption):
  """A stop requested (as SIGTERM would) once the loop has done `step` steps."""

  def __init__(self, step):
    super().__init__()
    self.step = step

  def reached(self, step, checkpointer):
    super().reached(step, checkpointer)
    if step >= self.step:
      self.signum = 15
    return self.signum is not None


def test_a_stop_saves_the_dispatch_just_done_and_resumes_bit_identically(tmp_path, tfds_data_dir):
  """Several steps per dispatch: the stop saves where the dispatch ended, and the rerun ends bit-identical,
  logged points included; a rerun with another logging interval (dispatches that end elsewhere) ends
  bit-identical too."""
  config = augmented_config(**{"num_train_steps": 12, "log_every_steps": 3, "checkpoint_every_steps": 100,
                               "parallel.strategy": "none", "data.placement": "device",
                               "parallel.steps_per_dispatch": 4})
  reference = train.run(config, str(tmp_path / "uninterrupted"))
  with pytest.raises(Preempted, match="at step 8"):
    train.run(config, str(tmp_path / "stopped"), preemption=StopAt(7))
  assert checkpoint_steps(tmp_path / "stopped") == [8]
  with pytest.raises(Preempted, match="at step 8"):
    train.run(config, str(tmp_path / "relogged"), preemption=StopAt(7))
  resumed = train.run(config, str(tmp_path / "stopped"))
  assert resumed["param_checksum"] == reference["param_checksum"]
  points = [read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("uninterrupted", "stopped")]
  strip = lambda records: [{k: v for k, v in r.items() if k != "examples_per_second"} for r in records]  # noqa: E731
  assert strip(points[0]) == strip(points[1])
  config.log_every_steps = 5  # dispatches now end at 10 (and 9 no more): from 8, at 10 and 12
  assert train.run(config, str(tmp_path / "relogged"))["param_checksum"] == reference["param_checksum"]


def test_a_run_started_with_its_data_on_the_host_resumes_with_it_on_the_devices(tmp_path, tfds_data_dir):
  host = augmented_config(**{"num_train_steps": 8, "checkpoint_every_steps": 100, "data.placement": "host",
                             "parallel.strategy": "none"})
  reference = train.run(host, str(tmp_path / "uninterrupted"))
  with pytest.raises(Preempted, match="at step 4"):
    train.run(host, str(tmp_path / "moved"), preemption=StopAt(4))
  device = augmented_config(**{"num_train_steps": 8, "checkpoint_every_steps": 100, "data.placement": "device",
                               "parallel.strategy": "none"})
  assert train.run(device, str(tmp_path / "moved"))["param_checksum"] == reference["param_checksum"]


def test_the_loop_reads_the_devices_only_where_it_logs_or_checkpoints_and_places_batches_ahead(
    tmp_path, tfds_data_dir, monkeypatch):
  events = []
  original_outputs, original_put = parallel.SingleEngine.outputs, parallel.SingleEngine.put_batch
  original_compile = parallel.SingleEngine.compile_train_step

  def outputs(self, device_outputs):
    if "bad_step" in device_outputs:
      events.append("read")
    return original_outputs(self, device_outputs)

  def put_batch(self, batches):
    events.append("put")
    return original_put(self, batches)

  def compile_train_step(self, *args):
    compiled = original_compile(self, *args)

    def dispatch(carry, batch):
      events.append("step")
      return compiled(carry, batch)
    return dispatch

  monkeypatch.setattr(parallel.SingleEngine, "outputs", outputs)
  monkeypatch.setattr(parallel.SingleEngine, "put_batch", put_batch)
  monkeypatch.setattr(parallel.SingleEngine, "compile_train_step", compile_train_step)
  config = augmented_config(**{"num_train_steps": 20, "log_every_steps": 10, "checkpoint_every_steps": 20,
                               "parallel.strategy": "none", "data.placement": "host"})
  train.run(config, str(tmp_path))
  assert events.count("step") == 20 and events.count("read") == 2  # at step 10 (log) and 20 (log, save)
  for index in range(20):
    before = events[:[i for i, e in enumerate(events) if e == "step"][index]]
    assert before.count("put") == min(index + loop_lib.DEVICE_PREFETCH, 20)


def test_several_cpu_devices_run_one_program_at_a_time(tmp_path, tfds_data_dir, monkeypatch):
  # XLA's CPU client deadlocks collectives when programs queue on several CPU devices (a flaky abort that
  # took a LeNet-5 run on 8 devices); one device, or an accelerator, queues freely.
  devices = jax.devices()
  assert len(devices) == 8 and parallel.waits_for_each_program(devices)
  assert not parallel.waits_for_each_program(devices[:1])
  previous, queued = [], {"train": 0, "eval": 0}
  original_compile, original_eval = parallel.SingleEngine.compile_train_step, parallel.SingleEngine.eval_step_fn

  def watched(kind, compiled):
    def dispatch(*args):
      queued[kind] += any(not leaf.is_ready() for leaf in jax.tree.leaves(previous))
      previous[:] = [compiled(*args)]
      return previous[0]
    return dispatch

  monkeypatch.setattr(parallel.SingleEngine, "compile_train_step",
                      lambda self, *args: watched("train", original_compile(self, *args)))
  monkeypatch.setattr(parallel.SingleEngine, "eval_step_fn",
                      lambda self, data=None: watched("eval", original_eval(self, data)))
  config = augmented_config(**{"num_train_steps": 12, "log_every_steps": 6, "checkpoint_every_steps": 12,
                               "eval_every_steps": 6, "parallel.strategy": "jit"})
  train.run(config, str(tmp_path))
  assert queued == {"train": 0, "eval": 0}


def test_steps_per_dispatch_and_where_dispatches_end():
  config = experiment_config("lenet5_digits")  # logs every 50 steps, checkpoints every 200
  assert loop_lib.steps_per_dispatch(config, False, "gpu") == 1
  assert loop_lib.steps_per_dispatch(config, True, "cpu") == 1
  assert loop_lib.steps_per_dispatch(config, True, "gpu") == loop_lib.MAX_AUTO_STEPS_PER_DISPATCH
  config.parallel.steps_per_dispatch = 7
  assert loop_lib.steps_per_dispatch(config, True, "cpu") == 7
  dispatches = step_lib.Dispatches(per_dispatch=4, total_steps=30, intervals=(6, 0), marks=(9,))
  firsts = (0, 4, 6, 8, 9, 28)
  assert [int(dispatches.end(first)) for first in firsts] == [4, 6, 8, 9, 12, 30]
  on_device = jax.jit(lambda first: dispatches.end(first, jnp))
  assert [int(on_device(jnp.int32(first))) for first in firsts] == [4, 6, 8, 9, 12, 30]
