r"""The paper's ablations as config overrides: trains and evaluates every variant of a study over
seeds and writes one table.

  python scripts/ablate.py --config configs/synthetic.py --workdir runs/ablate --study modules
  python scripts/ablate.py --config configs/synthetic.py --workdir runs/ablate --study fusion \
      --seeds 3
  python scripts/ablate.py --config configs/synthetic.py:tiny --workdir /tmp/ablate \
      --study losses --variants full,no_center -- --config.num_train_steps=2   # a smoke test

Studies (`STUDIES`; every variant is a set of config keys on top of `--config` and the overrides
after `--`, the same model code throughout):
  modules  the paper's Table 3: the baseline (ResNet with early concatenation of the modalities'
           pooled maps, no attention, no fusion, cross-entropy + triplet), + cross-modal
           attention, + the three-branch fusion (with its reconstruction loss), + the joint loss
           (center alignment and modal consistency: the full model);
  fusion   the paper's Table 4, the full model with its fusion replaced: early concatenation
           (`model.embedding="concat"`), late fusion (`"late"`, each modality embedded on its own,
           scores averaged), the paper's dynamic correlation fusion (`"fusion"`);
  losses   the full model, and the full model without each of its four losses in turn
           (cross-entropy, triplet, center alignment, modal consistency: the discriminator still
           trains, its verdict no longer reaches the network).
  conditions
           scene-adaptive weighting, on a config with scene conditions (configs/synthetic.py:
           conditions): the paper's model, the same without the modal attention (channel
           attention only), the reliability-weighted attention (`model.modal_weighting`), early
           concatenation and late fusion (both without attention); the tables add, per scene
           condition of the query, each capture protocol's mAP and Rank-1 ("fused/..."), the
           attention's modality weights and each modality's share of the fused embedding.

Each run trains in WORKDIR/<study>/<variant>/seed<k> (`config.seed = k`, seeds `--seed`,
`--seed + 1`, ...) through `mmreid_jax.run.train_and_evaluate`, in this process: a rerun resumes
an unfinished run from its newest checkpoint and reuses a finished one's report
(WORKDIR/.../eval/<dataset>.json) without training again, as it reuses the finished run of
another study's variant with the same overrides (the full model is a row of all three).
Evaluation pictures (`config.eval.pictures`) are off unless `--pictures`. `--tables-only` trains
nothing and rewrites the tables from the runs finished so far (while other runs go on).
After every run the script rewrites WORKDIR/ablation_<study>.md and .json: one row per variant
with Rank-1, mAP and mINP of the headline protocol (`--protocol`, default ir->rgb where it
exists) and their mean over every protocol but "all" (the directions), as mean and standard
deviation (ddof 0, as `scripts/aggregate_trials.py`) over the finished seeds, and a second table
with every protocol's Rank-1 and mAP. The JSON holds every protocol's values per seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from mmreid_jax import config_lib  # noqa: E402

RATES = ("rank1", "mAP", "mINP")
RATE_NAMES = {"rank1": "Rank-1", "mAP": "mAP", "mINP": "mINP"}


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of a study.

  Attributes:
    label: the row's name in the table.
    overrides: {dotted config key: value} set on top of the base config (keys the config lacks
      are added: `model.attention` and `model.embedding` are `MultimodalReID`'s switches).
  """

  label: str
  overrides: Mapping[str, Any]


# The paper's model: the cross-modal attention and the three-branch fusion (MultimodalReID's
# defaults, set explicitly so that every row of a study names its model).
_PAPER_MODEL = {"model.attention": True, "model.embedding": "fusion"}
# Cross-entropy and triplet only: the rows of Table 3 before the joint loss.
_CE_TRIPLET = {"loss.center": 0.0, "loss.consistency": 0.0}

