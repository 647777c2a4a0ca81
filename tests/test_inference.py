"""Pretrained weights in (`config.model.pretrained`), trained models out (`Embedder`, the
SavedModel export, scripts/embed.py), on the `tiny` preset.

One workdir serves the module: the tiny preset (ResNet-18 of width 8) started from seeded
torchvision-layout weights of that width (non-trivial BatchNorm statistics), checkpointed at
step 0 without training (`train(max_steps=0)`), so the only compilation of the initialiser is
the one test_train.py shares through the persistent cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import tensorflow as tf
from safetensors.numpy import save_file

import torch_reference
from mmreid_jax import config_lib, convert, evaluate, export, train
from mmreid_jax.data import datasets
from mmreid_jax.data.augment import resize
from mmreid_jax.inference import Embedder
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]
MODALITIES = ("rgb", "ir", "depth")
# One worker runs the module (its fixtures build the workdir and compile the forward passes).
pytestmark = [pytest.mark.usefixtures("persistent_compilation_cache"),
              pytest.mark.xdist_group("inference")]


def tiny_config(data_dir: str, pretrained: str | None = None):
  config = config_lib.load_config_file(ROOT / "configs" / "synthetic.py", "tiny")
  config.data.data_dir = data_dir
  config.model.pretrained = pretrained
  return config


def write_weights(path: Path, seed: int, width: int = 8) -> Path:
  """A seeded torchvision-layout ResNet-18 state dict as .safetensors."""
  tensors = torch_reference.random_state_dict(18, seed=seed, width=width)
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
  return path


def assert_trees_equal(a, b) -> None:
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


@pytest.fixture(scope="module")
def run(tfds_data_dir: str, tmp_path_factory: pytest.TempPathFactory, compile_lock
        ) -> SimpleNamespace:
  """A tiny-preset workdir started from pretrained weights, with its step-0 checkpoint."""
  root = tmp_path_factory.mktemp("inference")
  weights = write_weights(root / "resnet18_w8.safetensors", seed=1)
  config = tiny_config(tfds_data_dir, str(weights))
  workdir = root / "run"
  with compile_lock():  # test_train.py compiles the same initialiser
    state = jax.device_get(train.Trainer(config, str(workdir)).train(max_steps=0))
  return SimpleNamespace(workdir=workdir, weights=weights, config=config, state=state,
                         data_dir=tfds_data_dir, root=root)


@pytest.fixture(scope="module")
def embedder(run: SimpleNamespace) -> Embedder:
  return Embedder.from_workdir(str(run.workdir))


@pytest.fixture(scope="module")
def query(run: SimpleNamespace) -> SimpleNamespace:
  """The tiny query split and its images decoded at their stored size (32 x 16)."""
  split = datasets.load_split(datasets.get_builder("synthetic_mm/tiny", run.data_dir), "query")
  images = np.stack([tf.io.decode_image(x, channels=3).numpy() for x in split.images])
  return SimpleNamespace(split=split, images=images)


# ---------------------------------------------------------------- pretrained weights in


def test_pretrained_backbone_starts_a_run(run: SimpleNamespace, tmp_path: Path):
  """Every stem and the shared stages hold the file's weights and statistics; the rest is the
  ordinary initialisation; the step-0 checkpoint holds them."""
  resnet = convert.torchvision_resnet_variables(run.weights, 18, width=8)
  for collection in ("params", "batch_stats"):
    tree = getattr(run.state, collection)
    for part in ("stem_0", "stem_1", "stem_2", "shared"):
      assert tree[part]
      for module, subtree in tree[part].items():
        assert_trees_equal(subtree, resnet[collection][module])
  plain = jax.device_get(train.Trainer(tiny_config(run.data_dir), str(tmp_path)).initial_state())
  for name, subtree in run.state.params.items():
    if name.startswith("stem_") or name == "shared":
      for mine, initial in zip(jax.tree.leaves(subtree), jax.tree.leaves(plain.params[name])):
        assert not np.allclose(mine, initial)
    else:
      assert_trees_equal(subtree, plain.params[name])
  assert_trees_equal(run.state.disc_params, plain.disc_params)
  assert sorted(int(p.name) for p in (run.workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == [0]


def test_resumed_run_keeps_its_own_weights(run: SimpleNamespace, tmp_path: Path):
  """Resuming with other pretrained weights configured restores the checkpoint instead."""
  copy = tmp_path / "run"
  shutil.copytree(run.workdir, copy)
  other = write_weights(tmp_path / "other.safetensors", seed=2)
  trainer = train.Trainer(tiny_config(run.data_dir, str(other)), str(copy))
  state = jax.device_get(trainer.train(max_steps=0))
  assert_trees_equal(state.params, run.state.params)
  assert_trees_equal(state.batch_stats, run.state.batch_stats)
  other_kernel = convert.torchvision_resnet_variables(other, 18, 8)["params"]["conv1"]["kernel"]
  assert not np.allclose(state.params["stem_0"]["conv1"]["kernel"], other_kernel)


def test_pretrained_weights_that_do_not_fit_are_refused(run: SimpleNamespace, tmp_path: Path):
  """A file of another width, or no file: the error names config.model.pretrained and the
  problem, before anything is initialised."""
  wide = write_weights(tmp_path / "wide.safetensors", seed=3, width=16)
  trainer = train.Trainer(tiny_config(run.data_dir, str(wide)), str(tmp_path / "a"))
  with pytest.raises(ValueError, match=r"config\.model\.pretrained='.*wide\.safetensors'.*"
                     r"conv1\.weight \(16, 3, 7, 7\) \(expected \(8, 3, 7, 7\)\)"):
    trainer.initial_state()
  trainer = train.Trainer(tiny_config(run.data_dir, str(tmp_path / "none.safetensors")),
                          str(tmp_path / "b"))
  with pytest.raises(FileNotFoundError, match=r"config\.model\.pretrained=.*none\.safetensors"):
    trainer.initial_state()


# ---------------------------------------------------------------- the Embedder


def test_from_workdir_restores_the_checkpoint_and_config(run: SimpleNamespace,
                                                         embedder: Embedder, tmp_path: Path):
  assert embedder.step == 0
  assert embedder.modality_names == MODALITIES
  assert (embedder.height, embedder.width) == (32, 16)
  assert embedder.flip is True and embedder.batch_size == run.config.eval.batch_size
  assert embedder.embedding_dim == 2 * 16 + 6 * 4
  assert_trees_equal(embedder.variables["params"], run.state.params)
  assert_trees_equal(embedder.variables["batch_stats"], run.state.batch_stats)
  with pytest.raises(FileNotFoundError, match=r"step 5.*saved steps: \[0\]"):
    Embedder.from_workdir(str(run.workdir), step=5)
  with pytest.raises(FileNotFoundError, match="config.json"):
    Embedder.from_workdir(str(tmp_path))


def test_embeddings_are_the_evaluation_embeddings(embedder: Embedder, query: SimpleNamespace):
  """Per modality, the Embedder gives `evaluate.FeatureExtractor`'s flip-averaged unit
  embeddings, at the training size and (resizing as evaluation does) at another."""
  split = query.split
  # Batches of 8, as the Embedder pads 8 rows: the compiled forward passes are shared.
  extractor = evaluate.FeatureExtractor(embedder.model, embedder.variables, 8)
  expected = extractor(split, 32, 16, flip=True)
  for m, name in enumerate(MODALITIES):
    rows = split.modalities == m
    got = embedder(query.images[rows], name)
    assert got.shape == (rows.sum(), embedder.embedding_dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected[rows], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
  # Evaluation at 24 x 12 resizes the stored 32 x 16 images; so does the Embedder.
  smaller = Embedder(embedder.model, embedder.variables, embedder.modality_names, 24, 12)
  rows = split.modalities == 1
  expected = extractor(split.subset(rows), 24, 12, flip=True)
  np.testing.assert_allclose(smaller(query.images[rows], "ir"), expected, rtol=1e-5, atol=1e-5)
  assert not np.allclose(smaller(query.images[rows], "ir"), embedder(query.images[rows], "ir"),
                         atol=1e-3)


def test_any_size_dtype_channels_and_batch(run: SimpleNamespace, embedder: Embedder):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, 50, 30, 3)).astype(np.uint8)
  reference = embedder(images, "ir")
  assert reference.shape == (8, embedder.embedding_dim)
  np.testing.assert_allclose(np.linalg.norm(reference, axis=1), 1.0, atol=1e-5)
  # Resized as evaluation resizes: the same as passing the resized uint8 images.
  np.testing.assert_array_equal(embedder(resize(images, 32, 16).numpy(), "ir"),
                                reference)
  np.testing.assert_allclose(embedder(images.astype(np.float32), "ir"), reference, atol=1e-6)
  grey = images[..., :1]
  np.testing.assert_allclose(embedder(grey, "ir"), embedder(np.repeat(grey, 3, axis=-1), "ir"),
                             atol=1e-6)
  # Padding a short batch, or splitting a long one, changes no row.
  np.testing.assert_allclose(embedder(images[:5], "ir"), reference[:5], atol=1e-6)
  small_batches = Embedder.from_workdir(str(run.workdir), batch_size=4)
  np.testing.assert_allclose(small_batches(images, "ir"), reference, atol=1e-6)
  assert embedder(images[:0], "ir").shape == (0, embedder.embedding_dim)


def test_bad_inputs_are_refused(embedder: Embedder):
  images = np.zeros((2, 32, 16, 3), np.uint8)
  with pytest.raises(ValueError, match=r"Unknown modality 'thermal'.*\['rgb', 'ir', 'depth'\]"):
    embedder(images, "thermal")
  with pytest.raises(ValueError, match=r"4 channels.*expected 3, or 1"):
    embedder(np.zeros((2, 32, 16, 4), np.uint8), "rgb")
  with pytest.raises(ValueError, match=r"shape \(32, 16, 3\); expected \(B, H, W, C\)"):
    embedder(images[0], "rgb")
  with pytest.raises(ValueError, match="dtype int32"):
    embedder(images.astype(np.int32), "rgb")
  with pytest.raises(ValueError, match="Which modality"):
    embedder(images)
  with pytest.raises(ValueError, match="leave modality out"):
    embedder({"rgb": images}, "rgb")
  with pytest.raises(ValueError, match=r"batch sizes \{'rgb': 2, 'ir': 3\}"):
    embedder({"rgb": images, "ir": np.zeros((3, 32, 16, 3), np.uint8)})
  with pytest.raises(ValueError, match="Unknown modality 'nir'"):
    embedder({"rgb": images, "nir": images})


def test_multimodal_call_is_the_evaluation_capture_embedding(embedder: Embedder,
                                                             query: SimpleNamespace):
  """{modality: images} of aligned captures: one forward pass with those modalities present,
  fused as evaluation fuses captures (all modalities, and a subset)."""
  split = query.split
  table, _ = evaluate.capture_table(split)
  extractor = evaluate.FeatureExtractor(embedder.model, embedder.variables, 8)
  expected = extractor.captures(split, [(0, 1, 2), (0, 1)], 32, 16, flip=True)
  first_rows = table[:, 0]  # each capture's rgb row (every row of a capture has its embedding)
  captures = {name: query.images[table[:, m]] for m, name in enumerate(MODALITIES)}
  got = embedder(captures)
  assert got.shape == (len(table), 3 * embedder.embedding_dim)
  np.testing.assert_allclose(got, expected[(0, 1, 2)][first_rows], rtol=1e-5, atol=1e-5)
  pair = embedder({"ir": captures["ir"], "rgb": captures["rgb"]})
  np.testing.assert_allclose(pair, expected[(0, 1)][first_rows], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(pair, axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------- the SavedModel and the script


def test_saved_model_equals_the_embedder(run: SimpleNamespace, embedder: Embedder,
                                         tmp_path: Path, capsys: pytest.CaptureFixture):
  """`python -m mmreid_jax.export` (its main, in-process): one signature per modality, any
  batch size and image size, the Embedder's embeddings within 1e-5."""
  output = tmp_path / "saved_model"
  export.main(["--workdir", str(run.workdir), "--output", str(output)])
  assert "signatures ['rgb', 'ir', 'depth']" in capsys.readouterr().out
  assert (output / "saved_model.pb").is_file()
  loaded = tf.saved_model.load(str(output))
  assert set(loaded.signatures) == set(MODALITIES)
  rng = np.random.default_rng(1)
  # Every signature was traced with a symbolic batch: three batch sizes and image sizes.
  cases = [("ir", (5, 40, 20)), ("rgb", (7, 64, 30)), ("depth", (8, 20, 9))]
  for name, shape in cases:
    images = rng.integers(0, 256, shape + (3,)).astype(np.float32)
    served = loaded.signatures[name](images=tf.constant(images))["embeddings"].numpy()
    assert served.shape == (shape[0], embedder.embedding_dim)
    np.testing.assert_allclose(served, embedder(images, name), rtol=1e-5, atol=1e-5)


