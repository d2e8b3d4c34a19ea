"""Timing the host input pipeline: images per second, and CPU time per image over the training process
and its data worker processes.

Images per second is what a training step sees; on a machine shared with other
work it moves with their load. CPU seconds per image (user and system time of
this process, all its threads included, plus that of every worker process) is
the pipeline's own cost: its inverse is the images one core prepares per
second, which says how many cores a given rate needs. Worker CPU time is read
from /proc (Linux); elsewhere it is left out and the result says so.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import time
from typing import Any

# POSIX shared memory made by Python's multiprocessing.shared_memory (grain's batches from workers).
SHARED_MEMORY_GLOB = "/dev/shm/psm_*"


def _worker_cpu_seconds(pids: list[int]) -> float | None:
  """User + system CPU seconds of processes `pids` so far (None where /proc is not available)."""
  ticks_per_second = os.sysconf("SC_CLK_TCK")
  total = 0
  for pid in pids:
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      return None
    total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
  return total / ticks_per_second


def _machine_busy_seconds() -> float | None:
  """Busy CPU seconds of the whole machine so far, all cores (None where /proc is not available)."""
  try:
    with open("/proc/stat") as f:
      ticks = [int(value) for value in f.readline().split()[1:]]
  except OSError:
    return None
  idle = ticks[3] + ticks[4]  # idle, iowait
  return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def _shared_memory_bytes() -> int:
  total = 0
  for path in glob.glob(SHARED_MEMORY_GLOB):
    try:
      total += os.path.getsize(path)
    except OSError:
      pass  # freed while listing
  return total


def measure(batches: Any, batch_size: int, *, warmup_batches: int, min_batches: int,
            min_seconds: float) -> dict[str, Any]:
  """Times `batches` (an iterator of the pipeline, closed at the end) after `warmup_batches`, over at
  least `min_batches` batches and `min_seconds` seconds.

  Returns images per second, CPU seconds per image (this process and its worker
  processes), the cores kept busy on average, the workers' share of the CPU
  time, the most shared memory seen in use, the cores that other programs kept
  busy meanwhile, the load average before and after, and the first batch's
  wait (worker start-up included).
  """
  with batches:
    start = time.perf_counter()
    next(batches)
    first_batch_seconds = time.perf_counter() - start
    for _ in range(warmup_batches):
      next(batches)
    workers = [process.pid for process in multiprocessing.active_children()]
    load_before = os.getloadavg()[0]
    machine_start = _machine_busy_seconds()
    worker_cpu_start = _worker_cpu_seconds(workers)
    cpu_start, start, count, shared_peak = time.process_time(), time.perf_counter(), 0, 0
    while count < min_batches or time.perf_counter() - start < min_seconds:
      next(batches)
      count += 1
      if workers:  # listing /dev/shm costs more than a small image's batch
        shared_peak = max(shared_peak, _shared_memory_bytes())
    wall = time.perf_counter() - start
    own_cpu = time.process_time() - cpu_start
    worker_cpu_end = _worker_cpu_seconds(workers)
    machine_end = _machine_busy_seconds()
    load_after = os.getloadavg()[0]
  worker_cpu = (None if worker_cpu_start is None or worker_cpu_end is None
                else worker_cpu_end - worker_cpu_start)
  images = count * batch_size
  cpu = own_cpu + (worker_cpu or 0.0)
  # What else ran meanwhile: the machine's busy cores less the pipeline's own.
  others = (None if machine_start is None or machine_end is None
            else (machine_end - machine_start - cpu) / wall)
  return {"images_per_second": images / wall, "cpu_seconds_per_image": cpu / images,
          "busy_cores": cpu / wall, "worker_cpu_fraction": None if worker_cpu is None else worker_cpu / cpu,
          "worker_cpu_counted": worker_cpu is not None, "worker_processes": len(workers),
          "timed_batches": count, "timed_seconds": wall, "first_batch_seconds": first_batch_seconds,
          "shared_memory_peak_bytes": shared_peak, "other_busy_cores": others,
          "load_average_before": load_before, "load_average_after": load_after}


def setting_label(name: str) -> str:
  """'0x2' -> '2 threads', '2x1' -> '2 worker processes' (WxT: W workers of T threads; W=0: in-process)."""
  workers, threads = (int(part) for part in name.split("x"))
  if workers == 0:
    return f"{threads} thread{'s' if threads > 1 else ''}"
  each = f" of {threads} threads" if threads > 1 else ""
  return f"{workers} worker process{'es' if workers > 1 else ''}{each}"


def markdown_table(settings: dict[str, dict[str, Any]]) -> str:
  """The table docs/performance.md quotes from a `scripts/bench_pipeline.py` JSON's `settings`."""
  rows = ["| setting | images/s | x one thread | CPU ms per image |", "|---|---|---|---|"]
  for name, values in settings.items():
    rows.append(f"| {setting_label(name)} | {values['images_per_second']:.0f} | "
                f"{values.get('over_one_thread', 1.0):.2f} | {values['cpu_seconds_per_image'] * 1e3:.2f} |")
  return "\n".join(rows)
