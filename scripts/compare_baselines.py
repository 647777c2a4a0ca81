r"""Trains the paper's model and the AGW and CAJ baselines on the synthetic set in SYSU-MM01's
layout, with one budget, and writes their side-by-side table into docs/results.md.

  python scripts/compare_baselines.py --workdir runs/compare                 # the demo budget
  python scripts/compare_baselines.py --workdir /tmp/cmp --preset tiny --synthetic tiny \
      --results /tmp/cmp/results.md -- --config.num_train_steps=2           # a smoke test

1. Writes `synthetic_mm/<--synthetic>` as JPEG files in SYSU-MM01's layout
   (scripts/export_synthetic.py) to WORKDIR/synthetic_sysu, unless it is there already.
2. Runs `python -m mmreid_jax.main` for each method (`METHODS`: configs/sysu_mm01.py,
   configs/agw_sysu_mm01.py, configs/caj_sysu_mm01.py at preset --preset) in WORKDIR/<method>,
   through the real `sysu_mm01` builder (TFDS files in WORKDIR/tfds) and its official protocols.
   The presets give every method the same network size, image size, optimizer, batch of
   P x K tuples and number of steps; flags after `--` go to every run. A rerun resumes
   unfinished runs and re-evaluates finished ones without training again.
3. Reads each WORKDIR/<method>/eval/sysu_mm01.json and writes the table (mean and standard
   deviation over SYSU-MM01's 10 gallery trials) into --results between the markers
   `<!-- compare_baselines:begin -->` and `<!-- compare_baselines:end -->` (the rest of the
   file is kept; a missing file is created with the markers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# method -> (config file in configs/, what it is)
METHODS: dict[str, tuple[str, str]] = {
    "paper": ("sysu_mm01.py", "the paper's model (joint attention, three-branch fusion, four "
              "losses, min-max)"),
    "agw": ("agw_sysu_mm01.py", "AGW (non-local, GeM, BNNeck, ID + WRT)"),
    "caj": ("caj_sysu_mm01.py", "CAJ (AGW + channel-exchange view + random erasing)"),
}
PROTOCOLS = ("sysu/all-search/single-shot", "sysu/indoor-search/single-shot")
BEGIN, END = "<!-- compare_baselines:begin -->", "<!-- compare_baselines:end -->"


def export_layout(output: Path, synthetic: str) -> None:
  """Writes the synthetic set in SYSU-MM01's layout to `output` unless it is complete there."""
  if (output / "exp" / "test_id.txt").is_file():
    print(f"Reusing {output}", flush=True)
    return
  if output.exists() and any(output.iterdir()):
    raise SystemExit(f"{output} holds an incomplete export (no exp/test_id.txt); delete it and "
                     "rerun.")
  subprocess.run([sys.executable, str(REPO / "scripts" / "export_synthetic.py"), "--layout",
                  "sysu_mm01", "--config", synthetic, "--output", str(output)], check=True)


def run_method(method: str, preset: str, workdir: Path, layout: Path, data_dir: Path,
               extra: list[str]) -> float:
  """Trains (resuming) and evaluates one method; returns the wall time in seconds."""
  config_file, _ = METHODS[method]
  command = [sys.executable, "-m", "mmreid_jax.main",
             "--config", f"{REPO / 'configs' / config_file}:{preset}",
             "--workdir", str(workdir / method),
             f"--config.data.manual_dir={layout}", f"--config.data.data_dir={data_dir}", *extra]
  print("$ " + " ".join(command), flush=True)
  start = time.time()
  subprocess.run(command, check=True, cwd=REPO)
  return time.time() - start


def _rate(entry: dict, key: str) -> str:
  std = entry.get("std", {}).get(key)
  return f"{100 * entry[key]:.1f}" + (f" ± {100 * std:.1f}" if std else "")


def results_table(workdir: Path, methods: list[str], preset: str, synthetic: str,
                  seconds: dict[str, float]) -> str:
  """The markdown table of the methods' reports (and the raw-pixel baseline of the first)."""
  reports = {}
  for method in methods:
    path = workdir / method / "eval" / "sysu_mm01.json"
    if not path.is_file():
      raise SystemExit(f"No report {path}: the {method} run did not finish.")
    reports[method] = json.loads(path.read_text())
  header = ["method", "config", "steps"] + [
      f"{p.split('/')[1]} {rate}" for p in PROTOCOLS for rate in ("Rank-1", "mAP", "mINP")]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 6) + "|"]
  for method, report in reports.items():
    cells = [METHODS[method][1], f"`configs/{METHODS[method][0]}:{preset}`", str(report["step"])]
    for protocol in PROTOCOLS:
      entry = report["protocols"][protocol]
      cells += [_rate(entry, "rank1"), _rate(entry, "mAP"), _rate(entry, "mINP")]
    lines.append("| " + " | ".join(cells) + " |")
  raw = next(iter(reports.values())).get("baselines", {}).get("raw_pixel")
  if raw:
    cells = ["raw pixels (cosine)", "-", "-"]
    for protocol in PROTOCOLS:
      cells += [_rate(raw[protocol], "rank1"), _rate(raw[protocol], "mAP"),
                _rate(raw[protocol], "mINP")]
    lines.append("| " + " | ".join(cells) + " |")
  timing = ", ".join(f"{m} {seconds[m] / 60:.0f} min" for m in methods if m in seconds)
  notes = [f"`synthetic_mm/{synthetic}` in SYSU-MM01's layout through the `sysu_mm01` builder; "
           f"preset `{preset}` for every method; percentages, mean ± standard deviation over "
           "the 10 gallery trials (single-shot).",
           f"Written by `python scripts/compare_baselines.py --preset {preset} --synthetic "
           f"{synthetic}` on {time.strftime('%Y-%m-%d')}"
           + (f"; wall time of this invocation (training and evaluation): {timing}." if timing
              else ".")]
  return "\n".join(lines + [""] + notes)


def write_results(path: Path, table: str) -> None:
  """Puts `table` between the markers of `path` (created with them if missing)."""
  block = f"{BEGIN}\n{table}\n{END}"
  if path.is_file():
    text = path.read_text()
    if BEGIN in text and END in text:
      text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
      text = text.rstrip("\n") + "\n\n" + block + "\n"
  else:
    text = f"# Baselines on the synthetic set\n\n{block}\n"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  ours = argv[:argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, type=Path,
                      help="Folder for the exported layout, TFDS files and one run per method.")
  parser.add_argument("--preset", default="demo", choices=("demo", "tiny", "paper"),
                      help="The configs' preset, the same for every method (default demo).")
  parser.add_argument("--synthetic", default="demo", choices=("tiny", "demo", "hard"),
                      help="The synthetic_mm config to export (default demo).")
  parser.add_argument("--methods", default=",".join(METHODS),
                      help=f"Comma-separated subset of {list(METHODS)}.")
  parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md",
                      help="Markdown file whose table to write (default docs/results.md).")
  args = parser.parse_args(ours)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    parser.error(f"--methods: unknown {unknown}; expected a subset of {list(METHODS)}.")
  workdir = args.workdir.resolve()
  layout = workdir / "synthetic_sysu"
  export_layout(layout, args.synthetic)
  seconds = {m: run_method(m, args.preset, workdir, layout, workdir / "tfds", extra)
             for m in methods}
  write_results(args.results, results_table(workdir, methods, args.preset, args.synthetic,
                                            seconds))
  print(f"Wrote the table to {args.results}")
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.exit(main())
