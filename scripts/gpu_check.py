"""The GPU check: cnnjax on one GPU, next to PyTorch, in one JSON file and a log (cnnjax.lab.bench.gpu_check).

Command (on the GPU machine, through scripts/gpu_check.sh, which installs the
carried wheels first):
  bash scripts/gpu_check.sh [--json=gpu_check.json] [--log=gpu_check.log] [--budget_seconds=540] [--dry_run]
                            [--sections=throughput,full_run,gpu_decode,gpu_tests,torch_compiled,bn_sync,simulated_tests]
Expected: the GPU and package versions; ResNet-50 (batch 256, 224x224, bfloat16)
and ResNet-20 (batch 512, 32x32) images per second, compile time and peak device
memory, next to PyTorch (bf16 autocast, channels_last, eager and torch.compile)
with the ratios and the issue's goals; whole runs (ResNet-20 on CIFAR-shaped
arrays, ResNet-50 on synthetic JPEGs) against their bare steps and a PyTorch
DataLoader peer; the JPEG run with the host decoder and the GPU decoder (nvImageCodec)
side by side, with the host CPU ms per image of each; the GPU subset of the tests; bn_sync
global against local (none on one GPU; the 8-simulated-device measure beside it).
Cost: under 10 minutes on one H100 (the budget cuts what does not fit, and says
so in the JSON); --dry_run, tiny sizes on any host: about 2 minutes on 2 CPU cores.
"""

import argparse

from cnnjax.lab.bench import gpu_check


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default="gpu_check.json", help="where to write the results")
  parser.add_argument("--log", default="gpu_check.log", help="where to write the log (children's output too)")
  parser.add_argument("--budget_seconds", type=float, default=gpu_check.DEFAULT_BUDGET_SECONDS,
                      help="wall-clock budget; sections that do not fit are recorded as skipped")
  parser.add_argument("--dry_run", action="store_true", help="tiny sizes on any backend (what the CPU test runs)")
  parser.add_argument("--sections", default=",".join(gpu_check.SECTIONS),
                      help="comma-separated parts to run (a rerun of what failed): " + ", ".join(gpu_check.SECTIONS))
  args = parser.parse_args()
  if args.budget_seconds <= 0:
    parser.error(f"--budget_seconds={args.budget_seconds} must be positive")
  sections = tuple(name for name in args.sections.split(",") if name)
  try:
    gpu_check.check_sections(sections)
  except ValueError as e:
    parser.error(f"--sections: {e}")
  gpu_check.run(args.json, args.log, dry_run=args.dry_run, budget_seconds=args.budget_seconds, sections=sections)


if __name__ == "__main__":
  main()
