"""What the command-line entry points share: flag parsing with one-line errors, multi-process flags,
preemption signals, and the run-and-report wrapper around `cnnjax.train.run`.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from typing import Any, Callable, Sequence

from absl import flags

from cnnjax.errors import (DISK_FULL_TEXTS, EXIT_STATUS_BASE, EXIT_USER_ERROR, CnnjaxError, DiskFullError,
                           Preempted, UnreadableCheckpointError, is_disk_full, one_line)

EXIT_PEER_LOST = 3
# errno values of a file this user may not write: permission bits, an immutable file, a read-only mount.
NO_ACCESS_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)
# absl's help flags, which print the usage and exit with status 1 (absl's choice); asked-for help is no error.
HELP_FLAGS = ("-h", "--help", "-?", "--helpshort", "--helpfull", "--helpxml")


def fail(message: str) -> None:
  """Prints `error: message` as one line on stderr (`errors.one_line`: control characters escaped) and exits
  with status 2."""
  print(f"error: {one_line(message)}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def one_line_flags_parser(argv: Sequence[str]) -> list[str]:
  """absl's parser, but a bad flag or config override is one line and exit status 2."""
  try:
    remaining = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
      flags.FLAGS.config.keys()  # config_flags defers load errors to the first access
    return remaining
  except SystemExit:
    if any(arg in HELP_FLAGS for arg in argv[1:]):
      sys.exit(0)
    raise
  except Exception as e:  # pylint: disable=broad-except  (any parse failure is the user's input)
    fail(_diagnose_config_flags(argv) or (str(e).strip().splitlines() or [type(e).__name__])[0])
  return []


def _diagnose_config_flags(argv: Sequence[str]) -> str | None:
  """Names the config file or `--config.a.b` override that cannot apply, with the fix."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  config_path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_path is None:
    return None
  config_path = config_path.split(":", 1)[0]
  if not os.path.isfile(config_path):
    return f"config file {config_path!r} does not exist; pass --config=experiments/NAME.py"
  try:
    spec = importlib.util.spec_from_file_location("_cnnjax_config_check", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    return f"config file {config_path!r} failed to load: {type(e).__name__}: {e}"
  return _diagnose_overrides(config, argv)


def _diagnose_overrides(config: Any, argv: Sequence[str]) -> str | None:
  """Names the first `--config.a.b=value` of `argv` that `config` has no key for or whose value does not
  fit the key's type, with the fix."""
  from cnnjax.config import lookup  # pylint: disable=import-outside-toplevel  (only when parsing failed)
  from cnnjax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  for arg in argv:
    if not arg.startswith("--config.") or "=" not in arg:
      continue
    path, value = arg[len("--config."):].split("=", 1)
    try:
      node = lookup(config, path)
    except ConfigError as e:
      where = str(e).split("; ", 1)
      return f"{where[0]} in {arg}; {where[1]}"
    expected = type(node).__name__
    if isinstance(node, bool) and value.lower() not in ("true", "false", "1", "0"):
      return f"{arg}: config.{path} expects a bool (true/false), got {value!r}"
    if isinstance(node, (int, float)) and not isinstance(node, bool):
      try:
        float(value) if isinstance(node, float) else int(value)
      except ValueError:
        return f"{arg}: config.{path} expects {expected}, got {value!r}"
  return None


def define_distributed_flags() -> None:
  flags.DEFINE_string("coordinator_address", None,
                      "HOST:PORT of process 0 for a multi-process run (jax.distributed).")
  flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
  flags.DEFINE_integer("peer_timeout_seconds", 60,
                       "Seconds without a heartbeat after which a peer process counts as dead and the run stops.")


def define_device_flags() -> None:
  flags.DEFINE_integer("simulate_devices", -1,
                       "CPU devices to start with (XLA's --xla_force_host_platform_device_count): N, or -1 to let "
                       "cnnjax choose (on a CPU host, the count measured fastest for the model when "
                       "parallel.strategy=auto and parallel.num_devices=0; one otherwise). A count already in "
                       "XLA_FLAGS wins. Accelerator hosts are not affected.")
  flags.DEFINE_bool("deterministic", True,
                    "On a GPU, XLA's deterministic kernels (--xla_gpu_deterministic_ops), so that reruns and "
                    "resumes are bit-identical; --nodeterministic takes the fastest kernels instead. CPUs are "
                    "deterministic either way. A value already in XLA_FLAGS wins.")


