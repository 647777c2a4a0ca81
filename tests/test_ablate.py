"""Tests for the ablations: the fusion strategies of the paper's Table 4 (`EarlyConcatFusion`,
`LateFusion`, the "concat" and "late" embeddings) against NumPy references, the studies of
scripts/ablate.py as configs, its tables, and one run of the script on the tiny preset (two
variants of the losses study, one seed, the preset's 6 steps each, so that the full model's
programs are those test_main.py, test_train.py and test_visualize.py compile) whose tables must
hold each variant's evaluation report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmreid_jax import config_lib, evaluate, train_step
from mmreid_jax.models.fusion import EarlyConcatFusion, LateFusion
from mmreid_jax.models.reid import EMBEDDINGS, MultimodalReID
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]
# With test_main.py and test_train.py: the script's runs compile the tiny preset's programs.
pytestmark = pytest.mark.xdist_group("training")
DIRECTIONS = ("rgb->ir", "rgb->depth", "ir->rgb", "ir->depth", "depth->rgb", "depth->ir")
RATES = ("rank1", "mAP", "mINP")


ablate = load_script("ablate")


def tiny_config() -> ml_collections.ConfigDict:
  return config_lib.load_config_file(ROOT / "configs" / "synthetic.py", "tiny")


# ------------------------------------------------------------------- fusion strategies


def randomized(variables: dict, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), variables)


def numpy_early(params: dict, features: np.ndarray, present: np.ndarray,
                modalities: tuple[int, ...], num_modalities: int) -> np.ndarray:
  """EarlyConcatFusion, one sample at a time."""
  kernel = np.asarray(params["early_projection"]["kernel"], np.float64)
  bias = np.asarray(params["early_projection"]["bias"], np.float64)
  batch, slots = present.shape
  out = np.zeros((batch, slots, kernel.shape[1]))
  for b in range(batch):
    parts = []
    for m in range(num_modalities):
      pooled = [features[b, s].mean(axis=(0, 1)) for s in range(slots)
                if present[b, s] and modalities[s] == m]
      parts.append(np.mean(pooled, axis=0) if pooled else np.zeros(features.shape[-1]))
    fused = np.concatenate(parts) @ kernel + bias
    for s in range(slots):
      if present[b, s]:
        out[b, s] = fused
  return out


def numpy_late(params: dict, features: np.ndarray, present: np.ndarray) -> np.ndarray:
  """LateFusion, one slot at a time."""
  kernel = np.asarray(params["late_projection"]["kernel"], np.float64)
  bias = np.asarray(params["late_projection"]["bias"], np.float64)
  batch, slots = present.shape
  out = np.zeros((batch, slots, kernel.shape[1]))
  for b in range(batch):
    for s in range(slots):
      if present[b, s]:
        out[b, s] = features[b, s].mean(axis=(0, 1)) @ kernel + bias
  return out


CASES = [((0, 1, 2), 3), ((2, 0, 1), 3), ((1,), 3), ((0, 1, 0), 2)]  # (slot modalities, M)


@pytest.mark.parametrize("modalities,num_modalities", CASES)
def test_early_concat_fusion_matches_numpy(modalities, num_modalities):
  rng = np.random.default_rng(0)
  slots = len(modalities)
  features = rng.normal(size=(5, slots, 4, 2, 6)).astype(np.float32)
  present = rng.random((5, slots)) < 0.7
  present[0] = True
  present[1] = False
  module = EarlyConcatFusion(num_modalities, embed_dim=7)
  variables = randomized(module.init(jax.random.key(0), features, present, modalities), 1)
  out = np.asarray(module.apply(variables, features, present, modalities))
  assert out.shape == (5, slots, 7) and out.dtype == np.float32
  expected = numpy_early(variables["params"], features.astype(np.float64), present, modalities,
                         num_modalities)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  assert np.all(out[1] == 0)
  if len(set(modalities)) == slots and slots > 1:  # one vector per sample, the slots share it
    both = present[0]
    np.testing.assert_array_equal(out[0, both], np.broadcast_to(out[0, 0], out[0, both].shape))


@pytest.mark.parametrize("modalities,num_modalities", CASES)
def test_late_fusion_matches_numpy(modalities, num_modalities):
  rng = np.random.default_rng(1)
  slots = len(modalities)
  features = rng.normal(size=(5, slots, 4, 2, 6)).astype(np.float32)
  present = rng.random((5, slots)) < 0.7
  module = LateFusion(embed_dim=7)
  variables = randomized(module.init(jax.random.key(0), features, present, modalities), 2)
  out = np.asarray(module.apply(variables, features, present, modalities))
  np.testing.assert_allclose(out, numpy_late(variables["params"], features.astype(np.float64),
                                             present), rtol=1e-5, atol=1e-5)
  # Each slot alone: another slot's content does not change it.
  changed = features.copy()
  changed[:, 1:] += 5.0
  if slots > 1:
    again = np.asarray(module.apply(variables, changed, present, modalities))
    np.testing.assert_allclose(again[:, 0], out[:, 0], rtol=1e-6, atol=1e-6)


def test_late_fusion_scores_of_captures_are_averaged():
  """Evaluation's capture embedding turns late fusion into score averaging: the cosine of two
  fused captures is the mean of their modalities' cosines."""
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(4, 3, 5)), rng.normal(size=(4, 3, 5))
  present = np.ones((4, 3), bool)
  fused_a, fused_b = (evaluate.fuse_modalities(x, present) for x in (a, b))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  per_modality = np.sum(unit(a) * unit(b), axis=-1)  # (4, 3)
  np.testing.assert_allclose(np.sum(fused_a * fused_b, axis=-1), per_modality.mean(axis=1),
                             rtol=1e-5)