def test_embed_script_writes_embeddings_and_index(run: SimpleNamespace, embedder: Embedder,
                                                  query: SimpleNamespace, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture):
  split = query.split
  rows = np.flatnonzero(split.modalities == 1)
  folder = tmp_path / "images"
  names = []
  for i, row in enumerate(rows):  # nested folders, listed in sorted order
    name = f"cam{i % 2}/{i:03d}.png"
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(split.images[row])
    names.append(name)
  (folder / "notes.txt").write_text("not an image")
  script = load_script("embed")
  output = tmp_path / "out" / "ir"
  script.main(["--workdir", str(run.workdir), "--images", str(folder), "--modality", "ir",
               "--output", str(output)])
  captured = capsys.readouterr()
  assert "embedding ir" in captured.err and "img" in captured.err  # the progress bar
  embeddings = np.load(f"{output}.npy")
  index = json.loads(Path(f"{output}.json").read_text())
  order = np.argsort(names)
  assert index["images"] == sorted(names)
  assert index["modality"] == "ir" and index["step"] == 0
  assert index["embedding_dim"] == embeddings.shape[1] == embedder.embedding_dim
  np.testing.assert_allclose(embeddings, embedder(query.images[rows][order], "ir"), atol=1e-6)
  with pytest.raises(ValueError, match="Unknown modality 'thermal'"):
    script.main(["--workdir", str(run.workdir), "--images", str(folder), "--modality",
                 "thermal", "--output", str(output)])
  truncated = folder / "cam0" / "broken.png"
  truncated.write_bytes(split.images[rows[0]][:40])
  with pytest.raises(ValueError, match=r"broken\.png: not an image that can be read"):
    script.main(["--workdir", str(run.workdir), "--images", str(folder), "--modality", "ir",
                 "--output", str(output)])