STUDIES: dict[str, dict[str, Variant]] = {
    "modules": {
        "baseline": Variant("Baseline (ResNet + concatenation)", {
            "model.attention": False, "model.embedding": "concat", **_CE_TRIPLET,
            "loss.reconstruction": 0.0}),
        "attention": Variant("+ cross-modal attention", {
            "model.attention": True, "model.embedding": "concat", **_CE_TRIPLET,
            "loss.reconstruction": 0.0}),
        # The fusion's branch 3 trains its recovery network with the reconstruction loss.
        "fusion": Variant("+ multimodal fusion", {**_PAPER_MODEL, **_CE_TRIPLET}),
        "joint_loss": Variant("+ joint loss (full model)", dict(_PAPER_MODEL)),
    },
    "fusion": {
        "early_concat": Variant("Early concatenation", {
            "model.attention": True, "model.embedding": "concat", "loss.reconstruction": 0.0}),
        "late_fusion": Variant("Late fusion (score averaging)", {
            "model.attention": True, "model.embedding": "late", "loss.reconstruction": 0.0}),
        "dynamic": Variant("Dynamic correlation fusion (the paper's)", dict(_PAPER_MODEL)),
    },
    "losses": {
        "full": Variant("Full model (four losses)", dict(_PAPER_MODEL)),
        "no_cross_entropy": Variant("- modal cosine cross-entropy", {
            **_PAPER_MODEL, "loss.cross_entropy": 0.0}),
        "no_triplet": Variant("- cross-modal triplet", {**_PAPER_MODEL, "loss.triplet": 0.0}),
        "no_center": Variant("- center alignment", {**_PAPER_MODEL, "loss.center": 0.0}),
        "no_consistency": Variant("- modal consistency (adversarial)", {
            **_PAPER_MODEL, "loss.consistency": 0.0}),
    },
    # Scene-adaptive weighting (configs/synthetic.py:conditions): the paper's model against
    # fusion without any scene-dependent weighting.
    "conditions": {
        "paper": Variant("The paper's model (modal attention, dynamic fusion)", {
            **_PAPER_MODEL, "model.modal_attention": True}),
        "no_modal_attention": Variant("The paper's model without the modal attention", {
            **_PAPER_MODEL, "model.modal_attention": False}),
        "reliability": Variant("Reliability-weighted attention (each modality's own confidence)",
                               {**_PAPER_MODEL, "model.modal_attention": True,
                                "model.modal_weighting": "reliability"}),
        "early_concat": Variant("Early concatenation", {
            "model.attention": False, "model.embedding": "concat",
            "loss.reconstruction": 0.0}),
        "late_fusion": Variant("Late fusion (score averaging)", {
            "model.attention": False, "model.embedding": "late", "loss.reconstruction": 0.0}),
    },
}