@pytest.mark.parametrize("embedding,attention", [("concat", False), ("concat", True),
                                                 ("late", True)])
def test_reid_with_the_other_embeddings(embedding: str, attention: bool):
  """Shapes only (`jax.eval_shape`): nothing compiles."""
  model = MultimodalReID(num_classes=5, num_modalities=3, depth=18, width=8, embed_dim=16,
                         part_dim=4, attention_dim=8, attention=attention, embedding=embedding)
  images = jnp.zeros((2, 3, 32, 16, 3))
  present = jnp.ones((2, 3), bool)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, present, (0, 1, 2)))
  assert ("early_fusion" if embedding == "concat" else "late_fusion") in variables["params"]
  assert "fusion" not in variables["params"]
  assert ("attention" in variables["params"]) == attention
  out = jax.eval_shape(lambda v: model.apply(v, images, present, (0, 1, 2), train=True,
                                             rngs={"mask": jax.random.key(1)},
                                             mutable=["batch_stats"])[0], variables)
  assert model.embedding_dim == 16 == EMBEDDINGS[embedding].dim(model)
  assert out["embeddings"].shape == (2, 3, 16) and out["features"].shape == (2, 3, 16)
  assert ("modal_weights" in out) == attention
  assert "reconstruction" not in out


def test_an_unknown_embedding_lists_the_known_ones():
  model = MultimodalReID(num_classes=5, num_modalities=2, depth=18, width=8, embedding="gap")
  with pytest.raises(ValueError, match="concat.*fusion.*gem.*late"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2, 32, 16, 3)),
                                      jnp.ones((1, 2), bool), (0, 1)))


# -------------------------------------------------------------------------------- studies


