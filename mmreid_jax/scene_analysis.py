"""What evaluation reports per scene condition: which modality a model relies on when one fails.

On a set whose captures record a scene condition (the synthetic set's `condition` feature,
`synthetic_render.CONDITIONS`), evaluation adds three entries to its report (DESIGN.md section 8
gives the rest of the format):

  "conditions": {condition: {protocol: {rank1, ..., mAP, mINP, ...}}}
      every protocol again with only the queries captured in that condition (the gallery is
      unchanged: a query taken at night searches the whole gallery);
  "modal_weights_by_condition": {condition: {modality: mean A_m(m)}}
      the cross-modal attention's modality weights, averaged over the test captures (query and
      gallery) of the condition that hold every modality;
  "modality_share_by_condition": {condition: {modality: share}}
      how much of a capture's fused embedding each modality carries, measured by leaving it out:
      share_m = (1 - cos(f, f without m)), normalised to sum to one over the capture's
      modalities, averaged over the condition's test captures (`modality_shares`).

The attention's weights alone do not say what a modality contributes: in the paper's formula
F'_m = A_c,m F_m + A_m(m) sum_{n != m} F_n the weight A_m(m) scales how much of the *other*
modalities enters slot m (docs/design.md, "Scene conditions"); the share measures the
contribution whatever the mechanism, and applies to every fusion strategy alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmreid_jax.data.datasets import synthetic_render


def ordered_conditions(conditions: np.ndarray) -> list[str]:
  """The distinct conditions of `conditions` (N,), in `synthetic_render.CONDITIONS` order (other
  names after them, sorted)."""
  present = set(conditions.tolist())
  known = [c for c in synthetic_render.CONDITIONS if c in present]
  return known + sorted(present - set(known))


def condition_protocols(protocols: Sequence[Any], query_conditions: np.ndarray
                        ) -> dict[str, list[Any]]:
  """Each protocol restricted to the queries of each condition.

  Args:
    protocols: `evaluate.Protocol`s.
    query_conditions: (N,) the condition of each query-split row.

  Returns:
    {condition: the protocols with queries of that condition (gallery trials unchanged); a
    protocol without such queries is left out}.
  """
  by_condition = {}
  for condition in ordered_conditions(query_conditions):
    chosen = []
    for protocol in protocols:
      rows = protocol.query_rows[query_conditions[protocol.query_rows] == condition]
      if len(rows):
        chosen.append(dataclasses.replace(protocol, query_rows=rows))
    by_condition[condition] = chosen
  return by_condition


def modal_weights_by_condition(tables: Sequence[np.ndarray], weights: Sequence[np.ndarray],
                               conditions: Sequence[np.ndarray], modality_names: Sequence[str]
                               ) -> dict[str, dict[str, float]]:
  """The mean modality weight per condition and modality over captures holding every modality.

  Args:
    tables: per split, (T, M) rows of each capture's modalities, -1 where absent
      (`evaluate.capture_table`).
    weights: per split, (T, M) the attention's weights of those captures.
    conditions: per split, (N,) the condition of each row.
    modality_names: the M names.

  Returns:
    {condition: {modality: mean weight}}; a condition without complete captures is left out.
  """
  complete = [np.all(t >= 0, axis=1) for t in tables]
  capture_conditions = np.concatenate([c[t[:, 0]][k] for t, c, k in
                                       zip(tables, conditions, complete)])
  values = np.concatenate([w[k] for w, k in zip(weights, complete)]).astype(np.float64)
  report = {}
  for condition in ordered_conditions(capture_conditions):
    chosen = values[capture_conditions == condition]
    report[condition] = {name: float(chosen[:, m].mean())
                         for m, name in enumerate(modality_names)}
  return report


def modality_shares(fused: np.ndarray, without: np.ndarray, present: np.ndarray) -> np.ndarray:
  """Each modality's share of a capture's fused embedding, by leaving it out.

  Args:
    fused: (T, D) unit vectors, each capture embedded with its modalities.
    without: (T, M, D) unit vectors, the capture embedded without modality m.
    present: (T, M) bool, the capture's modalities.

  Returns:
    (T, M) shares: (1 - cos(f, f without m)) over present m, normalised to sum to one; zero for
    absent modalities; NaN for a capture whose embedding no single modality changes.
  """
  change = 1.0 - np.einsum("td,tmd->tm", fused.astype(np.float64), without.astype(np.float64))
  change = np.where(present, np.maximum(change, 0.0), 0.0)
  total = change.sum(axis=1, keepdims=True)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, change / np.where(total > 0, total, 1.0), np.nan)


def share_by_condition(shares: np.ndarray, capture_conditions: np.ndarray,
                       modality_names: Sequence[str]) -> dict[str, dict[str, float]]:
  """{condition: {modality: mean share}} over the captures of each condition ((T, M) shares,
  (T,) conditions); captures with NaN shares are left out."""
  report = {}
  for condition in ordered_conditions(capture_conditions):
    chosen = shares[capture_conditions == condition]
    chosen = chosen[np.all(np.isfinite(chosen), axis=1)]
    if len(chosen):
      report[condition] = {name: float(chosen[:, m].mean())
                           for m, name in enumerate(modality_names)}
  return report


def scene_response(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """How a model's reliance moves where one sensor fails, against clear scenes: for each
  condition that degrades a modality m (`synthetic_render.DEGRADED_MODALITY`), {"modality": m,
  "share_ratio": share of m in the condition / share of m in clear scenes, "weight_change":
  A_m(m) in the condition - A_m(m) in clear scenes (models with the modal attention)}.

  Issue 16's goals read these: a working weighting halves the failing modality's share
  (share_ratio <= 0.5), and moves RGB's weight at night by at least 0.1. Empty without the
  report's per-condition entries or clear scenes.
  """
  shares = report.get("modality_share_by_condition", {})
  weights = report.get("modal_weights_by_condition", {})
  if "clear" not in shares:
    return {}
  response = {}
  for condition, modality in synthetic_render.DEGRADED_MODALITY.items():
    if modality is None or condition not in shares or modality not in shares[condition]:
      continue
    entry: dict[str, Any] = {"modality": modality, "share_ratio": (
        shares[condition][modality] / max(shares["clear"][modality], 1e-12))}
    if condition in weights and "clear" in weights:
      entry["weight_change"] = weights[condition][modality] - weights["clear"][modality]
    response[condition] = entry
  return response


def format_table(entries: Mapping[str, Mapping[str, Any]], protocols: Sequence[str]) -> str:
  """A report's "conditions" entry as a fixed-width text table: Rank-1 / mAP (percentages) of
  `protocols` (columns) per condition of the query (rows)."""
  conditions = list(entries)
  width = max([10] + [len(c) + 2 for c in conditions])
  column = max([13] + [len(p) + 2 for p in protocols])
  lines = ["per scene condition of the query, Rank-1 / mAP",
           f"{'condition':<{width}}" + "".join(f"{p:>{column}}" for p in protocols)]
  for condition in conditions:
    cells = []
    for protocol in protocols:
      entry = entries[condition].get(protocol)
      cells.append(f"{'-':>{column}}" if entry is None else
                   f"{f'{100 * entry['rank1']:.1f} / {100 * entry['mAP']:.1f}':>{column}}")
    lines.append(f"{condition:<{width}}" + "".join(cells))
  return "\n".join(lines)


def format_reliance(report: Mapping[str, Any]) -> str:
  """The report's "modal_weights_by_condition" and "modality_share_by_condition" as one text
  table (condition rows; weight and share of each modality); empty without either entry."""
  weights = report.get("modal_weights_by_condition", {})
  shares = report.get("modality_share_by_condition", {})
  if not weights and not shares:
    return ""
  names = list(next(iter((weights or shares).values())))
  conditions = list(dict.fromkeys(list(weights) + list(shares)))
  width = max([10] + [len(c) + 2 for c in conditions])
  header = "".join(f"{'weight ' + n:>14}" for n in names if weights)
  header += "".join(f"{'share ' + n:>14}" for n in names if shares)
  lines = ["attention weight A_m(m) and share of the fused embedding, per scene condition",
           f"{'condition':<{width}}{header}"]
  for condition in conditions:
    cells = ""
    if weights:
      cells += "".join(f"{weights[condition][n]:14.3f}" if condition in weights else
                       f"{'-':>14}" for n in names)
    if shares:
      cells += "".join(f"{shares[condition][n]:14.3f}" if condition in shares else
                       f"{'-':>14}" for n in names)
    lines.append(f"{condition:<{width}}{cells}")
  return "\n".join(lines)
