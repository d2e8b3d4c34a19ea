"""The benchmark: cnnjax train steps next to PyTorch and the machine's matmul peak, in one run.

Command:
  python scripts/benchmark.py [--quick] --json=OUT.json [--no_torch]
PyTorch (the reference) is an optional extra: pip install '.[torch]'.
Expected: one line per case (model x batch x strategy x dtype) with images per
second, step time, compile time, fraction of the float32 matmul peak, the input
pipeline's speed over the step's, and PyTorch's eager and channels_last images
per second for the same model and batch (float32, one process, all cores) with
the ratios; the same in the JSON
(`cases`, one object per case). The README's "Performance" section shows a real run.
Cost: --quick under 5 minutes on 2 CPU cores; the full run (224x224 ResNet-18/50,
every strategy and dtype) about an hour there.

On a GPU host (`pip install -e . 'jax[cuda12]'` and a CUDA build of PyTorch),
the same command writes the same JSON: single-device cases use the first GPU,
multi-device cases all local GPUs (the simulated-device flag only affects
JAX's CPU platform), the PyTorch reference runs on the first GPU, and each
record names its `backend` and `torch_device`.
"""

import argparse
import json
import sys

from cnnjax.bench import harness


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", required=True, help="where to write the results")
  parser.add_argument("--quick", action="store_true", help="small ImageNet inputs and fewer cases")
  parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
  parser.add_argument("--warmup_steps", type=int, default=2)
  parser.add_argument("--timed_steps", type=int, default=None, help="default: 5 with --quick, 10 otherwise")
  args = parser.parse_args()
  if args.warmup_steps < 0 or (args.timed_steps is not None and args.timed_steps < 1):
    parser.error("--warmup_steps must be >= 0 and --timed_steps >= 1")
  timed = args.timed_steps or (5 if args.quick else 10)
  payload = harness.benchmark(harness.cases(args.quick), quick=args.quick, torch_reference=not args.no_torch,
                              warmup_steps=args.warmup_steps, timed_steps=timed,
                              progress=lambda line: print(line, flush=True))
  with open(args.json, "w") as f:
    json.dump(payload, f, indent=2)
  failed = [c for c in payload["cases"] if "error" in c]
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