def test_studies_are_config_overrides_of_one_model():
  base = tiny_config()
  for study, variants in ablate.STUDIES.items():
    for name, variant in variants.items():
      config = ablate.variant_config(base, variant, seed=3, pictures=False)
      assert config.seed == 3 and config.eval.pictures is False
      model, _ = train_step.build_model(config, num_classes=8, num_modalities=3)
      assert isinstance(model, MultimodalReID), (study, name)
      assert model.embedding in EMBEDDINGS
      if model.embedding != "fusion":  # no branch 3, nothing to reconstruct
        assert config.loss.reconstruction == 0.0, (study, name)
  assert base.seed == 0 and base.loss.center == tiny_config().loss.center  # base unchanged

  def weights(study: str, name: str) -> dict[str, float]:
    config = ablate.variant_config(base, ablate.STUDIES[study][name], 0, False)
    return {k: config.loss[k] for k in ("cross_entropy", "triplet", "center", "consistency",
                                        "reconstruction")}

  full = weights("losses", "full")
  assert all(value > 0 for value in full.values())
  assert weights("modules", "joint_loss") == full == weights("fusion", "dynamic")
  for name in ("baseline", "attention"):
    assert weights("modules", name) == {**full, "center": 0.0, "consistency": 0.0,
                                        "reconstruction": 0.0}
  assert weights("modules", "fusion") == {**full, "center": 0.0, "consistency": 0.0}
  for term in ("cross_entropy", "triplet", "center", "consistency"):
    assert weights("losses", f"no_{term}") == {**full, term: 0.0}
  models = {}
  for study, variants in ablate.STUDIES.items():
    for name, variant in variants.items():
      config = ablate.variant_config(base, variant, 0, False)
      models[(study, name)] = (config.model.attention, config.model.embedding)
  assert models[("modules", "baseline")] == (False, "concat")
  assert models[("modules", "attention")] == (True, "concat")
  assert models[("modules", "fusion")] == models[("modules", "joint_loss")] == (True, "fusion")
  assert models[("fusion", "early_concat")] == (True, "concat")
  assert models[("fusion", "late_fusion")] == (True, "late")


def test_command_line_and_overrides(tmp_path: Path):
  args, overrides = ablate.parse_args(["--config", "c.py", "--workdir", "w", "--study",
                                       "losses", "--variants", "no_center,full", "--",
                                       "--config.num_train_steps=2"])
  assert args.variants == ["full", "no_center"] and overrides == ["--config.num_train_steps=2"]
  with pytest.raises(SystemExit):
    ablate.parse_args(["--config", "c.py", "--workdir", "w", "--study", "losses", "--variants",
                       "no_dropout"])
  config_arg = f"{ROOT / 'configs' / 'synthetic.py'}:tiny"
  config = config_lib.load_config_with_overrides(
      config_arg, ["--config.num_train_steps=2", "--config.loss.triplet=0.25"])
  assert config.num_train_steps == 2 and config.loss.triplet == 0.25
  with pytest.raises(ValueError, match="tripplet"):
    config_lib.load_config_with_overrides(config_arg, ["--config.loss.tripplet=1"])
  with pytest.raises(ValueError, match="only --config.KEY=VALUE"):
    config_lib.load_config_with_overrides(config_arg, ["--steps=2"])


def fake_report(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {"dataset": "toy", "step": 4,
          "protocols": {p: {r: float(rng.random()) for r in RATES}
                        for p in ("ir->rgb", "rgb->ir", "all")}}


def test_summary_and_markdown():
  study = {"a": ablate.Variant("A", {"loss.center": 0.0}), "b": ablate.Variant("B", {}),
           "c": ablate.Variant("C", {})}
  runs = {"a": [{"seed": s, "workdir": f"w{s}", "report": fake_report(s)} for s in (0, 1)],
          "c": [{"seed": 0, "workdir": "x", "report": fake_report(5)}]}
  info = {"command": "cmd", "config": "cfg", "overrides": [], "seeds": [0, 1]}
  summary = ablate.summarize("toy", study, runs, None, info)
  assert summary["headline"] == "ir->rgb" and summary["directions"] == ["ir->rgb", "rgb->ir"]
  assert [row["variant"] for row in summary["rows"]] == ["a", "c"]  # b has no finished run
  row = summary["rows"][0]
  values = [fake_report(s)["protocols"]["ir->rgb"]["mAP"] for s in (0, 1)]
  assert row["protocols"]["ir->rgb"]["mAP"]["mean"] == pytest.approx(np.mean(values))
  assert row["protocols"]["ir->rgb"]["mAP"]["std"] == pytest.approx(np.std(values))
  means = [np.mean([fake_report(s)["protocols"][p]["rank1"] for p in ("ir->rgb", "rgb->ir")])
           for s in (0, 1)]
  assert row["mean_over_directions"]["rank1"]["values"] == pytest.approx(means)
  text = ablate.markdown(summary)
  assert f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}" in text
  assert "| C | 1 | 4 |" in text and "| B |" not in text


