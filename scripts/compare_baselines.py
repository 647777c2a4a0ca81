r"""Trains the paper's model and the AGW and CAJ baselines on the synthetic set in SYSU-MM01's
layout, with one budget, and writes their side-by-side table into docs/results.md.

  python scripts/compare_baselines.py --workdir runs/compare                 # the demo budget
  python scripts/compare_baselines.py --workdir runs/compare_fair --seeds 3 --images-per-step 96 \
      --methods paper,agw,agw_exact,caj                                      # issue 20's table
  python scripts/compare_baselines.py --workdir /tmp/cmp --preset tiny --synthetic tiny \
      --results /tmp/cmp/results.md -- --config.num_train_steps=2           # a smoke test

1. Writes `synthetic_mm/<--synthetic>` as JPEG files in SYSU-MM01's layout
   (scripts/export_synthetic.py) to WORKDIR/synthetic_sysu, unless it is there already.
2. Runs `python -m mmreid_jax.main` for each method (`METHODS`: configs/sysu_mm01.py,
   configs/agw_sysu_mm01.py (twice: with AGW's WRT normaliser and with the exact softmax),
   configs/caj_sysu_mm01.py at preset --preset) and each seed in WORKDIR/<method>/seed<S>,
   through the real `sysu_mm01` builder (TFDS files in WORKDIR/tfds) and its official protocols.
   The presets give every method the same network size, image size, optimizer, batch of
   P x K tuples and number of steps. With --images-per-step N, each method's K (tuples per
   identity) is set so that P x K x (images per tuple) = N, images per tuple being the present
   images the losses see: 1 for the paper's demo recipe (one modality per tuple), 2 for AGW (RGB
   and infrared), 3 for CAJ (plus the channel-exchanged RGB view); the network, steps and
   learning rate stay the preset's. Flags after `--` go to every run. A rerun resumes unfinished
   runs and re-evaluates finished ones without training again.
3. Reads each WORKDIR/<method>/seed<S>/eval/sysu_mm01.json and writes the table into --results
   between the markers `<!-- compare_baselines:begin -->` and `<!-- compare_baselines:end -->`
   (the rest of the file is kept; a missing file is created with the markers): with one seed,
   mean and standard deviation over SYSU-MM01's 10 gallery trials; with several, mean and
   standard deviation (ddof 0) over seeds of each seed's 10-trial mean.
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
# method -> (config file in configs/, what it is, overrides of that config)
METHODS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "paper": ("sysu_mm01.py", "the paper's model (joint attention, three-branch fusion, four "
              "losses, min-max)", ()),
    "agw": ("agw_sysu_mm01.py", "AGW (non-local, GeM, BNNeck, ID + WRT)", ()),
    "agw_exact": ("agw_sysu_mm01.py", "AGW with the exact softmax in WRT (no 1e-6 normaliser)",
                  ("--config.loss.wrt_agw_normaliser=False",)),
    "caj": ("caj_sysu_mm01.py", "CAJ (AGW + channel-exchange view + random erasing + adaptive "
            "triplet)", ()),
}
SYSU_MODALITIES = ("rgb", "ir")
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


def tuples_per_identity(method: str, preset: str, images_per_step: int) -> int:
  """K such that the method's P x K tuples hold `images_per_step` present images per step.

  Raises:
    SystemExit: `images_per_step` is not a multiple of P x (images per tuple).
  """
  from mmreid_jax import config_lib  # pylint: disable=import-outside-toplevel
  from mmreid_jax.data import pipeline  # pylint: disable=import-outside-toplevel

  config_file, _, _ = METHODS[method]
  config = config_lib.load_config_file(REPO / "configs" / config_file, preset)
  slots = len(pipeline.training_slots(SYSU_MODALITIES, config.augment))
  single = config.data.single_modality_frac
  if single not in (0.0, 1.0):
    raise SystemExit(f"{method}: single_modality_frac={single} gives a random number of images "
                     "per tuple; --images-per-step needs 0 or 1.")
  per_tuple = 1 if single == 1.0 else slots
  per_identity, remainder = divmod(images_per_step, config.data.num_identities * per_tuple)
  if remainder or not per_identity:
    raise SystemExit(f"--images-per-step {images_per_step} is not a multiple of {method}'s "
                     f"P x images per tuple = {config.data.num_identities} x {per_tuple}.")
  return per_identity


def run_method(method: str, preset: str, rundir: Path, layout: Path, data_dir: Path,
               extra: list[str]) -> float:
  """Trains (resuming) and evaluates one method in `rundir`; returns the wall time in seconds."""
  config_file, _, overrides = METHODS[method]
  command = [sys.executable, "-m", "mmreid_jax.main",
             "--config", f"{REPO / 'configs' / config_file}:{preset}",
             "--workdir", str(rundir),
             f"--config.data.manual_dir={layout}", f"--config.data.data_dir={data_dir}",
             *overrides, *extra]
  print("$ " + " ".join(command), flush=True)
  start = time.time()
  subprocess.run(command, check=True, cwd=REPO)
  return time.time() - start


def _rate(entry: dict, key: str) -> str:
  std = entry.get("std", {}).get(key)
  return f"{100 * entry[key]:.1f}" + (f" ± {100 * std:.1f}" if std else "")


def _over_seeds(entries: list[dict], key: str) -> str:
  values = [100 * entry[key] for entry in entries]
  mean = sum(values) / len(values)
  std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
  return f"{mean:.1f} ± {std:.1f}"


def results_table(workdir: Path, methods: list[str], preset: str, synthetic: str,
                  seeds: int, images_per_step: int | None, tuples: dict[str, int],
                  seconds: dict[str, float]) -> str:
  """The markdown table of the methods' reports (and the raw-pixel baseline of the first)."""
  reports: dict[str, list[dict]] = {}
  for method in methods:
    reports[method] = []
    for seed in range(seeds):
      path = workdir / method / f"seed{seed}" / "eval" / "sysu_mm01.json"
      if not path.is_file():
        raise SystemExit(f"No report {path}: the {method} run of seed {seed} did not finish.")
      reports[method].append(json.loads(path.read_text()))
  header = ["method", "config", "steps", "K"] + [
      f"{p.split('/')[1]} {rate}" for p in PROTOCOLS for rate in ("Rank-1", "mAP", "mINP")]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * 6) + "|"]
  for method, runs in reports.items():
    config_file, description, overrides = METHODS[method]
    config = f"`configs/{config_file}:{preset}`" + "".join(f" `{o}`" for o in overrides)
    cells = [description, config, str(runs[0]["step"]), str(tuples.get(method, "preset"))]
    for protocol in PROTOCOLS:
      entries = [run["protocols"][protocol] for run in runs]
      for key in ("rank1", "mAP", "mINP"):
        cells.append(_rate(entries[0], key) if seeds == 1 else _over_seeds(entries, key))
    lines.append("| " + " | ".join(cells) + " |")
  raw = reports[methods[0]][0].get("baselines", {}).get("raw_pixel")
  if raw:
    cells = ["raw pixels (cosine)", "-", "-", "-"]
    for protocol in PROTOCOLS:
      cells += [_rate(raw[protocol], "rank1"), _rate(raw[protocol], "mAP"),
                _rate(raw[protocol], "mINP")]
    lines.append("| " + " | ".join(cells) + " |")
  timing = ", ".join(f"{m} {seconds[m] / 60:.0f} min" for m in methods if m in seconds)
  spread = ("mean ± standard deviation over the 10 gallery trials (single-shot)" if seeds == 1
            else f"mean ± standard deviation (ddof 0) over {seeds} seeds of each seed's "
                 "10-trial mean (single-shot)")
  budget = (f"K (tuples per identity, P = 8) set so that every method sees {images_per_step} "
            "images per step" if images_per_step else "each preset's own K")
  command = (f"python scripts/compare_baselines.py --preset {preset} --synthetic {synthetic} "
             f"--seeds {seeds} --methods {','.join(methods)}"
             + (f" --images-per-step {images_per_step}" if images_per_step else ""))
  notes = [f"`synthetic_mm/{synthetic}` in SYSU-MM01's layout through the `sysu_mm01` builder; "
           f"preset `{preset}` for every method, {budget}; percentages, {spread}.",
           f"Written by `{command}` on {time.strftime('%Y-%m-%d')}"
           + (f"; wall time of this invocation (training and evaluation, all seeds): {timing}."
              if timing else ".")]
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
  parser.add_argument("--seeds", type=int, default=1,
                      help="Runs per method, config.seed = 0 .. N-1 (default 1).")
  parser.add_argument("--images-per-step", type=int, default=None,
                      help="Set each method's tuples per identity so that it sees this many "
                           "images per step (default: each preset's own).")
  args = parser.parse_args(ours)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    parser.error(f"--methods: unknown {unknown}; expected a subset of {list(METHODS)}.")
  if args.seeds < 1:
    parser.error(f"--seeds {args.seeds}: expected at least 1.")
  tuples = ({m: tuples_per_identity(m, args.preset, args.images_per_step) for m in methods}
            if args.images_per_step else {})
  workdir = args.workdir.resolve()
  layout = workdir / "synthetic_sysu"
  export_layout(layout, args.synthetic)
  seconds: dict[str, float] = {}
  for method in methods:
    budget = ([f"--config.data.tuples_per_identity={tuples[method]}"] if method in tuples
              else [])
    for seed in range(args.seeds):
      seconds[method] = seconds.get(method, 0.0) + run_method(
          method, args.preset, workdir / method / f"seed{seed}", layout, workdir / "tfds",
          [f"--config.seed={seed}", *budget, *extra])
  write_results(args.results, results_table(workdir, methods, args.preset, args.synthetic,
                                            args.seeds, args.images_per_step, tuples, seconds))
  print(f"Wrote the table to {args.results}")
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.exit(main())
