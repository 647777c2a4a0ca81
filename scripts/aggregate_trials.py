r"""Aggregates the evaluation reports of separately trained runs (RegDB's ten trials) into one.

  python scripts/aggregate_trials.py --output runs/regdb/eval/regdb.json \
      runs/regdb/trial_*/eval/regdb.json

Every protocol's rates become the mean over the runs, with `trials` (the number of runs) and the
standard deviation of rank1, mAP and mINP (DESIGN.md section 8); the table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mmreid_jax import evaluate


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("reports", nargs="+", help="WORKDIR/eval/<dataset>.json of each run.")
  parser.add_argument("--output", required=True, help="Where to write the aggregated JSON.")
  args = parser.parse_args(argv)
  reports = []
  for path in args.reports:
    try:
      with open(path) as f:
        reports.append(json.load(f))
    except FileNotFoundError:
      parser.error(f"report {path} does not exist; did that run finish its evaluation?")
  aggregated = evaluate.aggregate_reports(reports)
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump(aggregated, f, indent=2)
  print(evaluate.format_table(aggregated))
  print(f"Aggregated the reports of {len(reports)} run(s) into {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
