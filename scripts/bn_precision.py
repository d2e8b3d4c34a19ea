"""BatchNorm precision against float64 when channel means are large against their spread.

Command:
  python scripts/bn_precision.py [--json=OUT.json]
Expected: one line per mean/std ratio (10, 100, 300, 1000) with the relative
error max |y - y64| / max |y64| of the train-mode output, for every statistics
grouping (one group, ghost groups, a group across 8 vmapped devices, sub-groups
of 2 devices), and torch float32 where PyTorch is installed; docs/parallel.md
quotes a run. Both grow about linearly with mean/std, from
about 3e-7 at 10 to 3.5e-5 (cnnjax) and 1.9e-5 (torch) at 1,000.
Cost: a few seconds on a CPU.
"""

import argparse
import json

from cnnjax.lab.bench import bn_precision


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default="", help="also write the records here")
  args = parser.parse_args()
  records = bn_precision.precision_table()
  for record in records:
    torch_error = record["torch_float32"]
    print(f"mean/std {record['mean_over_std']:>5}: cnnjax max {record['cnnjax_max']:.1e} "
          f"(one group {record['one_group']:.1e}, ghost {record['ghost_groups']:.1e}, "
          f"across devices {record['across_devices']:.1e}, device sub-groups {record['device_sub_groups']:.1e})"
          f"  torch float32 {'not installed' if torch_error is None else f'{torch_error:.1e}'}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(records, f, indent=2)


if __name__ == "__main__":
  main()
