"""BatchNorm precision against float64 when channel means are large against their spread.

Command:
  python scripts/bn_precision.py [--json=docs/results/notes/bn_precision.json]
Expected: one line per mean/std ratio (10, 100, 300, 1000) with the relative
error max |y - y64| / max |y64| of the train-mode output, for every statistics
grouping (one group, ghost groups, a group across 8 vmapped devices, sub-groups
of 2 devices), for the plain one-pass E[x^2] - E[x]^2 (flax's BatchNorm), and
for torch float32 where PyTorch is installed; then the table docs/parallel.md
quotes. cnnjax's error (every grouping) and torch's grow about linearly with
mean/std and stay within a small factor of each other; the one-pass form's grows
faster, above cnnjax's at every ratio and further above it the larger the ratio.
Result: docs/results/notes/bn_precision.json (every ratio's errors, the input
shape, the script's wall-clock seconds, the command, commit and machine).
"""

import argparse
import os
import time

from cnnjax.lab.bench import bn_precision, harness


def main() -> None:
  start = time.monotonic()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default=os.path.join("docs", "results", "notes", "bn_precision.json"),
                      help="where to write the records")
  args = parser.parse_args()
  records = bn_precision.precision_table()
  for record in records:
    torch_error = record["torch_float32"]
    print(f"mean/std {record['mean_over_std']:>5}: cnnjax max {record['cnnjax_max']:.1e} "
          f"(one group {record['one_group']:.1e}, ghost {record['ghost_groups']:.1e}, "
          f"across devices {record['across_devices']:.1e}, device sub-groups {record['device_sub_groups']:.1e})"
          f"  one-pass {record['one_pass_float32']:.1e}"
          f"  torch float32 {'not installed' if torch_error is None else f'{torch_error:.1e}'}")
  print(bn_precision.markdown_table(records))
  harness.write_results(args.json, {
      **harness.provenance(), "shape": list(bn_precision.SHAPE), "devices": bn_precision.DEVICES,
      "ghost_group": bn_precision.GHOST_GROUP, "device_sub_group": bn_precision.DEVICE_SUB_GROUP,
      "epsilon": bn_precision.EPSILON, "records": records, "wall_seconds": time.monotonic() - start})


if __name__ == "__main__":
  main()