def test_scene_response_table_gives_mean_and_std_over_seeds():
  """condition_spreads and condition_markdown: the failing modality's share ratio and weight
  change per seed (scene_analysis.scene_response), as mean ± std (ddof 0)."""
  def report(rgb_night: float, weight_night: float) -> dict:
    return {"conditions": {c: {"fused/all": {r: 0.5 for r in RATES}} for c in ("clear", "night")},
            "modality_share_by_condition": {"clear": {"rgb": 0.4, "ir": 0.6},
                                            "night": {"rgb": rgb_night, "ir": 1 - rgb_night}},
            "modal_weights_by_condition": {"clear": {"rgb": 0.5, "ir": 0.5},
                                           "night": {"rgb": weight_night,
                                                     "ir": 1 - weight_night}}}
  spreads = ablate.condition_spreads([report(0.1, 0.7), report(0.3, 0.5)])
  night = spreads["scene_response"]["night"]
  assert night["modality"] == "rgb"
  assert night["share_ratio"]["values"] == pytest.approx([0.25, 0.75])
  assert night["weight_change"]["values"] == pytest.approx([0.2, 0.0])
  lines = ablate.condition_markdown({"rows": [{"label": "X", **spreads}]})
  assert lines[-1] == "| X | 0.50 ± 0.25, +0.10 ± 0.10 |"
  assert lines[-3] == "| variant | night (rgb) |"


# -------------------------------------------------------------------- the script, for real


def run_ablate(workdir: Path, data_dir: str, cache_dir: str, study: str = "losses",
               variants: str = "full,no_consistency") -> subprocess.CompletedProcess:
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_COMPILATION_CACHE_DIR": cache_dir,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"}
  command = [sys.executable, str(ROOT / "scripts" / "ablate.py"), "--config",
             "configs/synthetic.py:tiny", "--workdir", str(workdir), "--study", study,
             "--variants", variants, "--seeds", "1", "--",
             "--config.checkpoint_every_steps=6", f"--config.data.data_dir={data_dir}"]
  return subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=1200)


@pytest.fixture(scope="module")
def ablation(tfds_data_dir: str, jax_cache_dir: str, tmp_path_factory: pytest.TempPathFactory,
             compile_lock) -> SimpleNamespace:
  workdir = tmp_path_factory.mktemp("ablate")
  with compile_lock():  # the tiny preset's initialiser, as test_main.py's and test_train.py's
    result = run_ablate(workdir, tfds_data_dir, jax_cache_dir)
  assert result.returncode == 0, result.stderr[-5000:]
  return SimpleNamespace(workdir=workdir, result=result, data_dir=tfds_data_dir,
                         cache_dir=jax_cache_dir)