def define_run_reading_flags() -> None:
  """The flags of the tools that read a trained run back (evaluate, predict, export): its directory and
  which checkpoint."""
  flags.DEFINE_string("workdir", None, "The run's directory (what python -m cnnjax.main was given).")
  flags.DEFINE_integer("step", None, "The checkpoint's step (default: the newest, or the best with "
                       "--checkpoint=best).")
  flags.DEFINE_enum("checkpoint", "latest", ["latest", "best"],
                    "Without --step: the newest checkpoint, or the best-scoring one kept by keep_best_metric.")


def check_checkpoint_flags(values: Any) -> None:
  """One line and exit status 2 when both --step and --checkpoint=best are given."""
  if values.step is not None and values.checkpoint == "best":
    fail("give either --step=N or --checkpoint=best, not both")


def configure_host_devices(simulate_devices: int, config: Any, *, sweep: bool = False,
                           deterministic: bool = True) -> Any:
  """Sets the CPU device count and GPU determinism before JAX starts (see `cnnjax.parallel.host_devices`);
  returns what they are.
  `config` (a run's; None for other tools) says whether the run leaves its devices to cnnjax, and for
  which model; a sweep spreads its trials over `SWEEP_CPU_DEVICES`."""
  from cnnjax.parallel import host_devices  # pylint: disable=import-outside-toplevel
  try:
    leaves = sweep or (config.parallel.strategy == "auto" and not config.parallel.num_devices)
    model = config.model.name
  except (AttributeError, KeyError):
    leaves, model = False, ""  # not a cnnjax config: validation names the problem once JAX is up
  try:
    return host_devices.configure(simulate_devices, leaves_devices_to_cnnjax=leaves, model=model,
                                  automatic_count=host_devices.SWEEP_CPU_DEVICES if sweep else None,
                                  deterministic_gpu=deterministic)
  except ValueError as e:
    fail(str(e))


def distributed_flags(values: Any) -> dict[str, Any]:
  return dict(coordinator_address=values.coordinator_address, num_processes=values.num_processes,
              process_id=values.process_id, peer_timeout_seconds=values.peer_timeout_seconds)


def configure_logging() -> None:
  """cnnjax's own progress lines on stderr; libraries (orbax, TFDS, JAX) only from warnings up."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.WARNING)
  # TFDS warns on every run that it decodes PNGs with PIL rather than OpenCV: expected here. Looking for an
  # unprepared dataset, it warns of a variant folder without dataset_info.json, which cnnjax's one-line
  # error explains. orbax warns that a checkpoint directory opened only to read (cnnjax.evaluate) is read
  # only. A full disk makes orbax's writer threads log their tracebacks; cnnjax reports it in one line
  # instead.
  quiet = ("OpenCV is not installed", "has no dataset_info.json", "Given directory is read only") + DISK_FULL_TEXTS
  logging.getLogger("absl").addFilter(lambda record: not any(text in record.getMessage() for text in quiet))
  sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
  logger = logging.getLogger("cnnjax")
  if not logger.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False


def _quiet_closed_loop(hook: Callable[[Any], Any]) -> Callable[[Any], Any]:
  """`hook` (sys.unraisablehook) but silent on 'Event loop is closed': after a failed read of a damaged
  checkpoint, tensorstore's threads still finish the other reads of it and report, through the hook,
  that orbax's event loop for them has closed."""
  def unraisablehook(unraisable):
    if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
      hook(unraisable)
  return unraisablehook


def run_reporting_errors(fn: Callable[[], Any]) -> Any:
  """Runs fn; a CnnjaxError, a full disk, an unreadable checkpoint or a file this user may not write
  becomes one line on stderr and exit status 2, a preemption (SIGTERM, SIGINT) one line and exit status
  128 + the signal."""
  try:
    return fn()
  except (DiskFullError, UnreadableCheckpointError) as e:
    stop_at_once(str(e))
  except CnnjaxError as e:
    fail(str(e))
  except Preempted as stop:
    print(f"{stop}; every step trained is saved, rerun the same command to resume", file=sys.stderr,
          flush=True)
    sys.exit(stop.exit_status)
  except KeyboardInterrupt:
    # Ctrl-C outside training (starting up, or writing results), where the handlers are not installed.
    print("stopped by SIGINT outside training; every step trained is saved, rerun the same command to go on",
          file=sys.stderr, flush=True)
    sys.exit(EXIT_STATUS_BASE + signal.SIGINT)
  except OSError as e:
    if e.errno in NO_ACCESS_ERRNOS and (e.filename2 or e.filename):
      # A file made read-only (or immutable, or on a read-only mount) after the run's checks.
      fail(f"{e.filename2 or e.filename}: {e.strerror}; make it writable for this user (chmod u+w), or use "
           "another --workdir")
    if not is_disk_full(e):
      raise
    stop_at_once(f"the disk is full ({e.filename or e}); checkpoints are written atomically, so the last good one "
                 "is kept; free space and rerun the same command to resume from it")


