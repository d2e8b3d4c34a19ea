"""Starting JAX's multi-process runtime (`jax.distributed`).

Explicit flags (`--coordinator_address`, `--num_processes`, `--process_id`) start
it on any machines; with no flags, a cluster that JAX recognizes by itself (SLURM
with several tasks, Open MPI, Cloud TPU pods) starts it too; otherwise the run is
single-process.
"""

from __future__ import annotations

import os

import jax

from cnnjax.errors import DistributedError

# Seconds a process waits for its peers at start-up.
INITIALIZATION_TIMEOUT_SECONDS = 120
# Default seconds without a heartbeat before a peer counts as dead and the others stop.
DEFAULT_PEER_TIMEOUT_SECONDS = 60


def cluster_detected() -> bool:
  """Whether the environment describes a multi-process job that JAX can join by itself."""
  env = os.environ
  return (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               peer_timeout_seconds: int = DEFAULT_PEER_TIMEOUT_SECONDS) -> None:
  """Starts jax.distributed from explicit flags or a detected cluster; does nothing otherwise.

  A process that loses a peer (no heartbeat for `peer_timeout_seconds`) is stopped
  by JAX's coordination service instead of waiting forever in a collective.
  """
  timeouts = dict(initialization_timeout=INITIALIZATION_TIMEOUT_SECONDS,
                  heartbeat_timeout_seconds=peer_timeout_seconds,
                  shutdown_timeout_seconds=peer_timeout_seconds)
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise DistributedError("a multi-process run needs all of --coordinator_address, --num_processes "
                             "and --process_id")
    if not 0 <= process_id < num_processes:
      raise DistributedError(f"--process_id={process_id} must be in [0, {num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **timeouts)
  elif cluster_detected():
    jax.distributed.initialize(**timeouts)