def test_ablate_writes_one_row_per_variant(ablation):
  summary = json.loads((ablation.workdir / "ablation_losses.json").read_text())
  text = (ablation.workdir / "ablation_losses.md").read_text()
  assert summary["study"] == "losses" and summary["headline"] == "ir->rgb"
  assert summary["directions"] == list(DIRECTIONS)
  assert [row["variant"] for row in summary["rows"]] == ["full", "no_consistency"]
  table = [line for line in text.splitlines() if line.startswith("| ")]
  for row in summary["rows"]:
    workdir = ablation.workdir / "losses" / row["variant"] / "seed0"
    assert row["seeds"] == [0] and row["workdirs"] == [str(workdir)]
    config = json.loads((workdir / "config.json").read_text())
    assert config["seed"] == 0 and config["checkpoint_every_steps"] == 6  # the override
    assert config["loss"]["consistency"] == (0.0 if row["variant"] == "no_consistency" else 0.1)
    assert not (workdir / "eval" / "index.html").exists()  # no pictures without --pictures
    report = json.loads((workdir / "eval" / "synthetic_mm.json").read_text())
    assert report["step"] == row["steps"] == 6
    for protocol, entry in report["protocols"].items():
      for rate in RATES:
        stats = row["protocols"][protocol][rate]
        assert stats["values"] == [entry[rate]] and stats["mean"] == entry[rate]
        assert stats["std"] == 0.0
    for rate in RATES:
      mean = np.mean([report["protocols"][d][rate] for d in DIRECTIONS])
      assert row["mean_over_directions"][rate]["mean"] == pytest.approx(mean, abs=1e-12)
    # The markdown row: label, seeds, steps, ir->rgb Rank-1 / mAP / mINP, the mean's three.
    line = next(line for line in table if line.startswith(f"| {row['label']} | 1 | 6 |"))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    expected = ([f"{100 * report['protocols']['ir->rgb'][r]:.1f}" for r in RATES]
                + [f"{100 * row['mean_over_directions'][r]['mean']:.1f}" for r in RATES])
    assert cells[3:9] == expected
  # Two tables over protocols, then one per capture protocol, rate and scene condition.
  main, _, per_condition = text.partition("fused/all mAP per scene condition of the query:")
  main_table = [line for line in main.splitlines() if line.startswith("| ")]
  assert sum(line.startswith("| Full model") for line in main_table) == 2  # both tables
  assert sum(line.startswith("| - modal consistency") for line in main_table) == 2
  for row in summary["rows"]:
    report = json.loads((ablation.workdir / "losses" / row["variant"] / "seed0" / "eval"
                         / "synthetic_mm.json").read_text())
    first = next(line for line in per_condition.splitlines()
                 if line.startswith(f"| {row['label']} |"))
    # The tiny set is all clear: one column, the run's fused/all mAP in its clear scenes.
    assert first == (f"| {row['label']} | "
                     f"{100 * report['conditions']['clear']['fused/all']['mAP']:.1f} |")
    assert row["conditions"]["clear"]["fused/all"]["mAP"]["values"] == [
        report["conditions"]["clear"]["fused/all"]["mAP"]]
    assert set(row["modality_share_by_condition"]["clear"]) == {"rgb", "ir", "depth"}


def test_tables_only_trains_nothing_and_leaves_unfinished_variants_out(ablation, tmp_path):
  workdir = tmp_path / "tables"
  shutil.copytree(ablation.workdir / "losses", workdir / "losses")
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  result = subprocess.run(
      [sys.executable, str(ROOT / "scripts" / "ablate.py"), "--config",
       "configs/synthetic.py:tiny", "--workdir", str(workdir), "--study", "losses", "--variants",
       "full,no_center", "--tables-only", "--", "--config.checkpoint_every_steps=6",
       f"--config.data.data_dir={ablation.data_dir}"],
      check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "[losses/no_center/seed0] not finished: left out (--tables-only)" in result.stdout
  assert not (workdir / "losses" / "no_center").exists()
  summary = json.loads((workdir / "ablation_losses.json").read_text())
  assert [row["variant"] for row in summary["rows"]] == ["full"]


def test_ablate_reuses_finished_runs(ablation):
  before = (ablation.workdir / "ablation_losses.json").read_text()
  result = run_ablate(ablation.workdir, ablation.data_dir, ablation.cache_dir)
  assert result.returncode == 0, result.stderr[-5000:]
  assert result.stdout.count("finished before: reusing") == 2
  assert "training in" not in result.stdout
  assert (ablation.workdir / "ablation_losses.json").read_text() == before


def test_ablate_reuses_the_same_run_of_another_study(ablation):
  # The fusion study's "dynamic" row is the losses study's "full" row: the same overrides.
  result = run_ablate(ablation.workdir, ablation.data_dir, ablation.cache_dir, study="fusion",
                      variants="dynamic")
  assert result.returncode == 0, result.stderr[-5000:]
  assert "training in" not in result.stdout
  full = ablation.workdir / "losses" / "full" / "seed0"
  assert f"reusing {full / 'eval' / 'synthetic_mm.json'}" in result.stdout
  fusion = json.loads((ablation.workdir / "ablation_fusion.json").read_text())
  losses = json.loads((ablation.workdir / "ablation_losses.json").read_text())
  assert [row["variant"] for row in fusion["rows"]] == ["dynamic"]
  assert fusion["rows"][0]["workdirs"] == [str(full)]
  assert fusion["rows"][0]["protocols"] == losses["rows"][0]["protocols"]
  assert not (ablation.workdir / "fusion").exists()
