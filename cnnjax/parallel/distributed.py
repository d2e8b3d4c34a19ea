"""Starting JAX's multi-process runtime (`jax.distributed`).

Explicit flags (`--coordinator_address`, `--num_processes`, `--process_id`) start
it on any machines; with no flags, a cluster that JAX recognizes by itself (SLURM
with several tasks, Open MPI, Cloud TPU pods) starts it too; otherwise the run is
single-process.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

import jax

from cnnjax.errors import EXIT_USER_ERROR, DistributedError, one_line

# JAX's own start-up deadline lies this many seconds beyond --peer_timeout_seconds (ours ends first).
STARTUP_GRACE_SECONDS = 30
# Default seconds without a heartbeat before a peer counts as dead and the others stop.
DEFAULT_PEER_TIMEOUT_SECONDS = 60


def cluster_detected() -> bool:
  """Whether the environment describes a multi-process job that JAX can join by itself."""
  env = os.environ
  return (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def check_coordinator_port(coordinator_address: str) -> None:
  """Raises DistributedError when process 0 cannot serve on the coordinator's port (another program
  listens there). JAX's own failure to bind leaves a half-started service that crashes at exit."""
  host, _, port = coordinator_address.rpartition(":")
  if not port.isdigit():
    raise DistributedError(f"--coordinator_address={coordinator_address} needs the form HOST:PORT")
  for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
    try:
      probe = socket.socket(family)
    except OSError:
      continue  # this host has no such address family (IPv6 disabled)
    with probe:
      try:
        probe.bind((address, int(port)))
      except OSError as e:
        raise DistributedError(f"the coordinator port {port} is in use on this host ({e.strerror}); pick a free "
                               f"port in --coordinator_address={host or 'HOST'}:PORT for every process") from None


def _give_up_waiting(coordinator_address: str, num_processes: int, process_id: int, seconds: int) -> None:
  """Ends the process with one line when the other processes never came (JAX would abort with a trace)."""
  print("error: " + one_line(
      f"process {process_id} waited {seconds} s at {coordinator_address} for the other "
      f"{num_processes - 1} of {num_processes} processes, which did not all connect; start every process with "
      "the same --coordinator_address and --num_processes and its own --process_id (0 listens), or raise "
      "--peer_timeout_seconds"), file=sys.stderr, flush=True)
  os._exit(EXIT_USER_ERROR)  # pylint: disable=protected-access  (no JAX shutdown: it would wait for the peers)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               peer_timeout_seconds: int = DEFAULT_PEER_TIMEOUT_SECONDS) -> None:
  """Starts jax.distributed from explicit flags or a detected cluster; does nothing otherwise.

  The processes must all connect within `peer_timeout_seconds`, or each ends
  with a one-line error (exit status 2). A process that later loses a peer (no
  heartbeat for `peer_timeout_seconds`) is stopped by JAX's coordination
  service instead of waiting forever in a collective.
  """
  # JAX's own start-up deadline stays beyond ours, so that our one-line error comes first.
  timeouts = dict(initialization_timeout=peer_timeout_seconds + STARTUP_GRACE_SECONDS,
                  heartbeat_timeout_seconds=peer_timeout_seconds,
                  shutdown_timeout_seconds=peer_timeout_seconds)
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise DistributedError("a multi-process run needs all of --coordinator_address, --num_processes "
                             "and --process_id")
    if not 0 <= process_id < num_processes:
      raise DistributedError(f"--process_id={process_id} must be in [0, {num_processes})")
    if peer_timeout_seconds <= 0:
      raise DistributedError(f"--peer_timeout_seconds={peer_timeout_seconds} must be positive")
    if process_id == 0:
      check_coordinator_port(coordinator_address)
    watchdog = threading.Timer(peer_timeout_seconds, _give_up_waiting,
                               args=(coordinator_address, num_processes, process_id, peer_timeout_seconds))
    watchdog.daemon = True
    watchdog.start()
    try:
      jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                 process_id=process_id, **timeouts)
    except Exception as e:  # pylint: disable=broad-except  (JAX's runtime errors on a failed start-up)
      raise DistributedError(f"process {process_id} could not join the run at {coordinator_address} "
                             f"({' '.join(str(e).split())[:200]}); check the address and that every process "
                             "runs the same command") from None
    finally:
      watchdog.cancel()
  elif cluster_detected():
    jax.distributed.initialize(**timeouts)