def set_key(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  """config[a][b]... = value for `dotted` "a.b...", adding the last key if the config lacks it."""
  *parents, leaf = dotted.split(".")
  node = config
  for part in parents:
    node = node[part]
  with node.unlocked():
    node[leaf] = value


def variant_config(base: ml_collections.ConfigDict, variant: Variant, seed: int,
                   pictures: bool) -> ml_collections.ConfigDict:
  """A copy of `base` with the variant's overrides, `seed` and `eval.pictures`."""
  config = base.copy_and_resolve_references()
  for key, value in variant.overrides.items():
    set_key(config, key, value)
  set_key(config, "seed", seed)
  set_key(config, "eval.pictures", pictures)
  return config


def dataset_name(config: ml_collections.ConfigDict) -> str:
  """The name of a run's report, WORKDIR/eval/<dataset>.json."""
  return config.data.name.partition("/")[0]


def finished_report(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
  """The run's report if it evaluated the last step, else None."""
  path = os.path.join(workdir, "eval", dataset_name(config) + ".json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    report = json.load(f)
  return report if report.get("step") == config.num_train_steps else None


def same_runs(study: str, name: str, seed: int, root: str) -> list[str]:
  """The workdirs under `root` of the other studies' variants with the same overrides as
  `study`/`name` (the same run: the full model is a row of every study), for `seed`."""
  overrides = dict(STUDIES[study][name].overrides)
  return [os.path.join(root, other_study, other_name, f"seed{seed}")
          for other_study, variants in STUDIES.items()
          for other_name, variant in variants.items()
          if (other_study, other_name) != (study, name) and dict(variant.overrides) == overrides]


def directions(protocols: Sequence[str]) -> list[str]:
  """The protocols the "mean over directions" averages: all but "all" (and ".../all") and the
  synthetic set's capture protocols ("fused/...")."""
  return [name for name in protocols if name != "all" and not name.endswith("/all")
          and not name.startswith("fused/")]


def spread(values: Sequence[float]) -> dict[str, Any]:
  """Mean, standard deviation (ddof 0), min, max and the values over seeds."""
  array = np.asarray(values, np.float64)
  return {"mean": float(array.mean()), "std": float(array.std()), "min": float(array.min()),
          "max": float(array.max()), "values": [float(v) for v in array]}


def summarize(study: str, variants: Mapping[str, Variant],
              runs: Mapping[str, Sequence[dict[str, Any]]], headline: str | None,
              info: Mapping[str, Any]) -> dict[str, Any]:
  """The study's JSON: every variant with finished runs, its values per seed and their spread.

  Args:
    study: the study's name.
    variants: the study's variants (their order is the table's).
    runs: {variant: [{"seed", "workdir", "report"}, ...]} of the finished runs.
    headline: the protocol of the main table (None: ir->rgb where it exists, else the first
      direction).
    info: what to record about the invocation (command, config, overrides, seeds).
  """
  rows = []
  protocols: list[str] = []
  for name, variant in variants.items():
    finished = runs.get(name, [])
    if not finished:
      continue
    names = list(finished[0]["report"]["protocols"])
    protocols = protocols or names
    per_protocol = {
        protocol: {rate: spread([r["report"]["protocols"][protocol][rate] for r in finished])
                   for rate in RATES}
        for protocol in names}
    mean_over = {rate: spread([np.mean([r["report"]["protocols"][p][rate]
                                        for p in directions(names)]) for r in finished])
                 for rate in RATES}
    rows.append({
        "variant": name, "label": variant.label, "overrides": dict(variant.overrides),
        "seeds": [r["seed"] for r in finished], "steps": finished[0]["report"]["step"],
        "workdirs": [r["workdir"] for r in finished],
        "runs": [{"seed": r["seed"], "workdir": r["workdir"], "step": r["report"]["step"],
                  "protocols": {p: {rate: r["report"]["protocols"][p][rate] for rate in RATES}
                                for p in names}} for r in finished],
        "protocols": per_protocol, "mean_over_directions": mean_over,
        **condition_spreads([r["report"] for r in finished]),
    })
  if headline is None:
    headline = "ir->rgb" if "ir->rgb" in protocols else (directions(protocols) or protocols
                                                          or [None])[0]
  return {"study": study, **info, "headline": headline, "directions": directions(protocols),
          "rows": rows}


def condition_spreads(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The spread over seeds of the per-scene-condition entries of the reports (configs with
  scene conditions, `mmreid_jax.scene_analysis`): "conditions" {condition: {protocol: {rate:
  spread}}} for the capture protocols ("fused/..."), and "modal_weights_by_condition" and
  "modality_share_by_condition" {condition: {modality: spread}}; {} without conditions."""
  if not all("conditions" in report for report in reports):
    return {}
  first = reports[0]
  spreads: dict[str, Any] = {"conditions": {
      condition: {protocol: {rate: spread([r["conditions"][condition][protocol][rate]
                                           for r in reports]) for rate in RATES}
                  for protocol in entries if protocol.startswith("fused/")}
      for condition, entries in first["conditions"].items()}}
  for key in ("modal_weights_by_condition", "modality_share_by_condition"):
    if all(key in report for report in reports):
      spreads[key] = {condition: {modality: spread([r[key][condition][modality] for r in reports])
                                  for modality in values}
                      for condition, values in first[key].items()}
  from mmreid_jax import scene_analysis  # pylint: disable=import-outside-toplevel

  responses = [scene_analysis.scene_response(report) for report in reports]
  if responses[0]:
    spreads["scene_response"] = {
        condition: {"modality": entry["modality"],
                    **{name: spread([r[condition][name] for r in responses])
                       for name in ("share_ratio", "weight_change") if name in entry}}
        for condition, entry in responses[0].items()}
  return spreads


def condition_markdown(summary: Mapping[str, Any]) -> list[str]:
  """Per-condition tables of a study whose runs report scene conditions: mAP and Rank-1 of each
  capture protocol per condition of the query, then the attention's weights and the modalities'
  shares of the fused embedding."""
  rows = [row for row in summary["rows"] if "conditions" in row]
  if not rows:
    return []
  conditions = list(rows[0]["conditions"])
  protocols = list(rows[0]["conditions"][conditions[0]])
  lines = []
  for protocol in protocols:
    for rate in ("mAP", "rank1"):
      lines += ["", f"{protocol} {RATE_NAMES[rate]} per scene condition of the query:", "",
                "| variant | " + " | ".join(conditions) + " |",
                "|" + "|".join(["---"] + ["---:"] * len(conditions)) + "|"]
      for row in rows:
        cells = [_cell(row["conditions"][c][protocol][rate]) if protocol in row["conditions"][c]
                 else "-" for c in conditions]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
  for key, what in (("modal_weights_by_condition", "attention weight A_m(m)"),
                    ("modality_share_by_condition", "share of the fused embedding")):
    chosen = [row for row in rows if key in row]
    if not chosen:
      continue
    modalities = list(next(iter(chosen[0][key].values())))
    lines += ["", f"Each modality's {what} per scene condition ({', '.join(modalities)}):", "",
              "| variant | " + " | ".join(conditions) + " |",
              "|" + "|".join(["---"] + ["---:"] * len(conditions)) + "|"]
    for row in chosen:
      cells = [" / ".join(f"{row[key][c][m]['mean']:.2f}" for m in modalities)
               if c in row[key] else "-" for c in conditions]
      lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
  chosen = [row for row in rows if "scene_response" in row]
  if chosen:
    degraded = list(chosen[0]["scene_response"])
    lines += ["", "The failing modality's share of the fused embedding against clear scenes "
              "(ratio; a working weighting gives <= 0.5) and its attention weight A_m(m) minus "
              "clear scenes' (mean ± std over seeds):", "",
              "| variant | " + " | ".join(
                  f"{c} ({chosen[0]['scene_response'][c]['modality']})" for c in degraded) + " |",
              "|" + "|".join(["---"] + ["---:"] * len(degraded)) + "|"]
    for row in chosen:
      cells = []
      for condition in degraded:
        entry = row["scene_response"][condition]
        cell = _ratio(entry["share_ratio"])
        if "weight_change" in entry:
          cell += f", {entry['weight_change']['mean']:+.2f} ± {entry['weight_change']['std']:.2f}"
        cells.append(cell)
      lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
  return lines


def _ratio(stats: Mapping[str, Any]) -> str:
  text = f"{stats['mean']:.2f}"
  if len(stats["values"]) > 1:
    text += f" ± {stats['std']:.2f}"
  return text


def _cell(stats: Mapping[str, Any]) -> str:
  text = f"{100 * stats['mean']:.1f}"
  if len(stats["values"]) > 1:
    text += f" ± {100 * stats['std']:.1f}"
  return text


def markdown(summary: Mapping[str, Any]) -> str:
  """The study as markdown: the main table (headline protocol and the mean over directions) and
  every protocol's Rank-1 / mAP."""
  headline = summary["headline"]
  lines = [f"# Ablation: {summary['study']}", "",
           f"`{summary['command']}`", "",
           f"Config `{summary['config']}`"
           + (f" with `{' '.join(summary['overrides'])}`" if summary["overrides"] else "")
           + f"; seeds {summary['seeds']}. Percentages, mean ± standard deviation over the "
           "finished seeds (ddof 0; one seed: its value). \"mean\" averages the protocols "
           f"{', '.join(summary['directions'])}.", ""]
  header = (["variant", "seeds", "steps"]
            + [f"{headline} {RATE_NAMES[r]}" for r in RATES]
            + [f"mean {RATE_NAMES[r]}" for r in RATES] + ["overrides"])
  lines += ["| " + " | ".join(header) + " |",
            "|" + "|".join(["---", "---:", "---:"] + ["---:"] * 6 + ["---"]) + "|"]
  for row in summary["rows"]:
    overrides = ", ".join(f"`{k}={v}`" for k, v in row["overrides"].items()) or "-"
    cells = [row["label"], str(len(row["seeds"])), str(row["steps"])]
    entry = row["protocols"].get(headline)
    cells += [_cell(entry[r]) if entry else "-" for r in RATES]
    cells += [_cell(row["mean_over_directions"][r]) for r in RATES]
    cells.append(overrides)
    lines.append("| " + " | ".join(cells) + " |")
  protocols = list(summary["rows"][0]["protocols"]) if summary["rows"] else []
  if protocols:
    lines += ["", "Rank-1 / mAP of every protocol:", "",
              "| variant | " + " | ".join(protocols) + " |",
              "|" + "|".join(["---"] + ["---:"] * len(protocols)) + "|"]
    for row in summary["rows"]:
      cells = [f"{_cell(row['protocols'][p]['rank1'])} / {_cell(row['protocols'][p]['mAP'])}"
               for p in protocols]
      lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
  lines += condition_markdown(summary)
  return "\n".join(lines) + "\n"


def write_outputs(workdir: str, summary: Mapping[str, Any]) -> tuple[str, str]:
  """Writes WORKDIR/ablation_<study>.md and .json (atomically); returns their paths."""
  stem = os.path.join(workdir, f"ablation_{summary['study']}")
  paths = []
  for suffix, text in ((".json", json.dumps(summary, indent=2) + "\n"),
                       (".md", markdown(summary))):
    with open(stem + suffix + ".tmp", "w") as f:
      f.write(text)
    os.replace(stem + suffix + ".tmp", stem + suffix)
    paths.append(stem + suffix)
  return paths[1], paths[0]


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """The script's options and the `--config.KEY=VALUE` overrides after `--`."""
  argv = list(argv)
  overrides: list[str] = []
  if "--" in argv:
    index = argv.index("--")
    argv, overrides = argv[:index], argv[index + 1:]
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="Config file (configs/NAME.py[:preset]).")
  parser.add_argument("--workdir", required=True, help="Folder of the runs and the tables.")
  parser.add_argument("--study", required=True, choices=sorted(STUDIES))
  parser.add_argument("--seeds", type=int, default=1, help="Seeds per variant (default 1).")
  parser.add_argument("--seed", type=int, default=0, help="The first seed (default 0).")
  parser.add_argument("--variants", default=None,
                      help="Comma-separated variants of the study to run (default: all).")
  parser.add_argument("--protocol", default=None,
                      help="The main table's protocol (default: ir->rgb where it exists).")
  parser.add_argument("--pictures", action="store_true",
                      help="Write each run's evaluation pictures (config.eval.pictures).")
  parser.add_argument("--tables-only", action="store_true",
                      help="Train nothing: rewrite the tables from the runs finished so far.")
  args = parser.parse_args(argv)
  if args.seeds < 1:
    parser.error(f"--seeds={args.seeds}; expected at least 1.")
  study = STUDIES[args.study]
  if args.variants:
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in study]
    if unknown or not chosen:
      parser.error(f"--variants={args.variants!r}: {args.study} has the variants "
                   f"{', '.join(study)}.")
    args.variants = [v for v in study if v in chosen]  # the study's order
  else:
    args.variants = list(study)
  return args, overrides


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args, overrides = parse_args(argv)
  try:
    base = config_lib.load_config_with_overrides(args.config, overrides)
  except ValueError as error:
    raise SystemExit(f"error: {error}") from error

  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  tf.config.set_visible_devices([], "GPU")  # TensorFlow only feeds data; JAX owns accelerators.
  from mmreid_jax import faults, run  # pylint: disable=import-outside-toplevel

  study = STUDIES[args.study]
  variants = {name: study[name] for name in args.variants}
  seeds = list(range(args.seed, args.seed + args.seeds))
  info = {"command": "python scripts/ablate.py " + shlex.join(argv), "config": args.config,
          "overrides": overrides, "seeds": seeds}
  os.makedirs(args.workdir, exist_ok=True)
  runs: dict[str, list[dict[str, Any]]] = {}
  paths: tuple[str, str] | None = None
  for name, variant in variants.items():
    for seed in seeds:
      config = variant_config(base, variant, seed, args.pictures)
      workdir = os.path.join(args.workdir, args.study, name, f"seed{seed}")
      report = finished_report(config, workdir)
      if report is None:
        for other in same_runs(args.study, name, seed, args.workdir):
          report = finished_report(config, other)
          if report is not None:
            workdir = other
            break
      if report is not None:
        print(f"[{args.study}/{name}/seed{seed}] finished before: reusing "
              f"{os.path.join(workdir, 'eval', dataset_name(config) + '.json')}", flush=True)
      elif args.tables_only:
        print(f"[{args.study}/{name}/seed{seed}] not finished: left out (--tables-only)",
              flush=True)
        continue
      else:
        print(f"[{args.study}/{name}/seed{seed}] training in {workdir} "
              f"({', '.join(f'{k}={v}' for k, v in variant.overrides.items()) or 'no overrides'})",
              flush=True)
        start = time.time()
        try:
          report = run.train_and_evaluate(config, workdir)
        except faults.RunError as error:
          print(f"error: {error}", file=sys.stderr)
          return 1
        if report is None:  # SIGTERM / SIGINT: a checkpoint was written
          print(f"Stopped during {workdir}; run the same command again to resume.", flush=True)
          return 0
        print(f"[{args.study}/{name}/seed{seed}] done in {time.time() - start:.0f} s",
              flush=True)
      runs.setdefault(name, []).append({"seed": seed, "workdir": workdir, "report": report})
      paths = write_outputs(args.workdir, summarize(args.study, variants, runs, args.protocol,
                                                    info))
  assert paths is not None
  with open(paths[0]) as f:
    print(f.read(), end="")
  print(f"Wrote {paths[0]} and {paths[1]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