def stop_at_once(message: str) -> None:
  """Prints `error: message` and exits with status 2 without Python's shutdown, whose cleanup of a
  checkpoint write that failed half-way prints tracebacks from orbax's threads (the partial write is
  a temporary directory that the next run removes)."""
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(EXIT_USER_ERROR)  # pylint: disable=protected-access


def run_training(config: Any, workdir: str, distributed: dict[str, Any], *, fresh: bool = False,
                 simulate_devices: int = -1, deterministic: bool = True) -> dict[str, Any]:
  """Sets the CPU devices, starts jax.distributed if asked, trains, and prints the final numbers."""
  configure_logging()
  host = configure_host_devices(simulate_devices, config, deterministic=deterministic)
  from cnnjax.parallel import distributed as distributed_lib  # pylint: disable=import-outside-toplevel
  from cnnjax.train import Preemption, run  # pylint: disable=import-outside-toplevel  (jax after flags)
  from cnnjax.train.rundir import check_workdir  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel

  def go():
    check_workdir(workdir)
    distributed_lib.initialize(**distributed)
    try:
      with Preemption().handling() as preemption:
        return run(config, workdir, fresh=fresh, preemption=preemption, host=host)
    except jax.errors.JaxRuntimeError as e:
      if jax.process_count() == 1:
        raise
      # A collective failed because a peer process died. Exit now: JAX's shutdown barrier at
      # exit would wait for the dead peer and then abort with a long trace.
      print(f"error: process {jax.process_index()} lost a peer process of this {jax.process_count()}-process run "
            f"({one_line(e)[:200]}); rerun every process with the same command to resume from "
            "the last complete checkpoint", file=sys.stderr, flush=True)
      os._exit(EXIT_PEER_LOST)  # pylint: disable=protected-access

  summary = run_reporting_errors(go)
  if jax.process_index() == 0:
    print(f"eval_accuracy={summary['eval_accuracy']:.4f} eval_loss={summary['eval_loss']:.4f} "
          f"step={summary['step']} examples_per_second={summary['examples_per_second']:.0f} "
          f"wall_seconds={summary['wall_seconds']:.1f} workdir={workdir}")
  return summary


def run_config_flags_parser(argv: Sequence[str]) -> list[str]:
  """`one_line_flags_parser` for the tools that read a run back (evaluate, predict): `--config.a.b=value`
  overrides apply to the config saved by the run in `--workdir` (defined here, once the workdir is
  known). Where it holds no run, the schema's defaults stand in, and the tool names the problem."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  from cnnjax.config import base_config  # pylint: disable=import-outside-toplevel
  from cnnjax.errors import CnnjaxError as Error  # pylint: disable=import-outside-toplevel
  from cnnjax.train.restore import load_config  # pylint: disable=import-outside-toplevel
  workdir = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--workdir=")), None)
  if workdir is None and "--workdir" in argv[:-1]:
    workdir = argv[list(argv).index("--workdir") + 1]
  try:
    config = load_config(workdir) if workdir is not None else base_config()
  except Error:
    config = base_config()
  problem = _diagnose_overrides(config, argv)
  if problem:
    fail(problem)
  try:  # config_flags reads the overrides in sys.argv as it defines the flag
    config_flags.DEFINE_config_dict("config", config, "The run's config, from its config.json; override keys "
                                    "with --config.a.b=value (e.g. --config.data.eval_split=train).",
                                    lock_config=True)
  except Exception as e:  # pylint: disable=broad-except  (any parse failure is the user's input)
    fail((str(e).strip().splitlines() or [type(e).__name__])[0])
  return one_line_flags_parser(argv)
